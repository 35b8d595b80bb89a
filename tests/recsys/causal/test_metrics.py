"""Ranking and rating metrics: hand-computed cases, a NumPy transcription, RecBole and scikit-learn (peers)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml.recsys import causal
from jaxml.recsys.causal import metrics
from tests import peer

KS = (1, 5, 10, 20)


def _numpy_ranking(scores, relevant, exclude, k):
  """Per-user loop over an argsort: the metrics' definitions written out (module docstring)."""
  recall, ndcg, hit = [], [], []
  for s, rel, ex in zip(scores, relevant.astype(bool), exclude.astype(bool)):
    target = rel & ~ex
    if not target.any():
      continue
    candidates = [i for i in np.argsort(-s, kind="stable") if not ex[i]][:k]
    hits = target[candidates]
    recall.append(hits.sum() / target.sum())
    ideal = sum(1 / np.log2(j + 2) for j in range(min(int(target.sum()), k)))
    ndcg.append(sum(h / np.log2(j + 2) for j, h in enumerate(hits)) / ideal)
    hit.append(float(hits.any()))
  return np.mean(recall), np.mean(ndcg), np.mean(hit)


def _random_case(seed, n_users=60, n_items=45):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
  relevant = rng.random((n_users, n_items)) < 0.1
  exclude = (rng.random((n_users, n_items)) < 0.3) & ~relevant
  relevant[:3] = False          # users without test items are left out of the mean
  return scores, relevant, exclude


class RankingTest(chex.TestCase):

  def test_hand_computed_user(self):
    # Items scored 5, 4, 3, 2, 1; item 0 was trained on (excluded); items 1 and 4 are relevant.
    # The ranking is 1, 2, 3, 4: at K = 2 one of two relevant items is found at rank 1;
    # at K = 4 the second is found at rank 4. A second user has no relevant item and is left out.
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], np.float32)
    relevant = np.array([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]], bool)
    exclude = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    ideal = 1 + 1 / np.log2(3)
    self.assertAlmostEqual(float(causal.recall_at_k(scores, relevant, exclude, 2)), 0.5, places=6)
    self.assertAlmostEqual(float(causal.ndcg_at_k(scores, relevant, exclude, 2)), 1 / ideal, places=6)
    self.assertAlmostEqual(float(causal.hit_rate_at_k(scores, relevant, exclude, 2)), 1.0, places=6)
    self.assertAlmostEqual(float(causal.recall_at_k(scores, relevant, exclude, 4)), 1.0, places=6)
    self.assertAlmostEqual(float(causal.ndcg_at_k(scores, relevant, exclude, 4)), (1 + 1 / np.log2(5)) / ideal,
                           places=6)
    # Without the mask, the trained item 0 takes rank 1 and pushes item 4 out of the top 4.
    self.assertAlmostEqual(float(causal.hit_rate_at_k(scores, relevant, None, 1)), 0.0, places=6)
    self.assertAlmostEqual(float(causal.recall_at_k(scores, relevant, None, 4)), 0.5, places=6)

  def test_training_items_are_masked_out_of_the_ranking(self):
    # The top-scored item is a training item: unmasked it takes rank 1, masked the relevant item does.
    scores = np.array([[9.0, 1.0, 2.0, 0.5]], np.float32)
    relevant = np.array([[0, 0, 1, 0]], bool)
    train = np.array([[1, 0, 0, 0]], bool)
    self.assertEqual(float(causal.hit_rate_at_k(scores, relevant, None, 1)), 0.0)
    self.assertEqual(float(causal.hit_rate_at_k(scores, relevant, train, 1)), 1.0)
    # A relevant item that is also excluded leaves R(u): it can be neither found nor missed.
    both = np.array([[0, 1, 1, 0]], bool)
    self.assertEqual(float(causal.recall_at_k(scores, both, np.array([[1, 1, 0, 0]], bool), 1)), 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_equal_a_numpy_transcription(self):
    scores, relevant, exclude = _random_case(0)
    for k in KS:
      want = _numpy_ranking(scores, relevant, exclude, k)
      got = [float(self.variant(f, static_argnums=3)(scores, relevant, exclude, k))
             for f in (causal.recall_at_k, causal.ndcg_at_k, causal.hit_rate_at_k)]
      np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"k={k}")

  def test_equal_recbole_and_scikit_learn(self):
    scores, relevant, exclude = _random_case(1, n_users=120, n_items=80)
    ref = peer.run("recbole_metrics", {"scores": scores, "relevant": relevant, "exclude": exclude}, ks=list(KS))
    for k in KS:
      self.assertAlmostEqual(float(causal.ndcg_at_k(scores, relevant, exclude, k)), float(ref[f"sklearn_ndcg@{k}"]),
                             places=5, msg=f"scikit-learn ndcg_score k={k}")
    if not ref["recbole_available"]:
      self.skipTest("recbole is not installed in the peer environment (pip install --no-deps recbole==1.2.1)")
    self.assertEqual(ref["recbole_version"], "1.2.1")
    for k in KS:
      for name, fn in (("recall", causal.recall_at_k), ("ndcg", causal.ndcg_at_k), ("hit", causal.hit_rate_at_k)):
        self.assertAlmostEqual(float(fn(scores, relevant, exclude, k)), float(ref[f"{name}@{k}"]), places=5,
                               msg=f"RecBole {name}@{k}")

  @parameterized.named_parameters(
      ("k_zero", dict(k=0), "k must be an integer in \\[1, 5\\]"),
      ("k_too_big", dict(k=6), "k must be an integer in \\[1, 5\\]"),
      ("shape", dict(relevant=np.ones((2, 4), bool)), "relevant_UxI has shape \\(2, 4\\)"),
      ("exclude_shape", dict(exclude=np.ones((5,), bool)), "exclude_UxI has shape \\(5,\\)"),
      ("mask_values", dict(relevant=np.full((2, 5), 2)), "relevant_UxI must be a 0/1"),
      ("all_empty", dict(relevant=np.zeros((2, 5), bool)), "relevant_UxI has no relevant item"),
      ("all_excluded", dict(exclude=np.ones((2, 5), bool)), "relevant_UxI has no relevant item"),
  )
  def test_bad_input_raises_naming_the_argument(self, change, message):
    args = dict(scores=np.zeros((2, 5), np.float32), relevant=np.eye(2, 5, dtype=bool), exclude=None, k=2)
    args.update(change)
    for fn in (causal.recall_at_k, causal.ndcg_at_k, causal.hit_rate_at_k):
      with self.assertRaisesRegex(ValueError, message):
        fn(args["scores"], args["relevant"], args["exclude"], args["k"])


