"""`jaxml.cpu_kernels.top_k` equals `jax.lax.top_k` on canonical scores, bit for bit, ties included.

The kernel takes one of two paths per row (`jaxml/cpu_kernels/top_k.cc`): rows of at least 32 k
entries with k finite group maxima are bounded and filtered (the (1003, 20), (1003, 1), (5000, 50)
and (40, 1) cases; "ties" fills the candidate buffer and tightens the bound several times), the
others are inserted entry by entry ("few_finite", and the short rows). The reference is
`lax.top_k(canonical(x), k)` and NumPy's stable argsort of the negated canonical
scores (higher first, lower index first among equals). Where a C++ compiler exists the kernel must
actually build and run (`available()` is asserted, not skipped on: a kernel that failed to build would
leave only the plain form under test); without one, the plain form runs and these tests check it.
"""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import cpu_kernels


def _canon(x):
  return np.where(np.isnan(x), -np.inf, np.where(x == 0, 0.0, x)).astype(np.float32)


def _assert_equals_lax_top_k(test, x, k):
  values, ids = jax.jit(cpu_kernels.top_k, static_argnums=1)(x, k)
  want_values, want_ids = jax.lax.top_k(_canon(x), k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(np.asarray(values).view(np.int32), np.asarray(want_values).view(np.int32))
  flat = _canon(x).reshape(-1, x.shape[-1])
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1, k), np.argsort(-flat, axis=1, kind="stable")[:, :k])
  test.assertEqual(ids.dtype, jnp.int32)


CASES = {
    "continuous": lambda rng, n: rng.standard_normal((12, n)),
    "ties": lambda rng, n: rng.integers(0, 3, (12, n)),                       # hundreds of equal scores a row
    "masked": lambda rng, n: np.where(rng.random((12, n)) < 0.3, -np.inf, rng.standard_normal((12, n))),
    "few_finite": lambda rng, n: np.where(np.arange(n) % 400 == 7, rng.standard_normal((12, n)), -np.inf),
    "zeros_nan": lambda rng, n: rng.choice(np.array([0.0, -0.0, np.nan, -np.nan, -np.inf, 1.0]), (12, n),
                                           p=[0.4, 0.4, 0.005, 0.1, 0.09, 0.005]),
    "ascending": lambda rng, n: np.tile(np.arange(n, dtype=np.float64), (12, 1)),   # every entry enters the list
    "descending": lambda rng, n: np.tile(-np.arange(n, dtype=np.float64), (12, 1)),
}


