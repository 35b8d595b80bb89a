"""Log-likelihood through the probability-flow ODE, and bits/dim for images.

Instantaneous change of variables (Chen et al. 2018; Song et al. 2011.13456, eq. 39):
with `v(x, t) = f(x, t) - g(t)^2 score(x, t) / 2` and `dx/dt = v`,

  log p_0(x(0)) = log p_1(x(1)) + int_0^1 div_x v(x(t), t) dt,

integrated forwards from `t = eps` to 1 with fixed-step RK4 on the augmented state
`(x, int div v)`. The divergence is exact (`trace` of `jax.jacfwd`, one Jacobian
per sample: cheap in low dimension) or Hutchinson's estimate `E_z[z^T (dv/dx) z]`
with one Rademacher probe `z` held fixed along the path (one `jvp` per stage).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.diffusion.sampling import check_score_fn
from jaxml.diffusion.sde import SDE

Array = jax.Array


def check_data(x, name: str = "x", min_rank: int = 2) -> None:
  """Raises on wrong rank or non-finite concrete values."""
  if not hasattr(x, "shape") or len(x.shape) < min_rank:
    raise ValueError(f"{name} must be an array of rank >= {min_rank} ([batch, *data_dims]), got shape "
                     f"{getattr(x, 'shape', None)}")
  if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"{name} contains NaN or infinite values")


def _ode_parts(sde: SDE, score_fn):
  def v(x, t_B):
    return sde.reverse_drift(x, t_B, score_fn(x, t_B), probability_flow=True)

  return v


@functools.partial(jax.jit, static_argnames=("sde", "score_fn", "exact_trace", "num_steps", "eps"))
def _log_likelihood(rng, x, *, sde, score_fn, exact_trace, num_steps, eps):
  check_score_fn(score_fn, x.shape, x_dtype=x.dtype)  # trace time: once per compilation
  v = _ode_parts(sde, score_fn)
  batch = x.shape[0]
  probe = jax.random.rademacher(rng, x.shape, dtype=x.dtype)

  def div(y, t_B):
    if exact_trace:
      def v_one(y1, t1):  # one sample, data shape only
        return v(y1[None], t1[None])[0]

      jac = jax.vmap(jax.jacfwd(v_one))(y, t_B)  # [B, *D, *D]
      d = math.prod(y.shape[1:])
      jac = jnp.reshape(jac, (batch, d, d))
      return v(y, t_B), jnp.trace(jac, axis1=1, axis2=2)
    out, jvp = jax.jvp(lambda yy: v(yy, t_B), (y,), (probe,))
    return out, jnp.sum(jnp.reshape(jvp * probe, (batch, -1)), axis=-1)

  def rhs(y, t_B):
    return div(y, t_B)

  ts = jnp.linspace(eps, 1.0, num_steps + 1, dtype=jnp.float32)

  def step(i, carry):
    y, acc = carry
    t = jnp.full((batch,), ts[i])
    h = ts[i + 1] - ts[i]
    k1, d1 = rhs(y, t)
    k2, d2 = rhs(y + 0.5 * h * k1, t + 0.5 * h)
    k3, d3 = rhs(y + 0.5 * h * k2, t + 0.5 * h)
    k4, d4 = rhs(y + h * k3, t + h)
    y = y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    acc = acc + (h / 6.0) * (d1 + 2 * d2 + 2 * d3 + d4)
    return y, acc

  y1, integral = jax.lax.fori_loop(0, num_steps, step, (x, jnp.zeros((batch,), x.dtype)))
  return sde.prior_logp(y1) + integral


def log_likelihood(rng: Array, sde: SDE, score_fn: Callable[[Array, Array], Array], x: Array, *,
                   exact_trace: bool = True, num_steps: int = 200, eps: float = 1e-5) -> Array:
  """Log-density (nats) of each sample `x` `[B, *D]` under the probability-flow ODE model: `[B]`.

  Compiled once per (`sde`, `score_fn`, shape, options), like `sample`: reuse the
  same `score_fn` object to avoid recompiling.

  Args:
    rng: PRNG key (the Hutchinson probe).
    sde: the forward SDE.
    score_fn: `score_fn(x [B, *D] float32, t [B] float32) -> [B, *D]`; `t` is a
      vector with one time per sample. Its output shape and dtype are checked with
      `jax.eval_shape` before compiling.
    x: data `[B, *D]`, finite.
    exact_trace: `True` builds the full Jacobian (use in low dimension); `False`
      uses one Hutchinson probe drawn from `rng` (unbiased, noisy; average several
      calls for a tighter estimate).
    num_steps: RK4 steps from `eps` to 1.
    eps: start time.

  Returns:
    `[B]` log-densities in nats.

  Raises:
    ValueError / TypeError naming the argument: bad `x` or options, or a `score_fn`
    whose output is not one floating array shaped like `x`.
  """
  check_data(x)
  if not callable(score_fn):
    raise TypeError(f"score_fn must be callable score_fn(x, t), got {type(score_fn).__name__}")
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  if not (0.0 < eps < 1.0):
    raise ValueError(f"eps must lie in (0, 1), got {eps}")
  if not isinstance(sde, SDE):
    raise TypeError(f"sde must be a jaxml.diffusion SDE, got {type(sde).__name__}")
  return _log_likelihood(rng, jnp.asarray(x, jnp.float32), sde=sde, score_fn=score_fn, exact_trace=bool(exact_trace),
                         num_steps=num_steps, eps=float(eps))


def dequantize(rng: Array, x_int: Array, num_levels: int, low: float = -1.0, high: float = 1.0) -> tuple[Array, float]:
  """Uniform dequantisation `z = low + (x + u) (high - low) / K`, `u ~ U[0, 1)`.

  Returns `z` and the per-dimension log-Jacobian `log((high - low) / K)` of the
  map from `x + u` to `z`.
  """
  u = jax.random.uniform(rng, x_int.shape)
  z = low + (jnp.asarray(x_int, jnp.float32) + u) * (high - low) / num_levels
  return z, math.log((high - low) / num_levels)


def bits_per_dim(rng: Array, sde: SDE, score_fn, x_int: Array, *, num_levels: int = 256, low: float = -1.0,
                 high: float = 1.0, exact_trace: bool = False, num_steps: int = 100, eps: float = 1e-5) -> Array:
  """Bits/dim `[B]` of integer images `x_int` in `{0..K-1}` with uniform dequantisation.

  The model density on `z` (scaled to `[low, high]`) gives a density on
  `x + u in [0, K)^D` by change of variables, `log p(x + u) = log p(z) + D log((high - low) / K)`,
  and `E_u log p(x + u)` lower-bounds the discrete log-probability of `x`
  (Theis et al. 2016). Without dequantisation a continuous model can put
  unbounded density on the discrete grid and report negative bits/dim.

  Args:
    rng: PRNG key (dequantisation noise and the Hutchinson probe).
    sde: the forward SDE.
    score_fn: `score_fn(z [B, *D] float32, t [B] float32) -> [B, *D]` on the scaled
      data; checked as in `log_likelihood`.
    x_int: integer images `[B, *D]` in `{0..num_levels-1}`.
    num_levels: `K`, the number of grey levels.
    low, high: the interval `z` is scaled to.
    exact_trace, num_steps, eps: as in `log_likelihood`.

  Returns:
    `[B]` bits per dimension.

  Raises:
    ValueError / TypeError naming the argument (see `log_likelihood`), or values of
    `x_int` outside `[0, num_levels - 1]`.
  """
  check_data(x_int, "x_int")
  arr = np.asarray(x_int)
  if arr.min() < 0 or arr.max() > num_levels - 1:
    raise ValueError(f"x_int must hold integers in [0, {num_levels - 1}], got range [{arr.min()}, {arr.max()}]")
  dq_rng, ll_rng = jax.random.split(rng)
  z, log_jac = dequantize(dq_rng, x_int, num_levels, low, high)
  logp = log_likelihood(ll_rng, sde, score_fn, z, exact_trace=exact_trace, num_steps=num_steps, eps=eps)
  d = math.prod(z.shape[1:])
  return -(logp + d * log_jac) / (d * math.log(2.0))
