"""The Llama 2 decoder as pure functions over a parameter pytree.

Parameter tree (names follow Meta's checkpoint; per-layer weights are stacked
on a leading `n_layers` axis so the blocks run under `jax.lax.scan`):

    tok_embeddings            [V, D]
    layers/attention_norm     [L, D]
    layers/wq                 [L, D, H*Dh]
    layers/wk, layers/wv      [L, D, K*Dh]
    layers/wo                 [L, H*Dh, D]
    layers/ffn_norm           [L, D]
    layers/w1, layers/w3      [L, D, F]
    layers/w2                 [L, F, D]
    norm                      [D]
    output                    [D, V]      (untied from tok_embeddings)

Linear weights are stored `(in, out)`, so `x @ w`; converters transpose
torch's `(out, in)`. The q/k rows are in Meta's interleaved rotary layout.

The forward pass is three reusable parts, `apply` being their composition:

    x_BxTxD = embed(params, tokens_BxT, cfg)          # token embeddings
    h_BxTxD = decoder(params, x_BxTxD, cfg, ...)      # blocks + final RMSNorm
    logits  = head(params, h_BxTxD, cfg)              # output projection

A model with its own inputs (Gato-style embeddings) calls `decoder` on them;
a reward or value model puts its own head on `decoder`'s output.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.llama.config import BATCH_AXES, LlamaConfig
from jaxml.nn import flash
from jaxml.nn import layers as nn
from jaxml.nn import losses

Params = dict[str, Any]
KVCache = nn.KVCache


def param_shapes(cfg: LlamaConfig) -> Params:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no memory allocated)."""
  return jax.tree.map(lambda s: s, _param_shapes(cfg))  # a fresh tree: the cached one stays intact


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: LlamaConfig) -> Params:
  return jax.eval_shape(functools.partial(init, cfg=cfg), jax.random.PRNGKey(0))


def init(rng: jax.Array, cfg: LlamaConfig) -> Params:
  """Initialises parameters: N(0, 0.02) matrices, unit norm weights.

  Output projections of each block (`wo`, `w2`) are scaled by
  `1/sqrt(2 * n_layers)` (GPT-2 style) so the residual stream starts with unit
  scale whatever the depth.
  """
  L, D, F, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size
  H, K, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  pd = jnp.dtype(cfg.param_dtype)
  std, out_std = 0.02, 0.02 / np.sqrt(2 * L)
  keys = jax.random.split(rng, 9)
  return {
      "tok_embeddings": nn.normal_init(keys[0], (V, D), std, pd),
      "layers": {
          "attention_norm": jnp.ones((L, D), pd),
          "wq": nn.normal_init(keys[1], (L, D, H * Dh), std, pd),
          "wk": nn.normal_init(keys[2], (L, D, K * Dh), std, pd),
          "wv": nn.normal_init(keys[3], (L, D, K * Dh), std, pd),
          "wo": nn.normal_init(keys[4], (L, H * Dh, D), out_std, pd),
          "ffn_norm": jnp.ones((L, D), pd),
          "w1": nn.normal_init(keys[5], (L, D, F), std, pd),
          "w3": nn.normal_init(keys[6], (L, D, F), std, pd),
          "w2": nn.normal_init(keys[7], (L, F, D), out_std, pd),
      },
      "norm": jnp.ones((D,), pd),
      "output": nn.normal_init(keys[8], (D, V), std, pd),
  }


def check_params(params: Params, cfg: LlamaConfig) -> None:
  """Checks that `params` has exactly the keys and shapes `init(rng, cfg)` makes.

  Accepts the forms `apply` takes: stacked or per-layer weights
  (`unstack_layers`), separate or joined projections (`join_projections`) and
  a whole or column-split output projection (`split_output_columns`). Reads
  shapes only (no device work), so it costs nothing under `jax.jit`.

  Args:
    params: a parameter tree (see the module docstring).
    cfg: the config the tree should match.

  Raises:
    ValueError: naming every missing, unexpected or wrongly shaped entry
      (a wrong `n_layers`, `vocab_size`, `dim`, ... shows as a shape).
    TypeError: if `params` is not a mapping.
  """
  _check_param_shapes(params, cfg)


