"""Parameter initialisers shared by the model families.

Two ways to fill a parameter tree with normal draws, with different numbers for
the same shapes:
- one draw per leaf from its own key (`normal_init`, `fan_in_normal`);
- `init_from_specs`: a pytree of `ParamSpec`s filled from ONE normal draw,
  sliced into the leaves. Every `jax.random.normal` call inlines a threefry
  hash into the init program, and many small ones make it slow to compile on
  CPU; one draw compiles fast.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def normal_init(rng: Array, shape: tuple[int, ...], std: float, dtype=jnp.float32) -> Array:
  """Normal (not truncated) init, `N(0, std^2)`.

  Args:
    rng: a PRNG key.
    shape: the shape of the result.
    std: the standard deviation.
    dtype: the result's dtype; the draw itself is float32.

  Returns:
    An array of `shape` and `dtype`: `std * N(0, 1)`.
  """
  return (std * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


def fan_in_normal(rng: Array, shape: tuple[int, ...], fan_in: int, scale: float = 1.0) -> Array:
  """Fan-in scaled normal (LeCun normal) init, `N(0, scale^2 / fan_in)`.

  Computed as `scale * N(0, 1) / sqrt(fan_in)` in float32 (division by the
  float32 square root; `scale = 1` leaves the draw's bits as they were).

  Args:
    rng: a PRNG key.
    shape: the shape of the result.
    fan_in: the number of inputs summed per output (usually the contracted axis
      of the weight, named because stacked or expert weights have it elsewhere
      than `shape[0]`).
    scale: a multiplier of the standard deviation.

  Returns:
    A float32 array of `shape`.
  """
  if fan_in <= 0:
    raise ValueError(f"fan_in must be positive, got {fan_in}")
  return scale * jax.random.normal(rng, shape, jnp.float32) / jnp.sqrt(jnp.float32(fan_in))


class ParamSpec(NamedTuple):
  """A leaf for `init_from_specs`: `N(0, std^2)` when `std > 0`, else the constant `value`.

  Attributes:
    shape: the leaf's shape.
    std: the standard deviation of its normal init; 0 for a constant leaf.
    value: the constant of a constant leaf (0 for biases, 1 for norm scales).
  """

  shape: tuple[int, ...]
  std: float = 0.0
  value: float = 0.0


def init_from_specs(rng: Array, specs: Any) -> Any:
  """Fills a pytree of `ParamSpec`s from ONE normal draw.

  The normal leaves take consecutive slices of one `N(0, 1)` vector, in the
  pytree's flattening order (dict keys sorted), each times its `std`.

  Args:
    rng: a PRNG key.
    specs: a pytree whose leaves are `ParamSpec`s.

  Returns:
    The same pytree with each spec replaced by a float32 array of its shape.
  """
  leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
  for leaf in leaves:
    if not isinstance(leaf, ParamSpec):
      raise TypeError(f"init_from_specs: specs must hold only ParamSpec leaves, got {type(leaf).__name__}")
  sizes = [math.prod(leaf.shape) if leaf.std > 0 else 0 for leaf in leaves]
  noise = jax.random.normal(rng, (max(sum(sizes), 1),))
  out, offset = [], 0
  for leaf, n in zip(leaves, sizes):
    if leaf.std > 0:
      out.append(leaf.std * noise[offset:offset + n].reshape(leaf.shape))
      offset += n
    else:
      out.append(jnp.full(leaf.shape, leaf.value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)
