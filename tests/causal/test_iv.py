"""2SLS: parity with linearmodels IV2SLS, invariants, Anderson-Rubin, bad input."""
import warnings

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

RTOL = 1e-6
N = 400  # one row count (and few column layouts) across tests keeps XLA compilations few
CASES = [dict(data=d, cov_type=c, debiased=b) for d in ("mroz", "sim")
         for c in ("unadjusted", "robust", "clustered") for b in (False, True)]


def _mroz():
  frame = causal.load_mroz().dropna(subset=["lwage"]).reset_index(drop=True)
  frame["const"] = 1.0
  return frame


def _simulated(seed=0, n=400):
  """Two endogenous regressors, three instruments, heteroskedastic errors, 40 clusters."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=n)
  z = rng.normal(size=(n, 3))
  w = np.c_[np.ones(n), rng.normal(size=(n, 2))]
  x = np.c_[z @ [0.8, 0.5, 0.3] + w[:, 1] + u + rng.normal(size=n), z @ [0.2, -0.6, 0.4] + rng.normal(size=n)]
  y = x @ [1.0, -0.5] + w @ [0.3, 0.2, -0.1] + 2 * u + rng.normal(size=n) * (1 + np.abs(z[:, 0]))
  return {"y": y, "w": w, "x": x, "z": z, "clusters": rng.integers(0, 40, size=n)}


# pandas dtypes linearmodels codes for itself: Categorical columns (category order deliberately not sorted, so
# "first category" and "first in sorted order" differ), nullable Int64 / Float64 / boolean. A list is a
# Categorical's categories (the data hold codes into it).
_EXOG = [["region", ["south", "north", "west"]], ["size", "Int64"], ["flag", "boolean"]]
_REST = {"dependent": [["y", "Float64"]], "endog": [["x", "float64"], ["treat", ["no", "yes"]]],
         "instruments": [["z1", "Float64"], ["zc", ["mid", "low", "high"]], ["zi", "Int64"]]}
FRAMES = {"mixed": dict(_REST, exog=[["const", "float64"]] + _EXOG),
          "mixed_noconst": dict(_REST, exog=_EXOG)}  # without a constant linearmodels still drops the first level
FRAME_CASES = [dict(frame=f, cov_type=c, debiased=b) for f in FRAMES for c in ("unadjusted", "robust", "clustered")
               for b in (False, True)]


def _mixed_arrays(seed=3, n=N):
  """Columns of the pandas-dtype frames: codes for the categoricals, values for the rest."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=n)
  cols = {"const": np.ones(n), "region": rng.integers(0, 3, n), "size": rng.integers(1, 6, n),
          "flag": rng.random(n) < 0.4, "z1": rng.normal(size=n), "zc": rng.integers(0, 3, n),
          "zi": rng.integers(0, 4, n)}
  zc = cols["zc"]
  cols["x"] = (cols["z1"] + 0.8 * (zc == 1) - 0.6 * (zc == 2) + 0.3 * cols["zi"] + 0.2 * cols["size"] + u
               + rng.normal(size=n))
  cols["treat"] = (0.8 * cols["z1"] + 0.7 * (zc == 2) + 0.4 * cols["zi"] - 0.6 + u + rng.normal(size=n) > 0)
  cols["treat"] = cols["treat"].astype(int)
  cols["y"] = (1.0 + 0.7 * cols["x"] + 1.5 * cols["treat"] + np.array([0.0, 0.5, -0.3])[cols["region"]]
               + 0.1 * cols["size"] + 0.4 * cols["flag"] + 2 * u + rng.normal(size=n) * (1 + np.abs(cols["z1"])))
  cols["clusters"] = rng.integers(0, 40, size=n)
  return cols


def _frame(cols, spec):
  """The DataFrame `spec` describes (as tests/peer_scripts/causal_linearmodels.py builds it)."""
  def column(values, kind):
    if isinstance(kind, list):
      return pd.Categorical.from_codes(values.astype(int), categories=kind)
    return values.astype(float) if kind == "float64" else pd.array(values, dtype=kind)
  return pd.DataFrame({name: column(cols[name], kind) for name, kind in spec})


