"""Shared layers as pure functions over plain parameter arrays.

Every function here takes arrays and returns arrays; parameters are passed in
explicitly, so the same code runs under `jax.jit`, `jax.pmap`, `jax.lax.scan`
and with sharded inputs. Shapes are named in argument names: B batch, T query
length, S key length, D model width, H query heads, K key/value heads,
Dh head width, F hidden width.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- init


def normal_init(rng: Array, shape: tuple[int, ...], std: float, dtype=jnp.float32) -> Array:
  """Truncated-free normal init, `N(0, std^2)`."""
  return (std * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


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


# ----------------------------------------------------------------------------- rotary


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Array:
  """`freqs_j = theta^(-2j / head_dim)` for `j < head_dim / 2` (float32)."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_tables(positions_BxT: Array, head_dim: int, theta: float = 10000.0) -> tuple[Array, Array]:
  """`cos` and `sin` of `position * freq`, each `[B, T, 1, head_dim / 2]` (float32).

  Computed once per forward pass and shared by every layer.
  """
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
  return jnp.cos(angles_BxTxF)[:, :, None, :], jnp.sin(angles_BxTxF)[:, :, None, :]


def apply_rope_tables(x_BxTxNxDh: Array, cos: Array, sin: Array) -> Array:
  """Rotates consecutive (even, odd) channel pairs with precomputed tables (see `apply_rope`)."""
  x32 = x_BxTxNxDh.astype(jnp.float32)
  x_pairs = x32.reshape(*x32.shape[:-1], x32.shape[-1] // 2, 2)
  x_re, x_im = x_pairs[..., 0], x_pairs[..., 1]
  out = jnp.stack([x_re * cos - x_im * sin, x_re * sin + x_im * cos], axis=-1).reshape(x32.shape)
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
  Returns `[B, T, H, Dh]`.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  if H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({K})")
  n_rep = H // K
  q = q_BxTxHxDh.reshape(B, T, K, n_rep, Dh)
  scores = jnp.einsum("btkrd,bskd->bkrts", q, k_BxSxKxDh, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(Dh)))
  if mask_Bx1xTxS is not None:
    mask = mask_Bx1xTxS[:, :, None, :, :]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxDh.dtype)
  out = jnp.einsum("bkrts,bskd->btkrd", probs, v_BxSxKxDh)
  return out.reshape(B, T, H, Dh)


class KVCache(NamedTuple):
  """Key/value cache for a stack of layers.

  k, v: `[L, B, S_max, K, Dh]`, stacked over layers so a scanned decoder can
  carry it. Slot `s` holds the token at absolute position `s`, so the causal
  mask on positions also hides slots that were not written yet.
  """

  k: Array
  v: Array

  @classmethod
  def zeros(cls, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
    shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write_cache(cache_k_BxSxKxDh: Array, new_BxTxKxDh: Array, start: Array) -> Array:
  """Writes `new` into the cache at slots `[start, start + T)` (same start for all rows)."""
  return jax.lax.dynamic_update_slice_in_dim(cache_k_BxSxKxDh, new_BxTxKxDh.astype(cache_k_BxSxKxDh.dtype), start, axis=1)


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
  """`w2(silu(x w1) * (x w3))`, no biases."""
  gate = jax.nn.silu(x_BxTxD @ w1_DxF)
  return (gate * (x_BxTxD @ w3_DxF)) @ w2_FxD