def _check_param_shapes(params: Params, cfg: LlamaConfig, keys: tuple[str, ...] | None = None,
                        what: str = "params") -> None:
  """`check_params` over the top-level entries `keys` only (all, and no unexpected ones, when None)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"{what} must be a dict of arrays (see jaxml.llama.model), got {type(params).__name__}")
  expected = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
  got = dict(jax.tree_util.tree_flatten_with_path(_canonical_shapes(params, cfg))[0])
  in_scope = (lambda path: True) if keys is None else (lambda path: path[0].key in keys)
  problems = []
  exp_keys = set()
  for path, spec in expected:
    if not in_scope(path):
      continue
    name = jax.tree_util.keystr(path)
    exp_keys.add(path)
    if path not in got:
      problems.append(f"missing {name} {tuple(spec.shape)}")
    elif tuple(np.shape(got[path])) != tuple(spec.shape):
      problems.append(f"{name}: shape {tuple(np.shape(got[path]))}, config expects {tuple(spec.shape)}")
  if keys is None:
    for path in got:
      if path not in exp_keys:
        problems.append(f"unexpected {jax.tree_util.keystr(path)}")
  if problems:
    raise ValueError(f"{what} do not match the config (n_layers={cfg.n_layers}, dim={cfg.dim}, "
                     f"vocab_size={cfg.vocab_size}, n_heads={cfg.n_heads}, kv_heads={cfg.kv_heads}, "
                     f"hidden_dim={cfg.hidden_dim}):\n  " + "\n  ".join(problems))


# The joined projections of `join_projections`: each name and the separate weights it holds, in order.
_JOINED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def _joined_widths(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The column widths of the weights each joined projection holds."""
  q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  return {"wqkv": (q, kv, kv), "w13": (cfg.hidden_dim, cfg.hidden_dim)}


def _canonical_shapes(params: Params, cfg: LlamaConfig) -> Params:
  """`params` as shapes in `init`'s form: per-layer weights stacked, output columns and joined
  projections (`join_projections`) split back (no copies)."""
  def shape(*dims):
    return jax.ShapeDtypeStruct(tuple(dims), jnp.float32)  # only the shape is compared

  def unjoin(lp):
    if not isinstance(lp, Mapping) or not any(name in lp for name in _JOINED):
      return lp
    lp = dict(lp)
    for name, parts in _JOINED.items():
      if name in lp:
        w = np.shape(lp.pop(name))
        widths = _joined_widths(cfg)[name]
        for part, width in zip(parts, widths):
          # A joined weight of the wrong width shows as a wrong shape of every part.
          lp[part] = shape(*w[:-1], width if w and w[-1] == sum(widths) else -1)
    return lp

  out = dict(params)
  layers = params.get("layers")
  layers = tuple(unjoin(lp) for lp in layers) if isinstance(layers, (tuple, list)) else unjoin(layers)
  if layers is not None:
    out["layers"] = layers
  if isinstance(layers, (tuple, list)) and layers and all(isinstance(lp, Mapping) for lp in layers):
    per_layer = [dict(jax.tree_util.tree_flatten_with_path(dict(lp))[0]) for lp in layers]
    stacked = {}
    for path in {p for leaves in per_layer for p in leaves}:
      shapes = {tuple(np.shape(leaves[path])) if path in leaves else None for leaves in per_layer}
      # (L, -1): the layers disagree (a shape, or an entry some lack)
      stacked[path[0].key] = shape(len(layers), *shapes.pop()) if len(shapes) == 1 and None not in shapes \
          else shape(len(layers), -1)
    out["layers"] = stacked
  w = params.get("output")
  if isinstance(w, (tuple, list)) and w:
    rows = {np.shape(c)[0] if np.ndim(c) == 2 else -1 for c in w}
    out["output"] = shape(rows.pop() if len(rows) == 1 else -1, sum(np.shape(c)[-1] for c in w))
  return out


def check_tokens(tokens: Any, cfg: LlamaConfig, *, what: str = "tokens", max_len: int | None = None) -> None:
  """Validates a token array before any compute: integer dtype, rank 2, ids in range.

  Args:
    tokens: `[batch, length]` integer token ids.
    cfg: the model config (vocabulary size, context length).
    what: the argument's name, for the error messages.
    max_len: the longest allowed `length` (default `cfg.max_seq_len`).

  Raises:
    TypeError: for a non-integer dtype.
    ValueError: for a wrong rank, a length over `max_len`, or ids outside
      `[0, cfg.vocab_size)`. The id check reads the values, so it runs only on
      concrete arrays: inside a trace (a caller's `jax.jit`, `grad` of
      traced tokens, ...) out-of-vocabulary ids cannot be detected.
  """
  max_len = cfg.max_seq_len if max_len is None else max_len
  if not jnp.issubdtype(jnp.asarray(tokens).dtype if not hasattr(tokens, "dtype") else tokens.dtype, jnp.integer):
    raise TypeError(f"{what} must be an integer array, got dtype {getattr(tokens, 'dtype', type(tokens))}")
  if np.ndim(tokens) != 2:
    raise ValueError(f"{what} must have shape [batch, length], got shape {np.shape(tokens)}")
  if np.shape(tokens)[1] > max_len:
    extra = "" if max_len == cfg.max_seq_len else f" (+{max_len - cfg.max_seq_len} for the shifted targets)"
    raise ValueError(f"{what} length {np.shape(tokens)[1]} exceeds the context max_seq_len={cfg.max_seq_len}{extra}")
  if not isinstance(tokens, jax.core.Tracer):
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
      raise ValueError(f"{what} has ids outside the vocabulary [0, {cfg.vocab_size}): "
                       f"min {arr.min()}, max {arr.max()}")


