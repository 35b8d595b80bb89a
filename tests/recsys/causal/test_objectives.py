"""DR-JL, PDA, MACR and DecRS objectives against NumPy transcriptions; the tower adapter; the ML-100K reader."""
import os
import tempfile
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from jaxml import train as jt
from jaxml.recsys import towers
from jaxml.recsys import train as ctr_train
from jaxml.recsys.causal import _checks, experiment, metrics, mf, movielens, objectives, towers_adapter


def np_sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_elu1(x):
  return np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1.0


def np_mf(p, u, i):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  return np.sum(p["user"][u] * p["item"][i], -1) + p["user_bias"][u] + p["item_bias"][i] + p["bias"]


def _sq(p):
  return sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for k, v in p.items() if k != "bias")


class DrJlTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.params = objectives.dr_jl_init(jax.random.PRNGKey(0), 5, 6, 3, global_bias=2.5, scale=0.5)
    n = 20
    self.batch = {"users": rng.integers(0, 5, n).astype(np.int32), "items": rng.integers(0, 6, n).astype(np.int32),
                  "observed": (rng.random(n) < 0.4).astype(np.float32),
                  "ratings": rng.integers(1, 6, n).astype(np.float32),
                  "propensities": rng.uniform(0.1, 1.0, n).astype(np.float32)}

  def _numpy(self, imputation, l2, il2):
    b = self.batch
    r_hat = np_mf(self.params["prediction"], b["users"], b["items"])
    r_tld = np_mf(self.params["imputation"], b["users"], b["items"])
    o, p = b["observed"], b["propensities"]
    r = np.where(o > 0, b["ratings"], 0.0)
    e, e_hat = (r_hat - r) ** 2, (r_hat - r_tld) ** 2
    dr = np.mean(e_hat + o * (e - e_hat) / p)
    resid = (e_hat - e) if imputation == "error" else (r_tld - r)
    imp = np.sum(o * resid ** 2 / p) / np.sum(o / p)
    return dr, imp, dr + imp + l2 * _sq(self.params["prediction"]) + il2 * _sq(self.params["imputation"])

  def test_both_losses_equal_their_formulas(self):
    for imputation in ("rating", "error"):
      loss, m = objectives.dr_jl_loss(self.params, self.batch, l2=0.01, imputation_l2=0.1, imputation=imputation)
      dr, imp, total = self._numpy(imputation, 0.01, 0.1)
      np.testing.assert_allclose(m["dr_loss"], dr, rtol=1e-5, err_msg=imputation)
      np.testing.assert_allclose(m["imputation_loss"], imp, rtol=1e-5, err_msg=imputation)
      np.testing.assert_allclose(loss, total, rtol=1e-5, err_msg=imputation)

  def test_each_loss_moves_only_its_model(self):
    # The prediction's gradient is L_DR's with r_tilde held fixed; the imputation's is L_IMP's alone.
    grads = jax.grad(lambda p: objectives.dr_jl_loss(p, self.batch)[0])(self.params)
    b = self.batch
    r_tld = mf.mf_apply(self.params["imputation"], b["users"], b["items"])

    def dr_only(pred):
      r_hat = mf.mf_apply(pred, b["users"], b["items"])
      r = jnp.where(b["observed"] > 0, b["ratings"], 0.0)
      e, e_hat = (r_hat - r) ** 2, (r_hat - r_tld) ** 2
      return jnp.mean(e_hat + b["observed"] * (e - e_hat) / b["propensities"])

    def imp_only(imp):
      r = jnp.where(b["observed"] > 0, b["ratings"], 0.0)
      resid = mf.mf_apply(imp, b["users"], b["items"]) - r
      w = b["observed"] / b["propensities"]
      return jnp.sum(w * resid ** 2) / jnp.sum(w)

    chex.assert_trees_all_close(grads["prediction"], jax.grad(dr_only)(self.params["prediction"]), rtol=1e-5)
    chex.assert_trees_all_close(grads["imputation"], jax.grad(imp_only)(self.params["imputation"]), rtol=1e-5)

  def test_all_cells_batch_and_bad_input(self):
    ratings = np.array([[5, 0, 1], [0, 2, 0]])
    o = ratings > 0
    p = np.array([[0.5, 0.0, 0.2], [0.0, 1.0, 0.0]])   # zero where unobserved: filled with 1, never read
    b = objectives.all_cells_batch(ratings, o, p)
    np.testing.assert_array_equal(b["observed"], o.ravel())
    np.testing.assert_allclose(b["propensities"], [0.5, 1.0, 0.2, 1.0, 1.0, 1.0])
    bad = dict(self.batch, propensities=np.zeros_like(self.batch["propensities"]))
    with self.assertRaisesRegex(ValueError, "batch\\['propensities'\\] must lie in \\(0, 1\\]"):
      objectives.dr_jl_loss(self.params, bad)
    with self.assertRaisesRegex(ValueError, "batch lacks \\['propensities'\\]"):
      objectives.dr_jl_loss(self.params, {k: v for k, v in self.batch.items() if k != "propensities"})
    with self.assertRaisesRegex(ValueError, "observed has shape"):
      objectives.dr_jl_loss(self.params, dict(self.batch, observed=np.ones(3, np.float32)))
    with self.assertRaisesRegex(ValueError, "propensities_UxI must lie in"):
      objectives.all_cells_batch(ratings, o, np.where(o, 0.0, 1.0))
    with self.assertRaisesRegex(ValueError, "imputation must be"):
      objectives.dr_jl_loss(self.params, self.batch, imputation="direct")


