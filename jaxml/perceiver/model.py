"""Perceiver and Perceiver IO as pure functions over a plain parameter dict.

Blocks (LN: LayerNorm with eps `cfg.layer_norm_eps`; widths from the config):

    Attn(x_q, x_kv) = concat_h softmax(q_h k_h^T / sqrt(d_qk / H)) v_h  Wo + bo,
                      q = x_q Wq + bq,  k = x_kv Wk + bk,  v = x_kv Wv + bv   (H heads)
    cross-attend(z, x): a = Attn(LN(z), LN'(x));  z <- z + a (use_query_residual) or a;  z <- z + MLP(LN''(z))
    self-attend(z):     z <- z + Attn(LN(z), LN(z));                          z <- z + MLP(LN''(z))
    MLP(h) = GELU(h W1 + b1) W2 + b2,  W1: C x (widening * C)

Encoder (`encode`): the learned latents `[N, D]` (the same for every example)
cross-attend to the inputs `[B, M, C]`, then `num_blocks` passes through the
same `num_self_attends_per_block` self-attention layers (with
`repeat_cross_attention`, the original Perceiver: a cross-attend before each
block, blocks 2.. sharing one set of cross-attend weights). The cross-attend
costs time linear in M; the latent transformer's cost, O(L N^2 D + L N D^2),
does not depend on M. `cfg.dropout` (training, with an `rng`) drops units of
every attention and MLP output before its residual add.
Decoders (`decode`): queries `[Q, C_q]` (learned, or Fourier features of the
output positions) cross-attend to the latents with the decoder's own
settings, then an optional linear layer. The masked LM's logits are
`h E^T + b` with `E` the byte embedding (`embedding_logits`).

Masks. An input mask `[B, M]` (True or 1: a real input) hides inputs from the
encoder's cross-attention: a masked input changes nothing. An example whose
inputs are all masked gets a zero attention output (deepmind's rule;
transformers' additive -inf mask attends uniformly there). A query mask
`[B, Q]` sets the decoder outputs of masked queries to zero; the masked LM
passes its input mask as the query mask, so padded positions score only the
output bias. (transformers ignores the query mask.)

Without position features the encoder is invariant to permuting its inputs
(and their mask): attention sums over keys.

Parameters (`init`; dense layers are `{"w": [in, out], "b": [out]}`, norms
`{"scale", "bias"}`):

    latents              [N, D]
    cross_attend         layer (queries D wide, keys/values d_model wide)
    cross_attend_repeat  layer, shared by the cross-attends of blocks 2.. (repeat_cross_attention only)
    self_attends         layer, each leaf stacked on a leading axis [num_self_attends_per_block, ...]
    input                bytes: {"embeddings": [vocab_size, d_model], "positions": [max_position_embeddings, d_model]}
    decoders             {name: {"queries": [Q, C_q] (learned), "cross_attend": layer, "final": dense (projection)}}
    output_bias          [vocab_size] (masked_lm)
    layer = {"norm_q", "norm_kv" (cross-attention only), "query", "key", "value", "out", "norm_mlp",
             "mlp": [dense, dense]}
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import cpu_kernels, nn
from jaxml.perceiver.config import BYTE_OFFSET, CLS_ID, SEP_ID, DecoderConfig, PerceiverConfig
from jaxml.perceiver.positions import fourier_features, linear_positions

Params = dict[str, Any]
Array = jax.Array

_LATENT_STD = 0.02  # init std of the latents, learned queries, byte embedding and learned positions


# ----------------------------------------------------------------------------- byte vocabulary


def text_to_ids(text: str, *, add_special_tokens: bool = True) -> np.ndarray:
  """UTF-8 bytes of `text` as Perceiver ids (byte b -> b + 6), `[CLS] ... [SEP]` around them by default.

  The same ids as transformers' `PerceiverTokenizer` ("hello" -> 4 110 107 114 114 117 5).
  """
  ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
  if add_special_tokens:
    ids = [CLS_ID] + ids + [SEP_ID]
  return np.asarray(ids, np.int32)


def ids_to_text(ids) -> str:
  """The text of byte ids; the special ids (PAD, BOS, EOS, MASK, CLS, SEP) are dropped."""
  data = bytes(int(i) - BYTE_OFFSET for i in np.asarray(ids).reshape(-1) if BYTE_OFFSET <= int(i) < 256 + BYTE_OFFSET)
  return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- init


def _norm_spec(width: int, lead: tuple[int, ...] = ()) -> Params:
  return {"scale": nn.ParamSpec((*lead, width), value=1.0), "bias": nn.ParamSpec((*lead, width))}


def _dense_spec(n_in: int, n_out: int, lead: tuple[int, ...] = ()) -> Params:
  return {"w": nn.ParamSpec((*lead, n_in, n_out), 1.0 / math.sqrt(n_in)), "b": nn.ParamSpec((*lead, n_out))}


def _layer_spec(q_dim: int, kv_dim: int | None, qk: int, v: int, widening: int, lead: tuple[int, ...] = ()) -> Params:
  """One attention + MLP layer; `kv_dim` None: self-attention (no key/value norm). `lead`: stacking axes."""
  src = q_dim if kv_dim is None else kv_dim
  p = {"norm_q": _norm_spec(q_dim, lead), "query": _dense_spec(q_dim, qk, lead), "key": _dense_spec(src, qk, lead),
       "value": _dense_spec(src, v, lead), "out": _dense_spec(v, q_dim, lead), "norm_mlp": _norm_spec(q_dim, lead),
       "mlp": [_dense_spec(q_dim, widening * q_dim, lead), _dense_spec(widening * q_dim, q_dim, lead)]}
  if kv_dim is not None:
    p["norm_kv"] = _norm_spec(kv_dim, lead)
  return p


def _decoder_spec(d: DecoderConfig, cfg: PerceiverConfig) -> Params:
  width = cfg.decoder_query_channels(d)
  p = {"cross_attend": _layer_spec(width, cfg.d_latents, cfg.decoder_qk_channels(d), cfg.decoder_v_channels(d),
                                   d.widening_factor)}
  if d.queries == "learned":
    p["queries"] = nn.ParamSpec((d.num_queries, width), _LATENT_STD)
  if d.output_channels is not None:
    p["final"] = _dense_spec(width, d.output_channels)
  return p


def param_specs(cfg: PerceiverConfig) -> Params:
  """The parameter tree of `cfg` as `jaxml.nn.ParamSpec`s (shape, init std or constant)."""
  D, L = cfg.d_latents, cfg.num_self_attends_per_block
  cross = lambda: _layer_spec(D, cfg.d_model, cfg.cross_qk_channels, cfg.cross_v_channels,  # noqa: E731
                              cfg.cross_attention_widening_factor)
  specs: Params = {
      "latents": nn.ParamSpec((cfg.num_latents, D), _LATENT_STD),
      "cross_attend": cross(),
      "self_attends": _layer_spec(D, None, cfg.self_qk_channels, cfg.self_v_channels,
                                  cfg.self_attention_widening_factor, lead=(L,)),
  }
  if cfg.repeat_cross_attention and cfg.num_blocks > 1:
    specs["cross_attend_repeat"] = cross()
  if cfg.inputs == "bytes":
    specs["input"] = {"embeddings": nn.ParamSpec((cfg.vocab_size, cfg.d_model), _LATENT_STD),
                      "positions": nn.ParamSpec((cfg.max_position_embeddings, cfg.d_model), _LATENT_STD)}
  specs["decoders"] = {d.name: _decoder_spec(d, cfg) for d in cfg.decoder_configs}
  if cfg.task == "masked_lm":
    specs["output_bias"] = nn.ParamSpec((cfg.vocab_size,))
  return specs


def init(rng: Array, cfg: PerceiverConfig) -> Params:
  """Parameters of `cfg`'s model (float32; layout in the module docstring), from one normal draw
  (`jaxml.nn.init_from_specs`: one draw compiles fast on CPU, many small ones do not).

  Dense weights are fan-in scaled normals `N(0, 1 / n_in)` with zero biases,
  norms start at the identity, and the latents, learned queries, byte
  embedding and learned positions are `N(0, 0.02^2)` (transformers' init;
  deepmind truncates those at 2 sigma).
  """
  return nn.init_from_specs(rng, param_specs(cfg))


@functools.lru_cache(maxsize=64)
def param_shapes(cfg: PerceiverConfig) -> Params:
  """The parameter tree of `cfg` as `jax.ShapeDtypeStruct`s (no arrays built)."""
  return jax.tree.map(lambda spec: jax.ShapeDtypeStruct(spec.shape, jnp.float32), param_specs(cfg),
                      is_leaf=lambda x: isinstance(x, nn.ParamSpec))


def param_count(cfg: PerceiverConfig) -> int:
  """Number of parameters of `cfg`'s model (the shared self-attention layers counted once)."""
  return sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(cfg)))