def _block(cfg: LlamaConfig, x_BxTxD, lp, cos, sin, attend):
  """One pre-norm decoder block.

  `attend(q, k, v) -> (out, kv)` takes the new rotated queries/keys/values
  `[B, T, *, Dh]`, stores keys/values in a cache if there is one, and returns
  the attention output `[B, T, H, Dh]` and what the block hands back (the
  updated cache arrays). Projections run on `[B*T, D]` matrices: on CPU, XLA
  sends the weight gradient of a 2-D matmul to its fast GEMM path, while 3-D
  inputs (two contracting dims in the gradient) get a slow generic dot.
  """
  B, T, D = x_BxTxD.shape
  H, K, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  dt = cfg.compute_dtype
  x = x_BxTxD.reshape(B * T, D)
  h = nn.rms_norm(x, lp["attention_norm"], cfg.norm_eps)
  if "wqkv" in lp:  # `join_projections`
    q, k, v = jnp.split(nn.linear(h, lp["wqkv"].astype(dt)), [H * Dh, (H + K) * Dh], axis=-1)
  else:
    q, k, v = (nn.linear(h, lp[name].astype(dt)) for name in ("wq", "wk", "wv"))
  q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
  q = nn.apply_rope_tables(q, cos, sin)
  k = nn.apply_rope_tables(k, cos, sin)
  attn, kv = attend(q, k.astype(dt), v.astype(dt))
  x = x + nn.linear(attn.reshape(B * T, H * Dh), lp["wo"].astype(dt))
  h = nn.rms_norm(x, lp["ffn_norm"], cfg.norm_eps)
  if "w13" in lp:
    gate, up = jnp.split(nn.linear(h, lp["w13"].astype(dt)), 2, axis=-1)
    x = x + nn.linear(jax.nn.silu(gate) * up, lp["w2"].astype(dt))
  else:
    x = x + nn.swiglu(h, lp["w1"].astype(dt), lp["w3"].astype(dt), lp["w2"].astype(dt))
  return x.reshape(B, T, D), kv


def embed(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """Token embeddings: the rows of `params["tok_embeddings"]` for the ids.

  Args:
    params: Llama parameters; only `tok_embeddings` `[V, D]` is read (and
      checked against `cfg`).
    tokens_BxT: `[B, T]` integer token ids in `[0, cfg.vocab_size)` (checked
      when concrete; see `check_tokens`).
    cfg: the model config.

  Returns:
    `x_BxTxD`: `[B, T, D]` embeddings in `cfg.compute_dtype`, what `decoder` reads.
  """
  _check_param_shapes(params, cfg, keys=("tok_embeddings",))
  check_tokens(tokens_BxT, cfg, what="tokens_BxT")
  return _embed(params, tokens_BxT, cfg)


def _shard_batch(x_BxTxD):
  """`x` split over the mesh's batch axes (`BATCH_AXES`) along its leading axis, when traced for a mesh.

  The mesh is the one the caller's `jax.jit` shardings name (read from the
  array's type); without one, or when the batch does not divide, `x` is
  returned as it is. Without this constraint XLA's sharding propagation, led
  by the FSDP-sharded weights (`dim` split over "fsdp") and the embedding
  gather, gathers the token ids and runs every layer on the WHOLE global
  batch on each device: the compiled 7b step's temporaries grew with the
  device count (431 GiB per device on 64 devices at 4 x 2048 tokens each).
  """
  mesh = getattr(getattr(jax.typeof(x_BxTxD), "sharding", None), "mesh", None)
  if mesh is None or not mesh.axis_names:
    return x_BxTxD
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  size = int(np.prod([mesh.shape[a] for a in axes]))
  if not axes or x_BxTxD.shape[0] % size:
    return x_BxTxD
  return jax.lax.with_sharding_constraint(x_BxTxD, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes)))


def _embed(params: Params, tokens_BxT, cfg: LlamaConfig):
  return params["tok_embeddings"].astype(cfg.compute_dtype)[tokens_BxT]


