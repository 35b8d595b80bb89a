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


def _block(cfg: LlamaConfig, x_BxTxD, lp, cos, sin, mask, update_kv):
  """One pre-norm decoder block.

  `update_kv(k, v) -> (k_all, v_all)` stores the new keys/values `[B, T, K, Dh]`
  in a cache and returns what attention should see, in the layouts of
  `nn.cached_attention` (without a cache: the new keys/values themselves).
  Projections run on `[B*T, D]` matrices: on CPU, XLA sends the weight gradient
  of a 2-D matmul to its fast GEMM path, while 3-D inputs (two contracting dims
  in the gradient) get a slow generic dot.
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
  k, v = update_kv(k, v)
  attn = nn.cached_attention(q, k.astype(dt), v.astype(dt), mask)
  x = x + nn.linear(attn.reshape(B * T, H * Dh), lp["wo"].astype(dt))
  h = nn.rms_norm(x, lp["ffn_norm"], cfg.norm_eps)
  x = x + nn.swiglu(h, lp["w1"].astype(dt), lp["w3"].astype(dt), lp["w2"].astype(dt))
  return x.reshape(B, T, D), (k, v)


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
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + cache_index, (B, T))
  cos, sin = nn.rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta)
  if cache is None:
    k_pos = positions_BxT
  else:
    S = cache.max_len
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  mask = nn.causal_mask(positions_BxT, k_pos)
  x = params["tok_embeddings"].astype(dt)[tokens_BxT]
  no_cache = lambda k, v: (nn.keys_layout(k), nn.values_layout(v))

  def block(x, lp, update_kv):
    return _block(cfg, x, lp, cos, sin, mask, update_kv)

  # Rematerialisation only matters for gradients; a cached (inference) pass runs the blocks as they are.
  remat = lambda f: jax.checkpoint(f, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable) \
      if cfg.remat and cache is None else f
  new_cache = None
  if cfg.scan_layers:
    stacked = None if cache is None else cache.as_stacked()

    def body(x, layer_in):
      lp, kv = layer_in
      update = no_cache if kv is None else (
          lambda k, v: nn.write_cache(kv[0], kv[1], k, v, cache_index))
      x, kv_new = remat(block)(x, lp, update)
      return x, (None if kv is None else kv_new)

    x, kv_out = jax.lax.scan(body, x, (stack_layers(params)["layers"], None if cache is None else (stacked.k, stacked.v)))
    if cache is not None:
      new_cache = KVCache(k=kv_out[0], v=kv_out[1])
      new_cache = new_cache if cache.is_stacked else new_cache.as_layers()
  else:
    per_layer = None if cache is None else cache.as_layers()
    ks, vs = (None, None) if cache is None else (list(per_layer.k), list(per_layer.v))
    layer_params = unstack_layers(params)["layers"]
    for i in range(cfg.n_layers):
      lp = layer_params[i]

      def update(k, v, i=i):
        ks[i], vs[i] = nn.write_cache(ks[i], vs[i], k, v, cache_index)
        return ks[i], vs[i]

      x, _ = remat(block)(x, lp, no_cache if cache is None else update)
    if cache is not None:
      new_cache = KVCache(k=tuple(ks), v=tuple(vs))
      new_cache = new_cache.as_stacked() if cache.is_stacked else new_cache
  x = nn.rms_norm(x, params["norm"], cfg.norm_eps)
  out = x if return_hidden else nn.linear(x, params["output"].astype(dt), out_dtype=jnp.float32)
  if cache is None:
    return out
  return out, new_cache


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
