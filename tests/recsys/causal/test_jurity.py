"""Replay (off-policy) estimates of a recommender's lists: the closed form by hand, and jurity 2.1.0 run live.

jurity's definitions (`jurity.recommenders.CTR`, after Dudik, Langford, Li 2011), for the rows
of each user's top-k list by predicted score (n rows in all, ties in the score avoided here:
jurity sorts them in an unspecified order):

    IPS = (1 / n) sum_rows 1[logged] r / p                        (unclipped, not self-normalised)
    DR  = (1 / n) sum_rows [ r_hat + 1[logged] (r - r_hat) / p ]  (r_hat: the predicted score)

with p the logged propensity (1 / number of distinct logged items when the log has none). These
are `ips_risk` and `dr_risk` on `replay_lists`'s [users, k] matrices.
"""
import numpy as np
import pytest
from absl.testing import absltest

from jaxml.recsys import causal
from tests import peer

pytestmark = pytest.mark.xdist_group("test_jurity")  # one worker: the peer runs once


def _estimates(scores, clicks, logged, prop, k):
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  r = causal.replay_lists(top, clicks, logged, prop, scores)
  args = (r["rewards_UxK"], r["observed_UxK"], r["propensities_UxK"])
  return (float(causal.ips_risk(*args)), float(causal.dr_risk(*args, r["predicted_UxK"])),
          float(causal.snips_risk(*args)))


class ClosedFormTest(absltest.TestCase):
  """2 users x 3 items; lists of 2 (u0: items 0, 2; u1: items 1, 2), worked by hand."""
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]], np.float32)
  logged = np.array([[1, 1, 0], [0, 0, 1]], bool)
  clicks = np.array([[1.0, 1.0, np.nan], [np.nan, np.nan, 0.0]], np.float32)   # unlogged: never read
  prop = np.array([[0.5, 0.25, np.nan], [np.nan, np.nan, 0.4]], np.float32)

  def test_replay_estimates_equal_the_formulas(self):
    ips, dr, snips = _estimates(self.scores, self.clicks, self.logged, self.prop, 2)
    # IPS: listed and logged: (0, 0) click 1 at p 0.5; (1, 2) click 0 at p 0.4 (item 1 of u0 is logged, not listed).
    self.assertAlmostEqual(ips, (1 / 0.5 + 0 / 0.4) / 4, places=6)
    # DR: (0, 0) 0.9 + 0.1 / 0.5; (0, 2) 0.5; (1, 1) 0.8; (1, 2) 0.4 - 0.4 / 0.4.
    self.assertAlmostEqual(dr, (1.1 + 0.5 + 0.8 - 0.6) / 4, places=6)
    self.assertAlmostEqual(snips, (1 / 0.5) / (1 / 0.5 + 1 / 0.4), places=6)

  def test_bad_lists_raise_naming_the_argument(self):
    with self.assertRaisesRegex(ValueError, "top_items_UxK must lie in \\[0, 3\\)"):
      causal.replay_lists(np.array([[0, 3], [1, 2]]), self.clicks, self.logged, self.prop)
    with self.assertRaisesRegex(ValueError, "top_items_UxK must be a \\[users, K\\] matrix with 2 rows"):
      causal.replay_lists(np.array([[0, 1]]), self.clicks, self.logged, self.prop)
    with self.assertRaisesRegex(TypeError, "top_items_UxK must hold integer"):
      causal.replay_lists(np.zeros((2, 2), np.float32), self.clicks, self.logged, self.prop)
    bad = self.prop.copy()
    bad[0, 0] = 0.0
    with self.assertRaisesRegex(ValueError, "propensities_UxI \\(where logged\\) must lie in \\(0, 1\\]"):
      causal.replay_lists(np.array([[0, 2], [1, 2]]), self.clicks, self.logged, bad)


class JurityTest(absltest.TestCase):
  """The same estimates against jurity 2.1.0 (pandas 2.3.3) on one small log, k = 1, 3 and every item."""

  def test_ips_and_dr_equal_jurity(self):
    rng = np.random.default_rng(0)
    n_u, n_i = 7, 9
    scores = rng.random((n_u, n_i)).astype(np.float32)              # continuous: no ties in any list
    logged = rng.random((n_u, n_i)) < 0.4
    clicks = np.where(logged, rng.random((n_u, n_i)) < 0.5, np.nan).astype(np.float32)
    prop = np.where(logged, rng.uniform(0.1, 1.0, (n_u, n_i)), np.nan).astype(np.float32)
    u, i = np.nonzero(logged)
    pu, pi = np.indices((n_u, n_i)).reshape(2, -1)
    inputs = {"actual__user": u, "actual__item": i, "actual__click": clicks[u, i], "actual__propensity": prop[u, i],
              "predicted__user": pu, "predicted__item": pi, "predicted__score": scores[pu, pi]}
    ks = [1, 3, None]
    ref = peer.run("jurity_ctr", inputs, ks=ks)
    if not ref["available"]:
      self.skipTest(ref["reason"])
    self.assertEqual((ref["jurity_version"], ref["pandas_version"][0]), ("2.1.0", "2"))
    for k in ks:
      ips, dr, _ = _estimates(scores, clicks, logged, prop, k or n_i)
      self.assertAlmostEqual(ips, ref[f"ips@{k}"], places=5, msg=f"IPS k={k}")
      self.assertAlmostEqual(dr, ref[f"dr@{k}"], places=5, msg=f"DR k={k}")
      uniform = np.full((n_u, n_i), 1.0 / np.unique(i).size, np.float32)   # jurity's default propensity
      ips, dr, _ = _estimates(scores, clicks, logged, uniform, k or n_i)
      self.assertAlmostEqual(ips, ref[f"ips@{k}/no_propensity"], places=5, msg=f"IPS k={k}, no propensity")
      self.assertAlmostEqual(dr, ref[f"dr@{k}/no_propensity"], places=5, msg=f"DR k={k}, no propensity")


if __name__ == "__main__":
  absltest.main()