def decoder(params: Params, x_BxTxD: jax.Array, cfg: LlamaConfig, *, positions: Any = None,
            cache: KVCache | None = None, cache_index: jax.Array | int = 0, attention_mask: Any = None):
  """The decoder blocks and the final RMSNorm over a sequence of input vectors.

  Returns the hidden states AFTER the final RMSNorm (`params["norm"]`): what
  `head` (the output projection) or any other head reads. Token inputs come
  from `embed`; a model with its own inputs (image patches, actions, ...)
  passes its own `[B, T, D]` vectors.

  Each position attends causally: a query at position `p` sees the keys at
  positions `<= p` (and, with `attention_mask`, only real tokens).

  Args:
    params: Llama parameters; `layers` (stacked or per-layer, see
      `unstack_layers`) and `norm` are read and checked against `cfg`.
    x_BxTxD: `[B, T, cfg.dim]` input vectors (cast to `cfg.compute_dtype`).
    cfg: the model config.
    positions: `[B, T]` integer position ids (rotary angles and the causal
      order). Default: `cache_index + arange(T)`; with `attention_mask` and no
      `positions`, `clip(cumsum(attention_mask) - 1, 0)` (a left-padded row
      starts at position 0 at its first real token, as Hugging Face's
      `generate` numbers it). NumPy positions (known when tracing) give
      constant rotary tables.
    cache: optional KV cache (`init_cache`); the new keys/values are written
      to slots `[cache_index, cache_index + T)` and the queries attend to all
      earlier slots.
    cache_index: the first cache slot written (int, or a traced scalar).
    attention_mask: optional `[B, T]` (bool or 0/1) marking real tokens; no
      query attends to a key where it is 0. Only without `cache`.

  Returns:
    `h_BxTxD`, `[B, T, D]` in `cfg.compute_dtype`; with `cache`, the pair
    `(h_BxTxD, new_cache)`.
  """
  _check_param_shapes(params, cfg, keys=("layers", "norm"))
  if np.ndim(x_BxTxD) != 3 or np.shape(x_BxTxD)[-1] != cfg.dim:
    raise ValueError(f"x_BxTxD must have shape [batch, length, dim={cfg.dim}], got shape {np.shape(x_BxTxD)}")
  if np.shape(x_BxTxD)[1] > cfg.max_seq_len:
    raise ValueError(f"x_BxTxD length {np.shape(x_BxTxD)[1]} exceeds the context max_seq_len={cfg.max_seq_len}")
  B, T = np.shape(x_BxTxD)[:2]
  for name, arr in (("positions", positions), ("attention_mask", attention_mask)):
    if arr is not None and tuple(np.shape(arr)) != (B, T):
      raise ValueError(f"{name} must have shape [batch, length] = {(B, T)}, got shape {np.shape(arr)}")
  if attention_mask is not None and cache is not None:
    raise ValueError("attention_mask is supported without a cache only (a cache's slots are all attended to)")
  h, new_cache = _decoder(params, x_BxTxD, cfg, positions, cache, cache_index, attention_mask)
  return h if cache is None else (h, new_cache)


def _decoder(params: Params, x_BxTxD, cfg: LlamaConfig, positions_BxT, cache: KVCache | None, cache_index,
             attention_mask_BxT=None):
  """`decoder` without the checks. Returns `(h_BxTxD, new cache or None)`."""
  B, T = x_BxTxD.shape[:2]
  x = _shard_batch(x_BxTxD.astype(cfg.compute_dtype))
  impl = cfg.resolved_attention_impl() if cache is None else "cpu"
  if impl == "pallas" and positions_BxT is not None:
    impl = "blockwise"  # the kernel's causal order is the index: given positions need the exact form
  index_order = positions_BxT is None  # positions are arange(T), or cumsum(attention_mask) - 1
  if positions_BxT is None and attention_mask_BxT is not None:
    xp = np if isinstance(attention_mask_BxT, np.ndarray) else jnp  # NumPy masks: constant rotary tables
    counts = xp.cumsum(xp.asarray(attention_mask_BxT).astype(np.int32), axis=1).astype(np.int32)
    positions_BxT = xp.maximum(counts - 1, 0)
  # Positions known when tracing (training, prefill): constant rotary tables.
  static_positions = positions_BxT is None and isinstance(cache_index, (int, np.integer))
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + cache_index, (B, T))
  if static_positions:
    cos, sin = nn.rope_tables(np.arange(T, dtype=np.int32)[None] + int(cache_index), cfg.head_dim, cfg.rope_theta)
  else:
    cos, sin = nn.rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta)
  if cache is None:
    k_pos = positions_BxT
  else:
    S = cache.max_len
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  k_valid = None if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
  mask = nn.causal_mask(positions_BxT, k_pos, k_valid) if impl == "cpu" else None
  by_index = impl in ("cudnn", "pallas") and index_order and attention_mask_BxT is None
  if impl == "cudnn" and not by_index:
    impl = "blockwise"  # cuDNN's kernel gets its own causal mask only (a [B, 1, T, S] one would be materialised)
  q_pos, k_pos = (None, None) if by_index else (positions_BxT, k_pos)

  def attend(kv, _):
    """The block's attention: over the new keys alone, or written into the cache `kv` and over all of it."""
    def fn(q, k, v):
      if kv is None and impl != "cpu":
        return flash.attention(q, k, v, impl=impl, q_positions_BxT=q_pos,
                               k_positions_BxS=k_pos, k_valid_BxS=k_valid, block_q=cfg.attention_block,
                               block_k=cfg.attention_block), None
      if kv is None:
        return nn.cached_attention(q, nn.keys_layout(k), nn.values_layout(v), mask), None
      k_all, v_all = nn.write_cache(kv[0], kv[1], k, v, cache_index)
      return nn.cached_attention(q, k_all, v_all, mask), (k_all, v_all)
    return fn

  x, new_cache = _run_layers(cfg, params, x, cos, sin, attend, cache, remat=cfg.remat and cache is None)
  return nn.rms_norm(x, params["norm"], cfg.norm_eps), new_cache


