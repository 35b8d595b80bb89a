"""linearmodels IV2SLS results for jaxml.causal parity tests (peer env only).

inputs: for each data set D, arrays D.y [n], D.w [n, kw], D.x [n, kx], D.z [n, kz],
D.clusters [n]. kwargs: cases = [{"data": D, "cov_type": ..., "debiased": bool}, ...].
Returns, for case i, arrays "i.params", "i.std_errors", "i.first_stage" (rows: endog;
columns: rsquared, partial.rsquared, shea.rsquared, f.stat, f.pval) and
"i.tests" (wu_hausman stat/pval, durbin stat/pval, sargan stat/pval, basmann stat/pval;
NaN when not defined), plus "mroz" (linearmodels' own copy of the data) and its columns.

pandas dtypes: kwargs `frames = {F: {arg: [[column, kind], ...]}}` describe DataFrames
per argument (dependent, exog, endog, instruments) built from inputs "F.<column>":
kind is a dtype name ("float64", "Int64", "Float64", "boolean") or a list of
category labels (the input then holds codes into it, giving a pd.Categorical with
that category order). `frame_cases = [{"frame": F, "cov_type": ..., "debiased": bool}, ...]`
give, for case i, "frame{i}.params", "frame{i}.std_errors", "frame{i}.first_stage",
"frame{i}.tests" as above and "frame{i}.names" (linearmodels' parameter names).
"""
import warnings

import numpy as np


def _column(values, kind):
  import pandas as pd
  if isinstance(kind, list):
    return pd.Categorical.from_codes(values.astype(int), categories=kind)
  return pd.array(values, dtype=kind) if kind != "float64" else values.astype(float)


def _frame(inputs, frame, columns):
  import pandas as pd
  return pd.DataFrame({name: _column(inputs[f"{frame}.{name}"], kind) for name, kind in columns})


def _record(out, key, res):
  out[f"{key}.params"] = res.params.to_numpy()
  out[f"{key}.std_errors"] = res.std_errors.to_numpy()
  diag = res.first_stage.diagnostics
  out[f"{key}.first_stage"] = diag[["rsquared", "partial.rsquared", "shea.rsquared", "f.stat",
                                    "f.pval"]].to_numpy(dtype=float)
  tests = []
  for t in (res.wu_hausman(), res.durbin(), res.sargan, res.basmann):
    stat = getattr(t, "stat", np.nan)
    tests += [stat, getattr(t, "pval", np.nan)]
  out[f"{key}.tests"] = np.asarray(tests, dtype=float)


def run(inputs, workdir, cases, frames=None, frame_cases=()):
  del workdir
  warnings.simplefilter("ignore")
  import pandas as pd
  from linearmodels.datasets import mroz
  from linearmodels.iv import IV2SLS
  out = {}
  for i, case in enumerate(frame_cases):
    f = case["frame"]
    spec = frames[f]
    dep = _frame(inputs, f, spec["dependent"])
    args = [dep.iloc[:, 0]] + [_frame(inputs, f, spec[a]) if spec[a] else None
                               for a in ("exog", "endog", "instruments")]
    kwargs = {"cov_type": case["cov_type"], "debiased": case["debiased"]}
    if case["cov_type"] == "clustered":
      kwargs["clusters"] = inputs[f"{f}.clusters"]
    res = IV2SLS(*args).fit(**kwargs)
    _record(out, f"frame{i}", res)
    out[f"frame{i}.names"] = [str(c) for c in res.params.index]
  for i, case in enumerate(cases):
    d = case["data"]
    y, w, x, z = (inputs[f"{d}.{k}"] for k in ("y", "w", "x", "z"))
    exog = pd.DataFrame(w, columns=[f"w{j}" for j in range(w.shape[1])]) if w.shape[1] else None
    endog = pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])])
    instr = pd.DataFrame(z, columns=[f"z{j}" for j in range(z.shape[1])])
    kwargs = {"cov_type": case["cov_type"], "debiased": case["debiased"]}
    if case["cov_type"] == "clustered":
      kwargs["clusters"] = inputs[f"{d}.clusters"]
    res = IV2SLS(pd.Series(y, name="y"), exog, endog, instr).fit(**kwargs)
    _record(out, str(i), res)
  frame = mroz.load()
  out["mroz"] = frame.to_numpy(dtype=float)
  out["mroz_columns"] = list(map(str, frame.columns))
  return out
