"""Real data shipped with jaxml.causal (see data/README.md for sources and licences)."""
from __future__ import annotations

import importlib.resources

import pandas as pd


def load_mroz() -> pd.DataFrame:
  """Mroz (1987) labour-supply data, 753 rows; `lwage` is NaN for the 325 women not working.

  Wooldridge Example 15.1 uses the 428 working women:
  `iv2sls(d.lwage, d[["const"]], d.educ, d.fatheduc)` after `d = load_mroz().dropna(subset=["lwage"])`
  and `d["const"] = 1.0`.
  """
  with importlib.resources.files("jaxml.causal").joinpath("data/mroz.csv").open("r") as f:
    return pd.read_csv(f)