class TopKTest(parameterized.TestCase):

  def test_the_kernel_is_built_and_used(self):
    text = jax.jit(lambda s: cpu_kernels.top_k(s, 3)).lower(jnp.zeros((4, 50))).as_text()
    if cpu_kernels._compiler() is None:            # no C++ compiler: the plain form, said once
      self.assertFalse(cpu_kernels.available())
      self.assertNotIn("jaxml_top_k", text)
      return
    self.assertTrue(cpu_kernels.available())       # a compiler that fails to build the kernel fails here
    self.assertIn("jaxml_top_k", text)

  @parameterized.named_parameters(*[(f"{name}_n{n}_k{k}", name, n, k) for name in CASES
                                    for n, k in ((1003, 20), (1003, 1), (5000, 50), (40, 1), (17, 17), (5, 3), (16, 16),
                                                 (33, 2))])
  def test_equals_lax_top_k(self, case, n, k):
    _assert_equals_lax_top_k(self, CASES[case](np.random.default_rng(n + k), n).astype(np.float32), k)

  def test_the_portable_build_equals_lax_top_k(self):
    # The plain loops any CPU without AVX-512 compiles (-DJAXML_TOP_K_PORTABLE), under a target of their own.
    import ctypes
    compiler = cpu_kernels._compiler()
    if compiler is None:
      self.skipTest("no C++ compiler on this machine: nothing to build")
    portable = ctypes.CDLL(str(cpu_kernels._build(compiler, cpu_kernels._FLAGS + ("-DJAXML_TOP_K_PORTABLE",))))
    default = ctypes.CDLL(str(cpu_kernels._build(compiler)))
    self.assertEqual(portable.JaxmlTopKVectorised(), 0)
    if " avx512f " in cpu_kernels._cpu_identity().replace("\n", " ") + " ":    # the default build takes the AVX-512 paths
      self.assertEqual(default.JaxmlTopKVectorised(), 1)
    jax.ffi.register_ffi_target("jaxml_top_k_portable", jax.ffi.pycapsule(portable.JaxmlTopK), platform="cpu")
    rng = np.random.default_rng(7)
    for case in ("continuous", "ties", "zeros_nan", "few_finite"):
      for n, k in ((1003, 20), (40, 1), (17, 17)):
        x = CASES[case](rng, n).astype(np.float32)
        shape = x.shape[:-1] + (k,)
        call = jax.ffi.ffi_call("jaxml_top_k_portable", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                                         jax.ShapeDtypeStruct(shape, jnp.int32)))
        values, ids = call(jnp.asarray(x))
        want_values, want_ids = jax.lax.top_k(_canon(x), k)
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"{case} n={n} k={k}")
        np.testing.assert_array_equal(np.asarray(values).view(np.int32), np.asarray(want_values).view(np.int32))

  def test_leading_axes_vmap_and_empty_batches(self):
    x = np.random.default_rng(0).integers(0, 4, (2, 3, 70)).astype(np.float32)
    _assert_equals_lax_top_k(self, x, 5)
    values, ids = jax.vmap(lambda r: cpu_kernels.top_k(r, 4))(jnp.asarray(x[0]))
    np.testing.assert_array_equal(ids, jax.lax.top_k(x[0], 4)[1])
    np.testing.assert_array_equal(values, jax.lax.top_k(x[0], 4)[0])
    values, ids = cpu_kernels.top_k(jnp.zeros((0, 9)), 2)
    self.assertEqual(ids.shape, (0, 2))

  def test_the_plain_form_when_the_kernel_is_unavailable(self):
    x = np.random.default_rng(3).integers(0, 3, (6, 90)).astype(np.float32)
    with mock.patch.object(cpu_kernels, "available", lambda: False):
      text = jax.jit(lambda s: cpu_kernels.top_k(s, 7)).lower(x).as_text()
      ids = cpu_kernels.top_k(x, 7)[1]
    self.assertNotIn("jaxml_top_k", text)
    np.testing.assert_array_equal(ids, cpu_kernels.top_k(x, 7)[1])

  def test_bad_arguments_raise_before_compute(self):
    with self.assertRaisesRegex(ValueError, "k must be an integer in \\[1, 30\\]"):
      cpu_kernels.top_k(jnp.zeros((2, 30)), 31)
    with self.assertRaisesRegex(ValueError, "k must be an integer"):
      cpu_kernels.top_k(jnp.zeros((2, 30)), 0)
    with self.assertRaisesRegex(ValueError, "x must have at least one axis"):
      cpu_kernels.top_k(jnp.float32(1.0), 1)


if __name__ == "__main__":
  absltest.main()


def _attention_operands(seed, B, T, S, H, K, V):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(ks[0], (B, T, H, K)), jax.random.normal(ks[1], (B, S, H, K)),
          jax.random.normal(ks[2], (B, S, H, V)), jax.random.normal(ks[3], (B, T, H, V)))


