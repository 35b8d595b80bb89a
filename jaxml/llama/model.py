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
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.llama.config import LlamaConfig
from jaxml.nn import layers as nn

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
  """Raises ValueError naming every key or shape that does not match `cfg`."""
  expected = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  problems = []
  exp_keys = set()
  for path, spec in expected:
    name = jax.tree_util.keystr(path)
    exp_keys.add(path)
    if path not in got:
      problems.append(f"missing {name} {tuple(spec.shape)}")
    elif tuple(np.shape(got[path])) != tuple(spec.shape):
      problems.append(f"{name}: shape {tuple(np.shape(got[path]))}, config expects {tuple(spec.shape)}")
  for path in got:
    if path not in exp_keys:
      problems.append(f"unexpected {jax.tree_util.keystr(path)}")
  if problems:
    raise ValueError("Llama parameters do not match the config:\n  " + "\n  ".join(problems))


def check_tokens(tokens: Any, cfg: LlamaConfig, *, what: str = "tokens") -> None:
  """Validates a token array before any compute: integer dtype, rank 2, ids in range.

  The value check runs only on concrete arrays (not inside a trace).
  """
  if not jnp.issubdtype(jnp.asarray(tokens).dtype if not hasattr(tokens, "dtype") else tokens.dtype, jnp.integer):
    raise TypeError(f"{what} must be an integer array, got dtype {getattr(tokens, 'dtype', type(tokens))}")
  if np.ndim(tokens) != 2:
    raise ValueError(f"{what} must have shape [batch, length], got shape {np.shape(tokens)}")
  if np.shape(tokens)[1] > cfg.max_seq_len:
    raise ValueError(f"{what} length {np.shape(tokens)[1]} exceeds the context max_seq_len={cfg.max_seq_len}")
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
  q = nn.linear(h, lp["wq"].astype(dt)).reshape(B, T, H, Dh)
  k = nn.linear(h, lp["wk"].astype(dt)).reshape(B, T, K, Dh)
  v = nn.linear(h, lp["wv"].astype(dt)).reshape(B, T, K, Dh)
  q = nn.apply_rope_tables(q, cos, sin)
  k = nn.apply_rope_tables(k, cos, sin)
  attn, kv = attend(q, k.astype(dt), v.astype(dt))
  x = x + nn.linear(attn.reshape(B * T, H * Dh), lp["wo"].astype(dt))
  h = nn.rms_norm(x, lp["ffn_norm"], cfg.norm_eps)
  x = x + nn.swiglu(h, lp["w1"].astype(dt), lp["w3"].astype(dt), lp["w2"].astype(dt))
  return x.reshape(B, T, D), kv


