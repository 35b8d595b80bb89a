"""Device mesh with (data, fsdp, tensor) axes and regex partition rules.

* `data`: pure data parallelism (params replicated, batch split).
* `fsdp`: batch split AND params/optimizer state split (ZeRO-3 style); XLA
  all-gathers each weight where it is used.
* `tensor`: Megatron-style split of heads / hidden units inside a layer.

A rule is `(regex, PartitionSpec)`; the first regex that `re.search`es a leaf's
path (`"params/layers/wq"`, `"opt_state/1/0/mu/layers/wq"`) gives its spec.
Leaves that match nothing (scalars, counters, rng) are replicated. A mesh
axis that does not divide the corresponding dimension is dropped for that
leaf (that dimension stays replicated) rather than failing.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxml.train.optim import path_str

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, P]]

def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh of shape (data, fsdp, tensor). One size may be -1: the remaining devices.

  Uses every (global) device unless `devices` is given; their product must
  equal the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive or -1, got (data, fsdp, tensor)={tuple(shape)}")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got {tuple(shape)}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh (data, fsdp, tensor)={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"have {len(devices)}")
  # Auto axes: XLA's partitioner propagates shardings from the in/out
  # shardings we give jit; model code needs no sharding annotations.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(shape), AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec for one leaf (see the module docstring)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  if len(spec) > len(shape):
    return P()
  fixed = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = math.prod(mesh.shape[a] for a in names)
    fixed.append(axes if names and dim % size == 0 else None)
  return P(*fixed)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs)."""
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(leaf)), mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Places a host batch (the same full global batch on every process) as global arrays.

  Each process materialises only its addressable shards, so this is correct
  under multi-host as long as every process computes the same global batch
  (the data iterators here are deterministic in (seed, step)).
  """
  def put(x):
    x = np.asarray(x)
    if x.shape[0] % (sharding.mesh.shape["data"] * sharding.mesh.shape["fsdp"]):
      raise ValueError(f"batch size {x.shape[0]} is not divisible by data*fsdp="
                       f"{sharding.mesh.shape['data'] * sharding.mesh.shape['fsdp']}")
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, batch)
