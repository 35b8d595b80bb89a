"""Bayesian IV (NUTS, LKJ) and the SCM simulators' interventional ground truth."""
import numpy as np
import pytest
from absl.testing import absltest

from jaxml import causal
from jaxml.causal import scm


def test_bayesian_iv_agrees_with_2sls_and_diagnoses_convergence():
  n = 150
  d = scm.simulate(scm.confounded_iv, 0, n=n, beta=1.0, confounding=1.0)
  post = causal.bayesian_iv(d["y"], d["w"], d["x"], d["z"], num_warmup=120, num_samples=120, num_chains=2)
  res = causal.iv2sls(d["y"], np.c_[np.ones(n), d["w"]], d["x"], d["z"])
  effect = post.effects[0]
  assert effect.lower < 1.0 < effect.upper                           # covers the truth
  assert abs(effect.mean - res.params[-1]) < 0.5 * res.std_errors[-1]  # agrees with 2SLS
  np.testing.assert_allclose(effect.sd, res.std_errors[-1], rtol=0.35)
  assert post.rho.lower > 0.0                                        # found the confounding
  assert effect.r_hat < 1.05 and effect.ess > 50 and effect.ess_per_second > 0
  assert effect.samples.shape == (2, 120)
  assert "r_hat" in post.summary()


def test_bayesian_iv_bad_input():
  d = scm.simulate(scm.confounded_iv, 0, n=50)
  with pytest.raises(ValueError, match=r"underidentified"):
    causal.bayesian_iv(d["y"], None, np.c_[d["x"], d["w"]], d["z"][:, :1])
  y = d["y"].copy()
  y[0] = np.nan
  with pytest.raises(ValueError, match=r"dependent contains NaN"):
    causal.bayesian_iv(y, None, d["x"], d["z"])


def test_do_intervention_gives_structural_effect():
  """handlers.do cuts X from its causes: the interventional slope is beta, the observational one is not."""
  effect = scm.average_effect(scm.confounded_iv, 0, treatment="x", outcome="y", n=20000, beta=1.5)
  np.testing.assert_allclose(effect, 1.5, atol=1e-4)   # common random numbers: exact up to float error
  obs = scm.simulate(scm.confounded_iv, 1, n=20000, beta=1.5)
  assert np.polyfit(obs["x"], obs["y"], 1)[0] > 1.6
  under_do = scm.simulate(scm.confounded_iv, 1, n=20000, do={"x": 2.0})
  np.testing.assert_array_equal(under_do["x"], np.full(20000, 2.0, np.float32))
  assert abs(np.corrcoef(under_do["u"], under_do["z"][:, 0])[0, 1]) < 0.05


def test_icp_environments_shift_only_non_targets():
  d = scm.icp_data(0, n_per_env=2000)
  resid = d["y"] - (d["x"][:, 0] - 0.8 * d["x"][:, 1])
  for e in range(3):   # Y | parents is invariant across environments
    np.testing.assert_allclose(resid[d["env"] == e].mean(), 0.0, atol=0.1)
    np.testing.assert_allclose(resid[d["env"] == e].std(), 1.0, atol=0.1)


if __name__ == "__main__":
  absltest.main()