def _hard_case(seed, n_users=40, n_items=30):
  """Heavy ties, +-0.0, NaN of both signs and -inf; users with no relevant item, with more than K, and with
  fewer non-excluded items than K."""
  rng = np.random.default_rng(seed)
  values = np.array([0.0, -0.0, np.nan, -np.nan, -np.inf, np.inf, 1.0, 2.0], np.float32)
  scores = rng.choice(values, (n_users, n_items), p=[0.2, 0.2, 0.05, 0.05, 0.05, 0.05, 0.2, 0.2])
  relevant = rng.random((n_users, n_items)) < 0.25
  exclude = rng.random((n_users, n_items)) < 0.3
  relevant[0] = False                                   # no relevant item
  relevant[1] = True                                    # 30 relevant items, more than any K
  exclude[1, ::2] = True                                # of which 15 are excluded
  exclude[2] = True                                     # 3 items left to rank, K up to 20
  exclude[2, [4, 9, 17]] = False
  relevant[2, [9, 17, 20]] = True                       # item 20 is both: it leaves R(u)
  scores[2, 9] = np.nan                                 # ranked after the excluded (-inf) items of lower index
  return scores, relevant, exclude


class RankedSetsTest(chex.TestCase):
  """`relevant_sets` forms (ranks counted, `top_k` on the users with relevant items) against `top_k` on every row.

  The hits [U, K] are compared exactly; so are the metrics, which the same code (`_at_ks`) computes from
  the hits: the same floats, not merely close ones.
  """

  @parameterized.named_parameters(("hard", _hard_case, 3), ("random", _random_case, 4))
  def test_hits_and_metrics_equal_the_top_k_form(self, make, seed):
    scores, relevant, exclude = make(seed)
    n_rel = np.sum(relevant & ~exclude, 1)
    for count_max in (0, 3, metrics.COUNT_MAX_ITEMS, scores.shape[1]):   # all top_k, mixed, all counted
      sets = metrics.relevant_sets(relevant, exclude, count_max=count_max)
      self.assertEqual(int(np.sum(np.asarray(sets.user_ids) < len(scores))), int(np.sum(n_rel > 0)))
      for k in (1, 5, 20, scores.shape[1]):
        hits, want_n = metrics._ranked(scores, relevant, exclude, k)
        got, got_n = metrics._ranked_from_sets(scores, sets, jnp.asarray(exclude), k)
        np.testing.assert_array_equal(got, hits, err_msg=f"count_max={count_max} k={k}")
        np.testing.assert_array_equal(got_n, want_n)
    ks = (1, 5, 20)
    want = jax.jit(metrics.ranking_metrics, static_argnums=3)(scores, relevant, exclude, ks)   # traced: top_k
    sets = metrics.relevant_sets(relevant, exclude)
    got = {"from_sets": jax.jit(metrics.ranking_metrics_from_sets, static_argnums=3)(scores, sets, exclude, ks),
           "eager": metrics.ranking_metrics(scores, relevant, exclude, ks),                 # concrete: the sets
           "unpadded": metrics.ranking_metrics_from_sets(
               scores, metrics.relevant_sets(relevant, exclude, pad=False), exclude, ks)}
    for form, values in got.items():
      for name in want:
        np.testing.assert_array_equal(np.asarray(values[name]), np.asarray(want[name]), err_msg=f"{form} {name}")
    for k in ks:
      for name, fn in (("recall", causal.recall_at_k), ("ndcg", causal.ndcg_at_k), ("hit", causal.hit_rate_at_k)):
        np.testing.assert_array_equal(np.asarray(fn(scores, relevant, exclude, k)), np.asarray(want[f"{name}@{k}"]))
    if make is _random_case:                            # finite scores: the argsort transcription too
      for k in ks:
        np.testing.assert_allclose([want[f"recall@{k}"], want[f"ndcg@{k}"], want[f"hit@{k}"]],
                                   _numpy_ranking(scores, relevant, exclude, k), rtol=1e-5)

  def test_hand_computed_counted_ranks_with_ties_and_nan(self):
    # Ranks 0..5: item 3 (score 2); 0, 1, 4 (score 1, by index); 2 (NaN -> -inf) and 5 (excluded: -inf), by index.
    scores = np.array([[1.0, 1.0, np.nan, 2.0, 1.0, 5.0]], np.float32)
    exclude = np.array([[0, 0, 0, 0, 0, 1]], bool)
    for items, k, hit_ranks in (([1], 3, [2]), ([1], 2, []), ([4], 3, []), ([4], 4, [3]),
                                 ([2], 5, [4]), ([2], 4, [])):
      relevant = np.zeros((1, 6), bool)
      relevant[0, items] = True
      sets = metrics.relevant_sets(relevant, exclude)
      self.assertEqual(sets.rows.size, 1)                # counted, not ranked by top_k
      hits, _ = metrics._ranked_from_sets(scores, sets, jnp.asarray(exclude), k)
      np.testing.assert_array_equal(np.nonzero(np.asarray(hits[0]))[0], hit_ranks, err_msg=f"{items} k={k}")

  def test_no_exclude_mask(self):
    scores, relevant, _ = _hard_case(5)
    want = jax.jit(metrics.ranking_metrics, static_argnums=3)(scores, relevant, None, (3, 7))
    got = metrics.ranking_metrics_from_sets(scores, metrics.relevant_sets(relevant), None, (3, 7))
    for name in want:
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)

  def test_mf_ranking_metrics_equal_the_full_score_matrix(self):
    p = causal.mf_init(jax.random.PRNGKey(0), 50, 40, 4, scale=1.0)
    p = {**p, "user": jnp.round(p["user"] * 2) / 2, "item": jnp.round(p["item"] * 2) / 2,   # exact, tied scores
         "user_bias": jnp.round(p["user_bias"] * 2) / 2, "item_bias": jnp.round(p["item_bias"] * 2) / 2}
    rng = np.random.default_rng(7)
    relevant = rng.random((50, 40)) < 0.15
    relevant[::3] = False                               # a third of the users have no relevant item
    exclude = (rng.random((50, 40)) < 0.3) & ~relevant
    sets = metrics.relevant_sets(relevant, exclude, count_max=4)
    got = jax.jit(metrics.mf_ranking_metrics, static_argnums=3)(p, sets, exclude, (5, 10))
    want = jax.jit(metrics.ranking_metrics, static_argnums=3)(causal.mf_scores(p), relevant, exclude, (5, 10))
    for name in want:
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)

  def test_bad_input_raises(self):
    scores, relevant, exclude = _random_case(6, n_users=5, n_items=8)
    relevant[4, 2], exclude[4, 2] = True, False
    with self.assertRaisesRegex(ValueError, "relevant_sets needs concrete"):
      jax.jit(metrics.relevant_sets)(relevant, exclude)
    with self.assertRaisesRegex(ValueError, "count_max must be a non-negative integer"):
      metrics.relevant_sets(relevant, exclude, count_max=-1)
    sets = metrics.relevant_sets(relevant, exclude)
    with self.assertRaisesRegex(ValueError, "sets are for 5 users x 8 items"):
      metrics.ranking_metrics_from_sets(scores[:4], sets, None)
    with self.assertRaisesRegex(ValueError, "exclude_UxI has shape \\(5, 7\\)"):
      metrics.ranking_metrics_from_sets(scores, sets, exclude[:, :7], (3,))
    with self.assertRaisesRegex(ValueError, "k must be an integer in \\[1, 8\\]"):
      metrics.ranking_metrics_from_sets(scores, sets, exclude, (9,))
    with self.assertRaisesRegex(ValueError, "sets hold no relevant item"):
      metrics.ranking_metrics_from_sets(scores, metrics.relevant_sets(np.zeros((5, 8), bool)), None, (3,))