class AttentionTest(parameterized.TestCase):
  """`jaxml.cpu_kernels.attention` (fused kernels on CPU) against `attention_reference` (`nn.attention_core`,
  itself tested against autodiff of textbook attention in tests/nn/test_layers.py): values and the gradients
  of a random projection of the output, to float32 rounding (the kernels sum in another order and use
  their own exp, relative error about 1e-7)."""

  def test_the_kernels_are_built_and_used(self):
    q, k, v, _ = _attention_operands(0, 2, 8, 16, 2, 16, 16)
    text = jax.jit(jax.grad(lambda *a: jnp.sum(cpu_kernels.attention(*a)), argnums=(0, 1, 2))).lower(q, k, v).as_text()
    avx512 = " avx512f " in cpu_kernels._cpu_identity().replace("\n", " ") + " "
    if cpu_kernels._compiler() is None or not avx512:   # no compiler, or one the kernels are not written for
      self.assertFalse(cpu_kernels.attention_available())
      self.assertNotIn("jaxml_attention", text)
      return
    self.assertTrue(cpu_kernels.attention_available())  # a compiler that fails to build the kernels fails here
    self.assertIn("jaxml_attention_forward", text)
    self.assertIn("jaxml_attention_backward", text)
    inference = jax.jit(cpu_kernels.attention).lower(q, k, v).as_text()  # nothing differentiates: no probabilities
    self.assertIn("jaxml_attention_inference", inference)
    self.assertNotIn("jaxml_attention_forward", inference)
    with cpu_kernels.reference_attention():  # a function traced inside it (a fresh one: jit caches traces)
      self.assertNotIn("jaxml_attention", jax.jit(lambda *a: cpu_kernels.attention(*a)).lower(q, k, v).as_text())
    self.assertIn("jaxml_attention_inference", jax.jit(cpu_kernels.attention).lower(q, k, v).as_text())

  # The Perceiver masked LM's three attentions (batch cut to 2): latent self-attention, the encoder's
  # cross-attention, the decoder (value heads narrower than qk heads); odd query counts (the kernels'
  # row tiles of 4 and 8 leave remainders), wider values, one head, 48-wide heads (a 32 + 16 column split).
  @parameterized.named_parameters(("latent", 2, 128, 128, 8, 32, 32), ("cross", 2, 128, 512, 4, 32, 32),
                                  ("decoder", 2, 512, 128, 8, 32, 16), ("odd_queries", 3, 13, 32, 3, 16, 16),
                                  ("wide_values", 1, 7, 16, 2, 16, 64), ("one_query", 2, 1, 48, 1, 48, 16))
  def test_equals_the_reference(self, B, T, S, H, K, V):
    q, k, v, w = _attention_operands(B * T + S, B, T, S, H, K, V)
    self.assertTrue(cpu_kernels.attention_kernel_takes(q, k, v) or not cpu_kernels.attention_available())
    got = jax.jit(cpu_kernels.attention)(q, k, v)
    want = jax.jit(cpu_kernels.attention_reference)(q, k, v)
    self.assertEqual(got.shape, (B, T, H, V))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)  # noqa: E731
    for name, g, r in zip("qkv", grad(cpu_kernels.attention), grad(cpu_kernels.attention_reference)):
      scale = float(jnp.max(jnp.abs(r)))
      np.testing.assert_allclose(g, r, rtol=0, atol=5e-6 * scale, err_msg=f"d{name}")

  def test_other_operands_run_the_reference(self):
    q, k, v, _ = _attention_operands(1, 2, 8, 16, 2, 16, 16)
    mask = jnp.array([[True] * 16, [True] * 9 + [False] * 7])
    for args in ((q, k, v, mask), (q[..., :8], k[..., :8], v), (q, k[:, :12], v[:, :12]),
                 (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))):
      self.assertFalse(cpu_kernels.attention_kernel_takes(*args))
      text = jax.jit(cpu_kernels.attention).lower(*args).as_text()
      self.assertNotIn("jaxml_attention", text)
      np.testing.assert_array_equal(cpu_kernels.attention(*args), cpu_kernels.attention_reference(*args))
    out = cpu_kernels.attention(q, k, v, mask)     # the masked keys get no weight
    np.testing.assert_allclose(out[1], cpu_kernels.attention(q[1:], k[1:, :9], v[1:, :9])[0], rtol=1e-5, atol=1e-6)

  def test_vmap(self):
    q, k, v, _ = _attention_operands(2, 2, 8, 16, 2, 16, 16)
    got = jax.vmap(cpu_kernels.attention)(q[None], k[None], v[None])[0]
    np.testing.assert_allclose(got, cpu_kernels.attention_reference(q, k, v), rtol=1e-5, atol=2e-6)