def _datasets():
  m = _mroz()
  return {"mroz": {"y": m.lwage.to_numpy(), "w": m[["const", "exper", "expersq"]].to_numpy(),
                   "x": m[["educ"]].to_numpy(), "z": m[["fatheduc", "motheduc"]].to_numpy(),
                   "clusters": m.age.to_numpy()},
          "sim": _simulated()}


@pytest.fixture(scope="module")
def reference():
  """One peer process for the module: linearmodels on every case."""
  data = _datasets()
  inputs = {f"{d}.{k}": v for d, arrays in data.items() for k, v in arrays.items()}
  inputs.update({f"{f}.{k}": v for f in FRAMES for k, v in _mixed_arrays().items()})
  return data, peer.run("causal_linearmodels", inputs, cases=CASES, frames=FRAMES, frame_cases=FRAME_CASES)


def _fit(arrays, cov_type, debiased):
  return causal.iv2sls(arrays["y"], arrays["w"], arrays["x"], arrays["z"], cov_type=cov_type,
                       debiased=debiased, clusters=arrays["clusters"] if cov_type == "clustered" else None)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c['data']}-{c['cov_type']}-{c['debiased']}"
                                                          for c in CASES])
def test_parity_with_linearmodels(reference, index):
  data, ref = reference
  case = CASES[index]
  res = _fit(data[case["data"]], case["cov_type"], case["debiased"])
  np.testing.assert_allclose(res.params, ref[f"{index}.params"], rtol=RTOL)
  np.testing.assert_allclose(res.std_errors, ref[f"{index}.std_errors"], rtol=RTOL)
  fs = res.first_stage
  mine = np.c_[fs.rsquared, fs.partial_rsquared, fs.shea_rsquared, fs.partial_f, fs.partial_f_pvalue]
  np.testing.assert_allclose(mine, ref[f"{index}.first_stage"], rtol=RTOL, atol=1e-300)
  tests = [res.wu_hausman.statistic, res.wu_hausman.pvalue, res.durbin.statistic, res.durbin.pvalue]
  tests += ([res.sargan.statistic, res.sargan.pvalue, res.basmann.statistic, res.basmann.pvalue]
            if res.sargan else [np.nan] * 4)
  np.testing.assert_allclose(tests, ref[f"{index}.tests"], rtol=RTOL, atol=1e-300)


@pytest.mark.parametrize("index", range(len(FRAME_CASES)),
                         ids=[f"{c['frame']}-{c['cov_type']}-{c['debiased']}" for c in FRAME_CASES])
def test_pandas_dtypes_parity_with_linearmodels(reference, index):
  """Categorical columns expand to linearmodels' dummies; nullable Int64/Float64/boolean are its numbers."""
  _, ref = reference
  case = FRAME_CASES[index]
  cols, spec = _mixed_arrays(), FRAMES[case["frame"]]
  res = causal.iv2sls(_frame(cols, spec["dependent"])["y"], _frame(cols, spec["exog"]), _frame(cols, spec["endog"]),
                      _frame(cols, spec["instruments"]), cov_type=case["cov_type"], debiased=case["debiased"],
                      clusters=cols["clusters"] if case["cov_type"] == "clustered" else None)
  assert list(res.names) == ref[f"frame{index}.names"]
  np.testing.assert_allclose(res.params, ref[f"frame{index}.params"], rtol=RTOL)
  np.testing.assert_allclose(res.std_errors, ref[f"frame{index}.std_errors"], rtol=RTOL)
  fs = res.first_stage
  mine = np.c_[fs.rsquared, fs.partial_rsquared, fs.shea_rsquared, fs.partial_f, fs.partial_f_pvalue]
  np.testing.assert_allclose(mine, ref[f"frame{index}.first_stage"], rtol=RTOL, atol=1e-300)
  tests = [res.wu_hausman.statistic, res.wu_hausman.pvalue, res.durbin.statistic, res.durbin.pvalue,
           res.sargan.statistic, res.sargan.pvalue, res.basmann.statistic, res.basmann.pvalue]
  np.testing.assert_allclose(tests, ref[f"frame{index}.tests"], rtol=RTOL, atol=1e-300)


