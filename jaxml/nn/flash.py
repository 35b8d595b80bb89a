"""Attention whose memory grows linearly in the sequence, in three forms, and one dispatcher.

`dot_product_attention` (in `layers`) materialises the `[B, H, T, S]` float32
scores, their softmax and, in the backward pass, their gradients: at
`B, H, T = 4, 32, 2048` that is 2 GiB per copy. The forms here never hold more
than one `[block_q, block_k]` tile of scores per (batch, head):

* `blockwise_attention`: pure JAX, any backend. The online softmax of
  FlashAttention (Dao et al. 2022, arXiv 2205.14135; the backward of
  FlashAttention-2, arXiv 2307.08691): per query block, running max `m`,
  running sum `l = sum exp(s - m)` and an unnormalised output accumulator,
  rescaled by `exp(m_old - m_new)` when the max grows. The forward keeps only
  the output and the log-sum-exp `lse = m + log l` per query row; the backward
  recomputes each tile's probabilities `p = exp(s - lse)` and uses
  `rowsum(p * dp) = rowsum(o * do)`, so no `[T, S]` array exists in either
  pass. Tiles where the mask hides every key are skipped (`lax.cond`): a
  causal mask skips about half of them.
* `fused_attention`: `jax.nn.dot_product_attention`, cuDNN's fused kernel on
  GPU (`implementation="cudnn"`), XLA's own (materialised) expansion elsewhere.
* `pallas_attention`: the Pallas TPU flash-attention kernel
  (`jax.experimental.pallas.ops.tpu.flash_attention`); off TPU it runs only
  under Pallas's interpret mode (slow: tests only).

All take the layout of `layers.dot_product_attention` (queries `[B, T, H, Dh]`,
keys/values `[B, S, K, Dh]`, `H = K * n_rep`, query head `h` using kv head
`h // n_rep`) and describe the mask by positions instead of a `[B, 1, T, S]`
array: query `t` sees key `s` when `k_valid[s]` and, if `causal`,
`k_positions[s] <= q_positions[t]` (positions default to `arange`). That is
`layers.causal_mask(q_positions, k_positions, k_valid)`; `attention(...,
impl="materialised")` builds that mask and calls `dot_product_attention`.

`blockwise_attention` equals the materialised form everywhere, including a
query row that sees no key at all (uniform attention over all `S` keys, as the
materialised form's float32-minimum scores give). `fused_attention` builds the
mask from the positions when any are given (else it uses the kernel's own
causal mask, by index). The Pallas kernel masks by index (`s <= t` when
causal), not by position, and gives each padding query the padding keys
(segment ids `q = kv = k_valid`): it equals the materialised form at every
query whose visible keys are the same under both rules, which holds for every
real (non-padding) token when positions increase by one over the real tokens
of a row (`arange`, or the `cumsum(attention_mask) - 1` positions of a padded
row).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.nn import layers

Array = jax.Array

IMPLS = ("materialised", "blockwise", "cudnn", "pallas")


def _check_qkv(fn: str, q, k, v, q_positions, k_positions, k_valid) -> tuple[int, int, int, int, int, int]:
  for name, a in (("q_BxTxHxDh", q), ("k_BxSxKxDh", k), ("v_BxSxKxDh", v)):
    if np.ndim(a) != 4:
      raise ValueError(f"{fn}: {name} must have 4 axes, got shape {np.shape(a)}")
  B, T, H, Dh = q.shape
  S, K = k.shape[1], k.shape[2]
  if k.shape != (B, S, K, Dh) or v.shape != k.shape:
    raise ValueError(f"{fn}: k_BxSxKxDh and v_BxSxKxDh must both be [{B}, S, K, {Dh}] for q {q.shape}, "
                     f"got {k.shape} and {v.shape}")
  if H % K:
    raise ValueError(f"{fn}: query heads ({H}) must be a multiple of key/value heads ({K})")
  for name, a, shape in (("q_positions_BxT", q_positions, (B, T)), ("k_positions_BxS", k_positions, (B, S)),
                         ("k_valid_BxS", k_valid, (B, S))):
    if a is not None and tuple(np.shape(a)) != shape:
      raise ValueError(f"{fn}: {name} must have shape {shape}, got {np.shape(a)}")
  return B, T, S, H, K, Dh


def _positions(p, B: int, n: int) -> Array:
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n)) if p is None else jnp.asarray(p, jnp.int32)


def visible_mask(B: int, T: int, S: int, *, causal: bool, q_positions_BxT=None, k_positions_BxS=None,
                 k_valid_BxS=None) -> Array | None:
  """The `[B, 1, T, S]` boolean mask the forms here describe by positions (None: every key visible)."""
  if not causal:
    return None if k_valid_BxS is None else jnp.broadcast_to(
        jnp.asarray(k_valid_BxS, bool)[:, None, None, :], (B, 1, T, S))
  k_valid = None if k_valid_BxS is None else jnp.asarray(k_valid_BxS, bool)
  return layers.causal_mask(_positions(q_positions_BxT, B, T), _positions(k_positions_BxS, B, S), k_valid)


def attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, *, impl: str = "blockwise",
              causal: bool = True, q_positions_BxT: Array | None = None, k_positions_BxS: Array | None = None,
              k_valid_BxS: Array | None = None, block_q: int = 512, block_k: int = 512) -> Array:
  """Grouped attention `[B, T, H, Dh]` by the form `impl` (one of `IMPLS`; see the module docstring).

  "materialised" is `layers.dot_product_attention` with the mask built from
  the positions; "blockwise", "cudnn" and "pallas" are `blockwise_attention`,
  `fused_attention` and `pallas_attention`. Block sizes apply to "blockwise".
  """
  if impl not in IMPLS:
    raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
  B, T, S, *_ = _check_qkv("attention", q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_positions_BxT, k_positions_BxS,
                           k_valid_BxS)
  kw = dict(causal=causal, q_positions_BxT=q_positions_BxT, k_positions_BxS=k_positions_BxS, k_valid_BxS=k_valid_BxS)
  if impl == "materialised":
    return layers.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_mask(B, T, S, **kw))
  if impl == "blockwise":
    return blockwise_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, block_q=block_q, block_k=block_k, **kw)
  if impl == "cudnn":  # JAX's default implementation is XLA's (materialised): ask for cuDNN's on GPU
    return fused_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                           implementation="cudnn" if jax.default_backend() == "gpu" else None, **kw)
  return pallas_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, causal=causal, k_valid_BxS=k_valid_BxS)


# ----------------------------------------------------------------------------- blockwise


def blockwise_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, *, causal: bool = True,
                        q_positions_BxT: Array | None = None, k_positions_BxS: Array | None = None,
                        k_valid_BxS: Array | None = None, block_q: int = 512, block_k: int = 512) -> Array:
  """Online-softmax attention with a backward pass that recomputes each tile (module docstring).

  Equal (values and gradients, up to float rounding) to
  `layers.dot_product_attention(q, k, v, visible_mask(...))`. Scores and the
  softmax statistics are float32; tiles of probabilities are cast to the
  values' dtype for the `p v` product, as the materialised form casts its
  probabilities. Lengths need not divide the blocks (the tail is padded with
  hidden keys and discarded queries). Works under `jit`, `grad`,
  `jax.checkpoint` and `lax.scan`.

  Args:
    q_BxTxHxDh: queries (unscaled; `1 / sqrt(Dh)` is applied here).
    k_BxSxKxDh, v_BxSxKxDh: keys and values, `K` dividing `H`.
    causal: hide keys at later positions than the query's.
    q_positions_BxT, k_positions_BxS: integer positions (default `arange`).
    k_valid_BxS: optional bool, False for keys no query may see (padding).
    block_q, block_k: tile sizes (clipped to the lengths).

  Returns:
    `[B, T, H, Dh]` in the values' dtype.
  """
  B, T, S, H, K, Dh = _check_qkv("blockwise_attention", q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_positions_BxT,
                                 k_positions_BxS, k_valid_BxS)
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if int(b) != b or b <= 0:
      raise ValueError(f"blockwise_attention: {name} must be a positive integer, got {b}")
  R = H // K
  bq, bk = min(int(block_q), T), min(int(block_k), S)
  nq, nk = -(-T // bq), -(-S // bk)
  Tp, Sp = nq * bq, nk * bk
  q = q_BxTxHxDh * jnp.asarray(1.0 / math.sqrt(Dh), q_BxTxHxDh.dtype)
  # Queries [nq, B, K, R, bq, Dh]: the R query heads of a kv head side by side.
  q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, nq, bq, K, R, Dh)
  q = jnp.transpose(q, (1, 0, 3, 4, 2, 5))
  # Keys/values [nk, B, K, bk, Dh]; padded keys are zero (so sums over all slots are sums over real keys).
  def kv_blocks(a):
    a = jnp.pad(a, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).reshape(B, nk, bk, K, Dh)
    return jnp.transpose(a, (1, 0, 3, 2, 4))
  k, v = kv_blocks(k_BxSxKxDh), kv_blocks(v_BxSxKxDh)
  qpos = jnp.pad(_positions(q_positions_BxT, B, T), ((0, 0), (0, Tp - T))).reshape(B, nq, bq).swapaxes(0, 1)
  kpos = jnp.pad(_positions(k_positions_BxS, B, S), ((0, 0), (0, Sp - S))).reshape(B, nk, bk).swapaxes(0, 1)
  kval = jnp.ones((B, S), bool) if k_valid_BxS is None else jnp.asarray(k_valid_BxS, bool)
  kval = jnp.pad(kval, ((0, 0), (0, Sp - S))).reshape(B, nk, bk).swapaxes(0, 1)
  out = _blockwise(q, k, v, qpos, kpos, kval, causal, S)  # [nq, B, K, R, bq, Dh]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(B, Tp, H, Dh)
  return out[:, :T]


def _tile_mask(qpos_Bxq, kpos_Bxk, kval_Bxk, causal):
  """`[B, 1, 1, bq, bk]`: which keys of a tile each query sees."""
  m = jnp.broadcast_to(kval_Bxk[:, None, :], (*qpos_Bxq.shape, kval_Bxk.shape[-1]))
  if causal:
    m = m & (kpos_Bxk[:, None, :] <= qpos_Bxq[:, :, None])
  return m[:, None, None]


def _scores(qb, kb, mask):
  """A tile of scores, float32, `-inf` where masked (`s + log(mask)`: no array built from constants alone)."""
  s = jnp.einsum("bkrqd,bksd->bkrqs", qb, kb, preferred_element_type=jnp.float32)
  return s + jnp.log(mask.astype(jnp.float32))


def _blockwise_fwd(q, k, v, qpos, kpos, kval, causal, S):
  """Forward over tiles: `(out [nq, B, K, R, bq, Dh], lse [nq, B, K, R, bq])` (lse = inf for rows seeing no key).

  Everything here is computed from the inputs, through one `optimization_barrier`: inside a caller's
  `lax.scan` (a layer loop), JAX's partial evaluation hoists what depends on loop constants alone (the
  masks, from the positions) out of the loop and keeps it for the backward pass, stacked over all
  tiles: the whole `[T, S]` mask and its broadcasts, what this function exists to avoid.
  """
  q, k, v, qpos, kpos, kval = jax.lax.optimization_barrier((q, k, v, qpos, kpos, kval))
  mean_v = jnp.sum(v.astype(jnp.float32), axis=(0, 3)) / S  # [B, K, Dh]: a row seeing no key attends uniformly
  zero = jnp.sum(mean_v) * 0.0  # a data-dependent 0 for the initial statistics (see above)
  init = (jnp.full(q.shape[1:-1], -jnp.inf) + zero, jnp.zeros(q.shape[1:-1]) + zero, jnp.zeros(q.shape[1:]) + zero)

  def q_block(_, q_in):
    qb, qp = q_in

    def k_block(carry, k_in):
      kb, vb, kp, kv = k_in
      mask = _tile_mask(qp, kp, kv, causal)

      def update(carry):
        m, l, acc = carry
        s = _scores(qb, kb, mask)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.maximum(m_new, jnp.finfo(jnp.float32).min)  # finite: exp(-inf - m_safe) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.einsum("bkrqs,bksd->bkrqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    (m, l, acc), _ = jax.lax.scan(k_block, init, (k, v, kpos, kval))
    seen = l > 0
    l_safe = jnp.maximum(l, jnp.finfo(jnp.float32).tiny)
    out = jnp.where(seen[..., None], acc / l_safe[..., None], mean_v[:, :, None, None, :])
    lse = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)
    return None, (out.astype(v.dtype), lse)

  _, (out, lse) = jax.lax.scan(q_block, None, (q, qpos))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blockwise(q, k, v, qpos, kpos, kval, causal, S):
  return _blockwise_fwd(q, k, v, qpos, kpos, kval, causal, S)[0]


def _blockwise_vjp_fwd(q, k, v, qpos, kpos, kval, causal, S):
  out, lse = _blockwise_fwd(q, k, v, qpos, kpos, kval, causal, S)
  return out, (q, k, v, qpos, kpos, kval, out, lse)


def _blockwise_vjp_bwd(causal, S, res, dout):
  """FlashAttention-2's backward, one pass over key tiles (outer) and query tiles (inner)."""
  q, k, v, qpos, kpos, kval, out, lse = res
  dout = dout.astype(v.dtype)
  row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # rowsum(p * dp), [nq, B, K, R, bq]

  def k_block(dq_acc, k_in):
    kb, vb, kp, kv = k_in

    def q_block(carry, q_in):
      qb, dob, lseb, rowb, qp = q_in
      mask = _tile_mask(qp, kp, kv, causal)

      def grads(carry):
        dk, dv = carry
        p = jnp.exp(_scores(qb, kb, mask) - lseb[..., None])  # 0 where masked, and in rows seeing no key
        dp = jnp.einsum("bkrqd,bksd->bkrqs", dob, vb, preferred_element_type=jnp.float32)
        ds = (p * (dp - rowb[..., None])).astype(qb.dtype)
        dq = jnp.einsum("bkrqs,bksd->bkrqd", ds, kb, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bkrqs,bkrqd->bksd", ds, qb, preferred_element_type=jnp.float32)
        dv = dv + jnp.einsum("bkrqs,bkrqd->bksd", p.astype(vb.dtype), dob, preferred_element_type=jnp.float32)
        return (dk, dv), dq

      def skip(carry):
        return carry, jnp.zeros(qb.shape, jnp.float32)

      return jax.lax.cond(jnp.any(mask), grads, skip, carry)

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), (q, dout, lse, row, qpos))
    return dq_acc + dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), (k, v, kpos, kval))
  # Rows that see no key attend uniformly to all S real key slots: each gets dout / S of such a row.
  empty = jnp.isinf(lse)[..., None]
  dv_empty = jnp.sum(jnp.where(empty, dout.astype(jnp.float32), 0.0), axis=(0, 3, 4)) / S  # [B, K, Dh]
  dv = dv + dv_empty[None, :, :, None, :]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_blockwise.defvjp(_blockwise_vjp_fwd, _blockwise_vjp_bwd)


