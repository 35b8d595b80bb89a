"""Samplers for score-based models, each one compiled program (`lax.fori_loop`s) under `jax.jit`.

Time runs backwards on the grid `t_0 = 1 > t_1 > ... > t_n = eps`
(`n = num_steps`, `eps = 1e-3` as in the paper's sampling); step `i` moves from
`t_i` to `t_{i+1}` with `dt = t_i - t_{i+1}`. Methods (Song et al. 2011.13456):

- `euler_maruyama`: `x <- x - [f - g^2 s] dt + g sqrt(dt) z` (reverse SDE).
- `reverse_diffusion`: the predictor that reverses the SDE's own discretisation,
  `x <- x - [f_d - G_d^2 s] + G_d z` (ancestral-like; eq. 46-47).
- `pc`: Langevin corrector then reverse-diffusion predictor at every step
  (Algorithm 2/3). Corrector step `e = 2 alpha (snr ||z|| / ||s||)^2`,
  `x <- x + e s + sqrt(2 e) z`; `||.||` is the per-sample norm averaged over
  the batch (as in the reference implementation: per-sample ratios are
  heavy-tailed in low dimension, where `||s||` can be near 0 at a mode).
- `ode`: probability-flow ODE `dx/dt = f - g^2 s / 2`, integrated with fixed-step
  classical RK4 (4 score evaluations per step; no adaptive step control).

Last-step denoising (`denoise=True`): the SDE samplers return the noise-free mean
of their final step; the ODE sampler applies Tweedie's formula at `eps`,
`x_0 = (x + s(eps)^2 score) / m(eps)`.

Noise: step `i` splits the carried key into the next key and its own key, and
draws its Gaussian noise from that key (`sampler_parts(...).step`). The compiled
`sample` makes the same draws but takes them off the per-step path: per chunk of
steps (`noise_chunk_steps`, at most `NOISE_CHUNK_BYTES` of noise) it splits the
key chain, draws all the chunk's noise in one vectorised call, then loops over
the updates. The draws are bitwise the per-step ones; results agree with stepping
`step` from Python to float rounding. Per-step cost is then the score network's
plus a few fused element-wise ops (`benchmarks/diffusion_bench.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxml.diffusion.sde import SDE, _bcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

METHODS = ("euler_maruyama", "reverse_diffusion", "pc", "ode")


class SamplerState(NamedTuple):
  x: Array  # current sample [B, ...]
  x_mean: Array  # noise-free mean of the last update [B, ...]
  rng: Array


class SamplerParts(NamedTuple):
  """A sampler split into pure pieces: `init(rng)`, `step(i, state)`, `finish(state)`."""

  init: Callable[[Array], SamplerState]
  step: Callable[[Array, SamplerState], SamplerState]
  finish: Callable[[SamplerState], Array]
  num_steps: int


def _per_sample_norm(x: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=-1))


def check_score_output(out, x, *, name: str = "score_fn", narrower: bool = True) -> None:
  """Checks the (abstract) output `out` of `name(x, t)` against the data `x` it was called on.

  Args:
    out: what the function returned (an array or a `jax.ShapeDtypeStruct`).
    x: the data it was called on (array or `jax.ShapeDtypeStruct`), `[B, *data_dims]`.
    name: the argument name the errors use.
    narrower: also require a dtype that promotes to `x.dtype` (float16/bfloat16/float32
      for float32 `x`): the samplers carry `x` in its own dtype through `lax` loops.

  Raises:
    TypeError when `out` is not one floating array (or is wider than `x` with
    `narrower`); ValueError when its shape is not `x.shape` (a `[B, 1]` output would
    otherwise be broadcast against `[B, D]` data without an error).
  """
  if not (hasattr(out, "shape") and hasattr(out, "dtype")):
    raise TypeError(f"{name}(x, t) must return one array shaped like x {tuple(x.shape)}, got "
                    f"{type(out).__name__}")
  if tuple(out.shape) != tuple(x.shape):
    raise ValueError(f"{name}(x, t) must return x's shape {tuple(x.shape)} (x: [B, *data_dims], t: [B]), got "
                     f"shape {tuple(out.shape)}; a broadcastable output such as [B, 1] would be broadcast silently")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"{name}(x, t) must return a floating array, got dtype {out.dtype}")
  if narrower and jnp.promote_types(out.dtype, x.dtype) != x.dtype:
    raise TypeError(f"{name}(x, t) returns dtype {out.dtype}, wider than x's {x.dtype}; cast the output to "
                    f"{x.dtype}")


def check_score_fn(score_fn: ScoreFn, x_shape: tuple[int, ...], *, x_dtype=jnp.float32, t_dtype=jnp.float32,
                   name: str = "score_fn", narrower: bool = True) -> None:
  """Checks `score_fn(x [B, *D], t [B]) -> [B, *D]` by `jax.eval_shape`: traced once, nothing run or compiled.

  Args:
    score_fn: the function to check.
    x_shape: `(B, *data_dims)` of the data it will get.
    x_dtype: dtype of that data.
    t_dtype: dtype of the `[B]` time vector.
    name: the argument name the errors use.
    narrower: see `check_score_output`.

  Raises:
    TypeError / ValueError naming `name` and both shapes (see `check_score_output`).
  """
  x = jax.ShapeDtypeStruct(tuple(x_shape), x_dtype)
  out = jax.eval_shape(score_fn, x, jax.ShapeDtypeStruct((x_shape[0],), t_dtype))
  check_score_output(out, x, name=name, narrower=narrower)


def check_sampler_args(sde, score_fn, shape, method, num_steps, snr, eps, n_corrector=1):
  """Validates sampler arguments; raises `ValueError`/`TypeError` naming the argument."""
  if not isinstance(sde, SDE):
    raise TypeError(f"sde must be a jaxml.diffusion SDE (VPSDE, subVPSDE, VESDE), got {type(sde).__name__}")
  if not callable(score_fn):
    raise TypeError(f"score_fn must be callable score_fn(x, t), got {type(score_fn).__name__}")
  if method not in METHODS:
    raise ValueError(f"unknown sampler method {method!r}; expected one of {METHODS}")
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  shape = tuple(shape)
  if len(shape) < 2 or any((not isinstance(s, int)) or s <= 0 for s in shape):
    raise ValueError(f"shape must be (batch, *data_dims) with positive ints and rank >= 2, got {shape}")
  if not (snr > 0):
    raise ValueError(f"snr must be positive, got {snr}")
  if not (0.0 < eps < 1.0):
    raise ValueError(f"eps (final time) must lie in (0, 1), got {eps}")
  if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
    raise ValueError(f"n_corrector must be a non-negative int, got {n_corrector!r}")
  return shape


class _Pieces(NamedTuple):
  """`SamplerParts` plus the split of `step` into `draw` (its noise) and `advance` (the update)."""

  parts: SamplerParts
  draw: Callable[[Array], tuple[Array, ...]]
  advance: Callable[[Array, Array, tuple[Array, ...]], tuple[Array, Array]]
  noisy: bool  # False for the ODE sampler, which draws no noise


def sampler_parts(sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], *, method: str = "euler_maruyama",
                  num_steps: int = 1000, snr: float = 0.16, denoise: bool = True, eps: float = 1e-3,
                  n_corrector: int = 1) -> SamplerParts:
  """Builds the pure pieces of a sampler (used by benchmarks and tests to step from Python).

  `step(i, state)` splits `state.rng` into the next key and this step's key, draws
  the step's noise from it and applies the update. `sample` runs the same update on
  the same noise (bitwise the same draws), drawing each chunk's noise in one call.

  Args:
    sde: the forward SDE.
    score_fn: `score_fn(x [B, *data_dims] float32, t [B] float32) -> [B, *data_dims]`;
      `t` holds one time per sample. Its output shape and dtype are checked with
      `jax.eval_shape` here, before anything runs.
    shape: `(B, *data_dims)`.
    method, num_steps, snr, denoise, eps, n_corrector: as in `sample`.

  Returns:
    `SamplerParts(init, step, finish, num_steps)`.

  Raises:
    ValueError / TypeError naming the argument (see `sample`).
  """
  return _pieces(sde, score_fn, shape, method=method, num_steps=num_steps, snr=snr, denoise=denoise, eps=eps,
                 n_corrector=n_corrector).parts


def _pieces(sde, score_fn, shape, *, method, num_steps, snr, denoise, eps, n_corrector) -> _Pieces:
  shape = check_sampler_args(sde, score_fn, shape, method, num_steps, snr, eps, n_corrector)
  check_score_fn(score_fn, shape)  # trace time: once per compilation of `sample`
  batch = shape[0]
  ts = jnp.linspace(1.0, eps, num_steps + 1, dtype=jnp.float32)

  def times(i):
    t, t_next = ts[i], ts[i + 1]
    return jnp.full((batch,), t), t - t_next

  def langevin(x, t_B, dt, z):
    grad = score_fn(x, t_B)
    ratio = snr * jnp.mean(_per_sample_norm(z)) / jnp.maximum(jnp.mean(_per_sample_norm(grad)), 1e-12)
    step = 2.0 * sde.langevin_alpha(t_B, dt) * ratio**2
    x_mean = x + _bcast(step, x) * grad
    return x_mean + _bcast(jnp.sqrt(2.0 * step), x) * z, x_mean

  def reverse_diffusion(x, t_B, dt, z):
    rev_f, G = sde.reverse_discretize(x, t_B, dt, score_fn(x, t_B))
    x_mean = x - rev_f
    return x_mean + _bcast(G, x) * z, x_mean

  def euler_maruyama(x, t_B, dt, z):
    drift = sde.reverse_drift(x, t_B, score_fn(x, t_B))
    _, g = sde.sde(x, t_B)
    x_mean = x - drift * dt
    return x_mean + _bcast(g * jnp.sqrt(dt), x) * z, x_mean

  def ode_rk4(x, t_B, dt):
    def v(y, t):
      return sde.reverse_drift(y, t, score_fn(y, t), probability_flow=True)

    h = -dt  # integrate from t down to t - dt
    k1 = v(x, t_B)
    k2 = v(x + 0.5 * h * k1, t_B + 0.5 * h)
    k3 = v(x + 0.5 * h * k2, t_B + 0.5 * h)
    k4 = v(x + h * k3, t_B + h)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

  def init(rng):
    rng, prior_rng = jax.random.split(rng)
    x = sde.prior_sample(prior_rng, shape).astype(jnp.float32)
    return SamplerState(x, x, rng)

  def draw(step_rng):
    """All the Gaussian noise one step uses, as a tuple drawn from that step's key."""
    if method == "ode":
      return ()
    if method == "pc":
      return tuple(jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(step_rng, n_corrector + 1))
    return (jax.random.normal(step_rng, shape, jnp.float32),)

  def advance(i, x, zs):
    """Step `i` from `x` given its noise `zs = draw(step_rng)`: returns `(x, x_mean)`."""
    t_B, dt = times(i)
    if method == "ode":
      x = ode_rk4(x, t_B, dt)
      return x, x
    if method == "euler_maruyama":
      return euler_maruyama(x, t_B, dt, zs[0])
    if method == "reverse_diffusion":
      return reverse_diffusion(x, t_B, dt, zs[0])
    for j in range(n_corrector):  # pc
      x, _ = langevin(x, t_B, dt, zs[j])
    return reverse_diffusion(x, t_B, dt, zs[-1])

  def step(i, state):
    if method == "ode":
      x, _ = advance(i, state.x, ())
      return SamplerState(x, x, state.rng)
    rng, step_rng = jax.random.split(state.rng)
    x, x_mean = advance(i, state.x, draw(step_rng))
    return SamplerState(x, x_mean, rng)

  def finish(state):
    if not denoise:
      return state.x
    if method == "ode":
      t_B = jnp.full((batch,), eps, jnp.float32)
      m, s = sde.marginal_coeffs(t_B)
      return (state.x + _bcast(s**2, state.x) * score_fn(state.x, t_B)) / _bcast(m, state.x)
    return state.x_mean

  return _Pieces(SamplerParts(init, step, finish, num_steps), draw, advance, method != "ode")


