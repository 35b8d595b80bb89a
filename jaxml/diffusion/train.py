"""A small, pure optax training loop: a jitted step scanned over `chunk` steps.

`loss_fn(params, rng, batch) -> scalar` and `sample_batch(rng) -> batch` are
pure JAX functions (the batch is drawn inside the compiled program, e.g. random
rows of a device array or fresh draws from a toy distribution), so one chunk of
steps is a single XLA program: the fast path on CPU. `make_trainer` exposes the
pure `init` / `run_chunk` pair (vmap them over seeds); `fit` drives it with a
NaN guard. For checkpoints, schedules and sharding use `jaxml.train`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml.diffusion.losses import ema_update

Array = jax.Array


class TrainState(NamedTuple):
  params: Any
  ema_params: Any
  opt_state: Any
  rng: Array
  step: Array


class Trainer(NamedTuple):
  init: Callable[[Array, Any], TrainState]
  run_chunk: Callable[[TrainState], tuple[TrainState, Array]]  # -> (state, losses [chunk])
  chunk: int


def make_trainer(loss_fn: Callable[[Any, Array, Any], Array], sample_batch: Callable[[Array], Any],
                 optimizer: optax.GradientTransformation, *, ema_decay: float = 0.999, chunk: int = 100) -> Trainer:
  """Pure `init(rng, params)` and `run_chunk(state)` (`chunk` steps under `lax.scan`)."""
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  if not (0.0 <= ema_decay < 1.0):
    raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")

  def init(rng, params):
    return TrainState(params, params, optimizer.init(params), rng, jnp.zeros((), jnp.int32))

  def one_step(state, _):
    rng, b_rng, l_rng = jax.random.split(state.rng, 3)
    batch = sample_batch(b_rng)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, l_rng, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Warm-up of the average (TF ExponentialMovingAverage with num_updates): early on the
    # average follows the parameters instead of remembering the initialisation.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = ema_update(state.ema_params, params, decay)
    return TrainState(params, ema, opt_state, rng, state.step + 1), loss

  def run_chunk(state):
    return jax.lax.scan(one_step, state, None, length=chunk)

  return Trainer(init, run_chunk, chunk)


def fit(rng: Array, loss_fn, params, sample_batch, *, num_steps: int, learning_rate: float = 1e-3,
        ema_decay: float = 0.999, chunk: int = 100, grad_clip: float | None = 1.0,
        log_every: int = 0, log: Callable[[str], None] = print) -> tuple[TrainState, np.ndarray]:
  """Trains for `num_steps` Adam steps; returns the final state and the loss per step.

  Steps run in compiled chunks of `chunk`; `num_steps` is rounded up to a
  multiple of `chunk` (the returned losses are cut to `num_steps`).

  Raises `FloatingPointError` when a chunk produces a non-finite loss (the
  state from before that chunk is attached as `err.last_good_state`).
  """
  if num_steps <= 0:
    raise ValueError(f"num_steps must be positive, got {num_steps}")
  chunk = min(chunk, num_steps)
  tx = optax.adam(learning_rate)
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  trainer = make_trainer(loss_fn, sample_batch, tx, ema_decay=ema_decay, chunk=chunk)
  run = jax.jit(trainer.run_chunk)
  state = trainer.init(rng, params)
  losses = []
  n_chunks = -(-num_steps // chunk)
  for c in range(n_chunks):
    new_state, chunk_losses = run(state)
    chunk_losses = np.asarray(chunk_losses)
    if not np.all(np.isfinite(chunk_losses)):
      err = FloatingPointError(f"non-finite loss in steps {c * chunk}..{(c + 1) * chunk}")
      err.last_good_state = state
      raise err
    state = new_state
    losses.append(chunk_losses)
    if log_every and ((c + 1) * chunk) % log_every < chunk:
      log(f"step {(c + 1) * chunk}: loss {chunk_losses.mean():.4f}")
  return state, np.concatenate(losses)[:max(num_steps, 0)]
