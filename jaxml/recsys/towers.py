"""CTR towers assembled from a `TowerConfig`: MLP, DCN-v2, DLRM, DHEN (± bottlenecks).

    params = towers.init(rng, cfg)
    logits_B = towers.apply(params, batch, cfg)
    towers.param_count(params), towers.flops_per_example(cfg)

Every tower embeds the batch into `x0` [B, F, D] (`features.apply`), runs its
interaction, then a top MLP (`cfg.hidden`, bottlenecked when `cfg.bottleneck`)
and a final linear layer to one logit.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.recsys import features, modules
from jaxml.recsys.config import TowerConfig, dhen_layer_rows

Array = jax.Array


def interaction_width(cfg: TowerConfig) -> int:
  """Width of the vector the top MLP receives."""
  f, d = cfg.features.n_slots, cfg.features.embed_dim
  if cfg.kind == "mlp":
    return f * d
  if cfg.kind == "dcnv2":
    n = f * d
    if cfg.cross_structure == "parallel":
      return n + (cfg.hidden[-1] if cfg.hidden else n)
    return n
  if cfg.kind == "dlrm":
    return f * (f - 1) // 2 + (d if cfg.features.n_dense else 0)
  rows = f
  for _ in range(cfg.dhen_layers):
    rows = dhen_layer_rows(cfg, rows)[1]
  return rows * d


def _init(rng: Array, cfg: TowerConfig) -> dict:
  k_feat, k_int, k_top, k_out = jax.random.split(rng, 4)
  fc = cfg.features
  f, d = fc.n_slots, fc.embed_dim
  p = {"features": features.init(k_feat, fc)}
  top_in = interaction_width(cfg)
  if cfg.kind == "dcnv2":
    p["cross"] = modules.cross_net_init(k_int, f * d, cfg.cross_layers, cfg.cross_rank, cfg.cross_experts)
    if cfg.cross_structure == "parallel":  # the deep branch reads x0 and is the top MLP; head reads the concat
      p["deep"] = modules.mlp_init(k_top, f * d, cfg.hidden, cfg.bottleneck)
      p["out"] = modules.dense_init(k_out, top_in, 1)
      return p
  elif cfg.kind == "dhen":
    layers, rows = [], f
    for k in jax.random.split(k_int, cfg.dhen_layers):
      module_rows, rows_out = dhen_layer_rows(cfg, rows)
      layers.append(modules.dhen_layer_init(k, cfg.dhen_modules, module_rows, rows, rows_out, d, cfg.cross_rank))
      rows = rows_out
    p["dhen"] = layers
  p["top"] = modules.mlp_init(k_top, top_in, cfg.hidden, cfg.bottleneck)
  p["out"] = modules.dense_init(k_out, cfg.hidden[-1] if cfg.hidden else top_in, 1)
  return p


init = jax.jit(_init, static_argnums=1)
init.__doc__ = """`init(rng, cfg) -> params`, compiled once per config (`cfg` is static)."""


def interact(p: dict, x0_BxFxD: Array, cfg: TowerConfig) -> Array:
  """The tower's interaction part: `[B, F, D] -> [B, interaction_width]` (before the top MLP)."""
  b, f, d = x0_BxFxD.shape
  act = modules.activation(cfg.activation, cfg.smelu_beta)
  flat = x0_BxFxD.reshape(b, f * d)
  if cfg.kind == "mlp":
    return flat
  if cfg.kind == "dcnv2":
    crossed = modules.cross_net(p["cross"], flat)
    if cfg.cross_structure == "parallel":
      return jnp.concatenate([crossed, modules.mlp(p["deep"], flat, act)], axis=-1)
    return crossed
  if cfg.kind == "dlrm":
    dots = modules.dot_interaction(x0_BxFxD)
    if cfg.features.n_dense:
      return jnp.concatenate([x0_BxFxD[:, 0, :], dots], axis=-1)
    return dots
  n = dhen_chunks(cfg, b)
  if n == 1:
    return _dhen_stack(p["dhen"], x0_BxFxD, cfg, act).reshape(b, -1)
  # Interleaved slices (rows i, i + n, ...): a batch-sharded x0 keeps every slice local.
  slices = jnp.moveaxis(x0_BxFxD.reshape(b // n, n, f, d), 1, 0)
  outs = [_dhen_stack(p["dhen"], slices[i], cfg, act) for i in range(n)]
  return jnp.stack(outs, axis=1).reshape(b, -1)


def _dhen_stack(layers: list, x_BxFxD: Array, cfg: TowerConfig, act) -> Array:
  x, rows = x_BxFxD, x_BxFxD.shape[1]
  for layer in layers:
    module_rows, rows = dhen_layer_rows(cfg, rows)
    x = modules.dhen_layer(layer, x, cfg.dhen_modules, module_rows, cfg.dhen_ensemble, cfg.attention_heads, act)
  return x


# Automatic slicing on CPU: 8 slices for batches of at least 1,024 examples that 8 divides,
# when no DHEN layer reads more than 64 rows (see `dhen_chunks`).
_AUTO_CHUNKS, _AUTO_MIN_BATCH, _AUTO_MAX_ROWS = 8, 1024, 64


def dhen_chunks(cfg: TowerConfig, batch: int) -> int:
  """How many interleaved batch slices `interact` runs the DHEN layers on.

  The slices are independent programs inside one jit: XLA:CPU can run their small
  kernels concurrently (most kernels of a narrow DHEN layer use one thread each) and each
  slice's `[b, H, F, F]` attention tensors are smaller. Dense step of
  `benchmarks/ctr_bench.py`'s DHEN (2 cores, batch 4096, huge pages), whole batch vs 8
  slices (`--dhen_batch_chunks=1` / `=8` reproduce 1, 2 and 4 layers; 3 layers and the
  partly sliced variant came from one-off scripts): 1 layer 222-260 vs 206-210 ms,
  2 layers 405-415 vs 354-372 ms, 3 layers 680-687 vs 597-598 ms, but 4 layers (inputs
  of 27 to 75 rows) 1,026-1,061 vs 1,078-1,133 ms, and 1,235-1,247 ms with only the
  layers of <= 64 rows sliced: in
  traces of the 4-layer programs the sliced kernels ran one after another, while the whole
  batch's large attention kernels use both threads. Hence the automatic rule: slice only
  when every layer reads at most 64 rows. It is fitted to these measurements on this
  CPU; set `cfg.dhen_batch_chunks` to choose (other backends get 1 slice by default).
  """
  n = cfg.dhen_batch_chunks
  if n == 0:
    rows, widest = cfg.features.n_slots, 0
    for _ in range(cfg.dhen_layers):
      widest = max(widest, rows)
      rows = dhen_layer_rows(cfg, rows)[1]
    auto = (jax.default_backend() == "cpu" and batch >= _AUTO_MIN_BATCH and batch % _AUTO_CHUNKS == 0
            and widest <= _AUTO_MAX_ROWS)
    n = _AUTO_CHUNKS if auto else 1
  if batch % n:
    raise ValueError(f"dhen_batch_chunks={n} must divide the batch size {batch}")
  return n


def apply(p: dict, batch: dict, cfg: TowerConfig) -> Array:
  """Logits `[B]` for a batch of raw features (see `features`).

  The batch keys the tower reads are checked before anything is computed
  (`features.check_inputs`: static shapes and dtypes, so under `jit` the check runs
  once at trace time). Values (NaN dense features, labels) are checked on the host
  by `features.check_batch`, which the trainer runs.

  Args:
    p: tower params (`init(rng, cfg)`).
    batch: `dense` `[B, n_dense]` float32, `cat` `[B, n_cat]` int32 raw ids (-1 =
      missing), `multi` `[B, n_multi, L]` int32 (-1 = padding), as `cfg.features`
      asks; other keys (label, weight, group, teacher, ...) are ignored.
    cfg: the tower config.

  Returns:
    Logits `[B]` float32.

  Raises:
    ValueError / TypeError naming the batch key, with the expected and the actual
    shape or dtype (e.g. one categorical column where the config has two, or float ids).
  """
  act = modules.activation(cfg.activation, cfg.smelu_beta)
  x0 = features.apply(p["features"], batch, cfg.features, act)
  h = interact(p, x0, cfg)
  if "top" in p:
    h = modules.mlp(p["top"], h, act)
  return modules.linear(p["out"], h)[:, 0]


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------- FLOPs


def _jaxpr_matmul_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), (lb, _) = eqn.params["dimension_numbers"]
      lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      contract = math.prod(lhs[i] for i in lc)
      total += 2 * contract * math.prod(out)
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for v in eqn.params.values():
      subs = v if isinstance(v, (list, tuple)) else [v]
      for s in subs:
        inner = getattr(s, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          total += mult * _jaxpr_matmul_flops(inner)
        elif hasattr(s, "eqns"):
          total += mult * _jaxpr_matmul_flops(s)
  return total


def matmul_flops(fn, *args) -> int:
  """FLOPs of every matrix multiply `fn(*args)` traces to (2 per multiply-add), scans unrolled."""
  return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def example_batch(cfg: TowerConfig, batch_size: int = 1, multi_len: int = 4) -> dict:
  fc = cfg.features
  b = {"dense": jnp.zeros((batch_size, fc.n_dense), jnp.float32), "cat": jnp.zeros((batch_size, len(fc.vocab_sizes)), jnp.int32)}
  if fc.multi_hot_vocab_sizes:
    b["multi"] = jnp.zeros((batch_size, len(fc.multi_hot_vocab_sizes), multi_len), jnp.int32)
  return b


def flops_per_example(cfg: TowerConfig) -> int:
  """Forward matrix-multiply FLOPs per example (training costs about 3x this)."""
  params = jax.eval_shape(lambda: _init(jax.random.PRNGKey(0), cfg))
  batch = example_batch(cfg, 8)
  return matmul_flops(lambda p, b: apply(p, b, cfg), params, batch) // 8


def dense_flops_per_example(cfg: TowerConfig) -> int:
  """Forward matmul FLOPs of the part after the embedding lookup (interaction + top MLP)."""
  params = jax.eval_shape(lambda: _init(jax.random.PRNGKey(0), cfg))
  fc = cfg.features
  x0 = jnp.zeros((8, fc.n_slots, fc.embed_dim), jnp.float32)

  def dense_part(p, x):
    h = interact(p, x, cfg)
    if "top" in p:
      h = modules.mlp(p["top"], h)
    return modules.linear(p["out"], h)

  return matmul_flops(dense_part, params, x0) // 8
