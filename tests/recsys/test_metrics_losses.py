"""Metrics (parity with scikit-learn through the peer env) and the Factory Floor losses/practices."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml.recsys import losses, metrics, simulator
from tests import peer


def _pair_count_auc(y, s):
  pos, neg = s[y == 1], s[y == 0]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


class MetricsTest(chex.TestCase):

  def test_auc_and_logloss_match_scikit_learn(self):
    rng = np.random.default_rng(0)
    inputs, ours = {}, {}
    for name, n, decimals in (("cont", 2000, 6), ("ties", 1500, 1), ("rare", 3000, 3)):
      y = (rng.random(n) < (0.03 if name == "rare" else 0.4)).astype(np.float32)
      s = np.clip(np.round(0.3 * y + 0.7 * rng.random(n), decimals), 0.0, 1.0).astype(np.float32)
      inputs[f"{name}__labels"], inputs[f"{name}__scores"] = y, s
      ours[name] = (float(metrics.auc(y, s)), float(metrics.logloss(y, s)))
    ref = peer.run("recsys_metrics", inputs)
    for name, (auc, ll) in ours.items():
      self.assertAlmostEqual(auc, float(ref[f"{name}__auc"]), places=5, msg=name)
      self.assertAlmostEqual(ll, float(ref[f"{name}__logloss"]), places=4, msg=name)

  def test_auc_counts_ties_half(self):
    y = np.array([0, 1, 0, 1, 1, 0], np.float32)
    s = np.array([0.2, 0.2, 0.5, 0.5, 0.9, 0.1], np.float32)
    self.assertAlmostEqual(float(metrics.auc(y, s)), _pair_count_auc(y, s), places=6)
    self.assertAlmostEqual(float(metrics.auc(y, np.full(6, 0.3, np.float32))), 0.5, places=6)

  def test_normalized_entropy_and_calibration_of_the_base_rate_predictor(self):
    y = (np.random.default_rng(1).random(1000) < 0.2).astype(np.float32)
    base = np.full_like(y, y.mean())
    self.assertAlmostEqual(float(metrics.normalized_entropy(y, base)), 1.0, places=5)
    self.assertAlmostEqual(float(metrics.calibration(y, 2 * base)), 2.0, places=5)

  def test_prediction_difference(self):
    p1 = np.array([0.1, 0.2, 0.4], np.float32)
    p2 = np.array([0.1, 0.3, 0.2], np.float32)
    want = np.mean([0.0, 0.1 / 0.25, 0.2 / 0.3])
    self.assertAlmostEqual(float(metrics.prediction_difference(p1, p2)), want, places=6)
    self.assertAlmostEqual(float(metrics.prediction_difference(p2, p1)), want, places=6)

  def test_bad_shapes_are_rejected(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      metrics.auc(np.zeros(3), np.zeros(4))


class LossesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rank_loss_depends_only_on_score_differences(self):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal(24), jnp.float32)
    labels = jnp.asarray(rng.random(24) < 0.4, jnp.float32)
    groups = jnp.repeat(jnp.arange(3), 8)
    f = self.variant(losses.pairwise_rank_loss)
    base = f(logits, labels, groups)
    self.assertAlmostEqual(float(f(logits + 3.7, labels, groups)), float(base), places=5)
    pairs = [np.log1p(np.exp(-(logits[i] - logits[j]))) for i in range(24) for j in range(24)
             if groups[i] == groups[j] and labels[i] > labels[j]]
    self.assertAlmostEqual(float(base), float(np.mean(pairs)), places=5)

  def test_distillation_with_the_labels_as_teacher_is_twice_logloss_at_lambda_one(self):
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal(50), jnp.float32)
    y = jnp.asarray(rng.random(50) < 0.3, jnp.float32)
    self.assertAlmostEqual(float(losses.distillation_loss(z, y, y, 1.0)),
                           2 * float(losses.logloss_from_logits(z, y)), places=5)
    manual = -np.mean(np.asarray(y) * np.log(jax.nn.sigmoid(z)) + (1 - np.asarray(y)) * np.log(1 - jax.nn.sigmoid(z)))
    self.assertAlmostEqual(float(losses.logloss_from_logits(z, y)), float(manual), places=5)

  def test_importance_weighted_subsampling_keeps_mean_prediction_at_the_base_rate(self):
    sim = simulator.CTRSimulator(simulator.SimulatorConfig(base_rate=0.05, seed=4))
    data = sim.sample(60000, 0)
    idx, w = losses.negative_subsample(np.random.default_rng(5), data["label"], rate=0.1)
    x_full = np.concatenate([np.ones((len(data["label"]), 1)), data["dense"]], 1).astype(np.float32)

    def fit(x, y, w):  # weighted logistic regression by Newton's method
      def body(_, beta):
        p = jax.nn.sigmoid(x @ beta)
        g = x.T @ (w * (y - p))
        h = (x * (w * p * (1 - p))[:, None]).T @ x
        return beta + jnp.linalg.solve(h, g)
      return jax.lax.fori_loop(0, 25, body, jnp.zeros(x.shape[1]))

    fit = jax.jit(fit)
    x, y = x_full[idx], data["label"][idx]
    mean_weighted = float(jax.nn.sigmoid(x_full @ fit(x, y, jnp.asarray(w))).mean())
    mean_unweighted = float(jax.nn.sigmoid(x_full @ fit(x, y, jnp.ones_like(w))).mean())
    base = float(data["label"].mean())
    self.assertAlmostEqual(mean_weighted, base, delta=0.004)
    self.assertGreater(mean_unweighted, base + 0.1)  # without the correction the rate is badly inflated
    self.assertTrue(np.all(w[y > 0] == 1.0) and np.allclose(w[y == 0], 10.0))

  @parameterized.parameters(0.0, 1.5)
  def test_subsampling_rejects_bad_rate(self, rate):
    with self.assertRaisesRegex(ValueError, "rate"):
      losses.negative_subsample(np.random.default_rng(0), np.zeros(4), rate)

  def test_ensemble_logit_is_member_mean(self):
    a, b = jnp.array([1.0, -2.0]), jnp.array([3.0, 0.0])
    np.testing.assert_allclose(losses.ensemble_logits([a, b]), (a + b) / 2)


if __name__ == "__main__":
  absltest.main()
