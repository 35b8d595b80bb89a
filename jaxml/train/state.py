"""The train state pytree and its shape-first, sharded initialisation."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxml.train import sharding as shd


class TrainState(NamedTuple):
  """Everything a step reads and writes. A NamedTuple, hence a pytree.

  params:    model parameters (any pytree)
  opt_state: the optax state for `params`
  step:      int32 scalar, number of updates applied so far
  rng:       uint32[2] PRNG key (raw, so checkpoints store a plain array)
  """
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state at step 0 for `params`."""
  return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                    rng=jnp.asarray(rng, jnp.uint32))


def _builder(init_fn, tx):
  def build(r):
    init_rng, state_rng = jax.random.split(r)
    return create_train_state(init_fn(init_rng), tx, state_rng)
  return build


def abstract_train_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
                         mesh: jax.sharding.Mesh | None = None, rules: shd.Rules = ()) -> tuple[TrainState, Any]:
  """The state as `jax.ShapeDtypeStruct`s carrying their shardings; nothing is allocated.

  `init_fn(rng) -> params`. Returns `(abstract_state, state_shardings)`;
  without a mesh every leaf goes to the first device.
  """
  abstract = jax.eval_shape(_builder(init_fn, tx), jnp.asarray(rng, jnp.uint32))
  if mesh is None:
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  shardings = shd.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
  return abstract, shardings


def init_train_state(init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
                     mesh: jax.sharding.Mesh | None = None,
                     rules: shd.Rules = ()) -> tuple[TrainState, Any]:
  """Shape-first init: `eval_shape`, derive shardings, then one jitted init.

  Each leaf is created directly in its sharded layout (no host copy of the
  full model). Returns `(state, state_shardings)`.
  """
  _, shardings = abstract_train_state(init_fn, tx, rng, mesh, rules)
  state = jax.jit(_builder(init_fn, tx), out_shardings=shardings)(jnp.asarray(rng, jnp.uint32))
  return state, shardings
