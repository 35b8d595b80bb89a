"""Shared layers as pure functions over plain parameter arrays.

Every function here takes arrays and returns arrays; parameters are passed in
explicitly, so the same code runs under `jax.jit`, `jax.pmap`, `jax.lax.scan`
and with sharded inputs. Shapes are named in argument names: B batch, T query
length, S key length, D model width, H query heads, K key/value heads,
N heads of `attention_core` (kv heads, or plain heads), Dh head width,
F hidden width, V vocabulary.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.nn.init import normal_init  # noqa: F401  (`layers.normal_init`, as before)

Array = jax.Array


# ----------------------------------------------------------------------------- norm


def rms_norm(x_BxTxD: Array, weight_D: Array, eps: float) -> Array:
  """RMSNorm: `x * rsqrt(mean(x^2, -1) + eps) * weight`, computed in float32.

  The normalisation runs in float32 and is cast back to the input dtype before
  the weight multiply, as in Meta's Llama 2 reference.
  """
  x32 = x_BxTxD.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return normed.astype(x_BxTxD.dtype) * weight_D.astype(x_BxTxD.dtype)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float = 1e-5) -> Array:
  """LayerNorm over the last axis, statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale + bias).astype(x.dtype)


def group_norm(x_NxHxWxC: Array, scale_C: Array, bias_C: Array, groups: int, eps: float = 1e-5) -> Array:
  """GroupNorm (Wu & He 2018) over channels-last images: the `C` channels split into `groups`
  groups, each normalised over its spatial positions and channels; statistics in float32.

  `groups = 1` is LayerNorm over `[H, W, C]`; `groups = C` is InstanceNorm.

  Args:
    x_NxHxWxC: `[N, H, W, C]` activations.
    scale_C, bias_C: `[C]` affine parameters.
    groups: divides `C`.
    eps: added to the variance.

  Returns:
    `[N, H, W, C]`, the dtype of `x`.
  """
  n, h, w, c = x_NxHxWxC.shape
  if groups <= 0 or c % groups:
    raise ValueError(f"groups must be a positive divisor of the channel count {c}, got {groups}")
  g = x_NxHxWxC.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(n, h, w, c)
  return (y * scale_C + bias_C).astype(x_NxHxWxC.dtype)


# ----------------------------------------------------------------------------- rotary


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Array:
  """`freqs_j = theta^(-2j / head_dim)` for `j < head_dim / 2` (float32)."""
  return jnp.asarray(_rope_frequencies_np(head_dim, theta))


def _rope_frequencies_np(head_dim: int, theta: float) -> np.ndarray:
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)


def rope_tables(positions_BxT, head_dim: int, theta: float = 10000.0,
                max_position: int | None = None) -> tuple[Array, Array]:
  """`cos` and `sin` of `position * freq`, each `[B, T, 1, head_dim / 2]` (float32).

  Computed once per forward pass and shared by every layer. Positions given as
  a NumPy array (known when tracing, as in training) give NumPy tables, which
  XLA sees as constants: otherwise it fuses the `cos`/`sin` into every consumer
  and recomputes them per element, in each layer's forward and backward. With
  traced positions and `max_position` (positions are below it), the rows are
  gathered from constant tables of `max_position` rows instead (decode steps).
  """
  if isinstance(positions_BxT, np.ndarray):
    angles = positions_BxT[..., None].astype(np.float32) * _rope_frequencies_np(head_dim, theta)
    return np.cos(angles)[:, :, None, :], np.sin(angles)[:, :, None, :]
  if max_position is not None:
    cos, sin = rope_tables(np.arange(max_position, dtype=np.int32)[None], head_dim, theta)
    return jnp.asarray(cos[0, :, 0])[positions_BxT][:, :, None, :], jnp.asarray(sin[0, :, 0])[positions_BxT][:, :, None, :]
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
  return jnp.cos(angles_BxTxF)[:, :, None, :], jnp.sin(angles_BxTxF)[:, :, None, :]