def check_params(params: Params, cfg: PerceiverConfig) -> None:
  """Raises ValueError naming the first missing, unexpected or misshapen parameter."""
  expected = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]}
  try:
    found = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  except Exception as e:  # noqa: BLE001  (not a pytree of arrays)
    raise ValueError(f"params: not a parameter tree ({e})") from e
  missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
  if missing or unexpected:
    raise ValueError(f"params do not match the config: missing {missing[:6]}, unexpected {unexpected[:6]}")
  for path, shape in expected.items():
    if tuple(found[path]) != tuple(shape):
      raise ValueError(f"params{path} has shape {tuple(found[path])}, the config expects {tuple(shape)}")


# ----------------------------------------------------------------------------- input checks


def _as_array(x, what: str):
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  try:
    return np.asarray(x)
  except Exception as e:  # noqa: BLE001
    raise TypeError(f"{what} must be an array, got {type(x).__name__}") from e


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_mask(mask, shape: tuple[int, ...], what: str):
  if mask is None:
    return None
  mask = _as_array(mask, what)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
  if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.number)):
    raise TypeError(f"{what} must be bool or numeric (1: a real element), got {mask.dtype}")
  return jnp.asarray(mask) != 0


def check_byte_ids(ids, cfg: PerceiverConfig, what: str = "inputs"):
  """Checks byte ids `[B, M]`: integer, `M <= max_position_embeddings`, values in `[0, vocab_size)` when known."""
  ids = _as_array(ids, what)
  if ids.ndim != 2:
    raise ValueError(f"{what} must be byte ids [B, M], got shape {tuple(ids.shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{what} must hold integer ids, got {ids.dtype}")
  if ids.shape[1] > cfg.max_position_embeddings:
    raise ValueError(f"{what} has length {ids.shape[1]} > max_position_embeddings ({cfg.max_position_embeddings})")
  if _concrete(ids) and ids.size:
    values = np.asarray(ids)  # (np.min on a jax.Array would call its traced .min inside a caller's trace)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= cfg.vocab_size:
      raise ValueError(f"{what} holds ids in [{lo}, {hi}], outside [0, vocab_size={cfg.vocab_size})")
  return ids