def head(params: Params, h_BxTxD: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """The output projection: logits from `decoder`'s (final-normed) hidden states.

  Args:
    params: Llama parameters; only `output` `[D, V]` (or its column chunks,
      see `split_output_columns`) is read and checked against `cfg`.
    h_BxTxD: `[B, T, cfg.dim]` hidden states from `decoder`.
    cfg: the model config.

  Returns:
    `[B, T, V]` float32 logits (the product runs in `cfg.compute_dtype`).
  """
  _check_param_shapes(params, cfg, keys=("output",))
  if np.ndim(h_BxTxD) < 1 or np.shape(h_BxTxD)[-1] != cfg.dim:
    raise ValueError(f"h_BxTxD must end in dim={cfg.dim}, got shape {np.shape(h_BxTxD)}")
  return _head(params, h_BxTxD, cfg)


def _head(params: Params, h_BxTxD, cfg: LlamaConfig):
  return _logits(h_BxTxD, params["output"], cfg.compute_dtype)


def apply(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig, *, positions_BxT: jax.Array | None = None,
          cache: KVCache | None = None, cache_index: jax.Array | int = 0,
          return_hidden: bool = False):
  """Forward pass: `head(params, decoder(params, embed(params, tokens), cfg, ...), cfg)`.

  Without `cache`: a causal forward over `tokens` at positions `0..T-1` (or
  `positions_BxT`). With `cache` (from `init_cache`): the tokens are written
  to cache slots `[cache_index, cache_index + T)` and attend to every earlier
  slot; positions default to `cache_index + arange(T)`. This one function
  serves prefill (T = prompt length) and decode (T = 1).

  Layers run under `jax.lax.scan` when `cfg.scan_layers` (one compiled block,
  fast compiles for deep models) or as an unrolled loop that writes the new
  keys/values into per-layer cache arrays in place (faster small models on
  CPU). Either loop accepts either cache form and returns the form it was given.

  Checks before any compute: `params` against `cfg` (`check_params`: keys and
  shapes, so a wrong `n_layers`, `vocab_size` or `dim` raises; free under
  jit, shapes being static) and `tokens_BxT` (`check_tokens`). The id range
  is checked only for concrete tokens: under a caller's own `jax.jit` the
  ids are tracers, and an out-of-vocabulary id there is not detected (JAX
  clamps the embedding lookup).

  Args:
    params: Llama parameters (`init`, `from_hf`, ...); per-layer
      (`unstack_layers`) and column-split (`split_output_columns`) forms too.
    tokens_BxT: `[B, T]` integer token ids in `[0, cfg.vocab_size)`.
    cfg: the model config.
    positions_BxT: optional `[B, T]` integer positions (see `decoder`).
    cache: optional KV cache (see `decoder`).
    cache_index: the first cache slot written.
    return_hidden: return `decoder`'s final-normed hidden states `[B, T, D]`
      (compute dtype) instead of logits (for reward/value heads).

  Returns:
    `[B, T, V]` float32 logits (or the hidden states); with `cache`, the pair
    `(logits, new_cache)`.

  Raises:
    ValueError: for params that do not match `cfg`, or bad tokens.
    TypeError: for non-integer tokens.
  """
  check_params(params, cfg)
  check_tokens(tokens_BxT, cfg)
  out, new_cache = _forward(params, tokens_BxT, cfg, positions_BxT, cache, cache_index, return_hidden)
  return out if cache is None else (out, new_cache)


def _forward(params: Params, tokens_BxT, cfg: LlamaConfig, positions_BxT=None, cache=None, cache_index=0,
             return_hidden=False, attention_mask_BxT=None):
  """`apply` without the checks. Returns `(logits or hidden states, new cache or None)`."""
  h, new_cache = _decoder(params, _embed(params, tokens_BxT, cfg), cfg, positions_BxT, cache, cache_index,
                          attention_mask_BxT)
  return (h if return_hidden else _head(params, h, cfg)), new_cache


def _run_layers(cfg: LlamaConfig, params: Params, x, cos, sin, attend, cache: KVCache | None,
                read_only: KVCache | None = None, remat: bool = False):
  """The decoder blocks over `x`. Returns `(x, new cache)` (None without a cache).

  `attend(kv, ro)` makes a block's attention (see `_block`) for its layer's
  pair of `cache` arrays `kv` (written) and of `read_only` arrays `ro` (None
  where that cache is None). Layers run under `jax.lax.scan` when
  `cfg.scan_layers` (one compiled block, fast compiles for deep models) or as an
  unrolled loop that writes each layer's cache arrays in place (faster small
  models on CPU). Either loop takes either cache form and returns the written
  cache in the form it was given.
  """
  policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
  wrap = (lambda f: jax.checkpoint(f, static_argnums=(2,), policy=policy)) if remat else (lambda f: f)
  block = wrap(lambda x, lp, fn: _block(cfg, x, lp, cos, sin, fn))
  def pairs(c: KVCache | None, form):
    return None if c is None else tuple(form(c))

  if cfg.scan_layers:
    def body(x, layer_in):
      lp, kv, ro = layer_in
      return block(x, lp, attend(kv, ro))

    xs = (stack_layers(params)["layers"], pairs(cache, KVCache.as_stacked), pairs(read_only, KVCache.as_stacked))
    x, kv_out = jax.lax.scan(body, x, xs)
    if cache is None:
      return x, None
    out = KVCache(*kv_out)
    return x, (out if cache.is_stacked else out.as_layers())
  kv_layers, ro_layers = pairs(cache, KVCache.as_layers), pairs(read_only, KVCache.as_layers)
  ks, vs = [], []
  for i, lp in enumerate(unstack_layers(params)["layers"]):
    kv = None if kv_layers is None else (kv_layers[0][i], kv_layers[1][i])
    ro = None if ro_layers is None else (ro_layers[0][i], ro_layers[1][i])
    x, kv_new = block(x, lp, attend(kv, ro))
    if cache is not None:
      ks.append(kv_new[0])
      vs.append(kv_new[1])
  if cache is None:
    return x, None
  out = KVCache(k=tuple(ks), v=tuple(vs))
  return x, (out.as_stacked() if cache.is_stacked else out)


def apply_split_cache(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig, past: KVCache, recent: KVCache,
                      cache_index: jax.Array):
  """Decoding against a cache held in two pieces: `past` (slots `[0, P)`, read only) and
  `recent` (slots `[P, P + R)`), where `P` and `R` are the pieces' lengths.

  The tokens (positions `cache_index + arange(T)`, all inside the recent
  piece) are written into `recent` and attend to all of `past` and to the
  written part of `recent`. Returns `(logits [B, T, V] float32, new recent)`.
  A decode loop over positions `[P, P + R)` thus reads `P + R` cache slots per
  step instead of the whole cache and writes only the small recent piece, in
  place; between such loops the caller appends the recent piece to the past.
  Same numbers as `apply` with one cache holding both pieces; the same checks
  of `params` and `tokens_BxT` as `apply`.

  Args:
    params: Llama parameters (any form `apply` takes).
    tokens_BxT: `[B, T]` integer token ids.
    cfg: the model config.
    past: the read-only cache piece, slots `[0, P)` (`KVCache`).
    recent: the written cache piece, slots `[P, P + R)` (`KVCache`).
    cache_index: the first slot written, in `[P, P + R - T]` (int32 scalar).

  Returns:
    `(logits, new_recent)`: `[B, T, V]` float32 logits and the updated recent piece.
  """
  check_params(params, cfg)
  check_tokens(tokens_BxT, cfg)
  if not (isinstance(past, KVCache) and isinstance(recent, KVCache)):
    raise TypeError(f"past and recent must be KVCache pieces, got {type(past).__name__}, {type(recent).__name__}")
  B, T = tokens_BxT.shape
  P, R = past.max_len, recent.max_len
  positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + cache_index, (B, T))
  cos, sin = nn.rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta, max_position=P + R)
  recent_mask = nn.causal_mask(positions_BxT, jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32) + P, (B, R)))
  x = _embed(params, tokens_BxT, cfg)

  def attend(kv, ro):
    def fn(q, k, v):
      k_rec, v_rec = nn.write_cache(kv[0], kv[1], k, v, cache_index - P)
      return nn.split_cached_attention(q, [(ro[0], ro[1], None), (k_rec, v_rec, recent_mask)]), (k_rec, v_rec)
    return fn

  x, new_recent = _run_layers(cfg, params, x, cos, sin, attend, recent, read_only=past)
  x = nn.rms_norm(x, params["norm"], cfg.norm_eps)
  return _head(params, x, cfg), new_recent