def test_categorical_dummies_are_the_explicit_encoding():
  """A Categorical column gives the fit of its hand-made dummies (first category dropped), not of its codes."""
  cols = _mixed_arrays()
  region = pd.Categorical.from_codes(cols["region"], categories=["south", "north", "west"])
  by_hand = np.c_[np.ones(N), cols["region"] == 1, cols["region"] == 2]
  a = causal.iv2sls(cols["y"], pd.DataFrame({"const": 1.0, "region": region}), cols["x"], np.c_[cols["z1"], cols["zi"]])
  b = causal.iv2sls(cols["y"], by_hand, cols["x"], np.c_[cols["z1"], cols["zi"]])
  assert a.names == ("const", "region.north", "region.west", "endog")
  np.testing.assert_allclose(a.params, b.params, rtol=1e-10)
  np.testing.assert_allclose(a.std_errors, b.std_errors, rtol=1e-10)


def test_shipped_mroz_equals_linearmodels_copy(reference):
  _, ref = reference
  ours = causal.load_mroz()
  assert list(ours.columns) == ref["mroz_columns"]
  np.testing.assert_array_equal(ours.to_numpy(dtype=float), ref["mroz"])


def test_wooldridge_example_15_1():
  """Published numbers (Wooldridge, Example 15.1): IV educ 0.0591 (0.0351), first stage 0.2694 (0.0286)."""
  m = _mroz()
  res = causal.iv2sls(m.lwage, m[["const"]], m.educ, m.fatheduc, debiased=True)  # textbook s^2 uses n - k
  assert res.names == ("const", "educ")
  np.testing.assert_allclose(res.params[1], 0.059, atol=5e-4)
  np.testing.assert_allclose(res.std_errors[1], 0.035, atol=5e-4)
  ols = np.linalg.lstsq(np.c_[np.ones(len(m)), m.fatheduc], m.educ, rcond=None)[0]
  np.testing.assert_allclose(ols[1], 0.2694, atol=5e-5)


def test_summary_names_every_section():
  m = _mroz()
  text = causal.iv2sls(m.lwage, m[["const", "exper", "expersq"]], m.educ, m[["fatheduc", "motheduc"]],
                       cov_type="robust").summary()
  for part in ("educ", "expersq", "First stage", "Wu-Hausman", "Sargan", "Basmann", "Anderson-Rubin"):
    assert part in text


def test_wald_ratio_equals_2sls_with_one_instrument():
  d = scm.simulate(scm.confounded_iv, 0, n=N, strength=(0.7,))
  res = causal.iv2sls(d["y"], np.ones(N), d["x"], d["z"])
  np.testing.assert_allclose(causal.wald_ratio(d["y"], d["x"], d["z"]), res.params[1], rtol=1e-10)


def test_2sls_recovers_effect_where_ols_is_biased():
  d = scm.simulate(scm.confounded_iv, 1, n=N, beta=1.0)
  exog = np.c_[np.ones(N), d["w"]]
  res = causal.iv2sls(d["y"], exog, d["x"], d["z"], cov_type="robust")
  lo, hi = res.conf_int()[2]
  assert lo < 1.0 < hi
  ols = np.linalg.lstsq(np.c_[exog, d["x"]], d["y"], rcond=None)[0][2]
  assert ols - 1.0 > 3 * res.std_errors[2]          # confounding pushes OLS up
  assert res.wu_hausman.pvalue < 1e-3


