"""Cross-entropy over a large vocabulary, chunked over the sequence, from hidden states.

`layers.cross_entropy` takes `[B, T, V]` logits: the caller materialises them
(float32: at 4 x 2048 tokens and V = 32,000 that is 1 GiB, and the backward
pass holds their gradient too). `chunked_token_nll` takes the hidden states
and the output matrix instead and computes the logits of `chunk` positions at
a time (all rows of the batch, so a batch sharded over devices stays sharded),
under `lax.scan`, with a hand-written backward pass that recomputes each
chunk's logits: only one `[B, chunk, V]` block of logits (and of their
gradient) exists at a time.

Per token: `nll = logsumexp(z) - z[target]` with `z = h @ w` (float32
accumulation), as `layers.cross_entropy`; its gradient in `z` is
`softmax(z) - onehot(target)`, so `dh = dz w^T` and `dw = sum_chunks h^T dz`,
the products of `layers.linear`'s backward (`dz` cast to the weight's dtype,
float32 accumulation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.nn import layers

Array = jax.Array


def _check(fn, h, w, targets, mask, chunk):
  if np.ndim(h) != 3:
    raise ValueError(f"{fn}: h_BxTxD must be [B, T, D], got shape {np.shape(h)}")
  if np.ndim(w) != 2 or w.shape[0] != h.shape[-1]:
    raise ValueError(f"{fn}: w_DxV must be [{h.shape[-1]}, V] for h_BxTxD {h.shape}, got shape {np.shape(w)}")
  if tuple(np.shape(targets)) != tuple(h.shape[:2]):
    raise ValueError(f"{fn}: targets_BxT must have shape {tuple(h.shape[:2])}, got {np.shape(targets)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"{fn}: targets_BxT must be integer ids, got dtype {targets.dtype}")
  if mask is not None and tuple(np.shape(mask)) != tuple(h.shape[:2]):
    raise ValueError(f"{fn}: mask_BxT must have shape {tuple(h.shape[:2])}, got {np.shape(mask)}")
  if int(chunk) != chunk or chunk <= 0:
    raise ValueError(f"{fn}: chunk must be a positive integer, got {chunk}")


def chunked_token_nll(h_BxTxD: Array, w_DxV: Array, targets_BxT: Array, *, chunk: int) -> tuple[Array, Array]:
  """Per-token `-log softmax(h @ w)[target]` and whether the target is the first argmax.

  Equal (values, and gradients in `h` and `w`) to
  `layers.cross_entropy`'s per-token losses of `layers.linear(h, w,
  out_dtype=float32)`, without those `[B, T, V]` logits (module docstring).
  `T` need not divide by `chunk` (the tail chunk is padded and discarded).

  Args:
    h_BxTxD: hidden states, any float dtype (the product runs in it).
    w_DxV: the output matrix, cast by the caller to the compute dtype.
    targets_BxT: integer ids in `[0, V)`.
    chunk: positions per block of logits (clipped to `T`).

  Returns:
    `(nll_BxT float32, correct_BxT bool)`; `correct` has no gradient.
  """
  _check("chunked_token_nll", h_BxTxD, w_DxV, targets_BxT, None, chunk)
  B, T, D = h_BxTxD.shape
  c = min(int(chunk), T)
  n = -(-T // c)
  pad = n * c - T
  h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
  t = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
  nll, correct = _chunked_nll(h, w_DxV, t)
  return nll.swapaxes(0, 1).reshape(B, n * c)[:, :T], correct.swapaxes(0, 1).reshape(B, n * c)[:, :T]


def chunked_cross_entropy(h_BxTxD: Array, w_DxV: Array, targets_BxT: Array, mask_BxT: Array | None = None, *,
                          chunk: int) -> tuple[Array, Array]:
  """`layers.cross_entropy(layers.linear(h, w, out_dtype=float32), targets, mask)` by chunks.

  Returns:
    `(loss, n)` as `layers.cross_entropy`: the masked mean token loss and
    `max(sum(mask), 1)`, float32 scalars.
  """
  _check("chunked_cross_entropy", h_BxTxD, w_DxV, targets_BxT, mask_BxT, chunk)
  nll, _ = chunked_token_nll(h_BxTxD, w_DxV, targets_BxT, chunk=chunk)
  return masked_mean(nll, mask_BxT)


def masked_mean(x_BxT: Array, mask_BxT: Array | None) -> tuple[Array, Array]:
  """`(sum(x * mask) / n, n)` with `n = max(sum(mask), 1)` (all counted when `mask` is None), float32."""
  m = jnp.ones(x_BxT.shape, jnp.float32) if mask_BxT is None else jnp.asarray(mask_BxT).astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return (x_BxT.astype(jnp.float32) * m).sum() / n, n


def _chunk_logits(h_BxcxD, w_DxV):
  return jnp.einsum("bcd,dv->bcv", h_BxcxD, w_DxV, preferred_element_type=jnp.float32)


def _nll_fwd(h, w, t):
  """Over chunks `h [n, B, c, D]`, `t [n, B, c]`: `(nll, correct, lse)`, each `[n, B, c]`."""
  def one(_, xs):
    hc, tc = xs
    z = _chunk_logits(hc, w)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0]
    return None, (lse - picked, layers.first_argmax(z) == tc, lse)
  _, out = jax.lax.scan(one, None, (h, t))
  return out


@jax.custom_vjp
def _chunked_nll(h, w, t):
  nll, correct, _ = _nll_fwd(h, w, t)
  return nll, correct


def _chunked_nll_fwd(h, w, t):
  nll, correct, lse = _nll_fwd(h, w, t)
  return (nll, correct), (h, w, t, lse)


def _chunked_nll_bwd(res, cts):
  h, w, t, lse = res
  g = cts[0].astype(jnp.float32)

  def one(dw, xs):
    hc, tc, lc, gc = xs
    z = _chunk_logits(hc, w)
    dz = (jnp.exp(z - lc[..., None]) - jax.nn.one_hot(tc, z.shape[-1], dtype=jnp.float32)) * gc[..., None]
    dz = dz.astype(w.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dz, w, preferred_element_type=jnp.float32).astype(h.dtype)
    return dw + jnp.einsum("bcd,bcv->dv", hc, dz, preferred_element_type=jnp.float32), dh

  dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (h, t, lse, g))
  return dh, dw.astype(w.dtype), np.zeros(t.shape, jax.dtypes.float0)


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)