def _logits(x, w_DxV, dt):
  """Float32 logits `x @ w`; `w` may be a tuple of column chunks (see `split_output_columns`)."""
  if isinstance(w_DxV, (tuple, list)):
    return jnp.concatenate([nn.linear(x, w.astype(dt), out_dtype=jnp.float32) for w in w_DxV], axis=-1)
  return nn.linear(x, w_DxV.astype(dt), out_dtype=jnp.float32)


def join_projections(params: Params) -> Params:
  """`params` with each layer's `wq`, `wk`, `wv` as one `wqkv` and `w1`, `w3` as one `w13`
  (columns side by side, stacked or per-layer weights alike).

  `apply` and `apply_split_cache` take either form (the same products, as one
  matmul per input). On XLA:CPU with one thread a decode step of the
  benchmark's small Llama ran about 3% faster joined at batch 8 and 6% at
  batch 1 (`benchmarks/decode_forms.py`); with two threads 9% slower,
  because the joined 384- and 704-column products are split across both
  threads (`generate.decode_loop` joins only on one thread; see BUILD_NOTES).
  Join once, outside a decode loop.
  """
  def join(lp):
    lp = dict(lp)
    for name, parts in _JOINED.items():
      lp[name] = jnp.concatenate([lp.pop(part) for part in parts], axis=-1)
    return lp

  layers = params["layers"]
  return dict(params, layers=tuple(join(lp) for lp in layers) if isinstance(layers, (tuple, list)) else join(layers))


