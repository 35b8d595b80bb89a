"""Training objectives: continuous-time denoising score matching and DDPM's L_simple.

DSM (Song et al. 2011.13456, eq. 7): with `t ~ U(eps, 1)`, `x_t = m(t) x_0 + s(t) z`,

  L = E_t lambda(t) E || score(x_t, t) + z / s(t) ||^2,

whose minimiser is the true score of the diffused data (Vincent 2011). Default
`lambda(t) = s(t)^2`, i.e. `|| s(t) score + z ||^2`; `likelihood_weighting=True`
uses `lambda(t) = g(t)^2`, which makes the loss an upper bound on the negative
log-likelihood (Song et al. 2101.09258). Sums over data dims, mean over batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxml.diffusion.sampling import check_score_output
from jaxml.diffusion.sde import SDE, DDPMSchedule, _bcast

Array = jax.Array


def _sum_dims(x):
  return jnp.sum(jnp.reshape(x, (x.shape[0], -1)), axis=-1)


def dsm_loss(rng: Array, sde: SDE, score_fn: Callable[[Array, Array], Array], x0: Array, *,
             likelihood_weighting: bool = False, eps: float = 1e-5, time_power: float = 1.0) -> Array:
  """Scalar DSM loss of `score_fn(x, t)` on a data batch `x0` `[B, ...]`.

  `time_power = p` draws `t = eps + (1 - eps) u^p`, `u ~ U(0, 1)`: `p = 1` is the
  paper's uniform `t`; `p > 1` spends more of the batch on small `t`, where
  sharp data (tiny mode widths) need the most precision. The density of `t`
  only reweights the per-`t` objectives, so the minimiser is still the true score.

  Args:
    rng: PRNG key (times and noise).
    sde: the forward SDE.
    score_fn: `score_fn(x_t [B, ...], t [B]) -> [B, ...]`; `t` is a vector with one
      time per sample. Its output must have `x0`'s shape and a floating dtype,
      checked when it is traced (at no cost under `jit`).
    x0: data batch `[B, ...]`.
    likelihood_weighting: weight by `g(t)^2` instead of `s(t)^2`.
    eps: smallest time.
    time_power: `p` above.

  Returns:
    The scalar loss (sum over data dims, mean over the batch).

  Raises:
    ValueError / TypeError naming `score_fn` and both shapes when its output is
    not shaped like `x0` (a `[B, 1]` output would otherwise broadcast silently).
  """
  t_rng, z_rng = jax.random.split(rng)
  batch = x0.shape[0]
  u = jax.random.uniform(t_rng, (batch,))
  t = eps + (1.0 - eps) * u**time_power
  z = jax.random.normal(z_rng, x0.shape, x0.dtype)
  mean, std = sde.marginal_prob(x0, t)
  xt = mean + _bcast(std, x0) * z
  score = score_fn(xt, t)
  check_score_output(score, xt, narrower=False)  # shapes are static: checked at trace time
  if likelihood_weighting:
    _, g = sde.sde(xt, t)
    per = (g**2) * _sum_dims((score + z / _bcast(std, x0)) ** 2)
  else:
    per = _sum_dims((score * _bcast(std, x0) + z) ** 2)
  return jnp.mean(per)


def ddpm_eps_loss(rng: Array, schedule: DDPMSchedule, eps_fn: Callable[[Array, Array], Array], x0: Array) -> Array:
  """DDPM `L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2` (mean over elements).

  Args:
    rng: PRNG key (steps and noise).
    schedule: the DDPM noise schedule.
    eps_fn: `eps_fn(x_t [B, ...], t [B] int32) -> [B, ...]`, the noise predictor;
      `t` is drawn uniformly from `1..T`, one step per sample. Its output must have
      `x0`'s shape and a floating dtype (checked at trace time).
    x0: data batch `[B, ...]`.

  Returns:
    The scalar loss.

  Raises:
    ValueError / TypeError naming `eps_fn` and both shapes when its output is not
    shaped like `x0`.
  """
  t_rng, z_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 1, schedule.num_timesteps + 1)
  noise = jax.random.normal(z_rng, x0.shape, x0.dtype)
  xt = schedule.q_sample(x0, t, noise)
  eps = eps_fn(xt, t)
  check_score_output(eps, xt, name="eps_fn", narrower=False)
  return jnp.mean((eps - noise) ** 2)

