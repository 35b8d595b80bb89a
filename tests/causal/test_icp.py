"""Invariant causal prediction: parity with causalicp, the coverage guarantee, the all-rejected outcome."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from jaxml import causal
from jaxml.causal import scm
from tests import peer

N_PER_ENV = 100
SEEDS = range(6)


def _violated(seed):
  """Y itself is shifted in environment 2: no set is invariant."""
  d = scm.icp_data(seed, n_per_env=N_PER_ENV)
  d["y"] = d["y"] + 3.0 * (d["env"] == 2)
  return d


def _cases():
  cases = [scm.icp_data(seed, n_per_env=N_PER_ENV) for seed in SEEDS]
  cases.append(_violated(99))
  return cases


@pytest.fixture(scope="module")
def reference():
  cases = _cases()
  inputs = {f"{i}.{k}": d[k] for i, d in enumerate(cases) for k in ("x", "y", "env")}
  return cases, peer.run("causal_icp", inputs, count=len(cases))


@pytest.mark.parametrize("index", range(len(SEEDS) + 1))
def test_accepted_sets_match_causalicp(reference, index):
  cases, ref = reference
  d = cases[index]
  res = causal.icp(d["x"], d["y"], d["env"])
  assert sorted(sorted(s) for s in res.accepted_sets) == ref[f"{index}.accepted"]
  assert (None if res.estimate is None else sorted(res.estimate)) == ref[f"{index}.estimate"]
  if res.conf_intervals is None:
    assert np.isnan(ref[f"{index}.ci"]).all()
  else:
    np.testing.assert_allclose(res.conf_intervals, ref[f"{index}.ci"], rtol=1e-6, atol=1e-9)


def test_estimate_within_true_parents_at_promised_rate():
  """P(S_hat subset of {0, 1}) >= 1 - alpha; with alpha = 0.2 over 40 seeds allow sampling noise."""
  alpha, reps = 0.2, 40
  inside = 0
  for seed in range(reps):
    d = scm.icp_data(1000 + seed, n_per_env=N_PER_ENV)
    res = causal.icp(d["x"], d["y"], d["env"], alpha=alpha)
    inside += res.estimate is not None and res.estimate <= {0, 1}
  assert inside / reps >= 1 - alpha - 0.1


def test_all_rejected_is_reported_clearly():
  d = _violated(5)
  res = causal.icp(d["x"], d["y"], d["env"])
  assert res.all_rejected and res.estimate is None and res.conf_intervals is None
  np.testing.assert_array_equal(res.pvalues, np.ones(3))
  assert "no invariant set" in res.summary()


def test_list_input_equals_label_input():
  d = scm.icp_data(3, n_per_env=N_PER_ENV)
  envs = np.unique(d["env"])
  a = causal.icp(d["x"], d["y"], d["env"])
  b = causal.icp([d["x"][d["env"] == e] for e in envs], [d["y"][d["env"] == e] for e in envs])
  assert a.accepted_sets == b.accepted_sets
  np.testing.assert_allclose(a.conf_intervals, b.conf_intervals, rtol=1e-12)


class SetTestsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_set_pvalue_is_welch_and_f(self):
    """For S = {} the residuals are y - mean(y): compare with scipy's tests directly."""
    from scipy import stats
    d = scm.icp_data(4, n_per_env=N_PER_ENV)
    masks = np.zeros((1, 3), bool)
    fn = lambda x, y, e, m: causal.icp_module.icp_set_tests(x, y, e, m, n_envs=3)
    with jax.enable_x64(True):
      out = self.variant(fn)(jnp.asarray(d["x"], jnp.float64), jnp.asarray(d["y"], jnp.float64),
                             jnp.asarray(d["env"]), jnp.asarray(masks))
    r = d["y"].astype(np.float64) - d["y"].mean()
    pvals = []
    for e in range(3):
      inside, outside = r[d["env"] == e], r[d["env"] != e]
      pvals.append(stats.ttest_ind(inside, outside, equal_var=False).pvalue)
      f = np.var(inside, ddof=1) / np.var(outside, ddof=1)
      cdf = stats.f.cdf(f, len(inside) - 1, len(outside) - 1)
      pvals.append(2 * min(cdf, 1 - cdf))
    np.testing.assert_allclose(float(out["pvalue"][0]), min(pvals), rtol=1e-8)


class BadInputTest(absltest.TestCase):

  def test_empty_environment(self):
    d = scm.icp_data(0, n_per_env=20)
    with self.assertRaisesRegex(ValueError, r"environment 1 is empty"):
      causal.icp([d["x"][:20], d["x"][:0]], [d["y"][:20], d["y"][:0]])

  def test_single_row_environment(self):
    d = scm.icp_data(0, n_per_env=20)
    env = d["env"].copy()
    env[0] = 7
    with self.assertRaisesRegex(ValueError, r"fewer than 2 rows"):
      causal.icp(d["x"], d["y"], env)

  def test_one_environment_and_nan(self):
    d = scm.icp_data(0, n_per_env=20)
    with self.assertRaisesRegex(ValueError, r"at least 2 environments"):
      causal.icp(d["x"], d["y"], np.zeros(len(d["y"])))
    x = d["x"].copy()
    x[3, 0] = np.nan
    with self.assertRaisesRegex(ValueError, r"x contains NaN"):
      causal.icp(x, d["y"], d["env"])


if __name__ == "__main__":
  absltest.main()
