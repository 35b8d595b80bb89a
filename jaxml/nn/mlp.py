"""Dense layers and MLPs over plain parameter dicts.

A dense layer is `{"w": [n_in, n_out], "b": [n_out]}`, `y = x w + b`, or, with
a low-rank bottleneck of rank `r`, `{"u": [n_in, r], "v": [r, n_out], "b"}`,
`y = (x u) v + b`: `r (n_in + n_out)` multiply-adds per example instead of
`n_in n_out` ("On the Factory Floor", arXiv 2209.05310). An MLP is a list of
dense layers. Weights are fan-in scaled normals, biases zero.

Two initialisations of the same distribution, with different numbers: each
layer from its own key (`dense_init`, `mlp_init`), or the whole tree from one
normal draw (`dense_spec` / `mlp_specs` with `init_from_specs`, or
`mlp_init(..., single_draw=True)`), which compiles faster on CPU for many small
layers.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxml.nn.init import ParamSpec, fan_in_normal, init_from_specs

Array = jax.Array


def _factorised(n_in: int, n_out: int, rank: int) -> bool:
  if rank < 0:
    raise ValueError(f"rank must be >= 0, got {rank}")
  return 0 < rank < min(n_in, n_out)


def dense_spec(n_in: int, n_out: int, *, rank: int = 0, scale: float = 1.0) -> dict[str, ParamSpec]:
  """`ParamSpec`s of one dense layer (for `init_from_specs`).

  Args:
    n_in: input width.
    n_out: output width.
    rank: bottleneck rank; the layer is factorised when `0 < rank < min(n_in, n_out)`.
    scale: multiplies the standard deviation of the last factor (`w`, or `v`).

  Returns:
    `{"w": N(0, scale^2 / n_in) [n_in, n_out], "b": 0 [n_out]}`, or factorised
    `{"u": N(0, 1 / n_in) [n_in, rank], "v": N(0, scale^2 / rank) [rank, n_out], "b"}`.
  """
  if _factorised(n_in, n_out, rank):
    return {"u": ParamSpec((n_in, rank), 1.0 / math.sqrt(n_in)), "v": ParamSpec((rank, n_out), scale / math.sqrt(rank)),
            "b": ParamSpec((n_out,))}
  return {"w": ParamSpec((n_in, n_out), scale / math.sqrt(n_in)), "b": ParamSpec((n_out,))}


def dense_init(rng: Array, n_in: int, n_out: int, *, rank: int = 0, scale: float = 1.0) -> dict[str, Array]:
  """One dense layer, its weights drawn from `rng` (see `fan_in_normal`).

  Args:
    rng: a PRNG key; a factorised layer splits it in two, for `u` and `v`.
    n_in: input width.
    n_out: output width.
    rank: bottleneck rank; the layer is factorised when `0 < rank < min(n_in, n_out)`.
    scale: multiplies the standard deviation of the last factor (`w`, or `v`).

  Returns:
    float32 `{"w": [n_in, n_out], "b": [n_out]}`, or `{"u": [n_in, rank],
    "v": [rank, n_out], "b": [n_out]}` (distributions as in `dense_spec`).
  """
  b = jnp.zeros((n_out,), jnp.float32)
  if _factorised(n_in, n_out, rank):
    ku, kv = jax.random.split(rng)
    return {"u": fan_in_normal(ku, (n_in, rank), n_in), "v": fan_in_normal(kv, (rank, n_out), rank, scale), "b": b}
  return {"w": fan_in_normal(rng, (n_in, n_out), n_in, scale), "b": b}


def dense(p: dict[str, Array], x: Array) -> Array:
  """Applies a dense layer (plain or factorised) over the last axis.

  Args:
    p: a layer from `dense_init` or `dense_spec`.
    x: `[..., n_in]`.

  Returns:
    `[..., n_out]`: `x w + b`, or `(x u) v + b`.
  """
  if "u" in p:
    return (x @ p["u"]) @ p["v"] + p["b"]
  return x @ p["w"] + p["b"]


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
  sizes = tuple(int(s) for s in sizes)
  if len(sizes) < 1 or any(s <= 0 for s in sizes):
    raise ValueError(f"sizes must be positive widths (n_in, width_1, ..., width_L), got {sizes}")
  return sizes


def mlp_specs(sizes: Sequence[int], *, rank: int = 0, out_scale: float = 1.0) -> list[dict[str, ParamSpec]]:
  """`ParamSpec`s of the dense layers `sizes[0] -> sizes[1] -> ... -> sizes[-1]`.

  Args:
    sizes: `(n_in, width_1, ..., width_L)`.
    rank: bottleneck rank of every layer (see `dense_spec`).
    out_scale: `scale` of the last layer (a small output layer, e.g. 0.1).

  Returns:
    A list of `L` `dense_spec` dicts.
  """
  sizes = _check_sizes(sizes)
  n = len(sizes) - 1
  return [dense_spec(fi, fo, rank=rank, scale=out_scale if i == n - 1 else 1.0)
          for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:]))]


def mlp_init(rng: Array, sizes: Sequence[int], *, rank: int = 0, out_scale: float = 1.0,
             single_draw: bool = False) -> list[dict[str, Array]]:
  """Dense layers `sizes[0] -> sizes[1] -> ... -> sizes[-1]` (a pyramid when the widths shrink).

  Args:
    rng: a PRNG key.
    sizes: `(n_in, width_1, ..., width_L)`; `(n_in,)` alone gives no layers.
    rank: bottleneck rank of every layer; a layer is factorised when
      `0 < rank < min(its n_in, n_out)`.
    out_scale: multiplies the weight standard deviation of the last layer.
    single_draw: False: layer `i` is `dense_init` of the `i`-th key of
      `jax.random.split(rng, L)`. True: `init_from_specs(rng, mlp_specs(...))`,
      every weight from one normal draw. The same distributions, different numbers.

  Returns:
    A list of `L` float32 layer dicts (see `dense_init`), for `mlp`.
  """
  if single_draw:
    return init_from_specs(rng, mlp_specs(sizes, rank=rank, out_scale=out_scale))
  sizes = _check_sizes(sizes)
  n = len(sizes) - 1
  keys = jax.random.split(rng, max(n, 1))
  return [dense_init(k, fi, fo, rank=rank, scale=out_scale if i == n - 1 else 1.0)
          for i, (k, fi, fo) in enumerate(zip(keys, sizes[:-1], sizes[1:]))]


def mlp(layers: Sequence[dict[str, Array]], x: Array, act: Callable[[Array], Array] = jax.nn.relu,
        final_act: bool = False) -> Array:
  """Applies dense layers in turn, `act` between them.

  Args:
    layers: layer dicts from `mlp_init` (or `mlp_specs` + `init_from_specs`).
    x: `[..., sizes[0]]`.
    act: the activation after each hidden layer.
    final_act: also apply `act` after the last layer.

  Returns:
    `[..., sizes[-1]]` (`x` itself for an empty list).
  """
  n = len(layers)
  for i, p in enumerate(layers):
    x = dense(p, x)
    if final_act or i < n - 1:
      x = act(x)
  return x
