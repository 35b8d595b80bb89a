"""jurity's IPS and DR replay estimates of a recommender's CTR, for parity with jaxml.recsys.causal (no jaxml import).

jurity 2.1.0 (`jurity.recommenders.CTR`) needs pandas < 3: its IPS and DR fill the
non-matching rows with `df[col].fillna(0, inplace=True)`, which under pandas 3's
copy-on-write changes a copy, so those rows stay NaN and every estimate with a
recommended but unlogged item is NaN (measured: 2.3.3 gives the formula's value, 3.1.1
NaN). The peer environment keeps pandas 3.1.1 for its other packages, so jurity and
pandas 2.3.3 live in their own folder, `<peer env>/jurity-pandas2`:

    .venv-peer/bin/pip install --no-deps --target .venv-peer/jurity-pandas2 \
        jurity==2.1.0 pandas==2.3.3 pytz==2026.6

(jurity's other requirements, cvxpy, numpy and scikit-learn, are the environment's own), and
this script puts that folder first on `sys.path` before importing pandas. Without it the
script returns `available: False` and the reason.

inputs: `actual__user`, `actual__item`, `actual__click`, `actual__propensity` (the log, one row
per logged pair); `predicted__user`, `predicted__item`, `predicted__score` (the recommender's
scores, one row per candidate pair). kwargs: `ks`, the list lengths (None: every row).
Returns `ips@k`, `dr@k` for each k (`CTR(click_column="click", k=k, estimation=...)`), and
`ips@k/no_propensity`, `dr@k/no_propensity` from the log without its propensity column (jurity then
assumes 1 / number of distinct logged items).
"""
import os
import sys

import numpy as np

JURITY_DIR = os.path.join(sys.prefix, "jurity-pandas2")


def _import():
  if os.path.isdir(JURITY_DIR):
    sys.path.insert(0, JURITY_DIR)
  try:
    import pandas as pd
    from jurity.recommenders import CTR
  except ImportError as e:
    return None, None, f"jurity not importable ({e}); install it into {JURITY_DIR} (this script's docstring)"
  if int(pd.__version__.split(".")[0]) >= 3:
    return None, None, f"pandas {pd.__version__} >= 3: jurity 2.1.0's IPS/DR return NaN (this script's docstring)"
  return pd, CTR, ""


def run(inputs, workdir, ks=(None,)):
  del workdir
  pd, CTR, reason = _import()
  if pd is None:
    return {"available": False, "reason": reason}
  import warnings
  warnings.simplefilter("ignore")                  # jurity's own FutureWarnings (chained inplace fillna)
  actual = pd.DataFrame({"user_id": inputs["actual__user"].astype(np.int64),
                         "item_id": inputs["actual__item"].astype(np.int64),
                         "click": inputs["actual__click"].astype(np.float64)})
  predicted = pd.DataFrame({"user_id": inputs["predicted__user"].astype(np.int64),
                            "item_id": inputs["predicted__item"].astype(np.int64),
                            "click": inputs["predicted__score"].astype(np.float64)})
  from jurity import _version
  out = {"available": True, "jurity_version": _version.__version__, "pandas_version": pd.__version__}
  logged = actual.assign(propensity=inputs["actual__propensity"].astype(np.float64))
  for k in ks:
    for est in ("ips", "dr"):
      metric = CTR(click_column="click", k=k, estimation=est)
      out[f"{est}@{k}"] = float(metric.get_score(logged.copy(), predicted.copy()))
      metric = CTR(click_column="click", k=k, estimation=est)
      out[f"{est}@{k}/no_propensity"] = float(metric.get_score(actual.copy(), predicted.copy()))
  return out
