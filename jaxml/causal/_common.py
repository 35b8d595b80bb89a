"""Shared pieces of jaxml.causal: input conversion and checks, SPD solves, test-statistic records."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pandas as pd
from scipy import stats


class TestStatistic(NamedTuple):
  """A test result: `statistic ~ dist` under `null`.

  dist is "chi2" (df) or "F" (df, df_denom); pvalue is the upper tail.
  """
  statistic: float
  pvalue: float
  df: int
  df_denom: int | None
  dist: str
  null: str

  def __str__(self) -> str:
    dist = f"F({self.df},{self.df_denom})" if self.dist == "F" else f"chi2({self.df})"
    return f"{self.statistic:.4f} ({dist}, p={self.pvalue:.4g}); H0: {self.null}"


def chi2_test(stat: float, df: int, null: str) -> TestStatistic:
  stat = float(stat)
  return TestStatistic(stat, float(stats.chi2.sf(stat, df)), int(df), None, "chi2", null)


def f_test(stat: float, df: int, df_denom: int, null: str) -> TestStatistic:
  stat = float(stat)
  return TestStatistic(stat, float(stats.f.sf(stat, df, df_denom)), int(df), int(df_denom), "F", null)


CATEGORICAL = ("expand", "raise")


def _is_string(series) -> bool:
  return pd.api.types.is_string_dtype(series.dtype) and bool(series.map(lambda v: isinstance(v, str)).all())


def _dummies(name: str, label: str, series) -> tuple[np.ndarray, list[str]]:
  """Dummy columns of a Categorical, coded as linearmodels' IVData codes them.

  One float64 0/1 column per category except the first (in the Categorical's
  category order, not sorted and not the first seen), named "<column>.<category>";
  the same with or without a constant (`pd.get_dummies(s, drop_first=True)`).
  """
  codes = series.cat.codes.to_numpy()
  missing = int(np.sum(codes < 0))
  if missing:
    # linearmodels codes a missing category as the first level (all dummies 0) without a warning.
    raise ValueError(f"{name} column {label!r} has {missing} missing value(s) in a categorical column; drop or "
                     "impute those rows first (coding them as the base level would be silently wrong)")
  levels = list(series.cat.categories)
  block = (codes[:, None] == np.arange(1, len(levels))[None, :]).astype(np.float64)
  return block, [f"{label}.{c}" for c in levels[1:]]


def _column(name: str, label: str, series, categorical: str) -> tuple[np.ndarray, list[str]]:
  """One DataFrame column as float64 [n, m] (m > 1 only for an expanded Categorical) and its names."""
  dtype = series.dtype
  if isinstance(dtype, pd.CategoricalDtype):
    if categorical == "expand":
      return _dummies(name, label, series)
    raise TypeError(f"{name} column {label!r} is categorical ({len(dtype.categories)} levels); encode it "
                    "first: pd.get_dummies(column, drop_first=True, dtype=float) for indicators, or "
                    "column.astype(float) if the categories are numbers that mean what they say")
  if _is_string(series):
    hint = ("convert it with .astype('category') to expand it to dummies (first category dropped)"
            if categorical == "expand" else "encode it numerically first (e.g. pd.get_dummies)")
    raise TypeError(f"{name} must be numeric, got strings in column {label!r}; {hint}")
  if pd.api.types.is_complex_dtype(dtype):
    raise TypeError(f"{name} must be real, got complex dtype {dtype} in column {label!r}")
  if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
    raise TypeError(f"{name} must be numeric, got dtype {dtype} in column {label!r}")
  if isinstance(dtype, pd.api.extensions.ExtensionDtype):  # nullable Int64 / Float64 / boolean, ...
    missing = int(series.isna().sum())
    if missing:
      raise ValueError(f"{name} column {label!r} ({dtype}) has {missing} missing value(s) (pd.NA); drop or "
                       "impute those rows first")
    return series.to_numpy(dtype=np.float64)[:, None], [label]
  return np.asarray(series, dtype=np.float64)[:, None], [label]


def _frame(name: str, frame, categorical: str) -> tuple[np.ndarray, tuple[str, ...]]:
  labels = [str(c) for c in frame.columns]
  plain = all(isinstance(dt, np.dtype) and (np.issubdtype(dt, np.number) or dt == bool)
              and not np.issubdtype(dt, np.complexfloating) for dt in frame.dtypes)
  if plain:  # numpy numeric columns only: one copy
    return np.asarray(frame.to_numpy(dtype=np.float64)).reshape(len(frame), len(labels)), tuple(labels)
  blocks, names = [], []
  for j, label in enumerate(labels):
    block, block_names = _column(name, label, frame.iloc[:, j], categorical)
    blocks.append(block)
    names += block_names
  arr = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
  return arr, tuple(names)


def as_matrix(name: str, value: Any, nobs: int | None = None, *, allow_none: bool = True,
              categorical: str = "raise") -> tuple[np.ndarray, tuple[str, ...]]:
  """Converts an array, pandas Series/DataFrame or None to a float64 [n, k] array and its column names.

  pandas columns: numpy numeric and bool dtypes and the nullable extension dtypes
  (Int64, Float64, boolean, ...) are converted to float64; a pd.NA in a nullable
  column raises ValueError naming the argument and column (missing values are
  never dropped or imputed here).

  Args:
    name: the argument's name, used in errors and for unnamed columns.
    value: array-like, pandas Series or DataFrame, or None.
    nobs: rows the value must have (and the row count of None).
    allow_none: whether None (no columns) is accepted.
    categorical: what a pandas Categorical column becomes. "expand": dummy columns
      as linearmodels' IV models make them (the first category in category order is
      dropped, with or without a constant; names "<column>.<category>"); "raise":
      TypeError saying how to encode it.

  Returns:
    (array [n, k] float64, column names). Unnamed columns are called `name`
    (one column) or `name.j`.

  Raises:
    TypeError for non-numeric data, ValueError (naming `name`) for missing values in
    nullable or categorical columns, a wrong row count or a rank above 2.
  """
  if categorical not in CATEGORICAL:
    raise ValueError(f"categorical must be one of {CATEGORICAL}, got {categorical!r}")
  if value is None:
    if not allow_none:
      raise ValueError(f"{name} is required")
    if nobs is None:
      raise ValueError(f"{name}: cannot infer the number of rows")
    return np.zeros((nobs, 0)), ()
  names: tuple[str, ...] | None = None
  if isinstance(value, pd.api.extensions.ExtensionArray):  # e.g. a bare pd.Categorical or pd.array(..., "Int64")
    value = pd.Series(value)
  if isinstance(value, pd.Series):
    value = value.to_frame(name=value.name if value.name is not None else name)
  if isinstance(value, pd.DataFrame):
    arr, names = _frame(name, value, categorical)
  else:
    if hasattr(value, "columns") and hasattr(value, "to_numpy"):  # another DataFrame library
      names = tuple(str(c) for c in value.columns)
      value = value.to_numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
      raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
      raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
  if arr.ndim == 0:
    raise ValueError(f"{name} must be 1-D or 2-D, got a scalar")
  if arr.ndim == 1:
    arr = arr[:, None]
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
  if nobs is not None and arr.shape[0] != nobs:
    raise ValueError(f"{name} has {arr.shape[0]} rows but dependent has {nobs}: row counts must match")
  if names is None:
    names = (name,) if arr.shape[1] == 1 else tuple(f"{name}.{j}" for j in range(arr.shape[1]))
  return arr, names


def check_finite(name: str, arr: np.ndarray, names: Sequence[str] = ()) -> None:
  """Raises ValueError naming the argument (and column) that holds NaN or inf."""
  bad = ~np.isfinite(arr)
  if bad.any():
    cols = np.nonzero(bad.reshape(arr.shape[0], -1).any(axis=0))[0]
    label = ", ".join(names[c] if c < len(names) else str(c) for c in cols)
    raise ValueError(f"{name} contains NaN or inf (column(s): {label}, {int(bad.sum())} value(s)); "
                     "drop or impute those rows first")


def spd_solve(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Solves a x = b for symmetric positive definite a, with diagonal equilibration.

  a: [k, k]; b: [k] or [k, m]. Scaling by 1/sqrt(diag(a)) keeps Cholesky accurate
  when columns have very different units (e.g. exper and exper^2).
  """
  if a.shape[0] == 0:
    return b
  d = 1.0 / jnp.sqrt(jnp.diag(a))
  scaled = a * d[:, None] * d[None, :]
  chol = jnp.linalg.cholesky(scaled)
  rhs = b * (d[:, None] if b.ndim == 2 else d)
  y = jsl.cho_solve((chol, True), rhs)
  return y * (d[:, None] if b.ndim == 2 else d)


