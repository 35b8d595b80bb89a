"""Feature layer: hashed categorical embeddings (single/multi-hot) and dense features.

All categorical fields share one table `[R, D]` (R = FeatureConfig.table_rows);
field f owns rows `[offset_f, offset_f + V_f)`, its row 0 stands for "missing".
One table means one array to shard by rows over a mesh axis (`table_sharding`).

Inputs of a batch (raw ids, not yet hashed):
  dense:  [B, n_dense] float32
  cat:    [B, n_cat]   int32, -1 = missing
  multi:  [B, n_multi, L] int32, -1 = padding / missing
Output: `x0` [B, F, D] with the dense slot first, then single-hot, then multi-hot fields.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxml.recsys import modules
from jaxml.recsys.config import FeatureConfig

Array = jax.Array


def field_offsets(cfg: FeatureConfig) -> np.ndarray:
  """First table row of each field (single-hot fields, then multi-hot)."""
  sizes = list(cfg.vocab_sizes) + list(cfg.multi_hot_vocab_sizes)
  return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32) if sizes else np.zeros((0,), np.int32)


def hash_ids(raw: Array, field: Array | int, n_buckets: Array | int) -> Array:
  """Hashes raw ids into `[1, n_buckets)`; ids < 0 (missing) go to bucket 0.

  A 32-bit integer mix (xor with a per-field salt, multiply-xorshift finaliser)
  so that nearby raw ids land in unrelated buckets and fields do not collide alike.
  """
  raw = jnp.asarray(raw)
  h = raw.astype(jnp.uint32) ^ (jnp.asarray(field, jnp.uint32) * jnp.uint32(0x9E3779B9))
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  bucket = (h % (jnp.asarray(n_buckets, jnp.uint32) - 1)).astype(jnp.int32) + 1
  return jnp.where(raw < 0, 0, bucket)


def init(rng: Array, cfg: FeatureConfig) -> dict:
  k_table, k_dense = jax.random.split(rng)
  p = {"table": 0.05 * jax.random.normal(k_table, (cfg.table_rows, cfg.embed_dim), jnp.float32)}
  if cfg.n_dense:
    p["dense"] = modules.mlp_init(k_dense, cfg.n_dense, tuple(cfg.dense_hidden) + (cfg.embed_dim,))
  return p


def embed_single(table: Array, raw_BxC: Array, cfg: FeatureConfig) -> Array:
  """Single-hot fields: `[B, C]` raw ids -> `[B, C, D]`."""
  n = len(cfg.vocab_sizes)
  fields = jnp.arange(n, dtype=jnp.int32)
  rows = hash_ids(raw_BxC, fields, jnp.asarray(cfg.vocab_sizes)) + field_offsets(cfg)[:n]
  return jnp.take(table, rows, axis=0)


def embed_multi(table: Array, raw_BxMxL: Array, cfg: FeatureConfig) -> Array:
  """Multi-hot fields: `[B, M, L]` raw ids (-1 padded) -> pooled `[B, M, D]`.

  Pooling is the sum or the mean over the valid ids; a field with no valid id
  gets its "missing" row.
  """
  n_single, n_multi = len(cfg.vocab_sizes), len(cfg.multi_hot_vocab_sizes)
  fields = jnp.arange(n_single, n_single + n_multi, dtype=jnp.int32)[None, :, None]
  sizes = jnp.asarray(cfg.multi_hot_vocab_sizes)[None, :, None]
  offsets = jnp.asarray(field_offsets(cfg)[n_single:])[None, :, None]
  rows = hash_ids(raw_BxMxL, fields, sizes) + offsets
  valid = (raw_BxMxL >= 0).astype(table.dtype)[..., None]
  e = jnp.take(table, rows, axis=0) * valid
  total = e.sum(axis=2)
  count = valid.sum(axis=2)
  pooled = total / jnp.maximum(count, 1.0) if cfg.pooling == "mean" else total
  missing = jnp.take(table, offsets[..., 0], axis=0)  # [1, M, D]
  return jnp.where(count > 0, pooled, missing)


def apply(p: dict, batch: dict, cfg: FeatureConfig, act=jax.nn.relu) -> Array:
  """Embeds a batch into `x0` `[B, F, D]`.

  The keys it reads are checked first (`check_inputs`: shapes and dtypes only, so
  the check runs once at trace time under `jit` and costs nothing per step).

  Args:
    p: feature-layer params (`init`).
    batch: `dense` `[B, n_dense]` float, `cat` `[B, n_cat]` integer ids, `multi`
      `[B, n_multi, L]` integer ids, as `cfg` asks; other keys (labels, weights,
      ...) are ignored.
    cfg: the feature config.
    act: activation of the dense-feature MLP.

  Returns:
    `x0` `[B, F, D]`: the dense slot, then single-hot, then multi-hot fields.

  Raises:
    ValueError / TypeError naming the batch key, with the expected and the actual
    shape or dtype.
  """
  check_inputs(batch, cfg)
  slots = []
  if cfg.n_dense:
    slots.append(modules.mlp(p["dense"], batch["dense"], act, final_act=False)[:, None, :])
  if cfg.vocab_sizes:
    slots.append(embed_single(p["table"], batch["cat"], cfg))
  if cfg.multi_hot_vocab_sizes:
    slots.append(embed_multi(p["table"], batch["multi"], cfg))
  return jnp.concatenate(slots, axis=1)


def _expected(cfg: FeatureConfig) -> list[tuple[str, int, str]]:
  """(key, columns, "float" or "int") of each input `cfg` reads."""
  need = [("dense", cfg.n_dense, "float")] if cfg.n_dense else []
  if cfg.vocab_sizes:
    need.append(("cat", len(cfg.vocab_sizes), "int"))
  if cfg.multi_hot_vocab_sizes:
    need.append(("multi", len(cfg.multi_hot_vocab_sizes), "int"))
  return need


def check_inputs(batch: dict, cfg: FeatureConfig) -> int:
  """Checks the shapes and dtypes of the batch keys `cfg` reads; works on arrays, tracers and `ShapeDtypeStruct`s.

  Only static facts are read (no values), so under `jit` it runs once, at trace
  time. Keys the feature layer does not read (label, weight, group, teacher, ...)
  are not looked at.

  Args:
    batch: the model inputs (see the module docstring).
    cfg: the feature config.

  Returns:
    The batch size `B`.

  Raises:
    ValueError naming the key for a missing key, a wrong rank or column count, or
    batch sizes that differ; TypeError for ids that are not integers (float ids
    would be cast and hashed without an error) or dense features that are not real numbers.
  """
  if not isinstance(batch, dict):
    raise TypeError(f"batch must be a dict of arrays, got {type(batch).__name__}")
  b, first = None, None
  for key, width, kind in _expected(cfg):
    ndim = 3 if key == "multi" else 2
    want = {"dense": f"[B, {width}] float32", "cat": f"[B, {width}] int32",
            "multi": f"[B, {width}, L] int32"}[key]
    if key not in batch:
      raise ValueError(f"batch is missing {key!r} (the feature config expects {want})")
    x = batch[key]
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"batch[{key!r}] must be an array ({want}), got {type(x).__name__}")
    shape, dtype = tuple(x.shape), x.dtype
    if len(shape) != ndim or shape[1] != width:
      raise ValueError(f"batch[{key!r}] has shape {shape}, expected {want} ({ndim} dims with {width} columns)")
    if kind == "int" and not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(f"batch[{key!r}] must hold integer ids ({want}), got dtype {dtype}")
    if kind == "float" and not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"batch[{key!r}] must hold real numbers ({want}), got dtype {dtype}")
    if b is not None and shape[0] != b:
      raise ValueError(f"batch[{key!r}] has {shape[0]} rows, batch[{first!r}] has {b}: batch sizes must match")
    b, first = shape[0], key
  return b


def check_batch(batch: dict, cfg: FeatureConfig) -> None:
  """Checks a host batch before training: `check_inputs`, then its values.

  Args:
    batch: host arrays (numpy or jax); `label`, when present, is checked too.
    cfg: the feature config.

  Raises:
    ValueError/TypeError naming the key when the batch does not fit `cfg`, its
    dense features hold NaN/inf or its labels are not `[B]` in {0, 1}.
  """
  host = {k: np.asarray(batch[k]) for k, _, _ in _expected(cfg) if k in batch}
  b = check_inputs({**batch, **host}, cfg)
  if "dense" in host and not np.all(np.isfinite(host["dense"])):
    bad = np.argwhere(~np.isfinite(host["dense"]))[0]
    raise ValueError(f"batch['dense'] holds NaN/inf (first at row {bad[0]}, column {bad[1]}); "
                     "impute missing dense features before training")
  if "label" in batch:
    y = np.asarray(batch["label"])
    if y.shape != (b,) or not np.all((y == 0) | (y == 1)):
      raise ValueError(f"batch['label'] must be [{b}] with values in {{0, 1}}")


def table_sharding(params: dict, mesh: Mesh, row_axis: str | tuple[str, ...]) -> dict:
  """Shardings for a tower's params: the embedding table split by rows over `row_axis`, the rest replicated."""
  def spec(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if "table" in names:
      return NamedSharding(mesh, P(row_axis, None))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec, params)
