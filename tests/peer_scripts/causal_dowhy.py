"""dowhy frontdoor two-stage regression for jaxml.causal parity tests and benchmarks (peer env only).

inputs: "{i}.x", "{i}.m", "{i}.y" ([n] each) for i in range(count).
kwargs: count; repeats (timing runs per case, default 0).
Returns "{i}.effect" (float) and, with repeats, "{i}.seconds" (list of wall times of
CausalModel + identify_effect + estimate_effect on the full data).
"""
import logging
import time
import warnings


def _estimate(x, m, y):
  import pandas as pd
  from dowhy import CausalModel
  frame = pd.DataFrame({"X": x, "M": m, "Y": y})
  model = CausalModel(data=frame, treatment="X", outcome="Y",
                      graph='digraph {X->M; M->Y; U->X; U->Y; U [observed="no"];}')
  estimand = model.identify_effect(proceed_when_unidentifiable=True)
  return float(model.estimate_effect(estimand, method_name="frontdoor.two_stage_regression",
                                     treatment_value=1, control_value=0).value)


def run(inputs, workdir, count, repeats=0):
  del workdir
  warnings.simplefilter("ignore")
  logging.disable(logging.WARNING)
  out = {}
  for i in range(count):
    x, m, y = inputs[f"{i}.x"], inputs[f"{i}.m"], inputs[f"{i}.y"]
    out[f"{i}.effect"] = _estimate(x, m, y)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      _estimate(x, m, y)
      times.append(time.perf_counter() - start)
    out[f"{i}.seconds"] = times
  return out