def spd_inv(a: jnp.ndarray) -> jnp.ndarray:
  return spd_solve(a, jnp.eye(a.shape[0], dtype=a.dtype))


def condition_ok(gram: np.ndarray, tol: float = 1e-11) -> tuple[bool, int]:
  """Whether a Gram matrix X'X has full rank: returns (full_rank, numerical rank).

  Works on the correlation-scaled matrix, so units do not matter; tol bounds the
  smallest eigenvalue relative to the largest (1e-11 ~ squared singular-value
  ratio 3e-6).
  """
  k = gram.shape[0]
  if k == 0:
    return True, 0
  diag = np.diag(gram)
  if np.any(diag <= 0):
    return False, int(np.sum(diag > 0))
  d = 1.0 / np.sqrt(diag)
  eig = np.linalg.eigvalsh(gram * d[:, None] * d[None, :])
  rank = int(np.sum(eig > tol * eig.max()))
  return rank == k, rank


def spans_constant(gram: np.ndarray, colsum: np.ndarray, nobs: int) -> bool:
  """Whether the columns (Gram `gram`, column sums `colsum`) span the constant vector.

  Regresses 1 on the columns using only cross products: the residual sum of
  squares is n - 1'X (X'X)^-1 X'1, and the constant is spanned when it is below
  1e-10 n (an angle below ~1e-5 radians).
  """
  if gram.shape[0] == 0:
    return False
  coef = np.linalg.lstsq(gram, colsum, rcond=None)[0]
  rss = nobs - colsum @ coef
  return bool(rss <= 1e-10 * nobs)
