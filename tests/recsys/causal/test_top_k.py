"""`top_k_blocked` and the chunked `mf_top_k` (every `block` form, the compiled kernel's included) return
`jax.lax.top_k`'s ranking exactly, ties included.

The tie rule (jaxml.recsys.causal.metrics docstring): higher score first, then lower item index;
written out here as NumPy's stable argsort of the negated scores (-inf, i.e. masked, items last,
in index order), after `canonical_scores` (NaN -> -inf, -0.0 -> +0.0; XLA:CPU's own top_k
would rank +0.0 above -0.0 and +NaN first).
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import cpu_kernels
from jaxml.recsys.causal import metrics, mf


def _reference(s, k):
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


CASES = {
    "continuous": lambda rng: rng.standard_normal((16, 1003)).astype(np.float32),
    "ties": lambda rng: rng.integers(0, 3, (16, 1003)).astype(np.float32),        # hundreds of equal scores a row
    "masked": lambda rng: np.where(rng.random((16, 1003)) < 0.3, -np.inf, rng.standard_normal((16, 1003))
                                   ).astype(np.float32),
    "few_finite": lambda rng: np.where(np.arange(1003) % 400 == 7, rng.standard_normal((16, 1003)), -np.inf
                                       ).astype(np.float32),                       # 3 finite items < k
    # signed zeros and NaN of both signs, where a float max disagrees with top_k's own order
    "zeros_nan": lambda rng: rng.choice(np.array([0.0, -0.0, np.nan, -np.nan, -np.inf, 1.0], np.float32), (16, 1003),
                                        p=[0.4, 0.4, 0.005, 0.1, 0.09, 0.005]),
}


class TopKBlockedTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(f"{name}_block{b}", name, b) for name in CASES for b in (7, 50)])
  def test_equals_lax_top_k_and_the_tie_rule(self, case, block):
    s = CASES[case](np.random.default_rng(0))                 # 1003 items: the last block is padded
    k = 20
    values, ids = jax.jit(metrics.top_k_blocked, static_argnums=(1, 2))(s, k, block)
    canon = np.where(np.isnan(s), -np.inf, np.where(s == 0, 0.0, s)).astype(np.float32)
    want_values, want_ids = jax.lax.top_k(canon, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(np.asarray(values).view(np.int32), np.asarray(want_values).view(np.int32))  # bits
    np.testing.assert_array_equal(ids, _reference(canon, k))
    if case != "zeros_nan":                                   # no NaN, no -0.0: lax.top_k on the raw scores
      np.testing.assert_array_equal(ids, jax.lax.top_k(s, k)[1])

  def test_few_blocks_fall_back_to_top_k(self):
    s = np.random.default_rng(1).integers(0, 2, (4, 30)).astype(np.float32)
    np.testing.assert_array_equal(metrics.top_k_blocked(s, 5, 10)[1], _reference(s, 5))   # 3 blocks <= k

  def test_bad_arguments_raise(self):
    s = jnp.zeros((2, 30))
    with self.assertRaisesRegex(ValueError, "k must be an integer in \\[1, 30\\]"):
      metrics.top_k_blocked(s, 31)
    with self.assertRaisesRegex(ValueError, "block must be a positive integer"):
      metrics.top_k_blocked(s, 3, 0)


class MfTopKTest(absltest.TestCase):

  def test_blocked_chunks_equal_plain_top_k_on_the_full_matrix(self):
    p = mf.mf_init(jax.random.PRNGKey(0), 45, 611, 4, scale=1.0)
    p = {**p, "user": jnp.round(p["user"] * 2) / 2, "item": jnp.round(p["item"] * 2) / 2}   # exact, tied scores
    ex = np.random.default_rng(0).random((45, 611)) < 0.2
    s = np.where(ex, -np.inf, np.asarray(p["user"] @ p["item"].T + p["user_bias"][:, None]
                                         + (p["item_bias"] + p["bias"])[None, :]))
    self.assertGreater(np.mean(s[:, :, None] == s[:, None, :100]), 0.01)           # many ties
    got = metrics.mf_top_k(p, ex, 10, chunk=16, block=25)    # 2 chunks of 16, a remainder of 13
    np.testing.assert_array_equal(got, _reference(s, 10))
    np.testing.assert_array_equal(got, metrics.mf_top_k(p, ex, 10, chunk=16, block=None))
    for block in ("kernel", "auto"):                          # the compiled kernel (jaxml.cpu_kernels)
      np.testing.assert_array_equal(metrics.mf_top_k(p, ex, 10, chunk=16, block=block), got, err_msg=block)
    if cpu_kernels._compiler() is not None:                  # with a C++ compiler the kernel is the default
      self.assertEqual(metrics.default_block(611, 10), "kernel")
    else:                                                     # without one, the XLA forms as before
      self.assertEqual(metrics.default_block(611, 10), metrics.auto_block(611, 10))
    with self.assertRaisesRegex(ValueError, "chunk must be a positive integer"):
      metrics.mf_top_k(p, ex, 10, chunk=0)
    with self.assertRaisesRegex(ValueError, "block must be a positive integer, None, 'kernel' or 'auto'"):
      metrics.mf_top_k(p, ex, 10, block="fast")

  def test_host_thread_shards_return_the_same_ids(self):
    p = mf.mf_init(jax.random.PRNGKey(1), 77, 400, 4, scale=1.0)
    p = {**p, "user": jnp.round(p["user"] * 2) / 2, "item": jnp.round(p["item"] * 2) / 2}   # tied scores
    ex = np.random.default_rng(1).random((77, 400)) < 0.2
    s = np.where(ex, -np.inf, np.asarray(p["user"] @ p["item"].T + p["user_bias"][:, None]
                                         + (p["item_bias"] + p["bias"])[None, :]))
    want = _reference(s, 7)
    # 77 users in chunks of 8: 9 whole chunks and a remainder of 5, split 5/4, 3/3/3, one chunk per thread
    # and fewer chunks than threads.
    for threads in (1, 2, 3, 9, 12):
      for block in (20, "kernel"):
        np.testing.assert_array_equal(metrics.mf_top_k(p, ex, 7, chunk=8, block=block, threads=threads), want,
                                      err_msg=f"threads={threads}, block={block}")
    self.assertEqual(metrics._host_shards(9, 5, 8, 2), [(0, 5, 0), (40, 4, 5)])
    self.assertEqual(metrics._host_shards(0, 5, 8, 4), [(0, 0, 5)])
    with self.assertRaisesRegex(ValueError, "threads must be a positive integer"):
      metrics.mf_top_k(p, ex, 7, threads=0)


if __name__ == "__main__":
  absltest.main()
