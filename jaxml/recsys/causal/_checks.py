"""Input checks shared by the estimators, propensity models and metrics.

Every check runs before any compute and raises `ValueError` naming the
argument. Shape checks always run (shapes are static under `jax.jit`); value
checks run only where the array is concrete (not a tracer), so every public
function stays jit-able and vmap-able.
"""
from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` holds values (not a tracer inside jit / vmap / grad)."""
  return not isinstance(x, jax.core.Tracer)


def same_shape(ref_name: str, ref, **others) -> None:
  """Raises unless every array in `others` has the shape of `ref` (None entries: optional, skipped)."""
  for name, value in others.items():
    if value is not None and np.shape(value) != np.shape(ref):
      raise ValueError(f"{name} has shape {tuple(np.shape(value))} but {ref_name} has shape "
                       f"{tuple(np.shape(ref))}; they must match")


def matrix(name: str, x) -> None:
  """Raises unless `x` is 2-D (users x items)."""
  if np.ndim(x) != 2:
    raise ValueError(f"{name} must be a [users, items] matrix, got shape {tuple(np.shape(x))}")


def mask(name: str, x) -> None:
  """Raises unless `x` is boolean or holds only 0 and 1 (where concrete)."""
  if not is_concrete(x) or np.asarray(x).dtype == bool:
    return
  v = np.asarray(x)
  if not np.all((v == 0) | (v == 1)):
    bad = np.unique(v[(v != 0) & (v != 1)])[:5]
    raise ValueError(f"{name} must be a 0/1 (or boolean) mask; found values {bad.tolist()}")


def propensities(name: str, p) -> None:
  """Raises unless every entry of `p` lies in (0, 1] (where concrete; NaN fails too)."""
  if not is_concrete(p):
    return
  v = np.asarray(p, np.float64)
  ok = (v > 0) & (v <= 1)
  if not np.all(ok):
    bad = v[~ok]
    raise ValueError(f"{name} must lie in (0, 1]; {bad.size} entries do not (e.g. {bad[:3].tolist()}); "
                     "a zero propensity means the cell can never be observed and no reweighting can "
                     "recover it")


def clip_value(clip) -> None:
  """Raises unless `clip` (a minimum propensity) is None or in (0, 1]."""
  if clip is None or not is_concrete(clip):
    return
  if not 0.0 < float(clip) <= 1.0:
    raise ValueError(f"clip (the minimum propensity) must lie in (0, 1], got {clip}")


def ids_in_range(name: str, ids, n: int) -> None:
  """Raises unless every id lies in [0, n) (where concrete)."""
  if not is_concrete(ids) or np.size(ids) == 0:
    return
  v = np.asarray(ids)
  if not np.issubdtype(v.dtype, np.integer):
    raise ValueError(f"{name} must hold integer ids, got dtype {v.dtype}")
  lo, hi = int(v.min()), int(v.max())
  if lo < 0 or hi >= n:
    raise ValueError(f"{name} must lie in [0, {n}); found ids from {lo} to {hi}")


def warn_mar_overlap(train_name: str, train_mask, test_name: str, test_mask) -> int:
  """Warns (UserWarning) when the test cells overlap the cells a model trained on; returns the overlap count.

  An evaluation on a missing-at-random split reads as unbiased only for cells the model did not
  fit; Coat's published split itself shares 366 cells between train and test.
  """
  import warnings
  same_shape(train_name, train_mask, **{test_name: test_mask})
  if not (is_concrete(train_mask) and is_concrete(test_mask)):
    return 0
  n = int(np.count_nonzero(np.asarray(train_mask).astype(bool) & np.asarray(test_mask).astype(bool)))
  if n:
    warnings.warn(f"{test_name} shares {n} cells with {train_name} (the cells the model trained on): the test "
                  "metric on those cells is not an out-of-sample estimate", UserWarning, stacklevel=3)
  return n
