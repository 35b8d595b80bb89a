"""The pure train step `(state, batch) -> (state, metrics)`, and its compiled forms.

Every model family trains through this contract. The built step
(`make_train_step`) is one loss and one optimizer; a family whose update is
not (a GAN's two players, PPO's rollout-then-update) writes its own function
with the same signature, draws its randomness from `step_rng(state)`, and
hands it to `jaxml.train.train` like the built one.

One function serves both parallel styles:
  * `jax.jit` with explicit shardings over a Mesh (`jit_train_step`): the batch
    is a global array sharded over (data, fsdp); XLA inserts the collectives;
  * `jax.pmap` (`make_train_step(..., axis_name="batch")`): each device gets a
    batch shard and the step averages gradients and metrics with `pmean`.

Several steps per compiled call (`scan_steps`, or `steps_per_call=k`): the k
steps run under `lax.scan` inside one program; the batch carries a leading
`[k]` axis (slice i feeds step i; a batch of None is allowed for steps that
draw their data from the key) and every metric comes back with a leading
`[k]` axis. Small models (2-D diffusion, toy GANs) are dispatch-bound on CPU
without it.

EMA of the parameters, with decay `d` (and, with `ema_warmup`, the TF
`ExponentialMovingAverage(num_updates=t)` warm-up `d_t = min(d, (1 + t) / (10 + t))`):

    ema <- d_t * ema + (1 - d_t) * params_after_update
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxml.train.state import TrainState, step_rng

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


def ema_decay_at(decay: float, step: jax.Array, warmup: bool) -> jax.Array:
  """The EMA decay used after update number `step + 1` (module docstring).

  Args:
    decay: the configured decay in [0, 1).
    step: int scalar, updates applied before this one.
    warmup: use the `(1 + t) / (10 + t)` warm-up.

  Returns:
    A float32 scalar.
  """
  d = jnp.asarray(decay, jnp.float32)
  if warmup:
    t = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
  return d


def update_ema(state: TrainState, new_params: Any, decay: float | None, warmup: bool = False) -> Any:
  """The EMA field after an update to `new_params` (None when the state keeps none).

  Args:
    state: the state before the update (its `ema_params` and `step`).
    new_params: the parameters after the update.
    decay: the EMA decay; required when `state.ema_params` is not None.
    warmup: see `ema_decay_at`.

  Returns:
    The new `ema_params` tree, or None.
  """
  if state.ema_params is None:
    return None
  if decay is None:
    raise ValueError("the state keeps an EMA (ema_params is set) but no ema_decay was given to the step")
  d = ema_decay_at(decay, state.step, warmup)
  return optax.incremental_update(new_params, state.ema_params, 1.0 - d)


def scan_steps(step_fn: StepFn, steps_per_call: int) -> StepFn:
  """`steps_per_call` applications of `step_fn` under one `lax.scan`.

  Args:
    step_fn: `(state, batch) -> (state, metrics)`.
    steps_per_call: k >= 1; k == 1 returns `step_fn` itself.

  Returns:
    `(state, batches) -> (state, metrics)`, where every leaf of `batches`
    has a leading `[k]` axis (or `batches` is None) and every metric comes
    back with a leading `[k]` axis.
  """
  if int(steps_per_call) != steps_per_call or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call}")
  if steps_per_call == 1:
    return step_fn

  def many(state, batches):
    if batches is not None:
      for leaf in jax.tree_util.tree_leaves(batches):
        if not jnp.shape(leaf) or jnp.shape(leaf)[0] != steps_per_call:
          raise ValueError(f"with steps_per_call={steps_per_call} every batch leaf needs a leading "
                           f"[{steps_per_call}] axis; got shape {jnp.shape(leaf)}")
    return jax.lax.scan(step_fn, state, batches, length=steps_per_call)

  return many


# Trees up to this many elements get their global norm from one reduction over the joined leaves.
SMALL_TREE_NORM = 1 << 18


def global_norm(tree: Any) -> jax.Array:
  """`sqrt(sum of squares)` over every leaf of `tree`, as float32.

  A small tree (at most `SMALL_TREE_NORM` elements in all, e.g. the GAN's and the 2-D
  diffusion MLP's gradients) is joined into one vector and reduced once: on XLA:CPU each leaf's
  own reduction is a kernel or two of its own, and for such models those kernels cost more than
  the copy (GAN ring-8 step: 2.2% slower with per-leaf norms than without any norm, 0.9% with
  the joined one; one-thread CPU time). Larger trees reduce leaf by leaf (`optax.tree.norm`)
  rather than copy their gradients. Equal to `optax.tree.norm` up to float summation order.

  Args:
    tree: a pytree of arrays (gradients, updates).

  Returns:
    A float32 scalar.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  if len(leaves) > 1 and sum(x.size for x in leaves) <= SMALL_TREE_NORM:
    v = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(v)))
  return optax.tree.norm(tree).astype(jnp.float32)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, axis_name: str | None = None,
                    schedule: optax.Schedule | None = None, ema_decay: float | None = None,
                    ema_warmup: bool = False, steps_per_call: int = 1) -> StepFn:
  """Builds the pure step for one loss and one optimizer.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)`; `rng` is
      `fold_in(state.rng, state.step)`, different at every step and the same
      for a resumed run. A loss that needs no randomness ignores it.
    tx: the optimizer.
    axis_name: average gradients and metrics over this mapped axis (`pmap`).
    schedule: when given, the step reports `lr = schedule(step)`.
    ema_decay: decay of the parameter EMA, used when the state keeps one
      (`init_train_state(..., ema=True)`).
    ema_warmup: the warm-up of the EMA decay (module docstring).
    steps_per_call: k steps per call under `lax.scan` (`scan_steps`).

  Returns:
    `step(state, batch) -> (state, metrics)`: the loss's metrics plus `loss`,
    `grad_norm` (`global_norm`, after any pmean, before clipping) and `lr` when a
    schedule is given; leading `[k]` axis on every metric when k > 1.
  """
  if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    (loss, metrics), grads = grad_fn(state.params, batch, step_rng(state))
    metrics = dict(metrics)
    metrics["loss"] = loss
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = global_norm(grads)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state._replace(params=params, opt_state=opt_state, step=state.step + 1,
                               ema_params=update_ema(state, params, ema_decay, ema_warmup))
    return new_state, metrics

  return scan_steps(step, steps_per_call)


def jit_train_step(step_fn: StepFn, state_shardings: Any, batch_sharding: Any, *, donate: bool = True) -> StepFn:
  """`jax.jit` of the step with explicit in/out shardings; the state is donated.

  Args:
    step_fn: the pure step.
    state_shardings: the tree from `init_train_state`.
    batch_sharding: a `NamedSharding` (or tree of them) for the batch, or
      None for a batch of None.
    donate: reuse the input state's buffers (the caller must not touch the
      old state after the call).

  Returns:
    The compiled step; metrics come back replicated.
  """
  mesh = jax.tree_util.tree_leaves(state_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())