def apply(params: Params, tokens_BxT: jax.Array, cfg: LlamaConfig, *, positions_BxT: jax.Array | None = None,
          cache: KVCache | None = None, cache_index: jax.Array | int = 0,
          return_hidden: bool = False):
  """Forward pass. Returns float32 logits `[B, T, V]` (and the new cache).

  Without `cache`: a causal forward over `tokens` at positions `0..T-1` (or
  `positions_BxT`). Returns `logits`.

  With `cache` (from `init_cache`): the tokens are written to cache slots
  `[cache_index, cache_index + T)` and attend to every earlier slot; positions
  default to `cache_index + arange(T)`. Returns `(logits, new_cache)`. This one
  function serves prefill (T = prompt length) and decode (T = 1).

  `return_hidden=True` returns the final normed hidden states `[B, T, D]`
  instead of logits (for reward/value heads).

  Layers run under `jax.lax.scan` when `cfg.scan_layers` (one compiled block,
  fast compiles for deep models) or as an unrolled loop that writes the new
  keys/values into per-layer cache arrays in place (faster small models on
  CPU). Either loop accepts either cache form and returns the form it was given.
  """
  check_tokens(tokens_BxT, cfg)
  B, T = tokens_BxT.shape
  dt = cfg.compute_dtype
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
  mask = nn.causal_mask(positions_BxT, k_pos)
  x = params["tok_embeddings"].astype(dt)[tokens_BxT]

  def attend(kv, _):
    """The block's attention: over the new keys alone, or written into the cache `kv` and over all of it."""
    def fn(q, k, v):
      if kv is None:
        return nn.cached_attention(q, nn.keys_layout(k), nn.values_layout(v), mask), None
      k_all, v_all = nn.write_cache(kv[0], kv[1], k, v, cache_index)
      return nn.cached_attention(q, k_all, v_all, mask), (k_all, v_all)
    return fn

  x, new_cache = _run_layers(cfg, params, x, cos, sin, attend, cache, remat=cfg.remat and cache is None)
  x = nn.rms_norm(x, params["norm"], cfg.norm_eps)
  out = x if return_hidden else _logits(x, params["output"], dt)
  if cache is None:
    return out
  return out, new_cache


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
  wrap = (lambda f: jax.checkpoint(f, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable)) \
      if remat else (lambda f: f)
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
  Same numbers as `apply` with one cache holding both pieces.
  """
  check_tokens(tokens_BxT, cfg)
  if not (isinstance(past, KVCache) and isinstance(recent, KVCache)):
    raise TypeError(f"past and recent must be KVCache pieces, got {type(past).__name__}, {type(recent).__name__}")
  B, T = tokens_BxT.shape
  dt = cfg.compute_dtype
  P, R = past.max_len, recent.max_len
  positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + cache_index, (B, T))
  cos, sin = nn.rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta, max_position=P + R)
  recent_mask = nn.causal_mask(positions_BxT, jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32) + P, (B, R)))
  x = params["tok_embeddings"].astype(dt)[tokens_BxT]

  def attend(kv, ro):
    def fn(q, k, v):
      k_rec, v_rec = nn.write_cache(kv[0], kv[1], k, v, cache_index - P)
      return nn.split_cached_attention(q, [(ro[0], ro[1], None), (k_rec, v_rec, recent_mask)]), (k_rec, v_rec)
    return fn

  x, new_recent = _run_layers(cfg, params, x, cos, sin, attend, recent, read_only=past)
  x = nn.rms_norm(x, params["norm"], cfg.norm_eps)
  return _logits(x, params["output"], dt), new_recent


def _logits(x, w_DxV, dt):
  """Float32 logits `x @ w`; `w` may be a tuple of column chunks (see `split_output_columns`)."""
  if isinstance(w_DxV, (tuple, list)):
    return jnp.concatenate([nn.linear(x, w.astype(dt), out_dtype=jnp.float32) for w in w_DxV], axis=-1)
  return nn.linear(x, w_DxV.astype(dt), out_dtype=jnp.float32)


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
  each step.
  """
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return dict(params, layers=tuple(jax.tree.map(lambda w, i=i: w[i], layers) for i in range(n)))


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


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array | None = None):
  """Mean token cross-entropy (nats) and the number of counted tokens."""
  # logsumexp minus the target logit picked by a one-hot product: the same value as gathering
  # from log_softmax, but its gradient is a dense multiply instead of a scatter (faster on CPU).
  logits = logits_BxTxV.astype(jnp.float32)
  onehot = jax.nn.one_hot(targets_BxT, logits.shape[-1], dtype=jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(onehot * logits, axis=-1)
  if mask_BxT is None:
    mask_BxT = jnp.ones_like(nll)
  mask_BxT = mask_BxT.astype(jnp.float32)
  n = jnp.maximum(mask_BxT.sum(), 1.0)
  return (nll * mask_BxT).sum() / n, n


def loss_fn(params: Params, batch: dict[str, jax.Array], cfg: LlamaConfig):
  """Next-token loss. `batch["tokens"]`: `[B, T+1]` int32; optional `batch["mask"]` `[B, T+1]`.

  Returns `(loss, metrics)` with `loss`, `perplexity`, `accuracy`, `tokens`.
  """
  tokens = batch["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits = apply(params, inputs, cfg)
  mask = batch.get("mask")
  mask = None if mask is None else mask[:, 1:]
  loss, n = cross_entropy(logits, targets, mask)
  correct = (nn.first_argmax(logits) == targets).astype(jnp.float32)
  m = jnp.ones_like(correct) if mask is None else mask.astype(jnp.float32)
  acc = (correct * m).sum() / jnp.maximum(m.sum(), 1.0)
  return loss, {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": acc, "tokens": n}