class RatingMetricsTest(chex.TestCase):

  def test_masked_mse_and_mae_by_hand(self):
    pred = np.array([[1.0, 2.0], [3.0, 9.0]], np.float32)
    target = np.array([[2.0, 2.0], [1.0, np.nan]], np.float32)   # the unmasked cell is never read
    mask = np.array([[1, 1], [1, 0]], bool)
    self.assertAlmostEqual(float(causal.masked_mse(pred, target, mask)), (1 + 0 + 4) / 3, places=6)
    self.assertAlmostEqual(float(causal.masked_mae(pred, target, mask)), (1 + 0 + 2) / 3, places=6)
    self.assertAlmostEqual(float(jax.jit(causal.masked_mse)(pred, np.nan_to_num(target), mask)), 5 / 3, places=6)
    with self.assertRaisesRegex(ValueError, "mask_UxI selects no cell"):
      causal.masked_mse(pred, target, np.zeros_like(mask))
    with self.assertRaisesRegex(ValueError, "targets_UxI has shape"):
      causal.masked_mae(pred, target[:1], mask)

  def test_masked_auc_equals_scikit_learn_on_the_masked_cells(self):
    rng = np.random.default_rng(2)
    labels = (rng.random((40, 30)) < 0.3).astype(np.float32)
    scores = np.round(0.4 * labels + rng.random((40, 30)), 2).astype(np.float32)   # with ties
    mask = rng.random((40, 30)) < 0.4
    ref = peer.run("recsys_metrics", {"mar__labels": labels[mask], "mar__scores": np.clip(scores[mask], 0, 1)})
    got = float(causal.masked_auc(labels, np.clip(scores, 0, 1), mask))
    self.assertAlmostEqual(got, float(ref["mar__auc"]), places=5)
    with self.assertRaisesRegex(ValueError, "labels_UxI must be a 0/1"):
      causal.masked_auc(2 * labels, scores, mask)


if __name__ == "__main__":
  absltest.main()
