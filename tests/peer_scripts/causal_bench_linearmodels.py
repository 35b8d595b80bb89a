"""linearmodels IV2SLS timing for benchmarks/causal_bench.py (peer env only).

inputs: y [n], w [n, kw], x [n, kx], z [n, kz]. kwargs: repeats.
Times IV2SLS(...).fit(cov_type="robust") plus the diagnostics jaxml computes in the
same call (first-stage diagnostics, Wu-Hausman, Durbin, Sargan, Basmann).
Returns params and the wall seconds of each repeat.
"""
import time
import warnings

import numpy as np


def run(inputs, workdir, repeats=1):
  del workdir
  warnings.simplefilter("ignore")
  from linearmodels.iv import IV2SLS
  y, w, x, z = (inputs[k] for k in ("y", "w", "x", "z"))
  seconds, params = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    res = IV2SLS(y, w, x, z).fit(cov_type="robust")
    _ = res.std_errors, res.first_stage.diagnostics, res.wu_hausman(), res.durbin(), res.sargan, res.basmann
    seconds.append(time.perf_counter() - start)
    params = np.asarray(res.params)
  return {"params": params, "seconds": seconds}
