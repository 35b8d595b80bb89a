"""Shared pieces of jaxml.causal: input checks, SPD solves, test-statistic records."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
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


def as_matrix(name: str, value: Any, nobs: int | None = None, *, allow_none: bool = True,
              ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Converts an array, pandas Series/DataFrame or None to a float64 [n, k] array and names.

  Raises TypeError for non-numeric data and ValueError (naming `name`) for a wrong
  row count or a rank above 2.
  """
  if value is None:
    if not allow_none:
      raise ValueError(f"{name} is required")
    if nobs is None:
      raise ValueError(f"{name}: cannot infer the number of rows")
    return np.zeros((nobs, 0)), ()
  names: tuple[str, ...] | None = None
  if hasattr(value, "columns") and hasattr(value, "to_numpy"):  # DataFrame
    names = tuple(str(c) for c in value.columns)
    value = value.to_numpy()
  elif hasattr(value, "to_numpy") and hasattr(value, "name"):  # Series
    names = (str(value.name) if value.name is not None else name,)
    value = value.to_numpy()
  arr = np.asarray(value)
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
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
