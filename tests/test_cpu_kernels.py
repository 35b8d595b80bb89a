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
