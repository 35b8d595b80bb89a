"""causalicp accepted sets for jaxml.causal parity tests (peer env only).

inputs: "{i}.x" [n, p], "{i}.y" [n], "{i}.env" [n] for i in range(count).
Returns "{i}.accepted" (list of sorted lists), "{i}.estimate" (sorted list or None),
"{i}.ci" [2, p] (NaN if all rejected).
"""
import numpy as np


def run(inputs, workdir, count, alpha=0.05):
  del workdir
  import causalicp
  out = {}
  for i in range(count):
    x, y, env = inputs[f"{i}.x"], inputs[f"{i}.y"], inputs[f"{i}.env"]
    data = [np.c_[x[env == e], y[env == e]] for e in np.unique(env)]
    res = causalicp.fit(data, x.shape[1], alpha=float(alpha))
    out[f"{i}.accepted"] = sorted(sorted(int(v) for v in s) for s in res.accepted_sets)
    out[f"{i}.estimate"] = None if res.estimate is None else sorted(int(v) for v in res.estimate)
    ci = res.conf_intervals
    out[f"{i}.ci"] = np.full((2, x.shape[1]), np.nan) if ci is None else np.asarray(ci)[:, : x.shape[1]]
  return out
