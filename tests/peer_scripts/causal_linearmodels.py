"""linearmodels IV2SLS results for jaxml.causal parity tests (peer env only).

inputs: for each data set D, arrays D.y [n], D.w [n, kw], D.x [n, kx], D.z [n, kz],
D.clusters [n]. kwargs: cases = [{"data": D, "cov_type": ..., "debiased": bool}, ...].
Returns, for case i, arrays "i.params", "i.std_errors", "i.first_stage" (rows: endog;
columns: rsquared, partial.rsquared, shea.rsquared, f.stat, f.pval) and
"i.tests" (wu_hausman stat/pval, durbin stat/pval, sargan stat/pval, basmann stat/pval;
NaN when not defined), plus "mroz" (linearmodels' own copy of the data) and its columns.
"""
import warnings

import numpy as np


def run(inputs, workdir, cases):
  del workdir
  warnings.simplefilter("ignore")
  import pandas as pd
  from linearmodels.datasets import mroz
  from linearmodels.iv import IV2SLS
  out = {}
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
    out[f"{i}.params"] = res.params.to_numpy()
    out[f"{i}.std_errors"] = res.std_errors.to_numpy()
    diag = res.first_stage.diagnostics
    out[f"{i}.first_stage"] = diag[["rsquared", "partial.rsquared", "shea.rsquared", "f.stat",
                                    "f.pval"]].to_numpy(dtype=float)
    tests = []
    for t in (res.wu_hausman(), res.durbin(), res.sargan, res.basmann):
      stat = getattr(t, "stat", np.nan)
      tests += [stat, getattr(t, "pval", np.nan)]
    out[f"{i}.tests"] = np.asarray(tests, dtype=float)
  frame = mroz.load()
  out["mroz"] = frame.to_numpy(dtype=float)
  out["mroz_columns"] = list(map(str, frame.columns))
  return out
