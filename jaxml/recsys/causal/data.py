"""The Coat shopping data (Schnabel et al. 2016), shipped with jaxml.

Source: T. Schnabel, A. Swaminathan, A. Singh, N. Chandak, T. Joachims,
"Recommendations as Treatments: Debiasing Learning and Evaluation", ICML 2016;
collected by the authors and published for research use (cite the paper).
The files in `jaxml/recsys/data/coat/` are unchanged copies taken from the
public MIT-licensed repository DongHande/AutoDebias (`datasets/coat/`); see
`SOURCE.md` and the authors' `README.txt` there.

290 users x 300 coats. Train: each user rated 24 coats of their own choosing
(missing not at random). Test: each user rated 16 coats drawn uniformly at
random (missing at random). Ratings 1..5, 0 = missing.
"""
from __future__ import annotations

import importlib.resources

import numpy as np

COAT_SHAPE = (290, 300)


def _read(name: str, dtype) -> np.ndarray:
  with importlib.resources.files("jaxml.recsys").joinpath(f"data/coat/{name}").open("r") as f:
    return np.loadtxt(f, dtype=dtype, ndmin=2)


def _names(name: str) -> np.ndarray:
  text = importlib.resources.files("jaxml.recsys").joinpath(f"data/coat/{name}").read_text()
  return np.asarray([line.strip() for line in text.splitlines() if line.strip()])


def load_coat() -> dict:
  """Loads Coat from the package data (module docstring for its source).

  Returns:
    dict of numpy arrays:
      train_UxI: int32 [290, 300], self-selected ratings 1..5, 0 = missing.
      test_UxI: int32 [290, 300], ratings of uniformly random items, 0 = missing.
      propensities_UxI: float64 [290, 300], the authors' learned propensities.
      user_features_UxF: float32 [290, 14], one-hot (gender, age, location, fashion interest).
      item_features_IxG: float32 [300, 33], one-hot (gender, jacket type, colour, on front page).
      user_feature_names: str [14], item_feature_names: str [33] ("group:value").
  """
  out = {"train_UxI": _read("train.ascii", np.int32), "test_UxI": _read("test.ascii", np.int32),
         "propensities_UxI": _read("propensities.ascii", np.float64),
         "user_features_UxF": _read("user_item_features/user_features.ascii", np.float32),
         "item_features_IxG": _read("user_item_features/item_features.ascii", np.float32),
         "user_feature_names": _names("user_item_features/user_features_map.txt"),
         "item_feature_names": _names("user_item_features/item_features_map.txt")}
  for key in ("train_UxI", "test_UxI", "propensities_UxI"):
    if out[key].shape != COAT_SHAPE:
      raise ValueError(f"the shipped Coat {key} has shape {out[key].shape}, expected {COAT_SHAPE}: the package "
                       "data is damaged")
  return out