def test_anderson_rubin_set_contains_truth_at_nominal_rate():
  """Over seeded simulations with weak-ish instruments, the 90% AR set covers beta >= ~90%."""
  hits = 0
  reps = 50
  for seed in range(reps):
    d = scm.simulate(scm.confounded_iv, 100 + seed, n=N, strength=(0.15, 0.05))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", causal.WeakInstrumentWarning)
      res = causal.iv2sls(d["y"], np.c_[np.ones(N), d["w"]], d["x"], d["z"], alpha=0.1)
    cs = res.anderson_rubin.confidence_set
    hits += any(lo <= 1.0 <= hi for lo, hi in cs)
    # The set is where the test does not reject: check the boundary point by point.
    assert (res.anderson_rubin_test(1.0, alpha=0.1).pvalue > 0.1) == any(lo <= 1.0 <= hi for lo, hi in cs)
  assert hits / reps >= 0.8


def test_anderson_rubin_bounded_when_strong_and_matches_test():
  d = scm.simulate(scm.confounded_iv, 7, n=N)
  res = causal.iv2sls(d["y"], np.c_[np.ones(N), d["w"]], d["x"], d["z"])
  ar = res.anderson_rubin
  assert ar.kind == "bounded"
  (lo, hi), = ar.confidence_set
  assert lo < res.params[-1] < hi
  for edge in (lo, hi):  # the test has p-value = alpha exactly on the boundary
    np.testing.assert_allclose(res.anderson_rubin_test(edge).pvalue, 0.05, rtol=1e-6)


def test_weak_instrument_warns_with_f_and_points_to_ar():
  d = scm.simulate(scm.confounded_iv, 3, n=N, strength=(0.05, 0.02))
  with pytest.warns(causal.WeakInstrumentWarning, match=r"partial F .* < 10.*Anderson-Rubin"):
    res = causal.iv2sls(d["y"], np.c_[np.ones(N), d["w"]], d["x"], d["z"])
  assert res.anderson_rubin.kind in ("real line", "union of two rays", "bounded")


def test_pandas_and_numpy_inputs_agree():
  m = _mroz()
  a = causal.iv2sls(m.lwage, m[["const", "exper"]], m[["educ"]], m[["fatheduc"]], cov_type="robust")
  b = causal.iv2sls(m.lwage.to_numpy(), m[["const", "exper"]].to_numpy(), m.educ.to_numpy(),
                    m.fatheduc.to_numpy(), cov_type="robust")
  np.testing.assert_allclose(a.params, b.params, rtol=1e-12)
  assert a.names == ("const", "exper", "educ") and b.names == ("exog.0", "exog.1", "endog")


def test_result_is_float64_without_global_x64():
  assert not jax.config.jax_enable_x64
  res = causal.iv2sls(*[_simulated()[k] for k in ("y", "w", "x", "z")])
  assert res.params.dtype == np.float64 and res.cov.dtype == np.float64


