"""Risk estimators, propensity models and MF-IPS against the simulator's known truth.

Unbiasedness is checked the way the IPS paper argues it: over repeated exposure
draws from fixed true propensities, the mean estimate's bias lies within 3
standard errors of zero (SE = spread / sqrt(draws)), while the naive
estimate's bias is hundreds of standard errors away.
"""
import functools
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import train as jt
from jaxml.recsys import causal

DRAWS = 300   # exposure draws; the 3-SE band of IPS's mean is then ~0.02 on a risk of 2.5


def _bias_z(estimates, truth):
  """Mean bias and its z-score over the draws."""
  bias = estimates - truth
  se = bias.std(ddof=1) / np.sqrt(bias.size)
  return float(bias.mean()), float(bias.mean() / se)


class HandComputedTest(chex.TestCase):
  """A 2 x 2 world worked by hand (module docstring of jaxml.recsys.causal.estimators)."""
  e = np.array([[1.0, 4.0], [9.0, 16.0]], np.float32)
  o = np.array([[1, 0], [1, 1]], np.float32)
  p = np.array([[0.5, 0.2], [0.25, 1.0]], np.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_each_estimator_equals_its_formula(self):
    e_hat = np.full((2, 2), 2.0, np.float32)
    self.assertAlmostEqual(float(self.variant(causal.naive_risk)(self.e, self.o)), 26 / 3, places=5)
    self.assertAlmostEqual(float(self.variant(causal.ips_risk)(self.e, self.o, self.p)), (2 + 36 + 16) / 4, places=5)
    self.assertAlmostEqual(float(self.variant(causal.snips_risk)(self.e, self.o, self.p)), 54 / 7, places=5)
    # cells: 2 + (1 - 2) / 0.5 = 0; 2 (unobserved); 2 + 7 / 0.25 = 30; 2 + 14 / 1 = 16.
    self.assertAlmostEqual(float(self.variant(causal.dr_risk)(self.e, self.o, self.p, e_hat)), 48 / 4, places=5)

  def test_clip_raises_small_propensities_to_the_floor(self):
    self.assertAlmostEqual(float(causal.ips_risk(self.e, self.o, self.p, clip=0.5)), (2 + 18 + 16) / 4, places=5)
    # clip = 1: every weight is 1, IPS becomes the observed sum over all cells.
    self.assertAlmostEqual(float(causal.ips_risk(self.e, self.o, self.p, clip=1.0)), 26 / 4, places=5)

  def test_unobserved_errors_are_never_read(self):
    e = self.e.copy()
    e[0, 1] = np.nan
    self.assertAlmostEqual(float(causal.ips_risk(e, self.o, self.p)), float(causal.ips_risk(self.e, self.o, self.p)))
    self.assertTrue(np.isfinite(float(causal.naive_risk(e, self.o))))

  def test_snips_ignores_a_common_scale_of_the_propensities_and_ips_does_not(self):
    a = float(causal.snips_risk(self.e, self.o, self.p))
    b = float(causal.snips_risk(self.e, self.o, self.p / 4))
    self.assertAlmostEqual(a, b, places=5)
    self.assertAlmostEqual(float(causal.ips_risk(self.e, self.o, self.p / 4)),
                           4 * float(causal.ips_risk(self.e, self.o, self.p)), places=4)

  def test_dr_with_exact_imputations_is_exact_for_any_propensities(self):
    for p in (self.p, np.full((2, 2), 0.7, np.float32)):
      self.assertAlmostEqual(float(causal.dr_risk(self.e, self.o, p, self.e)), float(self.e.mean()), places=5)

  @parameterized.named_parameters(
      ("zero", 0.0, "propensities_UxI must lie in \\(0, 1\\]"),
      ("above_one", 1.5, "propensities_UxI must lie in \\(0, 1\\]"),
      ("nan", np.nan, "propensities_UxI must lie in \\(0, 1\\]"),
  )
  def test_bad_propensities_raise_naming_the_argument(self, value, message):
    p = self.p.copy()
    p[1, 0] = value
    for fn in (causal.ips_risk, causal.snips_risk):
      with self.assertRaisesRegex(ValueError, message):
        fn(self.e, self.o, p)
    with self.assertRaisesRegex(ValueError, message):
      causal.dr_risk(self.e, self.o, p, self.e)

  def test_bad_shapes_masks_and_clips_raise_naming_the_argument(self):
    with self.assertRaisesRegex(ValueError, "observed_UxI has shape \\(2, 3\\)"):
      causal.naive_risk(self.e, np.ones((2, 3)))
    with self.assertRaisesRegex(ValueError, "propensities_UxI has shape \\(3, 2\\)"):
      causal.ips_risk(self.e, self.o, np.ones((3, 2)))
    with self.assertRaisesRegex(ValueError, "imputed_errors_UxI has shape \\(2,\\)"):
      causal.dr_risk(self.e, self.o, self.p, np.ones(2))
    with self.assertRaisesRegex(ValueError, "observed_UxI must be a 0/1"):
      causal.ips_risk(self.e, 2 * self.o, self.p)
    with self.assertRaisesRegex(ValueError, "clip"):
      causal.ips_risk(self.e, self.o, self.p, clip=0.0)
    with self.assertRaisesRegex(ValueError, "errors_UxI must be a \\[users, items\\] matrix"):
      causal.ips_risk(self.e.ravel(), self.o.ravel(), self.p.ravel())

  def test_traced_propensities_skip_the_value_check_but_not_the_shape_check(self):
    f = jax.jit(causal.ips_risk)
    self.assertAlmostEqual(float(f(self.e, self.o, self.p)), 13.5, places=5)
    with self.assertRaisesRegex(ValueError, "propensities_UxI has shape"):
      f(self.e, self.o, np.ones((2, 3), np.float32))


class UnbiasednessTest(chex.TestCase):
  """IPS / SNIPS / DR over repeated exposure draws on the two simulated worlds."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.worlds = {}
    for name, cfg in (("schnabel", causal.schnabel_config()), ("confounded", causal.confounded_config())):
      sim = causal.RatingSimulator(cfg)
      y = sim.ratings_UxI.astype(np.float32)
      cls.worlds[name] = (sim, y, sim.propensities_UxI.astype(np.float32), sim.sample_observed(0, n_draws=DRAWS))

  @parameterized.parameters("schnabel", "confounded")
  def test_ips_and_snips_are_unbiased_and_naive_is_not(self, world):
    _, y, p, draws = self.worlds[world]
    for pred in (np.full_like(y, 3.0), np.clip(y + 1.0, 1.0, 5.0)):   # errors that depend on the rating
      e = np.square(pred - y)
      est = jax.jit(jax.vmap(lambda o, e=e: jnp.stack([causal.naive_risk(e, o), causal.ips_risk(e, o, p),
                                                        causal.snips_risk(e, o, p)])))(draws)
      est = np.asarray(est, np.float64)
      truth = float(e.mean())
      naive, z_naive = _bias_z(est[:, 0], truth)
      for col, name in ((1, "ips"), (2, "snips")):
        bias, z = _bias_z(est[:, col], truth)
        self.assertLess(abs(z), 3.0, msg=f"{world} {name}: mean bias {bias:.4f} is {z:.1f} standard errors from 0")
      self.assertGreater(abs(z_naive), 50.0, msg=f"{world} naive bias {naive:.4f}")
      self.assertGreater(abs(naive), 0.1 * truth, msg=f"{world} naive bias {naive:.4f} vs true risk {truth:.3f}")

  def test_schnabel_world_reproduces_the_closed_form_bias_of_naive(self):
    # With marginals p_r and exposure k alpha^max(0, 4 - r), the constant-3 predictor has true MSE
    # sum_r p_r (r - 3)^2 = 2.51, and naive converges to sum_r p_r w_r (r - 3)^2 / sum_r p_r w_r.
    _, y, p, draws = self.worlds["schnabel"]
    e = np.square(3.0 - y)
    probs = np.array(causal.RatingSimConfig().rating_probs)
    w = 0.25 ** np.maximum(0, 4 - np.arange(1, 6))
    expected = float(np.sum(probs * w * (np.arange(1, 6) - 3.0) ** 2) / np.sum(probs * w))
    self.assertAlmostEqual(float(e.mean()), 2.51, places=4)
    naive = np.asarray(jax.vmap(lambda o: causal.naive_risk(e, o))(draws))
    bias, z = _bias_z(naive, expected)
    self.assertLess(abs(z), 3.0, msg=f"naive vs its closed form {expected:.4f}: {bias:.4f}")

  def test_dr_is_unbiased_when_either_model_is_right_and_biased_when_both_are_wrong(self):
    sim, y, p, draws = self.worlds["confounded"]
    e = np.square(3.0 - y)
    truth = float(e.mean())
    wrong_p = np.full_like(p, p.mean())            # ignores who was shown what
    wrong_e = np.full_like(e, 1.0)                 # a constant imputation, far from the truth (2.51)
    noise = np.random.default_rng(1).normal(0.0, 1.0, draws.shape).astype(np.float32)   # zero-mean imputation noise
    est = jax.jit(jax.vmap(lambda o, n: jnp.stack([
        causal.dr_risk(e, o, p, wrong_e),          # right propensities, wrong imputations
        causal.dr_risk(e, o, wrong_p, e + n),      # wrong propensities, right (in expectation) imputations
        causal.dr_risk(e, o, wrong_p, wrong_e)])))(draws, noise)
    est = np.asarray(est, np.float64)
    for col, case in ((0, "right propensities"), (1, "right imputations")):
      bias, z = _bias_z(est[:, col], truth)
      self.assertLess(abs(z), 3.0, msg=f"DR with {case}: bias {bias:.4f} ({z:.1f} SE)")
    closed = float(causal.dr_bias(e, p, wrong_p, wrong_e))
    bias, z = _bias_z(est[:, 2], truth)
    self.assertGreater(abs(z), 50.0, msg=f"DR with both wrong: bias {bias:.4f}")
    self.assertLess(abs(bias - closed) / (est[:, 2].std(ddof=1) / np.sqrt(DRAWS)), 3.0,
                    msg=f"DR's measured bias {bias:.4f} vs the closed form {closed:.4f}")


class PropensityModelsTest(chex.TestCase):

  def test_naive_bayes_recovers_schnabels_propensities_within_sampling_error(self):
    # Schnabel's rule makes P(O = 1 | Y = r) exact for naive Bayes; the estimate's error is sampling
    # only. Its log has standard error ~ sqrt((1 - q) / (n q)) per count (binomial), from the MAR
    # level count (n_mar q_r) and the observed level count; the test allows 3 of them per level.
    sim = causal.RatingSimulator(causal.schnabel_config())
    split = sim.sample_split(0, mar_per_user=15)   # a 5% MAR sample, as in the IPS paper's later code
    est = np.asarray(causal.naive_bayes_propensity(split["train_UxI"], split["test_UxI"]))
    y, p = sim.ratings_UxI, sim.propensities_UxI
    true = np.array([p[y == r].mean() for r in range(1, 6)])
    n_mar = np.array([np.sum(split["test_UxI"] == r) for r in range(1, 6)])
    n_obs = np.array([np.sum(split["train_UxI"] == r) for r in range(1, 6)])
    q_mar, q_obs = n_mar / n_mar.sum(), n_obs / n_obs.sum()
    se = np.sqrt((1 - q_mar) / n_mar + (1 - q_obs) / n_obs)
    np.testing.assert_array_less(np.abs(np.log(est / true)), 3 * se)
    cells = np.asarray(causal.rating_propensities(est, split["train_UxI"]))
    observed = split["observed_UxI"]
    np.testing.assert_allclose(cells[observed], est[split["train_UxI"][observed] - 1], rtol=1e-6)
    self.assertTrue(np.all(cells[~observed] == 1.0))

  def test_logistic_recovers_popularity_and_activity_exposure(self):
    # Exposure here is P = k a_u m_i (log-linear in the features log a_u, log m_i). A logistic link
    # differs from it by -log(1 - P), ~3% at the median propensity, and three coefficients fitted on
    # ~4,300 positives carry ~1-2% sampling error: the median relative error may be 10%. The item
    # frequency estimate (O_i / |U|) and the popularity weights are ~40% off (measured), for contrast.
    sim = causal.RatingSimulator(causal.schnabel_config(alpha=1.0, popularity_on_exposure=1.0, activity_sigma=0.5))
    observed = sim.sample_observed(0)
    x, z = sim.log_activity_U[:, None], sim.log_popularity_TxI[0][:, None]
    params = causal.logistic_propensity_fit(observed, x, z)
    est = np.asarray(causal.logistic_propensity(params, x, z))
    rel = np.abs(est / sim.propensities_UxI - 1)
    self.assertLess(np.median(rel), 0.10)
    freq = np.broadcast_to(observed.mean(0, keepdims=True), observed.shape)
    self.assertGreater(np.median(np.abs(freq / sim.propensities_UxI - 1)), 3 * np.median(rel))
    self.assertAlmostEqual(float(est.mean()), float(observed.mean()), places=3)   # the intercept's score equation

  def test_logistic_fit_reaches_the_optimum(self):
    # At the optimum the gradient of the penalised mean log-loss vanishes: X^T (p - o) / N + 2 l2 w = 0.
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(30, 3)).astype(np.float32), rng.normal(size=(40, 2)).astype(np.float32)
    o = rng.random((30, 40)) < 0.2
    params = causal.logistic_propensity_fit(o, x, z, interactions=True, l2=1e-3)
    resid = np.asarray(causal.logistic_propensity(params, x, z)) - o
    n = o.size
    np.testing.assert_allclose(resid.sum() / n, 0.0, atol=1e-5)
    np.testing.assert_allclose(x.T @ resid.sum(1) / n + 2e-3 * np.asarray(params["user"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.T @ resid @ z / n + 2e-3 * np.asarray(params["interaction"]), 0.0, atol=1e-5)

  def test_popularity_propensity_is_recbole_debias_count_ratio(self):
    o = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], np.float32)
    got = np.asarray(causal.popularity_propensity(o, eta=0.5))
    counts = np.array([3, 1, 2, 1])   # the last item is never observed: it is given one observation
    np.testing.assert_allclose(got, np.broadcast_to((counts / 3) ** 0.5, o.shape), rtol=1e-6)
    by_user = np.asarray(causal.popularity_propensity(o, by="user"))
    np.testing.assert_allclose(by_user[:, 0], [1.0, 1.0, 1.0], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "observed_UxI has no observation"):
      causal.popularity_propensity(np.zeros_like(o))

  def test_bad_propensity_model_input_raises_naming_the_argument(self):
    train = np.array([[1, 0], [6, 2]])
    with self.assertRaisesRegex(ValueError, "train_UxI must hold integer ratings 1..5"):
      causal.naive_bayes_propensity(train, np.array([1, 2]))
    with self.assertRaisesRegex(ValueError, "mar_ratings holds no rating"):
      causal.naive_bayes_propensity(np.array([[1, 0], [3, 2]]), np.zeros(3))
    with self.assertRaisesRegex(ValueError, "item_features_IxG has 3 rows but observed_UxI has 2 items"):
      causal.logistic_propensity_fit(np.eye(2), np.ones((2, 1)), np.ones((3, 1)))


def _fit_mf(split, weights, *, steps=300, dim=4, l2=1e-3, lr=0.05, self_normalize=False):
  batch = causal.observed_batch(split["train_UxI"], split["observed_UxI"], weights)
  n_users, n_items = split["train_UxI"].shape
  mean = float(np.average(batch["ratings"], weights=batch["weights"]))
  tx, _ = jt.make_optimizer(lr, total_steps=steps, kind="adam", schedule="constant", clip_norm=None)
  state, _ = jt.init_train_state(lambda r: causal.mf_init(r, n_users, n_items, dim, global_bias=mean), tx,
                                 jax.random.PRNGKey(0))
  loss = functools.partial(causal.mf_ips_loss, l2=l2, self_normalize=self_normalize)
  step = jax.jit(jt.make_train_step(loss, tx, steps_per_call=50), donate_argnums=0)
  with tempfile.TemporaryDirectory() as workdir:
    result = jt.train(step, state, lambda s: batch, num_steps=steps, workdir=workdir, steps_per_call=50,
                      log_every=50, tensorboard=False, plot=False, print_fn=lambda s: None)
  return np.asarray(causal.mf_scores(result.state.params)), result


class MFIPSTest(chex.TestCase):

  def test_ips_weighted_batch_loss_is_the_ips_risk_and_snips_form_is_snips(self):
    sim = causal.RatingSimulator(causal.schnabel_config(n_users=40, n_items=50))
    split = sim.sample_split(0)
    o, p = split["observed_UxI"], split["propensities_UxI"]
    params = causal.mf_init(jax.random.PRNGKey(1), 40, 50, 3, global_bias=3.0)
    sq = np.square(np.asarray(causal.mf_scores(params)) - split["ratings_UxI"])
    batch = causal.observed_batch(split["train_UxI"], o, causal.ips_weights(o, p))
    loss, metrics = causal.mf_ips_loss(params, batch, None)
    self.assertAlmostEqual(float(loss), float(causal.ips_risk(sq, o, p)), places=4)
    snips, _ = causal.mf_ips_loss(params, batch, None, self_normalize=True)
    self.assertAlmostEqual(float(snips), float(causal.snips_risk(sq, o, p)), places=4)
    naive, _ = causal.mf_ips_loss(params, causal.observed_batch(split["train_UxI"], o), None, l2=0.1)
    penalty = 0.1 * sum(float(np.sum(np.square(params[k]))) for k in ("user", "item", "user_bias", "item_bias"))
    self.assertAlmostEqual(float(naive), float(causal.naive_risk(sq, o)) + penalty, places=4)
    self.assertEqual(float(metrics["l2_penalty"]), 0.0)

  def test_mf_ips_beats_naive_mf_on_the_mar_split_of_the_confounded_world(self):
    # Figures at these settings (seed 0): MAR MSE ~1.24 naive vs ~0.80 MF-IPS (true propensities).
    sim = causal.RatingSimulator(causal.confounded_config())
    split = sim.sample_split(0)
    o, p = split["observed_UxI"], split["propensities_UxI"]
    naive_scores, naive_run = _fit_mf(split, None)
    ips_scores, ips_run = _fit_mf(split, np.asarray(causal.ips_weights(o, p)))
    mse = {name: float(causal.masked_mse(np.clip(s, 1, 5), split["test_UxI"], split["mar_UxI"]))
           for name, s in (("naive", naive_scores), ("ips", ips_scores))}
    for run, weights in ((naive_run, None), (ips_run, causal.ips_weights(o, p))):
      batch = causal.observed_batch(split["train_UxI"], o, weights)
      start = causal.mf_init(jax.random.PRNGKey(0), *o.shape, 4, global_bias=float(np.average(
          batch["ratings"], weights=batch["weights"])))
      self.assertEqual(run.step, 300)
      self.assertLess(run.history[-1]["weighted_mse"], 0.5 * float(causal.mf_ips_loss(start, batch)[0]))
    self.assertLess(mse["ips"], 0.85 * mse["naive"], msg=str(mse))

  def test_bad_mf_input_raises_naming_the_argument(self):
    params = causal.mf_init(jax.random.PRNGKey(0), 3, 4, 2)
    with self.assertRaisesRegex(ValueError, "items_B must lie in \\[0, 4\\)"):
      causal.mf_apply(params, np.array([0, 1]), np.array([0, 4]))
    with self.assertRaisesRegex(ValueError, "batch lacks \\['weights'\\]"):
      causal.mf_ips_loss(params, {"users": np.array([0]), "items": np.array([0]), "ratings": np.array([1.0])})
    with self.assertRaisesRegex(ValueError, "observed_UxI has no observed cell"):
      causal.observed_batch(np.ones((3, 4)), np.zeros((3, 4)))


if __name__ == "__main__":
  absltest.main()