# Noise of at most this many bytes is drawn ahead of the steps that use it.
NOISE_CHUNK_BYTES = 1 << 22


def noise_chunk_steps(shape: tuple[int, ...], method: str, num_steps: int, n_corrector: int = 1) -> int:
  """Steps whose noise the compiled sampler draws in one call (`NOISE_CHUNK_BYTES` of float32 at most)."""
  per_step = 4 * math.prod(shape) * (n_corrector + 1 if method == "pc" else 1)
  return max(1, min(num_steps, NOISE_CHUNK_BYTES // per_step))


def run_steps(pieces: _Pieces, state: SamplerState, chunk: int) -> SamplerState:
  """All `num_steps` steps, as `lax.fori_loop` over `pieces.parts.step` would, but with the noise drawn per chunk.

  Per chunk of `chunk` steps: the key chain `rng -> (rng', step_rng)` is split
  exactly as `step` does (a `lax.scan` of splits), then one vectorised call draws
  every step's noise from those keys (threefry is elementwise, so the draws are
  bitwise the ones `step` makes), and a `fori_loop` applies `advance`. On CPU each
  `jax.random` call is a small rolled loop of its own, so drawing per step costs
  more than the draw itself; batching it takes it off the per-step path.
  """
  parts, num_steps = pieces.parts, pieces.parts.num_steps
  if not pieces.noisy:
    return jax.lax.fori_loop(0, num_steps, parts.step, state)

  def split(rng, _):
    rng, step_rng = jax.random.split(rng)
    return rng, step_rng

  def run_chunk(start, state, length):
    rng, keys = jax.lax.scan(split, state.rng, None, length=length)
    noise = jax.vmap(pieces.draw)(keys)

    def body(j, carry):
      return pieces.advance(start + j, carry[0], tuple(z[j] for z in noise))

    x, x_mean = jax.lax.fori_loop(0, length, body, (state.x, state.x_mean))
    return SamplerState(x, x_mean, rng)

  n_full, rest = divmod(num_steps, chunk)
  if n_full == 1:
    state = run_chunk(0, state, chunk)
  elif n_full > 1:
    state = jax.lax.fori_loop(0, n_full, lambda c, st: run_chunk(c * chunk, st, chunk), state)
  if rest:
    state = run_chunk(n_full * chunk, state, rest)
  return state


@functools.partial(jax.jit, static_argnames=("sde", "score_fn", "shape", "method", "num_steps", "snr", "denoise",
                                             "eps", "n_corrector"))
def _sample_compiled(rng, *, sde, score_fn, shape, method, num_steps, snr, denoise, eps, n_corrector):
  pieces = _pieces(sde, score_fn, shape, method=method, num_steps=num_steps, snr=snr, denoise=denoise, eps=eps,
                   n_corrector=n_corrector)
  state = run_steps(pieces, pieces.parts.init(rng), noise_chunk_steps(shape, method, num_steps, n_corrector))
  return pieces.parts.finish(state)


def sample(rng: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], *, method: str = "euler_maruyama",
           num_steps: int = 1000, snr: float = 0.16, denoise: bool = True, eps: float = 1e-3,
           n_corrector: int = 1) -> Array:
  """Draws `shape = (batch, *data_dims)` samples by reversing `sde` with `score_fn(x, t) -> score`.

  Compilation: the whole loop is one compiled program, cached per (`sde`,
  `score_fn`, shape, options). The first call compiles it (a few seconds; longer for
  a large network), later calls with the same `score_fn` object run at once. A new
  function object, e.g. a `lambda` or `functools.partial` written in the call,
  is a new cache key and recompiles on every call: build `score_fn` once and reuse
  it (for a trained network, `score_fn_from_net`).

  Args:
    rng: PRNG key.
    sde: the forward SDE (`VPSDE`, `subVPSDE`, `VESDE`).
    score_fn: `score_fn(x [B, *data_dims] float32, t [B] float32) -> [B, *data_dims]`,
      the score `grad_x log p_t(x)`; `t` is a vector with one time per sample, not a
      scalar. Its output shape and dtype (floating, at most float32) are checked with
      `jax.eval_shape` before compiling.
    shape: `(B, *data_dims)`, rank >= 2.
    method: one of `METHODS`.
    num_steps: steps from `t = 1` to `eps`.
    snr: Langevin corrector signal-to-noise ratio (`pc`).
    denoise: return the noise-free mean of the last step (Tweedie's formula for `ode`).
    eps: final time.
    n_corrector: Langevin steps per predictor step (`pc`).

  Returns:
    Samples `[*shape]` float32.

  Raises:
    ValueError / TypeError naming the argument: bad options, or a `score_fn` whose
    output is not one floating array of shape `shape` (e.g. `[B, 1]` for `[B, D]`
    data, which would otherwise broadcast without an error).
  """
  shape = check_sampler_args(sde, score_fn, shape, method, num_steps, snr, eps, n_corrector)
  return _sample_compiled(rng, sde=sde, score_fn=score_fn, shape=shape, method=method, num_steps=num_steps,
                          snr=float(snr), denoise=bool(denoise), eps=float(eps), n_corrector=n_corrector)