class ArraysTest(parameterized.TestCase):
  """The jitted pieces are pure functions: jit and no-jit agree; the fit ignores row order."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_core_variants_agree_with_wrapper(self):
    arrays = _simulated(1, n=N)
    ref = causal.iv2sls(arrays["y"], arrays["w"], arrays["x"], arrays["z"], cov_type="robust")
    d = causal.data_matrix(arrays["y"], arrays["w"], arrays["x"], arrays["z"])
    with jax.enable_x64(True):
      gram = self.variant(causal.iv_moments)(jnp.asarray(d))
      np.testing.assert_allclose(np.asarray(gram), d.T @ d, rtol=1e-12)
      out = causal.iv2sls_arrays(jnp.asarray(d), gram, sizes=(3, 2, 3), cov_type="robust")
    np.testing.assert_allclose(np.asarray(out["params"]), ref.params, rtol=1e-10)
    np.testing.assert_allclose(np.sqrt(np.diag(np.asarray(out["cov"]))), ref.std_errors, rtol=1e-10)

  def test_fit_invariant_to_row_permutation(self):
    arrays = _simulated(1, n=N)
    perm = np.random.default_rng(0).permutation(N)
    a = causal.iv2sls(*(arrays[k] for k in ("y", "w", "x", "z")), cov_type="clustered",
                      clusters=arrays["clusters"])
    b = causal.iv2sls(*(arrays[k][perm] for k in ("y", "w", "x", "z")), cov_type="clustered",
                      clusters=arrays["clusters"][perm])
    np.testing.assert_allclose(a.params, b.params, rtol=1e-10)
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-8)
    np.testing.assert_allclose(a.first_stage.partial_f, b.first_stage.partial_f, rtol=1e-8)


class BadInputTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.d = _simulated(2, n=N)

  def call(self, **over):
    args = {k: self.d[k] for k in ("y", "w", "x", "z")}
    args.update(over)
    return causal.iv2sls(args["y"], args["w"], args["x"], args["z"])

  def test_nan_names_argument_and_column(self):
    z = self.d["z"].copy()
    z[5, 1] = np.nan
    with self.assertRaisesRegex(ValueError, r"NaN or inf.*instruments column 'instruments.1'"):
      self.call(z=z)

  def test_inf_in_dependent(self):
    y = self.d["y"].copy()
    y[0] = np.inf
    with self.assertRaisesRegex(ValueError, r"NaN or inf.*dependent"):
      self.call(y=y)

  def test_mismatched_rows(self):
    with self.assertRaisesRegex(ValueError, r"endog has 399 rows but dependent has 400"):
      self.call(x=self.d["x"][:-1])

  def test_underidentified(self):
    with self.assertRaisesRegex(ValueError, r"underidentified: 1 instrument\(s\) for 2 endogenous"):
      self.call(z=self.d["z"][:, :1])

  def test_constant_instrument(self):
    z = self.d["z"].copy()
    z[:, 2] = 3.0
    with self.assertRaisesRegex(ValueError, r"instruments column 'instruments.2' is constant"):
      self.call(z=z)

  def test_collinear_instruments(self):
    z = self.d["z"].copy()
    z[:, 2] = 2 * z[:, 0] - z[:, 1]
    with self.assertRaisesRegex(ValueError, r"instruments are rank deficient"):
      self.call(z=z)

  def test_bad_cov_type_and_clusters(self):
    with self.assertRaisesRegex(ValueError, r"cov_type must be one of"):
      causal.iv2sls(self.d["y"], self.d["w"], self.d["x"], self.d["z"], cov_type="hac")
    with self.assertRaisesRegex(ValueError, r"needs clusters"):
      causal.iv2sls(self.d["y"], self.d["w"], self.d["x"], self.d["z"], cov_type="clustered")

  def test_non_numeric(self):
    with self.assertRaisesRegex(TypeError, r"instruments must be numeric.*'a'.*astype\('category'\)"):
      self.call(z=pd.DataFrame({"a": ["u"] * N}))

  def test_missing_in_nullable_column_names_argument_and_column(self):
    zi = pd.array(np.arange(N) % 5, dtype="Int64")
    zi[7] = pd.NA
    z = pd.DataFrame({"z0": self.d["z"][:, 0], "zi": zi, "z2": self.d["z"][:, 2]})
    with self.assertRaisesRegex(ValueError, r"instruments column 'zi' \(Int64\) has 1 missing value"):
      self.call(z=z)

  def test_missing_category_raises(self):
    g = pd.Categorical.from_codes(np.arange(N) % 3, categories=["a", "b", "c"])
    g[[3, 4]] = np.nan
    with self.assertRaisesRegex(ValueError, r"exog column 'g' has 2 missing value"):
      self.call(w=pd.DataFrame({"const": 1.0, "g": g}))

  def test_unused_category_is_named(self):
    g = pd.Categorical.from_codes(np.arange(N) % 2, categories=["a", "b", "unused"])
    with self.assertRaisesRegex(ValueError, r"rank deficient.*'g.unused'.*remove_unused_categories"):
      self.call(w=pd.DataFrame({"const": 1.0, "g": g}))

  def test_categorical_dependent_with_three_levels(self):
    y = pd.Series(pd.Categorical.from_codes(np.arange(N) % 3, categories=["a", "b", "c"]), name="y")
    with self.assertRaisesRegex(ValueError, r"dependent must have one column, got 2 \(y.b, y.c\)"):
      self.call(y=y)


if __name__ == "__main__":
  absltest.main()
