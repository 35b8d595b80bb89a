"""The train state pytree and its shape-first, sharded initialisation.

One `TrainState` serves every model family. Besides the parameters and their
optimizer state it carries an optional exponential moving average of the
parameters (`ema_params`, updated by the built step when an EMA decay is set)
and `extras`: any pytree of state that the optimizer does not train
(spectral-norm power-iteration vectors, a frozen reference policy, running
reward statistics). Every field is checkpointed and restored.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxml.train import sharding as shd


class TrainState(NamedTuple):
  """Everything a step reads and writes. A NamedTuple, hence a pytree.

  Attributes:
    params: model parameters (any pytree).
    opt_state: the optax state for `params`.
    step: int32 scalar, the number of updates applied so far.
    rng: uint32[2] raw PRNG key, fixed for the run; step `t` draws its
      randomness from `jax.random.fold_in(rng, t)` (`step_rng`), so a resumed
      run draws the same numbers as an uninterrupted one.
    ema_params: an exponential moving average of `params` (same tree), or None.
    extras: state not trained by the optimizer (any pytree), or None.
  """
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  ema_params: Any = None
  extras: Any = None


def step_rng(state: TrainState) -> jax.Array:
  """The key of the step that `state` is about to take.

  Args:
    state: a `TrainState` (its `rng` and `step`).

  Returns:
    `jax.random.fold_in(state.rng, state.step)`, a uint32[2] key.
  """
  return jax.random.fold_in(state.rng, state.step)


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array, *, ema: bool = False,
                       extras: Any = None) -> TrainState:
  """A fresh state at step 0.

  Args:
    params: the initial parameters.
    tx: the optimizer; its state is `tx.init(params)`.
    rng: a PRNG key (raw uint32[2]).
    ema: keep an EMA of the parameters, starting at `params`.
    extras: the initial non-trained state (any pytree) or None.

  Returns:
    A `TrainState` with `step == 0`.
  """
  return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                    rng=jnp.asarray(rng, jnp.uint32),
                    # A copy: sharing the parameters' buffers would make a donating step donate them twice.
                    ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None, extras=extras)


def _builder(init_fn, tx, ema, extras_fn):
  def build(r):
    init_rng, state_rng = jax.random.split(r)
    params = init_fn(init_rng)
    extras = None if extras_fn is None else extras_fn(jax.random.fold_in(init_rng, 1), params)
    return create_train_state(params, tx, state_rng, ema=ema, extras=extras)
  return build


def abstract_train_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
                         mesh: jax.sharding.Mesh | None = None, rules: shd.Rules = (), *, ema: bool = False,
                         extras_fn: Callable[[jax.Array, Any], Any] | None = None) -> tuple[TrainState, Any]:
  """The state as `jax.ShapeDtypeStruct`s carrying their shardings; nothing is allocated.

  Args:
    init_fn: `init_fn(rng) -> params`.
    tx: the optimizer.
    rng: the run's PRNG key; split into an init key and the state's key.
    mesh: the device mesh; None puts every leaf on the first device.
    rules: `(regex, PartitionSpec)` pairs matched against leaf paths
      (`params/...`, `opt_state/...`, `ema_params/...`, `extras/...`); each
      model family owns its rules (e.g. `jaxml.llama.LLAMA_RULES`).
    ema: whether the state keeps an EMA of the parameters.
    extras_fn: `extras_fn(rng, params) -> extras`, or None.

  Returns:
    `(abstract_state, state_shardings)`.
  """
  abstract = jax.eval_shape(_builder(init_fn, tx, ema, extras_fn), jnp.asarray(rng, jnp.uint32))
  if mesh is None:
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  shardings = shd.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
  return abstract, shardings


def init_train_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
                     mesh: jax.sharding.Mesh | None = None, rules: shd.Rules = (), *, ema: bool = False,
                     extras_fn: Callable[[jax.Array, Any], Any] | None = None) -> tuple[TrainState, Any]:
  """Shape-first init: `eval_shape`, derive shardings, then one jitted init.

  Each leaf is created directly in its sharded layout (no host copy of the
  full model). Arguments as `abstract_train_state`.

  Returns:
    `(state, state_shardings)`.
  """
  _, shardings = abstract_train_state(init_fn, tx, rng, mesh, rules, ema=ema, extras_fn=extras_fn)
  state = jax.jit(_builder(init_fn, tx, ema, extras_fn), out_shardings=shardings)(jnp.asarray(rng, jnp.uint32))
  return state, shardings
