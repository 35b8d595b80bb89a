"""Gato's tokenization: layout ranges, mu-law, bins (x = 1 in bin 1023), discrete ids, patches."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import gato


class LayoutTest(absltest.TestCase):

  def test_paper_layout_and_disjoint_ranges(self):
    layout = gato.TokenLayout()
    self.assertEqual((layout.continuous_start, layout.discrete_start), (32000, 33024))
    r = gato.TokenLayout(text_vocab=100, discrete_vocab=18, n_extra=3).ranges()
    spans = list(r.values())
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
      self.assertEqual(a1, b0)                       # contiguous, no overlap, no gap
    self.assertEqual(spans[-1][1], gato.TokenLayout(text_vocab=100, discrete_vocab=18, n_extra=3).vocab_size)
    with self.assertRaisesRegex(ValueError, "TokenLayout.num_bins"):
      gato.TokenLayout(num_bins=0)


class ContinuousTest(chex.TestCase):

  def test_mu_law_formula_inverse_and_monotone(self):
    x = np.asarray([-256.0, -3.0, -0.01, 0.0, 0.5, 10.0, 256.0])
    want = np.sign(x) * np.log(np.abs(x) * 100 + 1) / np.log(256 * 100 + 1)
    np.testing.assert_allclose(gato.mu_law_encode(x), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gato.mu_law_decode(gato.mu_law_encode(x)), x, rtol=1e-4, atol=1e-6)
    self.assertTrue(np.all(np.diff(np.asarray(gato.mu_law_encode(np.linspace(-300, 300, 1001)))) >= 0))

  def test_bins_edges_and_the_value_one(self):
    layout = gato.TokenLayout()
    ids = gato.tokenize_continuous(np.asarray([-1.0, -0.999, 0.0, 0.999, 1.0, 5.0]), layout, mu_law=False)
    np.testing.assert_array_equal(np.asarray(ids) - 32000, [0, 0, 512, 1023, 1023, 1023])
    # floor((y + 1) / 2 * 1024) on a grid of bin edges and centres.
    y = np.linspace(-1, 1, 4097)[:-1]
    want = np.floor((y + 1) / 2 * 1024).astype(int)
    np.testing.assert_array_equal(np.asarray(gato.tokenize_continuous(y, layout, mu_law=False)) - 32000, want)

  def test_round_trip_within_half_a_bin(self):
    layout = gato.TokenLayout(text_vocab=10)
    x = np.linspace(-50, 50, 777)
    back = gato.detokenize_continuous(gato.tokenize_continuous(x, layout), layout)
    # in companded space the error is at most half a bin (1 / 1024)
    err = np.abs(np.asarray(gato.mu_law_encode(back)) - np.asarray(gato.mu_law_encode(x)))
    self.assertLessEqual(err.max(), 1.0 / 1024 + 1e-6)
    with self.assertRaisesRegex(ValueError, "ids must lie in the continuous range"):
      gato.detokenize_continuous(np.asarray([3]), layout)

  def test_jit(self):
    layout = gato.TokenLayout(text_vocab=10)
    f = jax.jit(lambda v: gato.detokenize_continuous(gato.tokenize_continuous(v, layout), layout))
    np.testing.assert_allclose(f(jnp.asarray([0.25])), gato.detokenize_continuous(
        gato.tokenize_continuous(np.asarray([0.25]), layout), layout), rtol=1e-6)


class DiscreteAndPatchTest(absltest.TestCase):

  def test_discrete_ids_follow_the_bins(self):
    layout = gato.TokenLayout(text_vocab=10, discrete_vocab=6)
    np.testing.assert_array_equal(gato.tokenize_discrete(np.asarray([0, 5]), layout), [10 + 1024, 10 + 1029])
    with self.assertRaisesRegex(ValueError, r"values must lie in \[0, 6\)"):
      gato.tokenize_discrete(np.asarray([6]), layout)
    with self.assertRaisesRegex(TypeError, "values must be integers"):
      gato.tokenize_discrete(np.asarray([1.0]), layout)

  def test_patches_order_and_normalisation(self):
    img = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3) % 256
    p = np.asarray(gato.image_patches(img.astype(np.uint8), patch=2))
    self.assertEqual(p.shape, (2, 6, 12))
    # patch (row 1, column 2) of image 1: pixels rows 2-3, columns 4-5, flattened rows, columns, channels
    want = (img[1, 2:4, 4:6, :].reshape(-1) / 255.0 * 2 - 1) / np.sqrt(2)
    np.testing.assert_allclose(p[1, 1 * 3 + 2], want, rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "divisible by patch=4"):
      gato.image_patches(img, patch=4)


if __name__ == "__main__":
  absltest.main()
