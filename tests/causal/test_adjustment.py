"""Backdoor and frontdoor adjustment: dowhy parity, recovery of the do-effect, numpyro posteriors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from absl.testing import absltest, parameterized

from jaxml import causal
from jaxml.causal import scm
from tests import peer

N = 4000


def _linear_cases():
  return [scm.simulate(scm.frontdoor_linear, seed, n=N, a=(a,), b=(b,))
          for seed, (a, b) in enumerate([(0.8, 1.5), (-0.4, 2.0), (1.2, -0.7)])]


@pytest.fixture(scope="module")
def dowhy_reference():
  cases = _linear_cases()
  inputs = {f"{i}.{k}": (d[k][:, 0] if k == "m" else d[k]) for i, d in enumerate(cases) for k in ("x", "m", "y")}
  return cases, peer.run("causal_dowhy", inputs, count=len(cases))


@pytest.mark.parametrize("index", range(3))
def test_linear_frontdoor_matches_dowhy_two_stage_regression(dowhy_reference, index):
  cases, ref = dowhy_reference
  d = cases[index]
  est = causal.frontdoor(d["y"], d["x"], d["m"])
  np.testing.assert_allclose(est.effect, ref[f"{index}.effect"], rtol=1e-6)


def _naive(d):
  return d["y"][d["x"] == 1].mean() - d["y"][d["x"] == 0].mean()


def test_multi_mediator_frontdoor_recovers_truth_where_naive_is_biased():
  a, b = (0.8, -0.5, 0.3), (1.5, 1.0, -2.0)
  d = scm.simulate(scm.frontdoor_linear, 11, n=N, a=a, b=b)
  truth = scm.average_effect(scm.frontdoor_linear, 12, treatment="x", outcome="y", n=20000, a=a, b=b)
  np.testing.assert_allclose(truth, float(np.dot(a, b)), atol=1e-3)   # do() reproduces the SCM's effect
  est = causal.frontdoor(d["y"], d["x"], d["m"])
  assert est.lower < truth < est.upper
  naive = np.polyfit(d["x"], d["y"], 1)[0]
  assert abs(naive - truth) > 5 * est.std_error


def test_discrete_frontdoor_recovers_truth():
  d = scm.simulate(scm.frontdoor_binary, 0, n=N)
  truth = scm.average_effect(scm.frontdoor_binary, 1, treatment="x", outcome="y", n=200_000)
  est = causal.frontdoor(d["y"], d["x"], d["m"], method="discrete")
  assert est.lower < truth < est.upper
  assert abs(_naive(d) - truth) > 3 * est.std_error


def test_backdoor_discrete_and_gformula_recover_truth():
  d = scm.simulate(scm.backdoor_discrete, 0, n=N, tau=2.0)
  for method in ("discrete", "gformula"):
    est = causal.backdoor(d["y"], d["x"], d["z"], method=method, interactions=False)
    assert est.lower < 2.0 < est.upper, (method, est)
  assert _naive(d) - 2.0 > 10 * est.std_error


def test_gformula_with_effect_modification_covers_truth_over_seeds():
  hits = 0
  for seed in range(20):
    d = scm.simulate(scm.backdoor_continuous, 50 + seed, n=1000, tau=1.0, modifier=0.5)
    est = causal.backdoor(d["y"], d["x"], d["z"], method="gformula")
    hits += est.lower < 1.0 < est.upper
  assert hits >= 16


def test_discrete_plugin_equals_stratified_difference_by_hand():
  d = scm.simulate(scm.backdoor_discrete, 3, n=1000)
  d["y"] = d["y"].astype(np.float64)
  by_hand = sum(np.mean(d["z"] == s) * (d["y"][(d["x"] == 1) & (d["z"] == s)].mean()
                                         - d["y"][(d["x"] == 0) & (d["z"] == s)].mean()) for s in range(3))
  np.testing.assert_allclose(causal.backdoor(d["y"], d["x"], d["z"]).effect, by_hand, rtol=1e-10)


def test_posteriors_cover_truth_and_agree_with_plugin():
  """Exact (conjugate) posterior draws pushed through the formulas: cover the truth, match the plug-in."""
  fd = scm.simulate(scm.frontdoor_binary, 4, n=N)
  truth = scm.average_effect(scm.frontdoor_binary, 1, treatment="x", outcome="y", n=200_000)
  post = causal.frontdoor_posterior(fd["y"], fd["x"], fd["m"], num_samples=1000)
  plug = causal.frontdoor(fd["y"], fd["x"], fd["m"], method="discrete")
  assert post.lower < truth < post.upper
  assert abs(post.mean - plug.effect) < 0.2 * plug.std_error
  np.testing.assert_allclose(post.sd, plug.std_error, rtol=0.15)   # Bernstein-von Mises vs delta method
  bd = scm.simulate(scm.backdoor_discrete, 5, n=N)
  post = causal.backdoor_posterior(bd["y"], bd["x"], bd["z"], num_samples=1000)
  assert post.lower < 2.0 < post.upper


def test_nuts_posterior_agrees_with_exact_posterior():
  """The same numpyro model by NUTS and by conjugate sampling gives the same posterior."""
  fd = scm.simulate(scm.frontdoor_binary, 6, n=N)
  exact = causal.frontdoor_posterior(fd["y"], fd["x"], fd["m"], num_samples=1000)
  nuts = causal.frontdoor_posterior(fd["y"], fd["x"], fd["m"], inference="nuts", num_warmup=100,
                                    num_samples=100)
  assert abs(nuts.mean - exact.mean) < 0.3 * exact.sd
  np.testing.assert_allclose(nuts.sd, exact.sd, rtol=0.3)
  assert nuts.r_hat < 1.05 and nuts.ess > 50


class LinearMomentsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_stage_coefficients_are_ols(self):
    d = scm.simulate(scm.frontdoor_linear, 8, n=500, a=(0.5, 1.0), b=(1.0, -1.0))
    data = np.c_[np.ones(500), d["x"], d["m"], d["y"]].astype(np.float64)
    with jax.enable_x64(True):
      out = self.variant(causal.adjustment.frontdoor_linear_moments)(jnp.asarray(data))
    x1 = np.c_[np.ones(500), d["x"]].astype(np.float64)
    a = np.linalg.lstsq(x1, d["m"].astype(np.float64), rcond=None)[0][1]
    b = np.linalg.lstsq(np.c_[np.ones(500), d["m"], d["x"]].astype(np.float64), d["y"], rcond=None)[0][1:3]
    np.testing.assert_allclose(np.asarray(out["a"]), a, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(out["b"]), b, rtol=1e-8)


class BadInputTest(absltest.TestCase):

  def test_positivity_violation_names_stratum(self):
    d = scm.simulate(scm.backdoor_discrete, 0, n=300)
    x = d["x"].copy()
    x[d["z"] == 2] = 1
    with self.assertRaisesRegex(ValueError, r"positivity violated.*stratum z=\[2"):
      causal.backdoor(d["y"], x, d["z"])

  def test_mismatched_rows_and_nan(self):
    d = scm.simulate(scm.frontdoor_linear, 0, n=300)
    with self.assertRaisesRegex(ValueError, r"x has 299 rows"):
      causal.frontdoor(d["y"], d["x"][:-1], d["m"])
    y = d["y"].copy()
    y[1] = np.nan
    with self.assertRaisesRegex(ValueError, r"y contains NaN"):
      causal.frontdoor(y, d["x"], d["m"])

  def test_categorical_and_nullable_columns(self):
    # Outside iv2sls a Categorical is not silently read as numbers: it raises, saying how to encode it;
    # nullable Int64 columns are read as their numbers.
    d = scm.simulate(scm.backdoor_discrete, 0, n=300)
    z = pd.Series(pd.Categorical(d["z"]), name="z")
    with self.assertRaisesRegex(TypeError, r"z column 'z' is categorical.*encode it"):
      causal.backdoor(d["y"], d["x"], z)
    a = causal.backdoor(d["y"], d["x"], pd.Series(pd.array(d["z"].astype(int), dtype="Int64")))
    b = causal.backdoor(d["y"], d["x"], d["z"])
    self.assertAlmostEqual(a.effect, b.effect, places=12)

  def test_unknown_treatment_level(self):
    d = scm.simulate(scm.frontdoor_binary, 0, n=300)
    with self.assertRaisesRegex(ValueError, r"treatment=5"):
      causal.frontdoor(d["y"], d["x"], d["m"], method="discrete", treatment=5)


if __name__ == "__main__":
  absltest.main()
