"""The pure train step `(state, batch) -> (state, metrics)`, and its compiled forms.

One function serves both parallel styles:
  * `jax.jit` with explicit shardings over a Mesh (`jit_train_step`): the batch
    is a global array sharded over (data, fsdp); XLA inserts the collectives;
  * `jax.pmap` (`make_train_step(..., axis_name="batch")`): each device gets a
    batch shard and the step averages gradients and metrics with `pmean`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxml.train.state import TrainState

LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, axis_name: str | None = None,
                    schedule: optax.Schedule | None = None) -> StepFn:
  """Builds the pure step.

  `loss_fn(params, batch) -> (loss, metrics)`. The returned metrics are
  `loss_fn`'s metrics plus `loss`, `grad_norm` (global, after any pmean, before
  clipping) and `lr` when `schedule` is given. With `axis_name`, gradients
  and metrics are averaged over that mapped axis, so the step can run under
  `jax.pmap(step, axis_name=...)`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    (loss, metrics), grads = grad_fn(state.params, batch)
    metrics = dict(metrics)
    metrics["loss"] = loss
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)
    return new_state, metrics

  return step


def jit_train_step(step_fn: StepFn, state_shardings: Any, batch_sharding: Any, *, donate: bool = True) -> StepFn:
  """`jax.jit` of the step with explicit in/out shardings; the state is donated.

  `state_shardings` is the tree from `init_train_state`; `batch_sharding` a
  `NamedSharding` (or tree of them) for the batch; metrics come back
  replicated. With `donate=True` the input state's buffers are reused, so the
  caller must not touch the old state after the call.
  """
  mesh = jax.tree_util.tree_leaves(state_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())
