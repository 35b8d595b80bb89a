"""Structural causal models as numpyro models, with interventions by `numpyro.handlers.do`.

Each model is a plain function of (n, parameters) that samples every variable in a
`numpyro.plate` and returns a dict of the variables *as used downstream*. Under
`handlers.do(model, data={"x": value})` the returned "x" is the intervened value
(numpyro keeps the sampled counterfactual in the trace), so

    simulate(model, seed, n=..., do={"x": 1.0})["y"].mean()

is a Monte Carlo estimate of E[Y | do(X = 1)]. `average_effect` uses common random
numbers (the same seed under both interventions), so its Monte Carlo error is small.

Graphs (U hidden):
  confounded_iv:     Z -> X -> Y,  U -> X,  U -> Y            effect of X on Y: beta
  frontdoor_linear:  X -> M_k -> Y, U -> X, U -> Y            effect: sum_k a_k b_k
  frontdoor_binary:  same graph, binary U, X, M, Y            effect: by `average_effect`
  backdoor_discrete: Z -> X, Z -> Y, X -> Y (Z observed, 3 levels)  effect: tau
  icp_environments:  X0 -> X1, X0 -> Y, X1 -> Y, Y -> X2; environments shift X0, X1, X2
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers


def simulate(model: Callable[..., dict], seed: int | jax.Array, *, do: dict[str, Any] | None = None,
             **kwargs) -> dict[str, np.ndarray]:
  """Draws one data set from `model(**kwargs)`, optionally under do-interventions.

  do: {site: value} (scalar values are broadcast over the plate).
  Returns numpy arrays keyed by variable name.
  """
  key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
  if do:
    n = kwargs.get("n")
    data = {k: (jnp.full((n,), v, dtype=jnp.float32) if np.ndim(v) == 0 and n is not None else jnp.asarray(v))
            for k, v in do.items()}
    model = handlers.do(model, data=data)
  out = handlers.seed(model, key)(**kwargs)
  return {k: np.asarray(v) for k, v in out.items()}


def average_effect(model: Callable[..., dict], seed: int, *, treatment: str, outcome: str,
                   treat: float = 1.0, control: float = 0.0, **kwargs) -> float:
  """E[outcome | do(treatment = treat)] - E[outcome | do(treatment = control)] by Monte Carlo."""
  hi = simulate(model, seed, do={treatment: treat}, **kwargs)[outcome]
  lo = simulate(model, seed, do={treatment: control}, **kwargs)[outcome]
  return float(np.mean(hi.astype(np.float64)) - np.mean(lo.astype(np.float64)))


def confounded_iv(n: int, beta: float = 1.0, strength: Sequence[float] = (0.8, 0.4),
                  confounding: float = 1.0, exog_effect: float = 0.5) -> dict:
  """Z [n, kz] instruments, W [n] observed control, U hidden: X = Z a + W + c U + v; Y = b X + g W + c U + e."""
  a = jnp.asarray(strength, dtype=jnp.float32)
  with numpyro.plate("rows", n):
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([a.shape[0]]).to_event(1))
    x = numpyro.sample("x", dist.Normal(z @ a + w + confounding * u, 1.0))
    y = numpyro.sample("y", dist.Normal(beta * x + exog_effect * w + confounding * u, 1.0))
  return {"u": u, "w": w, "z": z, "x": x, "y": y}


def frontdoor_linear(n: int, a: Sequence[float] = (0.8,), b: Sequence[float] = (1.5,),
                     confounding: float = 1.0) -> dict:
  """Linear-Gaussian frontdoor graph with mediators M [n, k]: effect of X on Y = sum_k a_k b_k."""
  a_k = jnp.asarray(a, dtype=jnp.float32)
  b_k = jnp.asarray(b, dtype=jnp.float32)
  with numpyro.plate("rows", n):
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    x = numpyro.sample("x", dist.Normal(confounding * u, 1.0))
    m = numpyro.sample("m", dist.Normal(x[:, None] * a_k, 1.0).to_event(1))
    y = numpyro.sample("y", dist.Normal(m @ b_k + 2.0 * confounding * u, 1.0))
  return {"u": u, "x": x, "m": m, "y": y}


def frontdoor_binary(n: int, confounding: float = 2.0) -> dict:
  """Binary frontdoor graph: U ~ Bern(.5), X | U, M | X, Y | M, U (logistic links)."""
  with numpyro.plate("rows", n):
    u = numpyro.sample("u", dist.Bernoulli(0.5))
    x = numpyro.sample("x", dist.Bernoulli(logits=-1.0 + confounding * u))
    m = numpyro.sample("m", dist.Bernoulli(logits=-1.0 + 2.5 * x))
    y = numpyro.sample("y", dist.Bernoulli(logits=-1.5 + 2.0 * m + confounding * u))
  return {"u": u, "x": x, "m": m, "y": y}


def backdoor_discrete(n: int, tau: float = 2.0) -> dict:
  """Observed confounder Z in {0, 1, 2}: X ~ Bern(sigmoid(1.5 (Z - 1))), Y = tau X + 1.5 Z + N(0, 1)."""
  with numpyro.plate("rows", n):
    z = numpyro.sample("z", dist.Categorical(probs=jnp.array([0.3, 0.4, 0.3])))
    x = numpyro.sample("x", dist.Bernoulli(logits=1.5 * (z - 1.0)))
    y = numpyro.sample("y", dist.Normal(tau * x + 1.5 * z, 1.0))
  return {"z": z, "x": x, "y": y}


def backdoor_continuous(n: int, tau: float = 1.0, modifier: float = 0.5) -> dict:
  """Continuous Z [n, 2]: X = Z c + v, Y = (tau + modifier Z_0) X + Z g + e; ATE = tau + modifier E[Z_0] = tau."""
  with numpyro.plate("rows", n):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    x = numpyro.sample("x", dist.Normal(z @ jnp.array([1.0, -0.5]), 1.0))
    y = numpyro.sample("y", dist.Normal((tau + modifier * z[:, 0]) * x + z @ jnp.array([2.0, 1.0]), 1.0))
  return {"z": z, "x": x, "y": y}


def icp_environments(n: int, env: jax.Array, shifts: jax.Array) -> dict:
  """Linear SEM over environments; env [n] int labels, shifts [n_envs, 3] mean shifts of X0, X1, X2.

  X0 = s0 + N(0,1); X1 = 0.6 X0 + s1 + N(0,1); Y = 1.0 X0 - 0.8 X1 + N(0,1); X2 = 0.9 Y + s2 + N(0,1).
  True parents of Y: {0, 1}. Environments intervene on X0, X1, X2 only (never on Y).
  """
  s = shifts[env]
  with numpyro.plate("rows", n):
    x0 = numpyro.sample("x0", dist.Normal(s[:, 0], 1.0))
    x1 = numpyro.sample("x1", dist.Normal(0.6 * x0 + s[:, 1], 1.0))
    y = numpyro.sample("y", dist.Normal(1.0 * x0 - 0.8 * x1, 1.0))
    x2 = numpyro.sample("x2", dist.Normal(0.9 * y + s[:, 2], 1.0))
  return {"x": jnp.stack([x0, x1, x2], axis=1), "y": y, "env": env}


def icp_data(seed: int, n_per_env: int = 200, shifts: Sequence[Sequence[float]] = ((0, 0, 0), (1.5, 0, 1.0),
                                                                                 (0, -1.5, -1.0))) -> dict:
  """Draws `icp_environments` with n_per_env rows in each environment."""
  shifts = jnp.asarray(shifts, dtype=jnp.float32)
  env = jnp.repeat(jnp.arange(shifts.shape[0]), n_per_env)
  return simulate(icp_environments, seed, n=int(env.shape[0]), env=env, shifts=shifts)