def split_output_columns(params: Params, width: int) -> Params:
  """`params` with the output projection as a tuple of `[D, <= width]` column chunks.

  `apply` and `apply_split_cache` take either form (same logits). On XLA:CPU a decode
  step's `[B, D] x [D, V]` product with a few hundred columns or more is split
  across two threads, and waking the second one (about 55 us on the 2-core
  machine of the README's figures) costs more than the whole product; products
  of at most 256 columns run on the calling thread. Split once, outside the
  decode loop (slicing inside it would copy the weight at every step).
  """
  w = params["output"]
  return dict(params, output=tuple(w[:, i:i + width] for i in range(0, w.shape[1], width)))


def unstack_layers(params: Params) -> Params:
  """`params` with `layers` as a tuple of per-layer dicts (unstacked weights).

  `apply` takes either form. Unstacking once outside a decode loop keeps XLA
  from slicing (copying) every layer's weights out of the stacked arrays at
  each step. Differentiable: the gradient of the stacked weights is the stack
  of the per-layer gradients (built as one stack, not as padded sums).
  """
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return params
  return dict(params, layers=nn.unstack(layers))


def stack_layers(params: Params) -> Params:
  """The inverse of `unstack_layers`: per-layer weights stacked on a leading axis."""
  layers = params["layers"]
  if not isinstance(layers, (tuple, list)):
    return params
  return dict(params, layers=jax.tree.map(lambda *ws: jnp.stack(ws), *layers))


def init_cache(cfg: LlamaConfig, batch: int, max_len: int | None = None) -> KVCache:
  """An empty KV cache (`nn.KVCache`) in the compute dtype: stacked `[L, ...]` arrays for
  scanned layers, tuples of `L` per-layer arrays for unrolled ones."""
  max_len = cfg.max_seq_len if max_len is None else max_len
  if max_len > cfg.max_seq_len:
    raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}")
  return KVCache.zeros(cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim, cfg.compute_dtype,
                      stacked=cfg.scan_layers)


# Mean token cross-entropy and the number of counted tokens: the shared, CPU-fast form
# (logsumexp minus a one-hot product; its gradient is dense, not a scatter).
cross_entropy = nn.cross_entropy


