"""The shipped Coat data and the ratings simulator's promises."""
import dataclasses
import importlib.resources

import chex
import numpy as np
from absl.testing import absltest

from jaxml.recsys import causal


class CoatTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.coat = causal.load_coat()

  def test_published_shapes_and_counts(self):
    # Schnabel et al. 2016 (the Coat data set) and the shipped SOURCE.md: 290 users x 300 coats; each user
    # rated 24 self-selected coats (train) and 16 uniformly random ones (test); 366 cells in both.
    d = self.coat
    for key in ("train_UxI", "test_UxI", "propensities_UxI"):
      self.assertEqual(d[key].shape, (290, 300), msg=key)
    np.testing.assert_array_equal((d["train_UxI"] > 0).sum(1), 24)
    np.testing.assert_array_equal((d["test_UxI"] > 0).sum(1), 16)
    self.assertEqual(int(((d["train_UxI"] > 0) & (d["test_UxI"] > 0)).sum()), 366)
    for key in ("train_UxI", "test_UxI"):
      self.assertTrue(set(np.unique(d[key]).tolist()) <= {0, 1, 2, 3, 4, 5}, msg=key)
    # SOURCE.md: train mean 2.61, test mean 2.23 (self-selected coats are rated higher).
    self.assertAlmostEqual(float(d["train_UxI"][d["train_UxI"] > 0].mean()), 2.61, places=2)
    self.assertAlmostEqual(float(d["test_UxI"][d["test_UxI"] > 0].mean()), 2.23, places=2)
    p = d["propensities_UxI"]
    self.assertTrue(0.0 < p.min() and p.max() <= 1.0)
    self.assertAlmostEqual(float(p.mean()), 0.080, places=3)

  def test_features_are_one_hot_groups_named_by_their_maps(self):
    d = self.coat
    self.assertEqual(d["user_features_UxF"].shape, (290, 14))
    self.assertEqual(d["item_features_IxG"].shape, (300, 33))
    self.assertEqual(d["user_feature_names"].shape, (14,))
    self.assertEqual(d["item_feature_names"].shape, (33,))
    for feats, names in ((d["user_features_UxF"], d["user_feature_names"]),
                         (d["item_features_IxG"], d["item_feature_names"])):
      groups = np.array([n.split(":")[0] for n in names])
      for g in np.unique(groups):
        np.testing.assert_array_equal(feats[:, groups == g].sum(1), 1, err_msg=g)   # exactly one value per group

  def test_the_authors_readme_and_the_source_note_ship_with_the_files(self):
    root = importlib.resources.files("jaxml.recsys").joinpath("data/coat")
    readme = root.joinpath("README.txt").read_text()
    for name in ("train.ascii", "test.ascii", "propensities.ascii"):
      self.assertIn(name, readme)
      self.assertTrue(root.joinpath(name).is_file())
    self.assertIn("Schnabel", root.joinpath("SOURCE.md").read_text())

  def test_naive_bayes_on_coat_orders_propensities_by_rating(self):
    # Self-selection favours liked coats: the estimated P(O = 1 | Y = r) rises from r = 1 to r = 5.
    p = np.asarray(causal.naive_bayes_propensity(self.coat["train_UxI"], self.coat["test_UxI"]))
    self.assertTrue(np.all(np.diff(p) > 0), msg=str(p))


class SimulatorTest(chex.TestCase):

  def test_mar_marginal_and_density_are_as_configured(self):
    cfg = causal.confounded_config()
    sim = causal.RatingSimulator(cfg)
    counts = np.bincount(sim.ratings_UxI.ravel(), minlength=6)[1:] / sim.ratings_UxI.size
    np.testing.assert_allclose(counts, cfg.rating_probs, atol=2e-4)
    self.assertAlmostEqual(float(sim.propensities_UxI.mean()), cfg.density, places=6)
    self.assertTrue(np.all((sim.propensities_UxI > 0) & (sim.propensities_UxI <= 1)))

  def test_schnabel_rule_propensities(self):
    sim = causal.RatingSimulator(causal.schnabel_config())
    y, p = sim.ratings_UxI, sim.propensities_UxI
    k = p[y == 5][0]
    for r, power in ((1, 3), (2, 2), (3, 1), (4, 0), (5, 0)):
      np.testing.assert_allclose(p[y == r], k * 0.25 ** power, rtol=1e-12, err_msg=f"rating {r}")

  def test_popularity_confounds_ratings_and_exposure(self):
    sim = causal.RatingSimulator(causal.confounded_config())
    g = sim.log_popularity_TxI[0]
    self.assertGreater(np.corrcoef(g, sim.ratings_UxI.mean(0))[0, 1], 0.4)
    self.assertGreater(np.corrcoef(g, np.log(sim.propensities_UxI).mean(0))[0, 1], 0.8)
    blind = causal.RatingSimulator(causal.schnabel_config())
    self.assertLess(abs(np.corrcoef(blind.log_popularity_TxI[0], blind.ratings_UxI.mean(0))[0, 1]), 0.2)

  def test_splits_draws_and_stages(self):
    cfg = causal.confounded_config(n_users=30, n_items=40, n_stages=3, popularity_drift=0.3)
    sim = causal.RatingSimulator(cfg)
    split = sim.sample_split(5, mar_per_user=7)
    np.testing.assert_array_equal(split["mar_UxI"].sum(1), 7)
    np.testing.assert_array_equal(split["train_UxI"] > 0, split["observed_UxI"])
    np.testing.assert_array_equal(split["test_UxI"][split["mar_UxI"]], split["ratings_UxI"][split["mar_UxI"]])
    np.testing.assert_array_equal(sim.sample_observed(5), causal.RatingSimulator(cfg).sample_observed(5))
    self.assertFalse(np.array_equal(sim.sample_observed(5), sim.sample_observed(6)))
    # Stage t's log-popularity is stage 0's plus t steps of one drift direction.
    g = sim.log_popularity_TxI
    np.testing.assert_allclose(g[2] - g[1], g[1] - g[0], atol=1e-12)
    self.assertGreater(np.abs(g[2] - g[0]).mean(), 0.3)
    for t in range(3):
      self.assertAlmostEqual(float(sim.propensities_TxUxI[t].mean()), cfg.density, places=6)
    self.assertEqual(sim.sample_observed(0, stage=2, n_draws=4).shape, (4, 30, 40))
    with self.assertRaisesRegex(ValueError, "stage must lie in \\[0, 3\\)"):
      sim.sample_observed(0, stage=3)

  def test_bad_config_raises_naming_the_field(self):
    for change, message in ((dict(density=0.0), "density"), (dict(alpha=0.0), "alpha"),
                            (dict(rating_probs=(0.5, 0.6)), "rating_probs"), (dict(n_items=0), "n_items")):
      with self.assertRaisesRegex(ValueError, message):
        causal.RatingSimulator(dataclasses.replace(causal.RatingSimConfig(), **change))


if __name__ == "__main__":
  absltest.main()