class DrJlAlternatingTest(absltest.TestCase):
  """The paper's alternation: two imputation steps, then two prediction steps (period 2), against optax by hand."""

  def test_each_phase_moves_only_its_model_by_its_own_adam_step(self):
    case = DrJlTest("test_both_losses_equal_their_formulas")
    case.setUp()
    b = {k: jnp.asarray(v) for k, v in case.batch.items()}
    tx = optax.adam(0.05)
    init = lambda r: objectives.dr_jl_init(r, 5, 6, 3, global_bias=2.5, scale=0.5)  # noqa: E731
    state, _ = jt.init_train_state(init, objectives.dr_jl_optimizer(tx), jax.random.PRNGKey(0))
    step = jax.jit(objectives.make_dr_jl_alternating_step(tx, period=2, l2=0.01))
    r = jnp.where(b["observed"] > 0, b["ratings"], 0.0)
    w = b["observed"] / b["propensities"]

    def imp_loss(imp):        # L_IMP ("rating") + its L2, written out
      resid = mf.mf_apply(imp, b["users"], b["items"]) - r
      return jnp.sum(w * resid ** 2) / jnp.sum(w) + 0.01 * objectives.l2_penalty(imp)

    def dr_loss(pred, imp):   # L_DR with r_tilde fixed + the predictor's L2
      r_hat, r_tld = mf.mf_apply(pred, b["users"], b["items"]), mf.mf_apply(imp, b["users"], b["items"])
      e, e_hat = (r_hat - r) ** 2, (r_hat - r_tld) ** 2
      return jnp.mean(e_hat + b["observed"] * (e - e_hat) / b["propensities"]) + 0.01 * objectives.l2_penalty(pred)

    def by_hand(pred, imp, s_pred, s_imp, imputing):
      if imputing:
        u, s_imp = tx.update(jax.grad(imp_loss)(imp), s_imp, imp)
        return pred, optax.apply_updates(imp, u), s_pred, s_imp
      u, s_pred = tx.update(jax.grad(dr_loss)(pred, imp), s_pred, pred)
      return optax.apply_updates(pred, u), imp, s_pred, s_imp

    by_hand = jax.jit(by_hand, static_argnums=4)
    pred, imp = state.params["prediction"], state.params["imputation"]
    s_pred, s_imp = tx.init(pred), tx.init(imp)
    phases = []
    for t in range(4):
      pred, imp, s_pred, s_imp = by_hand(pred, imp, s_pred, s_imp, t < 2)
      before = state.params
      state, m = step(state, b)
      phases.append(int(m["phase"]))
      resting = "prediction" if t < 2 else "imputation"
      chex.assert_trees_all_equal(state.params[resting], before[resting])      # not moved at all
      chex.assert_trees_all_close(state.params["imputation"], imp, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(state.params["prediction"], pred, rtol=1e-5, atol=1e-6)
    self.assertEqual(phases, [0, 0, 1, 1])
    chex.assert_trees_all_close(state.opt_state["prediction"], s_pred, rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "period must be a positive integer"):
      objectives.make_dr_jl_alternating_step(tx, period=0)
    plain, _ = jt.init_train_state(init, tx, jax.random.PRNGKey(0))
    with self.assertRaisesRegex(ValueError, "dr_jl_optimizer"):
      objectives.make_dr_jl_alternating_step(tx)(plain, b)
    with self.assertRaisesRegex(ValueError, "dr_jl_period needs loss_fn = functools.partial\\(objectives.dr_jl_loss"):
      experiment.fit_model(mf.mf_ips_loss, init, lambda step: b, steps=1, lr=0.1, seed=0, dr_jl_period=1)


class PdaMacrTest(chex.TestCase):

  def test_pda_loss_is_bpr_on_the_backbone_with_stage_popularity(self):
    rng = np.random.default_rng(1)
    params = mf.mf_init(jax.random.PRNGKey(1), 4, 7, 3, scale=0.7)
    b = {"users": rng.integers(0, 4, 9).astype(np.int32), "pos_items": rng.integers(0, 7, 9).astype(np.int32),
         "neg_items": rng.integers(0, 7, 9).astype(np.int32), "pos_pop": rng.uniform(size=9).astype(np.float32),
         "neg_pop": rng.uniform(size=9).astype(np.float32)}
    gamma, l2 = 0.2, 0.01
    sp = np_elu1(np_mf(params, b["users"], b["pos_items"])) * b["pos_pop"] ** gamma
    sn = np_elu1(np_mf(params, b["users"], b["neg_items"])) * b["neg_pop"] ** gamma
    want = -np.mean(np.log(np_sig(sp - sn))) + l2 * _sq(params)
    loss, m = objectives.pda_loss(params, b, gamma=gamma, l2=l2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["bpr_accuracy"], np.mean(sp > sn))

  def test_macr_inference_at_c_zero_is_its_training_score(self):
    rng = np.random.default_rng(2)
    params = objectives.macr_init(mf.mf_init(jax.random.PRNGKey(2), 4, 5, 3, scale=0.8), 4, 5)
    params["user_logit"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    params["item_logit"] = jnp.asarray(rng.normal(size=5), jnp.float32)
    b = {"users": np.array([0, 1, 3, 2, 1], np.int32), "items": np.array([4, 0, 2, 2, 3], np.int32),
         "labels": np.array([1, 0, 1, 0, 0], np.float32)}
    _, m = objectives.macr_train_loss(params, b, alpha=0.0, beta=0.0)
    full = np.asarray(objectives.macr_scores(params, mf.mf_scores(params["backbone"]), 0.0))
    y = full[b["users"], b["items"]]   # the counterfactual ranking at c = 0, read at the training pairs
    bce = -np.mean(b["labels"] * np.log(np_sig(y)) + (1 - b["labels"]) * np.log(1 - np_sig(y)))
    np.testing.assert_allclose(m["main"], bce, rtol=1e-5)
    y_k = np_mf(params["backbone"], b["users"], b["items"])
    want = y_k * np_sig(np.asarray(params["item_logit"])[b["items"]]) * np_sig(np.asarray(params["user_logit"])[b["users"]])
    np.testing.assert_allclose(y, want, rtol=1e-5)
    shifted = np.asarray(objectives.macr_scores(params, mf.mf_scores(params["backbone"]), 1.5))[b["users"], b["items"]]
    branches = want / y_k
    np.testing.assert_allclose(shifted, (y_k - 1.5) * branches, rtol=1e-4)


class DecRsTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.params = objectives.decrs_init(jax.random.PRNGKey(3), 4, 5, 3, 2, scale=0.9)
    self.d = np.array([0.5, 0.3, 0.2], np.float32)

  def test_mediator_and_score_equal_the_fm_formulas(self):
    p = {k: np.asarray(v, np.float64) for k, v in self.params.items()}
    users, items = np.array([0, 3, 1]), np.array([4, 0, 2])
    want = []
    for u, i in zip(users, items):
      rows = [p["user"][u]] + [self.d[g] * p["group"][g] for g in range(3)]   # e_u and d_g v_g
      m = sum(rows[a] * rows[b] for a in range(len(rows)) for b in range(a + 1, len(rows)))   # FM pair sum
      fm = [p["user"][u], p["item"][i], m]
      pairs = sum(np.dot(fm[a], fm[b]) for a in range(3) for b in range(a + 1, 3))
      want.append(pairs + p["user_bias"][u] + p["item_bias"][i] + p["bias"])
    got = objectives.decrs_apply(self.params, users, items, self.d)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    full = np.asarray(objectives.decrs_scores(self.params, self.d))
    np.testing.assert_allclose(full[users, items], got, rtol=1e-5)

  def test_lambda_and_mix_follow_the_authors_inference(self):
    first = np.array([[0.7, 0.3, 0.0], [0.2, 0.4, 0.4], [0.5, 0.5, 0.0]])
    second = np.array([[0.1, 0.1, 0.8], [0.2, 0.4, 0.4], [0.4, 0.6, 0.0]])

    def kl(p, q, s=0.01):   # the authors' util.kl_div, written out
      return sum(pv * np.log(pv / ((1 - s) * q[k] + s * pv)) for k, pv in enumerate(p) if pv >= 1e-5)

    eta = np.array([kl(a, b) + kl(b, a) for a, b in zip(first, second)])
    want = ((eta - eta.min()) / (eta.max() - eta.min())) ** 0.2
    lam = objectives.decrs_lambda(first, second, 0.2)
    np.testing.assert_allclose(lam, want, rtol=1e-10)
    self.assertEqual(lam[1], 0.0)                      # no drift: the FM's score alone
    dec, fm = np.random.default_rng(4).normal(size=(2, 3, 5))
    mix = objectives.decrs_mix(dec, fm, lam)
    np.testing.assert_allclose(mix, want[:, None] * np_sig(dec) + (1 - want[:, None]) * np_sig(fm), rtol=1e-5)

  def test_group_distribution_and_bad_input(self):
    x = np.array([[1, 1, 0], [0, 0, 0]])
    g = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(objectives.group_distribution(x, g), [[0.75, 0.25], [0.5, 0.5]])
    with self.assertRaisesRegex(ValueError, "item_groups_IxG rows must sum to 1"):
      objectives.group_distribution(x, 2 * g)
    with self.assertRaisesRegex(ValueError, "d_G must be a \\[3\\] group distribution"):
      objectives.decrs_apply(self.params, np.array([0]), np.array([0]), np.ones(2))
    with self.assertRaisesRegex(ValueError, "items_B must lie in \\[0, 5\\)"):
      objectives.decrs_apply(self.params, np.array([0]), np.array([5]), self.d)


class TowerAdapterTest(chex.TestCase):
  """With uniform propensities the IPS / SNIPS tower losses are the plain tower loss."""

  def test_uniform_weights_give_the_plain_tower_loss(self):
    rng = np.random.default_rng(5)
    u, i = rng.integers(0, 30, 64), rng.integers(0, 40, 64)
    y = (rng.random(64) < 0.3).astype(np.float32)
    for kind, extra in (("dcnv2", {"cross_layers": 2}), ("dlrm", {}),
                        ("dhen", {"dhen_modules": ("linear", "dot"), "dhen_rows": (2, 2), "dhen_layers": 1})):
      cfg = towers_adapter.id_tower_config(kind, 30, 40, embed_dim=4, hidden=(8,), **extra)
      params = towers.init(jax.random.PRNGKey(0), cfg)
      plain, _ = ctr_train.loss_fn(params, towers_adapter.tower_batch(u, i, labels_B=y), cfg=cfg,
                                   tc=ctr_train.TrainConfig())
      ones = towers_adapter.tower_batch(u, i, labels_B=y, weights_B=np.ones(64))
      ips, m = towers_adapter.tower_ips_loss(params, ones, cfg=cfg)
      np.testing.assert_allclose(ips, plain, rtol=1e-6, err_msg=kind)
      np.testing.assert_allclose(m["logloss"], plain, rtol=1e-6, err_msg=kind)
      const = towers_adapter.tower_batch(u, i, labels_B=y, weights_B=np.full(64, 3.0))
      snips, _ = towers_adapter.tower_ips_loss(params, const, cfg=cfg, self_normalize=True)
      np.testing.assert_allclose(snips, plain, rtol=1e-6, err_msg=kind)
    # The same tower is a score_fn backbone for the other objectives (PDA here).
    score = towers_adapter.tower_score_fn(cfg)
    np.testing.assert_allclose(score(params, jnp.asarray(u), jnp.asarray(i)),
                               towers.apply(params, towers_adapter.tower_batch(u, i), cfg), rtol=1e-6)
    pairs = {"users": u[:8].astype(np.int32), "pos_items": i[:8].astype(np.int32),
             "neg_items": i[8:16].astype(np.int32), "pos_pop": np.full(8, 0.5, np.float32),
             "neg_pop": np.full(8, 0.25, np.float32)}
    f_pos = np.asarray(score(params, jnp.asarray(pairs["users"]), jnp.asarray(pairs["pos_items"])), np.float64)
    f_neg = np.asarray(score(params, jnp.asarray(pairs["users"]), jnp.asarray(pairs["neg_items"])), np.float64)
    want = -np.mean(np.log(np_sig(np_elu1(f_pos) * 0.5 ** 0.1 - np_elu1(f_neg) * 0.25 ** 0.1)))
    np.testing.assert_allclose(objectives.pda_loss(params, pairs, gamma=0.1, score_fn=score)[0], want, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "batch lacks 'weight'"):
      towers_adapter.tower_ips_loss(params, towers_adapter.tower_batch(u, i, labels_B=y), cfg=cfg)
    with self.assertRaisesRegex(ValueError, "items_B has shape"):
      towers_adapter.tower_batch(u, i[:3])


def write_inter(path, rows):
  with open(path, "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for r in rows:
      f.write("\t".join(str(x) for x in r) + "\n")


class MovielensTest(absltest.TestCase):

  def test_reader_and_temporal_split(self):
    # 10 interactions in time order t = 1..10. Five stages of 2: the test stage (t = 9, 10) holds
    # (u2, i30) with a user unseen in training and (u1, i40) with an unseen item: both dropped.
    # Two stages of 5: the test stage (t = 6..10) keeps only (u3, i30); (u1, i30) and (u3, i20) repeat
    # training pairs.
    rows = [("u1", "i10", 5, 1), ("u3", "i20", 3, 2), ("u1", "i30", 4, 3), ("u3", "i10", 2, 4),
            ("u1", "i10", 1, 5), ("u3", "i30", 4, 6), ("u1", "i30", 4, 7), ("u3", "i20", 5, 8),
            ("u2", "i30", 3, 9), ("u1", "i40", 2, 10)]
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "tiny.inter")
      write_inter(path, rows)
      data = movielens.read_inter(path)
    self.assertEqual((data["n_users"], data["n_items"]), (3, 4))
    np.testing.assert_array_equal(data["user_tokens"], ["u1", "u2", "u3"])
    split = movielens.temporal_split(data, n_stages=5)
    np.testing.assert_array_equal(split["counts_SxI"].sum(1), [2, 2, 2, 2])
    self.assertEqual(int(split["test_UxI"].sum()), 0)
    split = movielens.temporal_split(data, n_stages=2)
    test = {(data["user_tokens"][a], data["item_tokens"][b]) for a, b in zip(*np.nonzero(split["test_UxI"]))}
    self.assertEqual(test, {("u3", "i30")})
    self.assertEqual(int(split["train_UxI"].sum()), 4)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "bad.inter")
      with open(path, "w") as f:
        f.write("user_id:token\trating:float\n1\t2\n")
      with self.assertRaisesRegex(ValueError, "lacks 'item_id'"):
        movielens.read_inter(path)


class MarOverlapTest(absltest.TestCase):

  def test_overlap_warns_and_disjoint_does_not(self):
    train = np.array([[1, 0], [0, 1]], bool)
    with self.assertWarnsRegex(UserWarning, "test_UxI shares 1 cells with train_UxI"):
      n = _checks.warn_mar_overlap("train_UxI", train, "test_UxI", np.array([[1, 1], [0, 0]], bool))
    self.assertEqual(n, 1)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      self.assertEqual(_checks.warn_mar_overlap("train_UxI", train, "test_UxI", ~train), 0)
    with self.assertRaisesRegex(ValueError, "test_UxI has shape"):
      _checks.warn_mar_overlap("train_UxI", train, "test_UxI", np.ones(3, bool))



class RankingHelpersTest(absltest.TestCase):

  def test_chunked_top_k_and_one_pass_metrics_equal_the_full_computations(self):
    p = mf.mf_init(jax.random.PRNGKey(0), 37, 23, 4, scale=1.0)
    rng = np.random.default_rng(0)
    ex = rng.random((37, 23)) < 0.3
    rel = rng.random((37, 23)) < 0.2
    s = np.where(ex, -np.inf, np.asarray(mf.mf_scores(p)))
    want = np.argsort(-s, axis=1, kind="stable")[:, :5]        # 37 users in chunks of 8: the last 5 on their own
    np.testing.assert_array_equal(metrics.mf_top_k(p, ex, 5, chunk=8), want)
    m = metrics.ranking_metrics(s, rel, ex, (5, 10))
    for k in (5, 10):
      self.assertAlmostEqual(float(m[f"recall@{k}"]), float(metrics.recall_at_k(s, rel, ex, k)), places=6)
      self.assertAlmostEqual(float(m[f"ndcg@{k}"]), float(metrics.ndcg_at_k(s, rel, ex, k)), places=6)
      self.assertAlmostEqual(float(m[f"hit@{k}"]), float(metrics.hit_rate_at_k(s, rel, ex, k)), places=6)
    with self.assertRaisesRegex(ValueError, "exclude_UxI has shape \\(37, 22\\)"):
      metrics.mf_top_k(p, ex[:, :22], 5)
    with self.assertRaisesRegex(ValueError, "k must be an integer in \\[1, 23\\]"):
      metrics.mf_top_k(p, ex, 24)


if __name__ == "__main__":
  absltest.main()
