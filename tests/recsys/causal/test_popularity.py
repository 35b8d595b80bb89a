"""PDA / PD and MACR against NumPy transcriptions of the papers' formulas."""
import jax
import numpy as np
from absl.testing import absltest

from jaxml.recsys import causal


def np_elu1(x):
  return np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1.0


def np_sig(x):
  return 1.0 / (1.0 + np.exp(-x))


class PdaTest(absltest.TestCase):

  def test_stage_popularity(self):
    counts = np.asarray([[0, 3, 9, 0], [2, 2, 2, 2]])
    m = (counts + 1.0) / (counts.sum(1, keepdims=True) + 4)
    want0 = (m[0] - m[0].min()) / (m[0].max() - m[0].min())
    got = np.asarray(causal.stage_popularity(counts))
    np.testing.assert_allclose(got[0], want0, rtol=1e-6)
    np.testing.assert_allclose(got[1], 0.0)            # a stage where every item ties
    self.assertEqual(got[0].min(), 0.0)

  def test_bpr_loss_and_inference_rules(self):
    rng = np.random.default_rng(0)
    fp, fn = rng.normal(size=8), rng.normal(size=8)
    pp, pn = rng.uniform(size=8), rng.uniform(size=8)
    pp[0] = 0.0                                       # 0^gamma = 0: the least popular item's score vanishes
    gamma = 0.16
    sp, sn = np_elu1(fp) * pp ** gamma, np_elu1(fn) * pn ** gamma
    want = -np.mean(np.log(np_sig(sp - sn)))
    loss, m = causal.pda_bpr_loss(fp, fn, pp, pn, gamma=gamma)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["bpr_accuracy"], np.mean(sp > sn))
    f = rng.normal(size=(3, 5))
    last, prev = rng.uniform(size=5), rng.uniform(size=5)
    np.testing.assert_allclose(causal.pd_inference(f), np_elu1(f), rtol=1e-6)
    np.testing.assert_allclose(causal.pda_inference(f, last, gamma=gamma),
                               np_elu1(f) * np.clip(last, 1e-9, 1) ** gamma, rtol=1e-5)
    drift = np.clip(last + 0.5 * (last - prev), 1e-9, 1)
    np.testing.assert_allclose(causal.pda_inference(f, last, gamma=gamma, pop_prev_I=prev),
                               np_elu1(f) * drift ** gamma, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "pop_neg_B has shape"):
      causal.pda_bpr_loss(fp, fn, pp, pn[:3], gamma=gamma)

  def test_bpr_loss_trains_under_jit(self):
    g = jax.jit(jax.grad(lambda a: causal.pda_bpr_loss(a, -a, np.ones(4), np.ones(4), gamma=0.1)[0]))
    self.assertTrue(np.all(np.asarray(g(np.zeros(4))) < 0))   # raising f(u, i+) lowers the loss


class MacrTest(absltest.TestCase):

  def test_inference_at_zero_equals_the_training_score_and_loss_formula(self):
    rng = np.random.default_rng(1)
    yk, yi, yu = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    labels = (rng.uniform(size=6) < 0.5).astype(np.float32)
    train = yk * np_sig(yi) * np_sig(yu)
    np.testing.assert_allclose(causal.macr_score(yk, yi, yu), train, rtol=1e-5)
    np.testing.assert_allclose(causal.macr_score(yk, yi, yu, c=30.0), (yk - 30.0) * np_sig(yi) * np_sig(yu),
                               rtol=1e-5)

    def bce(p, y):
      return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    want = bce(np_sig(train), labels) + 0.01 * bce(np_sig(yi), labels) + 0.001 * bce(np_sig(yu), labels)
    loss, m = causal.macr_loss(yk, yi, yu, labels, alpha=0.01, beta=0.001)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["item"], bce(np_sig(yi), labels), rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