def loss_fn(params: Params, batch: dict[str, jax.Array], cfg: LlamaConfig):
  """Next-token loss: the logits at `t` score the token at `t + 1`.

  With `cfg.loss_chunk = n > 0` the logits are computed from the hidden states
  `n` positions at a time (`nn.chunked_token_nll`, its own backward): the same
  loss, metrics and gradients without the `[B, T, V]` float32 logits.

  Checks `params` against `cfg` (as `apply`) and `batch["tokens"]`, targets
  included, with `check_tokens`. Under a caller's own `jax.jit` (the train
  step) the token values are tracers and out-of-vocabulary ids cannot be
  checked; the shape checks still run, once, at trace time.

  Args:
    params: Llama parameters.
    batch: `{"tokens": [B, T+1] int, "mask": optional [B, T+1] (0/1 or
      bool)}`; `mask[:, t]` weighs the prediction of `tokens[:, t]`
      (`mask[:, 0]` is unused: nothing predicts the first token).
    cfg: the model config.

  Returns:
    `(loss, metrics)`: the mean token cross-entropy (float32 scalar, nats) and
    a dict of float32 scalars `loss`, `perplexity`, `accuracy`, `tokens`
    (the number of counted tokens).

  Raises:
    ValueError: for params that do not match `cfg`, bad token ids or shapes,
      or a mask of another shape.
  """
  check_params(params, cfg)
  tokens = batch["tokens"]
  check_tokens(tokens, cfg, what="batch['tokens']", max_len=cfg.max_seq_len + 1)
  mask = batch.get("mask")
  if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(tokens)):
    raise ValueError(f"batch['mask'] must have the shape of batch['tokens'] {np.shape(tokens)}, "
                     f"got {np.shape(mask)}")
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = None if mask is None else mask[:, 1:]
  if cfg.loss_chunk:
    h, _ = _forward(params, inputs, cfg, return_hidden=True)
    w = params["output"]
    w = jnp.concatenate(w, axis=-1) if isinstance(w, (tuple, list)) else w
    nll, correct = losses.chunked_token_nll(h, w.astype(cfg.compute_dtype), targets, chunk=cfg.loss_chunk)
    loss, n = losses.masked_mean(nll, mask)
    acc, _ = losses.masked_mean(correct, mask)
    return loss, {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": acc, "tokens": n}
  logits, _ = _forward(params, inputs, cfg)
  loss, n = cross_entropy(logits, targets, mask)
  correct = (nn.first_argmax(logits) == targets).astype(jnp.float32)
  m = jnp.ones_like(correct) if mask is None else mask.astype(jnp.float32)
  acc = (correct * m).sum() / jnp.maximum(m.sum(), 1.0)
  return loss, {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": acc, "tokens": n}


def sequence_logprobs(params: Params, tokens_BxT: jax.Array, loss_mask_BxT: jax.Array, cfg: LlamaConfig, *,
                      attention_mask_BxT: jax.Array | None = None) -> jax.Array:
  """Log-probability of each row's scored tokens: `sum_t loss_mask[t] * log p(tokens[t] | tokens[<t])`.

  The token at `t` is scored by the log-softmax of the logits at `t - 1`
  (float32). Rows may be right- or left-padded: `attention_mask_BxT` marks the
  real tokens; no token attends to padding, and each row's positions are
  `clip(cumsum(attention_mask) - 1, 0)`, so a left-padded row starts at
  position 0 at its first real token (the `position_ids` Hugging Face's
  `generate` makes). A padded row thus scores as the same row unpadded.

  A token can be scored only if it is real and follows a real token: the first
  column and each row's first real token have no prediction. Where the mask is
  concrete, a `loss_mask_BxT` of 1 at such a token raises; under a caller's
  own `jax.jit` it cannot be checked and such entries are ignored (counted as
  0), as are out-of-vocabulary ids unchecked there (see `check_tokens`).
  Differentiable in `params` (policy-gradient and preference losses).

  Args:
    params: Llama parameters (checked against `cfg`).
    tokens_BxT: `[B, T]` integer token ids (padding ids must be in the
      vocabulary too; they are never attended to).
    loss_mask_BxT: `[B, T]` (0/1 or bool) marking the tokens to score.
    cfg: the model config.
    attention_mask_BxT: optional `[B, T]` (0/1 or bool) marking real tokens;
      default all ones.

  Returns:
    `[B]` float32: the sum over scored tokens of their log-probabilities (0 for
    a row with none).

  Raises:
    ValueError: for params that do not match `cfg`, bad tokens, masks of
      another shape, or scored tokens without a prediction (concrete masks).
  """
  check_params(params, cfg)
  check_tokens(tokens_BxT, cfg, what="tokens_BxT")
  shape = tuple(np.shape(tokens_BxT))
  for name, m in (("loss_mask_BxT", loss_mask_BxT), ("attention_mask_BxT", attention_mask_BxT)):
    if m is not None and tuple(np.shape(m)) != shape:
      raise ValueError(f"{name} must have the shape of tokens_BxT {shape}, got {np.shape(m)}")
  real = attention_mask_BxT
  if real is not None:  # concrete masks as NumPy: positions and masks are then constants when traced
    real = real.astype(bool) if isinstance(real, jax.core.Tracer) else np.asarray(real).astype(bool)
  # Scorable: t >= 1, the token at t is real and so is the one at t - 1 (whose logits score it).
  scorable = np.ones((shape[0], shape[1] - 1), bool) if real is None else (real[:, 1:] & real[:, :-1])
  if not isinstance(loss_mask_BxT, jax.core.Tracer) and not isinstance(scorable, jax.core.Tracer):
    lm = np.asarray(loss_mask_BxT) != 0
    bad = np.concatenate([lm[:, :1], lm[:, 1:] & ~np.asarray(scorable)], axis=1)
    if bad.any():
      b, t = np.argwhere(bad)[0]
      raise ValueError(f"loss_mask_BxT is 1 at (row {b}, column {t}) where no prediction exists: the first column "
                       f"and each row's first real token (attention_mask_BxT) have no preceding token "
                       f"({int(bad.sum())} such entries)")
  logits, _ = _forward(params, tokens_BxT, cfg, attention_mask_BxT=real)
  logits = logits[:, :-1].astype(jnp.float32)
  targets = jnp.asarray(tokens_BxT)[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_logp = picked - jax.nn.logsumexp(logits, axis=-1)
  weight = jnp.asarray(loss_mask_BxT)[:, 1:].astype(jnp.float32) * jnp.asarray(scorable).astype(jnp.float32)
  return jnp.sum(token_logp * weight, axis=-1)
