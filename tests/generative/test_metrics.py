"""Mode metrics on hand-made sample sets with known answers; toy datasets."""
from absl.testing import absltest, parameterized
import chex
import jax
import numpy as np

from jaxml.generative import get_dataset, grid25, mixture1d, mode_metrics, ring8


class MetricsTest(chex.TestCase, parameterized.TestCase):

  def test_perfect_ring(self):
    ds = ring8()
    x = np.repeat(ds.centers, 10, axis=0)
    m = mode_metrics(x, ds.centers, ds.std)
    self.assertEqual(m["modes_captured"], 8)
    self.assertEqual(m["high_quality_frac"], 1.0)
    self.assertAlmostEqual(m["reverse_kl"], 0.0, places=12)
    self.assertEqual(m["gap_mass"], 0.0)

  def test_collapsed_to_one_mode(self):
    ds = grid25()
    x = np.repeat(ds.centers[:1], 100, axis=0) + 0.01
    m = mode_metrics(x, ds.centers, ds.std)
    self.assertEqual(m["modes_captured"], 1)
    self.assertEqual(m["high_quality_frac"], 1.0)
    self.assertAlmostEqual(m["reverse_kl"], np.log(25), places=6)

  def test_mass_between_modes_is_gap_and_far_mass_is_not(self):
    ds = mixture1d(4.0)  # modes at -2, +2, std 0.1; box [-2.3, 2.3]
    x = np.array([[-2.0], [2.0], [0.0], [1.0], [10.0], [-7.0]])
    m = mode_metrics(x, ds.centers, ds.std)
    self.assertAlmostEqual(m["high_quality_frac"], 2 / 6)
    self.assertAlmostEqual(m["gap_mass"], 2 / 6)
    self.assertEqual(m["modes_captured"], 2)

  def test_three_std_threshold_and_min_count(self):
    ds = mixture1d(4.0)
    x = np.array([[-2.0 + 0.29], [-2.0 - 0.31], [2.0], [2.05]])
    m = mode_metrics(x, ds.centers, ds.std)
    self.assertAlmostEqual(m["high_quality_frac"], 3 / 4)
    self.assertEqual(mode_metrics(x, ds.centers, ds.std, min_count=2)["modes_captured"], 1)
    self.assertEqual(m["mode_counts"], [1, 2])

  def test_reverse_kl_against_non_uniform_weights(self):
    centers = np.array([[-1.0], [1.0]])
    x = np.array([[-1.0]] * 30 + [[1.0]] * 70)
    p = np.array([0.5, 0.5])
    expected = 0.3 * np.log(0.3 / 0.5) + 0.7 * np.log(0.7 / 0.5)
    self.assertAlmostEqual(mode_metrics(x, centers, 0.1, p)["reverse_kl"], expected, places=6)
    self.assertAlmostEqual(mode_metrics(x, centers, 0.1, [0.3, 0.7])["reverse_kl"], 0.0, places=6)

  def test_no_high_quality_samples(self):
    ds = ring8()
    m = mode_metrics(np.zeros((5, 2)), ds.centers, ds.std)
    self.assertIsNone(m["reverse_kl"])
    self.assertEqual(m["modes_captured"], 0)
    self.assertEqual(m["gap_mass"], 1.0)

  def test_true_samples_score_well(self):
    for name in ("ring8", "grid25", "mix1d_sep8", "ring8_x10"):
      ds = get_dataset(name)
      m = mode_metrics(np.asarray(ds.sample(jax.random.PRNGKey(0), 2500)), ds.centers, ds.std, ds.weights)
      self.assertEqual(m["modes_captured"], len(ds.centers))
      # P(|x - c| <= 3 std) is 0.997 in 1D and 1 - exp(-4.5) = 0.989 in 2D.
      self.assertGreater(m["high_quality_frac"], 0.98)
      self.assertLess(m["reverse_kl"], 0.02)

  def test_dataset_geometry(self):
    self.assertEqual(ring8().centers.shape, (8, 2))
    np.testing.assert_allclose(np.linalg.norm(ring8().centers, axis=1), 2.0, rtol=1e-6)
    self.assertEqual(sorted(set(grid25().centers[:, 0].tolist())), [-4.0, -2.0, 0.0, 2.0, 4.0])
    np.testing.assert_allclose(get_dataset("mix1d_sep0p5").centers[:, 0], [-0.25, 0.25])
    big = get_dataset("ring8_x10")
    self.assertEqual(big.name, "ring8_x10")
    np.testing.assert_allclose(big.centers, 10 * ring8().centers, rtol=1e-6)
    self.assertAlmostEqual(big.std, 0.2, places=6)

  def test_bad_input(self):
    ds = ring8()
    with self.assertRaisesRegex(ValueError, "NaN"):
      mode_metrics(np.array([[0.0, np.nan]]), ds.centers, ds.std)
    with self.assertRaisesRegex(ValueError, "samples must be"):
      mode_metrics(np.zeros((4, 3)), ds.centers, ds.std)
    with self.assertRaisesRegex(ValueError, "samples must be"):
      mode_metrics(np.zeros((4, 2, 1)), ds.centers, ds.std)
    with self.assertRaisesRegex(ValueError, "unknown toy dataset"):
      get_dataset("ring9000x")
    with self.assertRaisesRegex(ValueError, "unknown toy dataset"):
      get_dataset("ring8_x0")
    with self.assertRaisesRegex(ValueError, "separation"):
      mixture1d(0.0)


if __name__ == "__main__":
  absltest.main()