def _check_width(x, width: int, what: str, field: str):
  x = _as_array(x, what)
  if x.ndim != 3:
    raise ValueError(f"{what} must be [B, M, C], got shape {tuple(x.shape)}")
  if x.shape[-1] != width:
    raise ValueError(f"{what} has width C={x.shape[-1]}, the config's {field} is {width}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{what} must be floating point, got {x.dtype}")
  return x


# ----------------------------------------------------------------------------- preprocessors


def embed_bytes(params: Params, ids_BxM, cfg: PerceiverConfig) -> Array:
  """Byte ids `[B, M]` -> `embeddings[ids] + positions[:M]`, `[B, M, d_model]` (transformers' text preprocessor)."""
  ids = check_byte_ids(ids_BxM, cfg, "ids_BxM")
  p = params["input"]
  return jnp.take(p["embeddings"], jnp.asarray(ids), axis=0) + p["positions"][None, :ids.shape[1]]


def pixel_features(pixels_BxHxWxC, cfg: PerceiverConfig) -> Array:
  """Images `[B, H, W, C]` (channels last) -> `[B, H*W, C + F]`: each pixel's channels, then the Fourier
  features of its grid position (`linear_positions((H, W))`, `cfg.num_bands` bands up to
  `cfg.max_resolution`), as transformers' image preprocessor with prep_type "pixels"."""
  x = _as_array(pixels_BxHxWxC, "pixels_BxHxWxC")
  if x.ndim != 4:
    raise ValueError(f"pixels_BxHxWxC must be images [B, H, W, C], got shape {tuple(x.shape)}")
  if x.shape[-1] != cfg.image_channels:
    raise ValueError(f"pixels_BxHxWxC has {x.shape[-1]} channels (last axis), the config's image_channels is "
                     f"{cfg.image_channels}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"pixels_BxHxWxC must be floating point, got {x.dtype}")
  B, H, W, C = x.shape
  pos = fourier_features(linear_positions((H, W)), cfg.num_bands, cfg.max_resolution, concat_pos=cfg.concat_pos,
                         sine_only=cfg.sine_only)  # a NumPy constant [H*W, F]
  feats = jnp.broadcast_to(jnp.asarray(pos, x.dtype), (B, H * W, pos.shape[-1]))
  return jnp.concatenate([jnp.reshape(x, (B, H * W, C)), feats], axis=-1)


def preprocess(params: Params, inputs, cfg: PerceiverConfig, *, input_mask=None) -> tuple[Array, Array | None]:
  """`cfg.inputs` -> the encoder's `[B, M, d_model]` array and its `[B, M]` bool mask (None: all real).

  bytes: ids `[B, M]` with mask `[B, M]`; pixels: `[B, H, W, C]` with mask
  `[B, H, W]` or `[B, H*W]`; array: `[B, M, d_model]` with mask `[B, M]`.
  """
  if cfg.inputs == "bytes":
    ids = check_byte_ids(inputs, cfg)
    mask = _check_mask(input_mask, ids.shape, "input_mask")
    return embed_bytes(params, ids, cfg), mask
  if cfg.inputs == "pixels":
    x = _as_array(inputs, "inputs")
    if x.ndim == 4 and input_mask is not None and np.ndim(input_mask) == 3:
      input_mask = _check_mask(input_mask, x.shape[:3], "input_mask").reshape(x.shape[0], -1)
    feats = pixel_features(x, cfg)
    return feats, _check_mask(input_mask, feats.shape[:2], "input_mask")
  x = _check_width(inputs, cfg.d_model, "inputs", "d_model")
  return jnp.asarray(x), _check_mask(input_mask, x.shape[:2], "input_mask")


# ----------------------------------------------------------------------------- layers


def gelu_erf(x: Array) -> Array:
  """Exact GELU as `x / 2 * (1 + erf(x / sqrt(2)))` (torch's form, which transformers runs).

  The same function as `jax.nn.gelu(x, approximate=False)`, which writes it
  with `erfc(-x / sqrt(2))` (equal up to float32 rounding: for x << 0 the sum
  `1 + erf` cancels, an absolute difference below 1e-6 for |x| < 9); XLA:CPU
  expands `erfc` into a polynomial with an exponential (about 30 operations
  per element, recomputed in each fusion that reads it), while `erf` stays
  one vectorised operation.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def _gelu(cfg: PerceiverConfig):
  return functools.partial(jax.nn.gelu, approximate=True) if cfg.gelu == "tanh" else gelu_erf


def _dense(p: Params, x: Array) -> Array:
  """`x w + b` through `jaxml.nn.linear` (its weight gradient runs on XLA:CPU's GEMM path)."""
  return nn.linear(x, p["w"]) + p["b"]


def _joined(p: Params, names: tuple[str, ...]) -> Params:
  """Dense layers `p[name]` that read the same input as one layer, their outputs side by side.

  One `[B T, C] @ [C, sum widths]` product in place of several: the input's
  transpose for the weight gradient is made once, and the input gradient is
  one product instead of a sum of several. Equal to the separate layers (each
  output column is the same dot product).
  """
  return {"w": jnp.concatenate([p[n]["w"] for n in names], axis=-1),
          "b": jnp.concatenate([p[n]["b"] for n in names], axis=-1)}


def _mlp(layers: list[Params], x: Array, act) -> Array:
  return _dense(layers[1], act(_dense(layers[0], x)))


def _fold(rng: Array | None, n: int) -> Array | None:
  return None if rng is None else jax.random.fold_in(rng, n)


def _dropout(x: Array, rate: float, rng: Array | None) -> Array:
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _attend(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxV: Array, key_mask_BxS: Array | None) -> Array:
  """Multi-head softmax attention, `[B, T, H, V]`; qk and value head widths may differ.

  `jaxml.cpu_kernels.attention`: scores `q k / sqrt(K)` and the softmax in
  float32; masked keys get probability 0, and an example with no real key gets
  zero output. On the CPU backend, unmasked float32 heads of multiples of 16
  run its fused kernels, everything else `jaxml.nn.attention_core`.
  """
  return cpu_kernels.attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, key_mask_BxS)


def _layer(p: Params, x_BxTxD: Array, kv_BxSxC: Array | None, cfg: PerceiverConfig, *, heads: int,
           query_residual: bool = True, key_mask_BxS: Array | None = None, rng: Array | None = None) -> Array:
  """One cross-attend (`kv_BxSxC` given) or self-attend (None) layer, with its MLP (module docstring).

  A cross-attend's queries may come unbatched, `[1, T, D]`: the learned latents
  and learned decoder queries are the same for every example, so their norm and
  query projection run once on `T` rows instead of `B T` (the same values; the
  gradient sums over the batch, as the broadcast's would).
  """
  eps = cfg.layer_norm_eps
  xq = nn.layer_norm(x_BxTxD, p["norm_q"]["scale"], p["norm_q"]["bias"], eps)
  xkv = xq if kv_BxSxC is None else nn.layer_norm(kv_BxSxC, p["norm_kv"]["scale"], p["norm_kv"]["bias"], eps)
  B, S = xkv.shape[:2]
  T = xq.shape[1]
  qk, vw = p["key"]["w"].shape[-1], p["value"]["w"].shape[-1]
  if kv_BxSxC is None:  # one product for queries, keys and values (`_joined`)
    q, k, v = jnp.split(_dense(_joined(p, ("query", "key", "value")), xq), (qk, 2 * qk), axis=-1)
  else:  # keys and values from one product
    q = _dense(p["query"], xq)
    k, v = jnp.split(_dense(_joined(p, ("key", "value")), xkv), (qk,), axis=-1)
  q = jnp.broadcast_to(q, (B, *q.shape[1:]))
  q, k, v = q.reshape(B, T, heads, -1), k.reshape(B, S, heads, -1), v.reshape(B, S, heads, -1)
  a = _dense(p["out"], _attend(q, k, v, key_mask_BxS).reshape(B, T, -1))
  a = _dropout(a, cfg.dropout, _fold(rng, 0))
  x = x_BxTxD + a if query_residual else a
  h = _mlp(p["mlp"], nn.layer_norm(x, p["norm_mlp"]["scale"], p["norm_mlp"]["bias"], eps), _gelu(cfg))
  return x + _dropout(h, cfg.dropout, _fold(rng, 1))


# ----------------------------------------------------------------------------- encoder


def _check_latents(z, cfg: PerceiverConfig, what: str = "latents_BxNxD"):
  z = _as_array(z, what)
  if z.ndim != 3 or z.shape[-1] != cfg.d_latents:
    raise ValueError(f"{what} must be [B, N, d_latents={cfg.d_latents}], got shape {tuple(z.shape)}")
  return z


def _cross(p: Params, params: Params, x, mask, cfg: PerceiverConfig, z=None, rng=None) -> Array:
  if z is None:  # the learned latents, shared by every example: `_layer` projects them once
    z = params["latents"][None].astype(x.dtype)
  return _layer(p, z, x, cfg, heads=cfg.num_cross_attention_heads, query_residual=cfg.use_query_residual,
                key_mask_BxS=mask, rng=rng)


def _block(params: Params, z: Array, cfg: PerceiverConfig, rng: Array | None) -> Array:
  """The shared self-attention layers, in order (a scan over their stacked weights)."""

  def body(z, layer):
    p, i = layer
    return _layer(p, z, None, cfg, heads=cfg.num_self_attention_heads, rng=_fold(rng, i)), None

  stacked = params["self_attends"]
  if not cfg.scan_layers:
    for i, p in enumerate(nn.unstack(stacked)):  # its gradient: one stack per weight (see `nn.unstack`)
      z = body(z, (p, i))[0]
    return z
  return jax.lax.scan(body, z, (stacked, jnp.arange(cfg.num_self_attends_per_block)))[0]


def _latent_transformer(params: Params, z: Array, cfg: PerceiverConfig, rng: Array | None) -> Array:
  def body(z, b):
    return _block(params, z, cfg, _fold(rng, b)), None

  if not cfg.scan_layers:
    for b in range(cfg.num_blocks):
      z = body(z, b)[0]
    return z
  return jax.lax.scan(body, z, jnp.arange(cfg.num_blocks))[0]


def _encode(params: Params, x: Array, mask: Array | None, cfg: PerceiverConfig, rng: Array | None) -> Array:
  z = _cross(params["cross_attend"], params, x, mask, cfg, rng=_fold(rng, 0))
  if not (cfg.repeat_cross_attention and cfg.num_blocks > 1):
    return _latent_transformer(params, z, cfg, _fold(rng, 1))
  for b in range(cfg.num_blocks):  # the original Perceiver: re-read the inputs before each block after the first
    if b:
      z = _cross(params["cross_attend_repeat"], params, x, mask, cfg, z=z, rng=_fold(_fold(rng, 2), b))
    z = _block(params, z, cfg, _fold(_fold(rng, 1), b))
  return z


def cross_attend(params: Params, inputs_BxMxC, cfg: PerceiverConfig, *, input_mask_BxM=None,
                 rng: Array | None = None) -> Array:
  """The encoder's first step: the latents cross-attend to the inputs. `[B, N, d_latents]`.

  Args, Raises: as `encode`.
  """
  x = jnp.asarray(_check_width(inputs_BxMxC, cfg.d_model, "inputs_BxMxC", "d_model"))
  mask = _check_mask(input_mask_BxM, x.shape[:2], "input_mask_BxM")
  return _cross(params["cross_attend"], params, x, mask, cfg, rng=rng)


def latent_transformer(params: Params, latents_BxNxD, cfg: PerceiverConfig, *, rng: Array | None = None) -> Array:
  """`num_blocks` passes of the shared self-attention layers over latents `[B, N, d_latents]` (no inputs)."""
  z = jnp.asarray(_check_latents(latents_BxNxD, cfg))
  return _latent_transformer(params, z, cfg, rng)


def encode(params: Params, inputs_BxMxC, cfg: PerceiverConfig, *, input_mask_BxM=None,
           rng: Array | None = None) -> Array:
  """Perceiver encoder: preprocessed inputs `[B, M, d_model]` -> latents `[B, num_latents, d_latents]`.

  Args:
    params: from `init` or `from_hf`.
    inputs_BxMxC: `[B, M, d_model]` floating point (what `preprocess` returns).
    cfg: the model config.
    input_mask_BxM: optional `[B, M]`, True (or 1) for real inputs; masked inputs are not attended.
    rng: a key for dropout (used when `cfg.dropout > 0`); None: no dropout.

  Raises:
    ValueError: inputs not `[B, M, d_model]`, a mask of another shape.
  """
  x = jnp.asarray(_check_width(inputs_BxMxC, cfg.d_model, "inputs_BxMxC", "d_model"))
  mask = _check_mask(input_mask_BxM, x.shape[:2], "input_mask_BxM")
  return _encode(params, x, mask, cfg, rng)


# ----------------------------------------------------------------------------- decoders


def decoder_queries(params_decoder: Params, d: DecoderConfig, batch_size: int, dtype=jnp.float32) -> Array:
  """The decoder's queries `[B, Q, C_q]`: its learned rows, or the Fourier features of
  `linear_positions(d.index_dims)` (`d.num_bands` bands up to `d.resolution`)."""
  if d.queries == "learned":
    q = params_decoder["queries"].astype(dtype)
  else:
    q = jnp.asarray(fourier_features(linear_positions(d.index_dims), d.num_bands, d.resolution,
                                     concat_pos=d.concat_pos, sine_only=d.sine_only), dtype)
  return jnp.broadcast_to(q[None], (batch_size, *q.shape))


def _decode(p: Params, z: Array, d: DecoderConfig, cfg: PerceiverConfig, queries: Array, query_mask,
            rng: Array | None) -> Array:
  out = _layer(p["cross_attend"], queries, z, cfg, heads=d.num_heads, query_residual=d.use_query_residual, rng=rng)
  if "final" in p:
    out = _dense(p["final"], out)
  if query_mask is not None:
    out = jnp.where(query_mask[..., None], out, 0.0).astype(out.dtype)
  return out


def decode(params_decoder: Params, latents_BxNxD, d: DecoderConfig, cfg: PerceiverConfig, *, queries_BxQxC=None,
           query_mask_BxQ=None, rng: Array | None = None) -> Array:
  """Perceiver IO decoder: queries cross-attend to the latents. `[B, Q, output channels]`.

  Args:
    params_decoder: `params["decoders"][d.name]`.
    latents_BxNxD: the encoder's output.
    d: the decoder's config (one of `cfg.decoder_configs`).
    cfg: the model config (latent width, GELU form, norm eps, dropout).
    queries_BxQxC: optional queries of the decoder's query width (e.g. a
      subset of output positions); None: `decoder_queries`.
    query_mask_BxQ: optional `[B, Q]`; outputs of masked (False / 0) queries are zero.
    rng: a dropout key (None: no dropout).
  """
  z = jnp.asarray(_check_latents(latents_BxNxD, cfg))
  if queries_BxQxC is None:
    queries = decoder_queries(params_decoder, d, 1, z.dtype)  # shared by the batch (see `_layer`)
  else:
    queries = jnp.asarray(_check_width(queries_BxQxC, cfg.decoder_query_channels(d), "queries_BxQxC",
                                       f"decoder {d.name!r} query width"))
    if queries.shape[0] != z.shape[0]:
      raise ValueError(f"queries_BxQxC has batch {queries.shape[0]}, latents_BxNxD {z.shape[0]}")
  mask = _check_mask(query_mask_BxQ, queries.shape[:2], "query_mask_BxQ")
  return _decode(params_decoder, z, d, cfg, queries, mask, rng)


def embedding_logits(params: Params, h_BxMxC: Array) -> Array:
  """The masked LM's tied embedding decoder: `h E^T + b`, `[B, M, vocab_size]`."""
  return jnp.einsum("bmc,vc->bmv", h_BxMxC, params["input"]["embeddings"].astype(h_BxMxC.dtype)) + params["output_bias"]


# ----------------------------------------------------------------------------- the models


def check_positions(positions_BxP, shape_BxM: tuple[int, int], what: str = "positions") -> Array:
  """Checks output positions `[B, P]`: integer indices into the `M` input positions (in range when known)."""
  pos = _as_array(positions_BxP, what)
  B, M = shape_BxM
  if pos.ndim != 2 or pos.shape[0] != B:
    raise ValueError(f"{what} must be [B={B}, P] position indices, got shape {tuple(pos.shape)}")
  if not jnp.issubdtype(pos.dtype, jnp.integer):
    raise TypeError(f"{what} must hold integer positions, got {pos.dtype}")
  if _concrete(pos) and pos.size:
    values = np.asarray(pos)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= M:
      raise ValueError(f"{what} holds positions in [{lo}, {hi}], outside the inputs' [0, M={M})")
  return jnp.asarray(pos, jnp.int32)


def apply(params: Params, inputs, cfg: PerceiverConfig, *, input_mask=None, query_mask=None, positions=None,
          rng: Array | None = None):
  """The whole model: inputs -> preprocess -> encode -> the task's decoders.

  Args:
    params: from `init` or `from_hf` (checked against `cfg`).
    inputs: bytes: ids `[B, M]` int (M <= max_position_embeddings); pixels:
      `[B, H, W, image_channels]` float, channels last; array: `[B, M, d_model]` float.
    cfg: the model config.
    input_mask: optional `[B, M]` (pixels: `[B, H, W]` or `[B, H*W]`), True or 1 for real inputs.
    query_mask: multitask only: optional `{name: [B, Q]}`; masked queries output zero.
    positions: masked_lm only: optional `[B, P]` int indices into the `M`
      input positions: decode only those queries (Perceiver IO's queries do not
      attend to each other, so each position's logits are the same as in the
      full output; the decoder's cost falls from M to P queries per example).
      Repeats are allowed.
    rng: a dropout key (used when `cfg.dropout > 0`); None: no dropout.

  Returns:
    masked_lm: logits `[B, M, vocab_size]` float32 (the first M decoder
    queries, one per input position; positions masked by `input_mask` get the
    output bias alone), or `[B, P, vocab_size]` at `positions`.
    classifier: logits `[B, num_classes]` float32.
    multitask: `{name: [B, Q, output channels]}`.

  Raises:
    ValueError / TypeError: parameters that do not match `cfg`, inputs of the
      wrong shape, width or dtype, byte ids out of range, masks of the wrong shape.
  """
  check_params(params, cfg)
  x, mask = preprocess(params, inputs, cfg, input_mask=input_mask)
  decs = cfg.decoder_configs
  if cfg.task != "multitask" and query_mask is not None:
    raise ValueError(f"query_mask is for task 'multitask' (the {cfg.task} decoder's queries are fixed)")
  if positions is not None:
    if cfg.task != "masked_lm":
      raise ValueError(f"positions is for task 'masked_lm' (one decoder query per input position), not {cfg.task!r}")
    positions = check_positions(positions, x.shape[:2])
  qmasks = {}
  if query_mask is not None:
    if not isinstance(query_mask, dict) or set(query_mask) - {d.name for d in decs}:
      raise ValueError(f"query_mask must be a dict keyed by decoder names {[d.name for d in decs]}, got "
                       f"{query_mask if not isinstance(query_mask, dict) else sorted(query_mask)}")
    qmasks = {d.name: _check_mask(query_mask[d.name], (x.shape[0], d.num_queries), f"query_mask[{d.name!r}]")
              for d in decs if query_mask.get(d.name) is not None}
  z = _encode(params, x, mask, cfg, _fold(rng, 0))
  outs = {}
  for j, d in enumerate(decs):
    p = params["decoders"][d.name]
    queries = decoder_queries(p, d, 1, z.dtype)  # [1, Q, C]: shared by the batch, projected once in `_layer`
    qm = qmasks.get(d.name)
    if cfg.task == "masked_lm" and positions is None:
      queries, qm = queries[:, :x.shape[1]], mask
    elif cfg.task == "masked_lm":  # each example's own positions: [B, P, C] queries, its input mask there
      queries = jnp.take(queries[0], positions, axis=0)
      qm = None if mask is None else jnp.take_along_axis(mask, positions, axis=1)
    outs[d.name] = _decode(p, z, d, cfg, queries, qm, _fold(rng, 1 + j))
  if cfg.task == "masked_lm":
    return embedding_logits(params, outs[decs[0].name]).astype(jnp.float32)
  if cfg.task == "classifier":
    return outs[decs[0].name][:, 0].astype(jnp.float32)
  return outs


def _batch_get(batch: dict, key: str, required: bool = True):
  if not isinstance(batch, dict):
    raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
  if required and key not in batch:
    raise ValueError(f"batch['{key}'] is missing (batch has {sorted(batch)})")
  return batch.get(key)


def _weighted_accuracy(logits, targets, weights):
  correct = (nn.first_argmax(logits) == targets).astype(jnp.float32)
  w = jnp.ones_like(correct) if weights is None else weights.astype(jnp.float32)
  return (correct * w).sum() / jnp.maximum(w.sum(), 1.0)


def loss_fn(params: Params, batch: dict, rng: Array | None, cfg: PerceiverConfig) -> tuple[Array, dict]:
  """Training loss of `cfg.task`; `rng` drives dropout (when `cfg.dropout > 0`).

  Batches (`input_mask` optional everywhere, as in `apply`):
    masked_lm: `{"inputs": [B, M] ids (corrupted, e.g. MASK_ID at hidden
      bytes), "targets": [B, M] ids, "weights": optional [B, M]}` (the
      positions scored; default every unmasked position). Metrics: loss
      (nats per scored byte), bits_per_byte, accuracy, tokens.
      Or with `"positions": [B, P]` int (BERT's masked-LM positions; see
      `gather_scored`): only those queries are decoded, and "targets" and
      "weights" are `[B, P]` (weights default to the input mask there, else 1);
      the same loss and gradients as the `[B, M]` form, at a fraction of the
      decoder's cost.
    classifier: `{"inputs", "labels": [B] int}`. Metrics: loss, accuracy.
    multitask: `{"inputs", "targets": {name: ...}, "weights": optional
      {name: [B, Q]}}`; each decoder's targets are `[B, Q]` ints
      (loss "cross_entropy") or `[B, Q, C]` floats ("mse", mean over the
      channels); the loss is the `loss_weight`-weighted sum. Metrics:
      loss and `<name>/loss` (+ `<name>/accuracy` for cross-entropy).

  Returns:
    `(loss, metrics)`, float32 scalars.
  """
  inputs = _batch_get(batch, "inputs")
  input_mask = _batch_get(batch, "input_mask", required=False)
  if cfg.task == "masked_lm":
    targets = check_byte_ids(_batch_get(batch, "targets"), cfg, "batch['targets']")
    ids = check_byte_ids(inputs, cfg, "batch['inputs']")
    positions = _batch_get(batch, "positions", required=False)
    if positions is not None:
      positions = check_positions(positions, ids.shape, "batch['positions']")
    scored = ids.shape if positions is None else tuple(positions.shape)
    if tuple(targets.shape) != scored:
      raise ValueError(f"batch['targets'] {tuple(targets.shape)} must have batch['"
                       f"{'inputs' if positions is None else 'positions'}']'s shape {scored}")
    weights = _check_mask_weights(_batch_get(batch, "weights", required=False), scored, "batch['weights']")
    if weights is None and input_mask is not None:
      weights = _check_mask(input_mask, ids.shape, "batch['input_mask']").astype(jnp.float32)
      if positions is not None:
        weights = jnp.take_along_axis(weights, positions, axis=1)
    logits = apply(params, ids, cfg, input_mask=input_mask, positions=positions, rng=rng)
    loss, n = nn.cross_entropy(logits, jnp.asarray(targets), weights)
    acc = _weighted_accuracy(logits, jnp.asarray(targets), weights)
    return loss, {"loss": loss, "bits_per_byte": loss / math.log(2.0), "accuracy": acc, "tokens": n}
  if cfg.task == "classifier":
    labels = _as_array(_batch_get(batch, "labels"), "batch['labels']")
    logits = apply(params, inputs, cfg, input_mask=input_mask, rng=rng)
    if tuple(labels.shape) != (logits.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"batch['labels'] must be [B={logits.shape[0]}] integers, got {tuple(labels.shape)} "
                       f"{labels.dtype}")
    loss, _ = nn.cross_entropy(logits, jnp.asarray(labels))
    return loss, {"loss": loss, "accuracy": _weighted_accuracy(logits, jnp.asarray(labels), None)}
  targets = _batch_get(batch, "targets")
  weights = _batch_get(batch, "weights", required=False) or {}
  decs = {d.name: d for d in cfg.decoder_configs}
  if not isinstance(targets, dict) or set(targets) != set(decs):
    raise ValueError(f"batch['targets'] must be a dict with one entry per decoder {sorted(decs)}, got "
                     f"{sorted(targets) if isinstance(targets, dict) else type(targets).__name__}")
  outs = apply(params, inputs, cfg, input_mask=input_mask, rng=rng)
  total, metrics = jnp.float32(0.0), {}
  for name, d in decs.items():
    out, t = outs[name], _as_array(targets[name], f"batch['targets'][{name!r}]")
    w = _check_mask_weights(weights.get(name), out.shape[:2], f"batch['weights'][{name!r}]")
    if d.loss == "cross_entropy":
      if tuple(t.shape) != out.shape[:2] or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"batch['targets'][{name!r}] must be [B, Q]={out.shape[:2]} integers, got "
                         f"{tuple(t.shape)} {t.dtype}")
      loss, _ = nn.cross_entropy(out, jnp.asarray(t), w)
      metrics[f"{name}/accuracy"] = _weighted_accuracy(out, jnp.asarray(t), w)
    else:
      if tuple(t.shape) != out.shape:
        raise ValueError(f"batch['targets'][{name!r}] must be {out.shape}, got {tuple(t.shape)}")
      se = jnp.mean(jnp.square(out.astype(jnp.float32) - jnp.asarray(t, jnp.float32)), axis=-1)
      wf = jnp.ones_like(se) if w is None else w
      loss = (se * wf).sum() / jnp.maximum(wf.sum(), 1.0)
    metrics[f"{name}/loss"] = loss
    total = total + d.loss_weight * loss
  metrics["loss"] = total
  return total, metrics