# ----------------------------------------------------------------------------- fused kernels


def fused_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, *, causal: bool = True,
                    q_positions_BxT: Array | None = None, k_positions_BxS: Array | None = None,
                    k_valid_BxS: Array | None = None, implementation: str | None = None) -> Array:
  """`jax.nn.dot_product_attention`: cuDNN's fused kernel with `implementation="cudnn"` (GPU only;
  bfloat16/float16, a subset of shapes: it raises otherwise), else XLA's expansion, which materialises
  the scores (`implementation=None` means XLA in JAX 0.10). `attention(impl="cudnn")` asks for cuDNN
  on GPU.

  Without positions or `k_valid` the causal mask is the kernel's own
  (`is_causal`, nothing `[T, S]` built); otherwise a boolean `[B, 1, T, S]`
  mask is built from them (a bool per score, not float32 scores).
  """
  B, T, S, *_ = _check_qkv("fused_attention", q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_positions_BxT,
                           k_positions_BxS, k_valid_BxS)
  if q_positions_BxT is None and k_positions_BxS is None and k_valid_BxS is None:
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, is_causal=causal,
                                        implementation=implementation)
  mask = visible_mask(B, T, S, causal=causal, q_positions_BxT=q_positions_BxT, k_positions_BxS=k_positions_BxS,
                      k_valid_BxS=k_valid_BxS)
  return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask, implementation=implementation)