def apply_rope_tables(x_BxTxNxDh: Array, cos: Array, sin: Array) -> Array:
  """Rotates consecutive (even, odd) channel pairs with precomputed tables (see `apply_rope`).

  Each pair `(re, im)` becomes `(re cos - im sin, im cos + re sin)`, computed as
  `pair * cos + swap(pair) * (-sin, sin)`: the swap is a reverse of the pair axis,
  whose gradient is a reverse too, where slicing the two halves out and stacking
  them back differentiates into pads (full-size zero buffers) and adds; same
  values bit for bit.
  """
  x32 = x_BxTxNxDh.astype(jnp.float32)
  pairs = x32.reshape(*x32.shape[:-1], x32.shape[-1] // 2, 2)
  xp = np if isinstance(sin, np.ndarray) else jnp  # constant tables stay constants
  signed_sin = xp.stack([-sin, sin], axis=-1)
  out = (pairs * cos[..., None] + pairs[..., ::-1] * signed_sin).reshape(x32.shape)
  return out.astype(x_BxTxNxDh.dtype)


def apply_rope(x_BxTxNxDh: Array, positions_BxT: Array, theta: float = 10000.0) -> Array:
  """Rotates consecutive (even, odd) channel pairs by `position * freq`.

  This is Meta's convention: pair `(x[2j], x[2j+1])` is the complex number
  `x[2j] + i x[2j+1]`, multiplied by `exp(i * t * freqs_j)`. Hugging Face's
  checkpoints use the "rotate half" layout instead, which is the same rotation
  after a fixed permutation of the rows of `wq` / `wk`; `jaxml.llama.convert`
  applies that permutation, so the model itself has a single convention.
  """
  cos, sin = rope_tables(positions_BxT, x_BxTxNxDh.shape[-1], theta)
  return apply_rope_tables(x_BxTxNxDh, cos, sin)


# ----------------------------------------------------------------------------- sinusoidal


def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal features of a scalar per row (Transformer positions, DDPM time steps).

  `[sin(x f_0), ..., sin(x f_{h-1}), cos(x f_0), ..., cos(x f_{h-1})]` with
  `h = dim // 2` and `f_j = max_period^(-j / h)`: periods from `2 pi` to nearly
  `2 pi max_period`. An odd `dim` gets one trailing zero. Scale `x` first to
  put its range on these periods (diffusion times `t` in [0, 1] enter as `1000 t`).

  Args:
    x: `[...]` positions or times, any real or integer dtype (computed in float32).
    dim: the embedding width, positive.
    max_period: the longest period divided by `2 pi`.

  Returns:
    `[..., dim]` float32.
  """
  if dim <= 0:
    raise ValueError(f"sinusoidal_embedding: dim must be positive, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x[..., None].astype(jnp.float32) * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


# ----------------------------------------------------------------------------- attention


def causal_mask(q_positions_BxT: Array, k_positions_BxS: Array, k_valid_BxS: Array | None = None) -> Array:
  """Boolean mask `[B, 1, T, S]`: query at position p sees keys at positions <= p.

  Positions are absolute, so the same mask serves a full forward pass (T = S),
  a prefill into a cache, and a one-token decode step against a cache.
  `k_valid_BxS` marks cache slots that hold real keys (False for padding or
  slots not yet written).
  """
  mask = k_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
  if k_valid_BxS is not None:
    mask = mask & k_valid_BxS[:, None, :]
  return mask[:, None, :, :]


def dot_product_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, mask_Bx1xTxS: Array | None) -> Array:
  """Softmax attention with grouped key/value heads (MHA, GQA, MQA).

  `H` query heads share `K` key/value heads, `H = K * n_rep`; query head `h`
  uses kv head `h // n_rep` (the `repeat_interleave` expansion of Llama 2),
  computed without materialising the repeated keys. Scores are
  `q k^T / sqrt(Dh)`, softmax in float32; masked entries get the dtype's
  minimum so a fully masked row yields a uniform (finite) distribution.
  Returns `[B, T, H, Dh]`. Keys/values laid out as a KV cache stores them go
  to `cached_attention`.
  """
  return cached_attention(q_BxTxHxDh, keys_layout(k_BxSxKxDh), values_layout(v_BxSxKxDh), mask_Bx1xTxS)


def keys_layout(k_BxTxKxDh: Array) -> Array:
  """Keys as a KV cache stores them: `[B, K, T, Dh]`."""
  return jnp.swapaxes(k_BxTxKxDh, 1, 2)


def values_layout(v_BxTxKxDh: Array) -> Array:
  """Values as a KV cache stores them: `[B, K, Dh, T]`."""
  return jnp.transpose(v_BxTxKxDh, (0, 2, 3, 1))


def cached_attention(q_BxTxHxDh: Array, k_BxKxSxDh: Array, v_BxKxDhxS: Array, mask_Bx1xTxS: Array | None) -> Array:
  """`dot_product_attention` over keys `[B, K, S, Dh]` and values `[B, K, Dh, S]`.

  A one-token decode step is two matrix-vector products per (batch, kv head):
  `k @ q` and `v @ p`. XLA runs a matrix-vector product with the contracted
  axis last in memory, and these layouts put it there (Dh for keys, S for
  values), so the step reads the cache as it lies instead of transposing
  (copying) every layer's whole cache for each new token.

  Queries are scaled by `1 / sqrt(Dh)` before the score product (`[T, Dh]` per
  head rather than the `[T, S]` scores) and arranged heads-major, the `n_rep`
  query heads that share a kv head stacked as `n_rep * T` rows, for
  `attention_core` (which has the hand-written backward).
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxKxSxDh.shape[1]
  q_BxKxMxDh = _queries_heads_major(q_BxTxHxDh, K)
  out = attention_core(q_BxKxMxDh, k_BxKxSxDh, v_BxKxDhxS, _mask_heads_major(mask_Bx1xTxS, H // K))
  return _heads_minor(out, T, H)


def _queries_heads_major(q_BxTxHxDh: Array, K: int) -> Array:
  """Queries scaled by `1 / sqrt(Dh)`, as `[B, K, n_rep * T, Dh]` rows per kv head."""
  B, T, H, Dh = q_BxTxHxDh.shape
  if H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({K})")
  q = q_BxTxHxDh * jnp.asarray(1.0 / math.sqrt(Dh), q_BxTxHxDh.dtype)
  return jnp.transpose(q.reshape(B, T, K, H // K, Dh), (0, 2, 3, 1, 4)).reshape(B, K, (H // K) * T, Dh)


def _mask_heads_major(mask_Bx1xTxS: Array | None, n_rep: int) -> Array | None:
  """A `[B, 1, T, S]` mask repeated for the `n_rep` query heads of each kv head: `[B, 1, n_rep * T, S]`."""
  if mask_Bx1xTxS is None:
    return None
  B, _, T, S = mask_Bx1xTxS.shape
  return jnp.broadcast_to(mask_Bx1xTxS[:, :, None], (B, 1, n_rep, T, S)).reshape(B, 1, n_rep * T, S)


def _heads_minor(out_BxKxMxDh: Array, T: int, H: int) -> Array:
  """The inverse arrangement of `_queries_heads_major` for the attention output: `[B, T, H, Dh]`."""
  B, K, _, Dh = out_BxKxMxDh.shape
  return jnp.transpose(out_BxKxMxDh.reshape(B, K, H // K, T, Dh), (0, 3, 1, 2, 4)).reshape(B, T, H, Dh)


def split_cached_attention(q_BxTxHxDh: Array, parts: Sequence[tuple[Array, Array, Array | None]]) -> Array:
  """`cached_attention` over several key/value sets at once (one softmax over all their keys).

  `parts` holds `(k [B, K, S_i, Dh], v [B, K, Dh, S_i], mask [B, 1, T, S_i] or None)`
  triples. A decode loop keeps its cache in two pieces, a read-only past and a
  short recent piece it writes into, and attends to both without joining them
  (joining would copy the cache at every step). Inference only (autodiff works,
  without `cached_attention`'s hand-written backward).

  The softmax is taken piece by piece against the maximum over all pieces:
  `exp(s_i - m)` per piece, their sums added, the value products of the
  unnormalised weights added and divided once by the total (the same function
  as one softmax over the joined scores, without joining them: on XLA:CPU the
  joined form costs a concatenation and a slice copy per piece). With one
  query row per kv head (a one-token decode step without grouped queries) the
  products are written as matrix-vector products without the unit row axis,
  which XLA:CPU lays out without transposing copies; a batch-8 decode step of
  the benchmark's small Llama ran about 7% faster, on one thread and on two,
  than with the joined softmax (`benchmarks/decode_forms.py`; see BUILD_NOTES).
  """
  B, T, H, _ = q_BxTxHxDh.shape
  K = parts[0][0].shape[1]
  q = _queries_heads_major(q_BxTxHxDh, K)
  one_row = q.shape[2] == 1
  if one_row:
    q = q[:, :, 0]
  neg = jnp.finfo(jnp.float32).min
  scores = []
  for k, _, mask in parts:
    mask = _mask_heads_major(mask, H // K)
    if one_row:
      s = jnp.einsum("bksd,bkd->bks", k, q, preferred_element_type=jnp.float32)
      mask = None if mask is None else mask[:, :, 0]
    else:
      s = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    scores.append(s if mask is None else jnp.where(mask, s, neg))
  top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
  out, total = 0.0, 0.0
  for s, (_, v, _) in zip(scores, parts):
    w = jnp.exp(s - top)
    total = total + jnp.sum(w, axis=-1, keepdims=True)
    if one_row:
      out = out + jnp.einsum("bkds,bks->bkd", v, w.astype(v.dtype))
    else:
      out = out + jnp.einsum("bkms,bkds->bkmd", w.astype(v.dtype), v)
  out = (out / total.astype(out.dtype)).astype(parts[0][1].dtype)
  return _heads_minor(out[:, :, None] if one_row else out, T, H)


def attention_core(q_BxNxTxDh: Array, k_BxNxSxDh: Array, v_BxNxDhxS: Array,
                   mask_BxNxTxS: Array | None = None) -> Array:
  """`softmax(q k^T) v` per (batch, head), with a hand-written backward pass.

  The core under `cached_attention` (Llama: `N` kv heads, each one's `n_rep`
  query heads stacked as `n_rep * T` query rows) and under
  `jaxml.recsys.modules.feature_attention` (DHEN: `N` heads over feature rows).
  Nothing is scaled here: the caller folds `1 / sqrt(Dh)` into the queries or
  their weights. Values come transposed, `[Dh, S]` per head (the decode layout
  of a KV cache; a self-attention caller transposes its `[S, Dh]` values in the
  same copy that splits the heads). Scores and softmax are float32; a masked
  score is the float32 minimum, so a row with no visible key attends uniformly
  (finite, no NaN) and its scores get no gradient.

  The backward pass (the same function as autodiff of the forward; only the
  layout of the gradient products changes): autodiff writes `dK = dS^T Q` and
  `dV = P^T dO`, batched products that contract the second-to-last axis of
  both operands, which XLA:CPU runs on a slow path (outside its YNNPACK dot
  fusions) or after transposing the `[T, S]` operand. Here the small `Q` and
  `dO` (`[T, Dh]`) are transposed instead (held by `optimization_barrier`, so
  XLA does not fold the transposes back into the dots) and `dK^T = Q^T dS`,
  `dV = dO^T P` computed; `dV` comes out in the `[Dh, S]` values layout. The
  softmax backward uses `rowsum(P * dP) = rowsum(O * dO)` (the FlashAttention
  identity), a reduction over `Dh` instead of over `S`. Only `P` `[B, N, T, S]`
  is kept for the backward pass, as autodiff keeps it.

  Args:
    q_BxNxTxDh: queries `[B, N, T, Dh]`, already scaled.
    k_BxNxSxDh: keys `[B, N, S, Dh]`.
    v_BxNxDhxS: values, transposed: `[B, N, Dv, S]`; the value width `Dv`
      may differ from the query/key width `Dh` (Perceiver IO's decoders).
    mask_BxNxTxS: optional bool, True where a query may see a key; any shape
      that broadcasts to `[B, N, T, S]` (`[B, 1, T, S]` shares it over heads).

  Returns:
    `[B, N, T, Dv]` in the values' dtype.
  """
  for name, a in (("q_BxNxTxDh", q_BxNxTxDh), ("k_BxNxSxDh", k_BxNxSxDh), ("v_BxNxDhxS", v_BxNxDhxS)):
    if a.ndim != 4:
      raise ValueError(f"attention_core: {name} must have 4 axes, got shape {a.shape}")
  (B, N, T, Dh), S = q_BxNxTxDh.shape, k_BxNxSxDh.shape[2]
  if k_BxNxSxDh.shape != (B, N, S, Dh):
    raise ValueError(f"attention_core: k_BxNxSxDh must be [{B}, {N}, S, {Dh}] for q {q_BxNxTxDh.shape}, "
                     f"got {k_BxNxSxDh.shape}")
  if v_BxNxDhxS.shape[:2] != (B, N) or v_BxNxDhxS.shape[3] != S:
    raise ValueError(f"attention_core: v_BxNxDhxS must be [{B}, {N}, Dv, {S}] (values transposed; their width Dv "
                     f"may differ from the queries' {Dh}), got {v_BxNxDhxS.shape}")
  if mask_BxNxTxS is not None and not _broadcasts_to(mask_BxNxTxS.shape, (B, N, T, S)):
    raise ValueError(f"attention_core: mask_BxNxTxS must broadcast to [{B}, {N}, {T}, {S}], got {mask_BxNxTxS.shape}")
  return _attention_core(q_BxNxTxDh, k_BxNxSxDh, v_BxNxDhxS, mask_BxNxTxS)


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  if len(shape) != len(target):
    return False
  try:
    return np.broadcast_shapes(shape, target) == target
  except ValueError:
    return False


def _attention_fwd(q_BxNxTxDh, k_BxNxSxDh, v_BxNxDhxS, mask_BxNxTxS):
  scores = jnp.einsum("bntd,bnsd->bnts", q_BxNxTxDh, k_BxNxSxDh, preferred_element_type=jnp.float32)
  if mask_BxNxTxS is not None:
    scores = jnp.where(mask_BxNxTxS, scores, jnp.finfo(jnp.float32).min)
  probs_BxNxTxS = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bnts,bnds->bntd", probs_BxNxTxS.astype(v_BxNxDhxS.dtype), v_BxNxDhxS)
  return out, (q_BxNxTxDh, k_BxNxSxDh, v_BxNxDhxS, mask_BxNxTxS, probs_BxNxTxS, out)


@jax.custom_vjp
def _attention_core(q_BxNxTxDh, k_BxNxSxDh, v_BxNxDhxS, mask_BxNxTxS):
  return _attention_fwd(q_BxNxTxDh, k_BxNxSxDh, v_BxNxDhxS, mask_BxNxTxS)[0]


def _attention_bwd(res, dout_BxNxTxDh):
  """`attention_core`'s gradient (see its docstring)."""
  q, k, v, mask, probs, out = res
  dout = dout_BxNxTxDh.astype(v.dtype)
  dprobs = jnp.einsum("bntd,bnds->bnts", dout, v, preferred_element_type=jnp.float32)
  row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dscores = probs * (dprobs - row)
  if mask is not None:
    dscores = jnp.where(mask, dscores, 0.0)
  dscores = dscores.astype(q.dtype)
  dq = jnp.einsum("bnts,bnsd->bntd", dscores, k)
  qT, doutT = jax.lax.optimization_barrier((jnp.swapaxes(q, 2, 3), jnp.swapaxes(dout, 2, 3)))
  dkT = jnp.einsum("bndt,bnts->bnds", qT, dscores)
  dv = jnp.einsum("bndt,bnts->bnds", doutT, probs.astype(v.dtype))
  # Held apart from the layout changes that follow (the swap below, the callers' transposes): the
  # DHEN dense step took 4-10% more CPU time without this barrier, the Llama step the same.
  dkT, dv = jax.lax.optimization_barrier((dkT, dv))
  return dq, jnp.swapaxes(dkT, 2, 3), dv, None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


class KVCache(NamedTuple):
  """Key/value cache for a stack of layers, in the layouts of `cached_attention`.

  k: `[L, B, K, S_max, Dh]`, v: `[L, B, K, Dh, S_max]`, stacked over layers
  (what a scanned decoder carries); or k and v as tuples of `L` per-layer
  arrays `[B, K, S_max, Dh]` / `[B, K, Dh, S_max]` (for an unrolled layer loop:
  a decode step then writes and reads each layer's cache in place, without
  slicing a copy out of a stacked array). Slot `s` holds the token at absolute
  position `s`, so the causal mask on positions also hides slots that were not
  written yet.
  """

  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]

  @classmethod
  def zeros(cls, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32, *,
            stacked: bool = True) -> "KVCache":
    k_shape, v_shape = (batch, n_kv_heads, max_len, head_dim), (batch, n_kv_heads, head_dim, max_len)
    if stacked:
      return cls(k=jnp.zeros((n_layers, *k_shape), dtype), v=jnp.zeros((n_layers, *v_shape), dtype))
    return cls(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(n_layers)),
               v=tuple(jnp.zeros(v_shape, dtype) for _ in range(n_layers)))

  @property
  def is_stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def max_len(self) -> int:
    return (self.v if self.is_stacked else self.v[0]).shape[-1]

  def as_stacked(self) -> "KVCache":
    """The same cache with `[L, ...]` arrays."""
    return self if self.is_stacked else KVCache(k=jnp.stack(self.k), v=jnp.stack(self.v))

  def append(self, other: "KVCache") -> "KVCache":
    """This cache's slots followed by `other`'s (same layers and form): a longer cache."""
    join = lambda axis: lambda a, b: jnp.concatenate([a, b], axis=axis)  # noqa: E731
    return KVCache(k=jax.tree.map(join(-2), self.k, other.k), v=jax.tree.map(join(-1), self.v, other.v))

  def as_layers(self) -> "KVCache":
    """The same cache as tuples of per-layer arrays."""
    if not self.is_stacked:
      return self
    n = self.k.shape[0]
    return KVCache(k=tuple(self.k[i] for i in range(n)), v=tuple(self.v[i] for i in range(n)))


def write_cache(cache_k: Array, cache_v: Array, k_BxTxKxDh: Array, v_BxTxKxDh: Array,
                start: Array) -> tuple[Array, Array]:
  """Writes one layer's new keys/values into its cache at slots `[start, start + T)` (same start for all rows).

  `cache_k` is `[B, K, S, Dh]`, `cache_v` is `[B, K, Dh, S]`; returns the updated pair.
  """
  k = jax.lax.dynamic_update_slice_in_dim(cache_k, keys_layout(k_BxTxKxDh).astype(cache_k.dtype), start, axis=2)
  v = jax.lax.dynamic_update_slice_in_dim(cache_v, values_layout(v_BxTxKxDh).astype(cache_v.dtype), start, axis=3)
  return k, v


def cross_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, k_valid_BxS: Array | None = None) -> Array:
  """Unmasked attention of queries over a separate key/value set (Perceiver-style).

  `k_valid_BxS` optionally masks padded keys.
  """
  mask = None if k_valid_BxS is None else k_valid_BxS[:, None, None, :]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q_BxTxHxDh.shape[0], 1, q_BxTxHxDh.shape[1], k_BxSxKxDh.shape[1]))
  return dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)


# ----------------------------------------------------------------------------- MLP


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
  """Llama 2's FFN width: `int(2 * 4 * dim / 3)`, scaled, rounded up to `multiple_of`."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def swiglu(x_BxTxD: Array, w1_DxF: Array, w3_DxF: Array, w2_FxD: Array) -> Array:
  """`w2(silu(x w1) * (x w3))`, no biases (projections through `linear`)."""
  gate = jax.nn.silu(linear(x_BxTxD, w1_DxF))
  return linear(gate * linear(x_BxTxD, w3_DxF), w2_FxD)


def linear(x_NxD: Array, w_DxF: Array, out_dtype=None) -> Array:
  """`x @ w` over the last axis of `x` (any leading axes), in `out_dtype` (default `x`'s).

  The same function as `jnp.matmul`, with a hand-written backward pass:
  `dw = x^T dy` is computed from an explicitly transposed copy of the
  activations `x` (`[D, N]`, usually the smaller operand), held apart by
  `optimization_barrier` so XLA does not fold the transpose back into the dot.
  Left to autodiff, the weight gradient contracts the leading (token) axis of
  both operands; XLA:CPU then transposes whichever operand it picks, often the
  large `dy` (for the output layer the `[tokens, vocab]` logit gradient), or
  runs the dot on a slower path. Matmul FLOPs are unchanged. Measured on the
  Llama training step (`benchmarks/llama_bench.py`, 1,024 tokens x width 128-768);
  for the CTR towers' 4,096-example batches through 1,024-wide layers, XLA's own
  choice was faster, and `jaxml.recsys` keeps plain matmuls.
  """
  lead = x_NxD.shape[:-1]
  out_dtype = jnp.dtype(x_NxD.dtype if out_dtype is None else out_dtype)
  y = _linear_2d(x_NxD.reshape(-1, x_NxD.shape[-1]), w_DxF, out_dtype)
  return y.reshape(*lead, w_DxF.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_2d(x_NxD: Array, w_DxF: Array, out_dtype) -> Array:
  return jnp.dot(x_NxD, w_DxF, preferred_element_type=jnp.float32).astype(out_dtype)


def _linear_2d_fwd(x_NxD, w_DxF, out_dtype):
  return _linear_2d(x_NxD, w_DxF, out_dtype), (x_NxD, w_DxF)


def _linear_2d_bwd(out_dtype, res, dy_NxF):
  x_NxD, w_DxF = res
  xT_DxN = jax.lax.optimization_barrier(x_NxD.T)
  dw_DxF = jnp.dot(xT_DxN, dy_NxF.astype(w_DxF.dtype), preferred_element_type=jnp.float32)
  dx_NxD = jnp.dot(dy_NxF.astype(w_DxF.dtype), w_DxF.T, preferred_element_type=jnp.float32)
  return dx_NxD.astype(x_NxD.dtype), dw_DxF.astype(w_DxF.dtype)


_linear_2d.defvjp(_linear_2d_fwd, _linear_2d_bwd)


# ----------------------------------------------------------------------------- stacked layers


def unstack(stacked: Any) -> tuple[Any, ...]:
  """Per-layer trees `(tree_0, ..., tree_{L-1})` of a tree whose leaves are stacked on a leading `L` axis.

  For an unrolled loop over stacked layer weights. Differentiable: the
  gradient of each stacked leaf is one stack of its `L` slice gradients.
  Autodiff of `w[i]` instead pads each slice's gradient to the whole stacked
  shape and adds the `L` padded arrays: `L` full-size buffers per weight (3%
  of the 24.6M Llama benchmark step on XLA:CPU, in pad fusions alone; the
  Perceiver masked-LM step unrolled took 105 ms against 84 at one thread).
  """
  leaves, treedef = jax.tree.flatten(stacked)
  if not leaves:
    raise ValueError("unstack: the tree has no leaves")
  n = leaves[0].shape[0] if leaves[0].ndim else None
  if n is None or any(a.ndim == 0 or a.shape[0] != n for a in leaves):
    raise ValueError(f"unstack: every leaf must share one leading (layer) axis, got shapes "
                     f"{[tuple(a.shape) for a in leaves]}")
  slices = [_unstack(a) for a in leaves]
  return tuple(jax.tree.unflatten(treedef, [s[i] for s in slices]) for i in range(n))


@jax.custom_vjp
def _unstack(w_LxN: Array) -> tuple[Array, ...]:
  return tuple(w_LxN[i] for i in range(w_LxN.shape[0]))


def _unstack_fwd(w_LxN):
  return _unstack(w_LxN), None


def _unstack_bwd(_, cts):
  return (jnp.stack(cts),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


# ----------------------------------------------------------------------------- outputs


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array, mask_BxT: Array | None = None) -> tuple[Array, Array]:
  """Mean token cross-entropy (nats) over the counted tokens, and their number.

  Each token's loss is `logsumexp(logits) - onehot(target) . logits`: the value
  of `-log_softmax(logits)[target]`, but its gradient `softmax - onehot` is a
  dense elementwise product instead of a scatter into the `[B, T, V]` gradient
  (faster on XLA:CPU). Computed in float32.

  Args:
    logits_BxTxV: `[B, T, V]` (any leading axes, vocabulary last), any float dtype.
    targets_BxT: `[B, T]` integer ids in `[0, V)`.
    mask_BxT: optional `[B, T]`, nonzero (or True) for the tokens to count; None counts all.

  Returns:
    `(loss, n)`: float32 scalars, `n = max(sum(mask), 1)` and `loss = sum(nll * mask) / n`
    (a fully masked batch gives loss 0 and `n = 1`).
  """
  if logits_BxTxV.shape[:-1] != targets_BxT.shape:
    raise ValueError(f"cross_entropy: targets_BxT {targets_BxT.shape} must be logits_BxTxV's leading shape "
                     f"{logits_BxTxV.shape[:-1]}")
  if mask_BxT is not None and mask_BxT.shape != targets_BxT.shape:
    raise ValueError(f"cross_entropy: mask_BxT {mask_BxT.shape} must have targets_BxT's shape {targets_BxT.shape}")
  logits = logits_BxTxV.astype(jnp.float32)
  onehot = jax.nn.one_hot(targets_BxT, logits.shape[-1], dtype=jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(onehot * logits, axis=-1)
  mask = jnp.ones_like(nll) if mask_BxT is None else mask_BxT.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  return (nll * mask).sum() / n, n


def first_argmax(x: Array) -> Array:
  """`jnp.argmax(x, axis=-1)`, as two plain reductions; always an index in `[0, x.shape[-1])`.

  The first index of the maximum on ties. A row holding NaN gives the index of
  its first NaN (as `jnp.argmax`, which treats NaN as the maximum), so an
  all-NaN row gives 0. XLA:CPU runs argmax's (value, index) pair reduction
  several times slower than a max followed by a min over the matching indices.

  Args:
    x: `[..., N]` with `N >= 1`, any real dtype.

  Returns:
    `[...]` int32 indices.
  """
  if x.ndim == 0 or x.shape[-1] == 0:
    raise ValueError(f"first_argmax: x needs a non-empty last axis, got shape {x.shape}")
  best = jnp.max(x, axis=-1, keepdims=True)  # NaN when the row has one
  hit = x == best
  if jnp.issubdtype(x.dtype, jnp.inexact):
    hit = hit | jnp.isnan(x)
  ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(hit, ids, x.shape[-1]), axis=-1)