def gather_scored(batch: dict, *, num_positions: int | None = None, multiple_of: int = 1) -> dict:
  """A masked-LM batch with `[B, M]` targets and weights in the `positions` form `loss_fn` decodes fastest.

  Each row's scored positions (weight > 0), in order, padded to `P` slots with
  position 0, target 0 and weight 0; `"inputs"` (and `"input_mask"`) are kept.
  `loss_fn` gives the same loss, metrics and gradients on either form. Host
  side (numpy), before the batch goes to the device.

  Args:
    batch: `{"inputs": [B, M], "targets": [B, M], "weights": [B, M]}` (+ optional "input_mask").
    num_positions: P; None: the most scored positions of any row, rounded up to `multiple_of`
      (a fixed P, or a coarse `multiple_of`, keeps the compiled step's shapes few).
    multiple_of: round P up to a multiple of this.

  Raises:
    ValueError: no weights, weights not `[B, M]`, a row with more scored positions than `num_positions`.
  """
  if not isinstance(batch, dict) or "weights" not in batch or "targets" not in batch:
    raise ValueError(f"gather_scored needs a batch dict with 'targets' and 'weights' [B, M], got "
                     f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
  targets, weights = np.asarray(batch["targets"]), np.asarray(batch["weights"], np.float32)
  if targets.ndim != 2 or weights.shape != targets.shape:
    raise ValueError(f"batch['weights'] {weights.shape} and batch['targets'] {targets.shape} must both be [B, M]")
  if multiple_of < 1:
    raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
  scored = weights > 0
  counts = scored.sum(axis=1)
  most = int(counts.max()) if counts.size else 0
  if num_positions is None:
    num_positions = max(multiple_of, -(-most // multiple_of) * multiple_of)
  elif most > num_positions:
    raise ValueError(f"a row scores {most} positions, more than num_positions={num_positions}")
  B = targets.shape[0]
  positions = np.zeros((B, num_positions), np.int32)
  out_t = np.zeros((B, num_positions), targets.dtype)
  out_w = np.zeros((B, num_positions), np.float32)
  for b in range(B):
    idx = np.flatnonzero(scored[b])
    positions[b, :len(idx)] = idx
    out_t[b, :len(idx)] = targets[b, idx]
    out_w[b, :len(idx)] = weights[b, idx]
  out = {k: v for k, v in batch.items() if k not in ("targets", "weights")}
  out.update(positions=positions, targets=out_t, weights=out_w)
  return out


def _check_mask_weights(w, shape, what: str):
  if w is None:
    return None
  w = _as_array(w, what)
  if tuple(w.shape) != tuple(shape):
    raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(w.shape)}")
  return jnp.asarray(w, jnp.float32)
