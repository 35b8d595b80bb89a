"""Memory-linear attention forms and the chunked cross-entropy against the materialised forms."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import nn as jnn
from jaxml.nn import flash, layers, losses

B, T, DH = 2, 37, 8  # T divides by none of the blocks used below


def _inputs(n_heads, n_kv, t=T, s=None, seed=0):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  q = jnp.asarray(rng.normal(size=(B, t, n_heads, DH)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, s, n_kv, DH)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, s, n_kv, DH)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(B, t, n_heads, DH)), jnp.float32)
  return q, k, v, ct


# Row 0 unpadded; row 1 left-padded by 5 (so with a causal mask its first 5 queries see no key at all).
LEFT_PAD = jnp.asarray(np.arange(T)[None] >= np.array([[0], [5]]))
# Row 1 right-padded: its last 9 slots are padding.
RIGHT_PAD = jnp.asarray(np.arange(T)[None] < np.array([[T], [T - 9]]))


def _value_and_grads(impl, q, k, v, ct, row_weight=None, **kw):
  """The attention output and the gradients of `sum(out * ct)` (rows weighted by `row_weight`)."""
  w = 1.0 if row_weight is None else row_weight[:, :, None, None].astype(jnp.float32)

  def f(q, k, v):
    out = flash.attention(q, k, v, impl=impl, **kw)
    return jnp.sum(out * ct * w), out

  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _assert_close(got, want, atol=2e-5, rows=None):
  (out_g, grads_g), (out_w, grads_w) = got, want
  if rows is not None:
    out_g, out_w = np.asarray(out_g)[np.asarray(rows)], np.asarray(out_w)[np.asarray(rows)]
  np.testing.assert_allclose(out_g, out_w, atol=atol, rtol=0)
  for name, a, b in zip("qkv", grads_g, grads_w):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"d{name}")


class BlockwiseTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("causal_gqa_left_pad", True, 4, 2, LEFT_PAD, 16, 8),
      ("full_mqa_right_pad", False, 4, 1, RIGHT_PAD, 8, 32),
  )
  def test_equals_materialised(self, causal, n_heads, n_kv, k_valid, block_q, block_k):
    """Values and gradients, every query row (left padding leaves rows that see no key: uniform in both)."""
    q, k, v, ct = _inputs(n_heads, n_kv)
    kw = dict(causal=causal, k_valid_BxS=k_valid)
    got, want = jax.jit(lambda *a: (_value_and_grads("blockwise", *a, block_q=block_q, block_k=block_k, **kw),
                                    _value_and_grads("materialised", *a, **kw)))(q, k, v, ct)
    _assert_close(got, want)

  def test_positions_checkpoint_and_scan(self):
    """MHA queries at positions 20.. over 37 keys (T != S), two layers under `lax.scan` + `jax.checkpoint`."""
    q, k, v, ct = _inputs(2, 2, t=11, s=T, seed=1)
    pos = dict(q_positions_BxT=jnp.broadcast_to(jnp.arange(11) + 20, (B, 11)),
               k_positions_BxS=jnp.broadcast_to(jnp.arange(T), (B, T)), k_valid_BxS=RIGHT_PAD)
    ws = jnp.asarray(np.random.default_rng(3).normal(size=(2, DH, DH)) / np.sqrt(DH), jnp.float32)

    def stack(impl, q, ws):
      def layer(x, w):
        return x + flash.attention(x @ w, k, v, impl=impl, block_q=4, block_k=16, **pos), None
      x, _ = jax.lax.scan(jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable), q, ws)
      return jnp.sum(x * ct)

    grad = lambda impl: jax.value_and_grad(lambda *a: stack(impl, *a), argnums=(0, 1))(q, ws)  # noqa: E731
    got, want = jax.jit(lambda: (grad("blockwise"), grad("materialised")))()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=0)

  def test_bad_inputs_raise(self):
    q, k, v, _ = _inputs(4, 2)
    with self.assertRaisesRegex(ValueError, "impl"):
      flash.attention(q, k, v, impl="flash")
    with self.assertRaisesRegex(ValueError, "multiple of key/value heads"):
      flash.attention(q[:, :, :3], k, v)
    with self.assertRaisesRegex(ValueError, "k_valid_BxS"):
      flash.attention(q, k, v, k_valid_BxS=LEFT_PAD[:, :5])
    with self.assertRaisesRegex(ValueError, "block_k"):
      flash.blockwise_attention(q, k, v, block_k=0)

  def test_exported(self):
    self.assertIs(jnn.blockwise_attention, flash.blockwise_attention)
    self.assertIs(jnn.chunked_cross_entropy, losses.chunked_cross_entropy)


class KernelFormsTest(parameterized.TestCase):
  """The fused kernels mask by index: equal at every query of a real token (module docstring of `flash`)."""

  @parameterized.named_parameters(("causal_gqa", True, 4, 2, None), ("full_mqa_right_pad", False, 4, 1, RIGHT_PAD))
  def test_cudnn_form_equals_materialised(self, causal, n_heads, n_kv, k_valid):
    """`jax.nn.dot_product_attention` (XLA's expansion here: cuDNN needs a GPU)."""
    q, k, v, ct = _inputs(n_heads, n_kv, seed=4)
    kw = dict(causal=causal, k_valid_BxS=k_valid)
    got, want = jax.jit(lambda *a: (_value_and_grads("cudnn", *a, **kw), _value_and_grads("materialised", *a, **kw)))(
        q, k, v, ct)
    _assert_close(got, want)

  def test_pallas_form_equals_materialised_at_real_tokens(self, causal=True, k_valid=LEFT_PAD):
    """The Pallas TPU kernel in interpret mode; the loss weighs real tokens only (padding queries differ by design)."""
    import jax.experimental.pallas.tpu as pltpu  # noqa: PLC0415

    q, k, v, ct = _inputs(4, 2, seed=5)
    kw = dict(causal=causal, k_valid_BxS=k_valid)
    with pltpu.force_tpu_interpret_mode():  # traced and compiled inside
      got, want = jax.jit(lambda *a: (_value_and_grads("pallas", *a, row_weight=k_valid, **kw),
                                      _value_and_grads("materialised", *a, row_weight=k_valid, **kw)))(q, k, v, ct)
    _assert_close(got, want, rows=k_valid)


class ChunkedCrossEntropyTest(parameterized.TestCase):

  def test_equals_plain_cross_entropy(self):
    """Loss and gradients with a mask and chunks of 5 over 13 positions; per-token values with one chunk."""
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, size=(2, 13)), jnp.int32)
    m = jnp.asarray(rng.integers(0, 2, size=(2, 13)), jnp.float32)

    def both(h, w):
      chunked = jax.value_and_grad(lambda h, w: losses.chunked_cross_entropy(h, w, t, m, chunk=5)[0], argnums=(0, 1))
      plain = jax.value_and_grad(lambda h, w: layers.cross_entropy(layers.linear(h, w, out_dtype=jnp.float32), t, m)[0],
                                 argnums=(0, 1))
      return chunked(h, w), plain(h, w), losses.chunked_token_nll(h, w, t, chunk=64), layers.first_argmax(h @ w)

    got, want, (nll, correct), argmax = jax.jit(both)(h, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1]):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(correct, argmax == t)
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    np.testing.assert_allclose(nll, -np.take_along_axis(logp, np.asarray(t)[..., None], -1)[..., 0], atol=1e-5)

  def test_bad_inputs_raise(self):
    h, w, t = jnp.zeros((2, 4, 8)), jnp.zeros((8, 5)), jnp.zeros((2, 4), jnp.int32)
    with self.assertRaisesRegex(ValueError, "w_DxV"):
      losses.chunked_cross_entropy(h, w.T, t, chunk=2)
    with self.assertRaisesRegex(ValueError, "targets_BxT"):
      losses.chunked_cross_entropy(h, w, t[:, :3], chunk=2)
    with self.assertRaisesRegex(TypeError, "targets_BxT"):
      losses.chunked_cross_entropy(h, w, t.astype(jnp.float32), chunk=2)
    with self.assertRaisesRegex(ValueError, "chunk"):
      losses.chunked_cross_entropy(h, w, t, chunk=0)


if __name__ == "__main__":
  absltest.main()