PALLAS_BLOCK = 128  # the Pallas TPU kernel's tile (lengths are padded to a multiple of it)


def pallas_attention(q_BxTxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array, *, causal: bool = True,
                     k_valid_BxS: Array | None = None, block: int = PALLAS_BLOCK) -> Array:
  """The Pallas TPU flash-attention kernel (TPU only; elsewhere trace and differentiate it inside
  `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`, which interprets it: slow, for tests).

  Causal by index (`s <= t`). The kernel has no grouped heads: keys and
  values are repeated to `H` heads (`[B, S, H, Dh]`, linear in `S`). Padding
  uses the kernel's segment ids, `k_valid` for queries and keys alike (a
  padding query sees the padding keys, never an empty row). Lengths are
  padded to a multiple of `block` with padding keys; the padded queries are
  dropped.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_fa  # noqa: PLC0415 - optional kernel

  B, T, S, H, K, Dh = _check_qkv("pallas_attention", q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, None, None, k_valid_BxS)
  if T != S and causal:
    raise ValueError(f"pallas_attention: a causal mask by index needs as many queries as keys, got T={T}, S={S}")
  L = -(-max(T, S) // block) * block
  def heads_major(a, n):  # [B, n, heads, Dh] -> [B, heads, L, Dh], zero padded
    return jnp.transpose(jnp.pad(a, ((0, 0), (0, L - n), (0, 0), (0, 0))), (0, 2, 1, 3))
  q = heads_major(q_BxTxHxDh, T)
  k = heads_major(jnp.repeat(k_BxSxKxDh, H // K, axis=2), S)
  v = heads_major(jnp.repeat(v_BxSxKxDh, H // K, axis=2), S)
  segments = None
  if k_valid_BxS is not None or L != S or L != T:
    valid = jnp.ones((B, S), bool) if k_valid_BxS is None else jnp.asarray(k_valid_BxS, bool)
    kv_ids = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, L - S)))
    q_ids = kv_ids if T == S else jnp.pad(jnp.ones((B, T), jnp.int32), ((0, 0), (0, L - T)))
    segments = pallas_fa.SegmentIds(q=q_ids, kv=kv_ids)
  b = min(block, L)
  sizes = pallas_fa.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
                               block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b,
                               block_k_dq=b, block_q_dq=b)
  run = functools.partial(pallas_fa.flash_attention, causal=causal, sm_scale=1.0 / math.sqrt(Dh), block_sizes=sizes)
  out = run(q, k, v, segment_ids=segments)
  return jnp.transpose(out, (0, 2, 1, 3))[:, :T].astype(v_BxSxKxDh.dtype)
