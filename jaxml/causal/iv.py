"""Two-stage least squares with the diagnostics of linearmodels' IV2SLS, in JAX.

Model (Wooldridge ch. 15; linearmodels' IV2SLS docs):

    y = X b + W g + e,    X = Z a + W d + v,    cov(e, v) != 0.

With regressors Xf = [W, X] (k columns) and instruments Zf = [W, Z] (kzf columns),
P = Zf (Zf'Zf)^-1 Zf', the estimator is

    b_2sls = (Xf' P Xf)^-1 Xf' P y,    eps = y - Xf b_2sls.

Every quantity is a function of the cross products of [y, W, X, Z] plus one pass
over the rows for residuals and scores, so the whole fit is one jitted function
that runs in float64 (the public wrapper enables x64 for its own call).

Covariances (definitions of linearmodels 7.1, `iv.covariance`), A = Xf'P Xf,
xhat = P Xf, s = n / (n - k) if debiased else 1:
  unadjusted   s * (eps'eps / n) A^-1
  robust       s * A^-1 (sum_i eps_i^2 xhat_i xhat_i') A^-1                  (HC0)
  clustered    c * A^-1 (sum_g xi_g xi_g') A^-1,  xi_g = sum_{i in g} eps_i xhat_i,
               c = s * G/(G-1) * (n-1)/n if debiased else 1.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from jaxml.causal._common import (TestStatistic, as_matrix, chi2_test, condition_ok, f_test,
                                  spans_constant, spd_inv, spd_solve)

COV_TYPES = {"unadjusted": "unadjusted", "homoskedastic": "unadjusted", "robust": "robust",
             "heteroskedastic": "robust", "clustered": "clustered"}
WEAK_F = 10.0


class WeakInstrumentWarning(UserWarning):
  """First-stage partial F below 10 (Staiger-Stock rule of thumb)."""


class FirstStage(NamedTuple):
  """First-stage diagnostics, one entry per endogenous regressor (linearmodels' definitions).

  rsquared: R^2 of x_j on [W, Z]. partial_rsquared: R^2 of M_W x_j on M_W Z.
  shea_rsquared: [(Xf'Xf)^-1]_jj / [(Xf'P Xf)^-1]_jj. partial_f: Wald statistic of
  the excluded-instrument coefficients in the first stage with the model's
  covariance type, divided by q = #instruments for "unadjusted" (then ~ F(q, n - kzf)),
  left as chi2(q) otherwise. partial_f_pvalue: its p-value.
  """
  names: tuple[str, ...]
  rsquared: np.ndarray
  partial_rsquared: np.ndarray
  shea_rsquared: np.ndarray
  partial_f: np.ndarray
  partial_f_pvalue: np.ndarray
  f_dist: str

  def table(self) -> pd.DataFrame:
    return pd.DataFrame({"rsquared": self.rsquared, "partial.rsquared": self.partial_rsquared,
                         "shea.rsquared": self.shea_rsquared, "f.stat": self.partial_f,
                         "f.pval": self.partial_f_pvalue, "f.dist": self.f_dist},
                        index=list(self.names))


class AndersonRubin(NamedTuple):
  """Anderson-Rubin test of H0: b = beta0 and its inverted confidence set.

  statistic = [(RSS_W(b0) - RSS_WZ(b0)) / q] / [RSS_WZ(b0) / (n - kw - q)] ~ F(q, n - kw - q)
  where RSS_S(b0) is the residual sum of squares of y - X b0 on the columns S. Valid
  however weak the instruments (homoskedastic errors). confidence_set is a tuple of
  closed intervals (may be empty, a bounded interval, two rays, or the real line);
  it is computed for one endogenous regressor and is None otherwise.
  """
  statistic: float
  pvalue: float
  df: int
  df_denom: int
  beta0: np.ndarray
  alpha: float
  confidence_set: tuple[tuple[float, float], ...] | None
  kind: str


# ----------------------------------------------------------------------------- jitted core

def _index_blocks(kw: int, kx: int, kz: int):
  """Columns of the data matrix D = [1, y, X, W, Z] (so that Zf = [W, Z] is contiguous)."""
  iy = np.array([1])
  ix = np.arange(2, 2 + kx)
  iw = np.arange(2 + kx, 2 + kx + kw)
  iz = np.arange(2 + kx + kw, 2 + kx + kw + kz)
  return iy, iw, ix, iz


def data_matrix(y: np.ndarray, w: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Stacks D = [1, y, X, W, Z] as one float64 [n, 2 + kx + kw + kz] array (one host copy)."""
  n = y.shape[0]
  d = np.empty((n, 2 + x.shape[1] + w.shape[1] + z.shape[1]), dtype=np.float64)
  d[:, 0] = 1.0
  d[:, 1] = y
  col = 2
  for block in (x, w, z):
    d[:, col:col + block.shape[1]] = block
    col += block.shape[1]
  return d


@jax.jit
def iv_moments(data: jax.Array) -> jax.Array:
  """G = D'D for D = [1, y, X, W, Z] ([n, m]): every cross product, column sums (row 0) and n (G[0, 0]).

  One pass over the rows; NaN or inf in column j makes G[j, j] non-finite.
  """
  return data.T @ data


def _meats(zf, resid, clusters, cov_type):
  """Score cross products sum_i r_ij^2 zf_i zf_i' (or clustered sums), for each column j of resid.

  zf: [n, kzf]; resid: [n, r]. Returns [r, kzf, kzf].
  """
  out = []
  for j in range(resid.shape[1]):
    scores = zf * resid[:, j:j + 1]
    if cov_type == "clustered":  # codes are in [0, n): shapes do not depend on the number of clusters
      scores = jax.ops.segment_sum(scores, clusters, num_segments=scores.shape[0])
    out.append(scores.T @ scores)
  return jnp.stack(out)


def _sandwich_scale(n: int, k: int, cov_type: str, debiased: jax.Array, n_clusters: jax.Array):
  base = n / (n - k)
  if cov_type == "clustered":
    base = base * n_clusters / (n_clusters - 1) * (n - 1) / n
  return jnp.where(debiased, base, 1.0)


def _combo(m: int, plus: np.ndarray, minus_idx: np.ndarray, minus: jax.Array) -> jax.Array:
  """Coefficient vector c over the columns of D with c[plus] = 1 and c[minus_idx] = -minus."""
  c = jnp.zeros((m,), minus.dtype).at[plus].set(1.0)
  return c.at[minus_idx].set(-minus)


@functools.partial(jax.jit, static_argnames=("sizes", "cov_type"))
def iv2sls_arrays(data, gram, clusters=None, *, sizes: tuple[int, int, int], cov_type: str = "robust",
                  debiased: bool | jax.Array = False, n_clusters: int | jax.Array = 0,
                  xf_const: bool | jax.Array = True, zf_const: bool | jax.Array = True,
                  z_const: bool | jax.Array = False) -> dict[str, jax.Array]:
  """The pure 2SLS fit: arrays in, arrays out (no checks; see `iv2sls`).

  data: D = [1, y, X, W, Z], [n, m] (see `data_matrix`); gram: `iv_moments(data)`;
  sizes = (kw, kx, kz); clusters: [n] int32 codes in [0, n_clusters) for
  cov_type="clustered". The *_const flags say whether [W, X], [W, Z] and (when there
  is no W) Z span a constant; they select centred or uncentred total sums of
  squares, as linearmodels does. Only sizes, cov_type and the shapes are static:
  debiased, n_clusters and the flags are traced, so one compilation serves them all.

  Every residual is a linear combination D c of the columns, so its sums of squares
  and cross products with the columns are c'G c and G c: the unadjusted fit and every
  test never touch the rows again. Robust and clustered covariances take one more
  pass, for the residuals and their score cross products.
  Returns params [k] (order: W then X), cov [k, k] and the statistics behind every diagnostic.
  """
  kw, kx, kz = sizes
  n, m = data.shape
  k, kzf = kw + kx, kw + kz
  iy, iw, ix, iz = _index_blocks(kw, kx, kz)
  ixf, izf = np.concatenate([iw, ix]), np.concatenate([iw, iz])
  sub = lambda r, c: gram[np.ix_(r, c)]
  quad = lambda a, b: a @ gram @ b

  # Second stage.
  gzz = sub(izf, izf)
  gzx = sub(izf, ixf)
  pi = spd_solve(gzz, gzx)                       # [kzf, k] first-stage coefficients of Xf
  a = gzx.T @ pi
  a = 0.5 * (a + a.T)                            # Xf' P Xf
  ainv = spd_inv(a)
  params = ainv @ (pi.T @ gram[izf, 1])
  c_eps = _combo(m, iy, ixf, params)             # eps = D c_eps
  ee = quad(c_eps, c_eps)

  # First stage, one regression of each endogenous x_j on [W, Z].
  pix = pi[:, kw:]                               # [kzf, kx]
  c_v = jnp.zeros((kx, m), pix.dtype).at[:, izf].set(-pix.T).at[np.arange(kx), ix].set(1.0)  # v = D c_v'

  rss = jnp.einsum("jm,mp,jp->j", c_v, gram, c_v)

  if cov_type == "unadjusted":
    cov = _sandwich_scale(n, k, cov_type, debiased, n_clusters) * ee / n * ainv
  else:
    zf = data[:, 2 + kx:]
    resid = data @ jnp.concatenate([c_eps[:, None], c_v.T], axis=1)   # [n, 1 + kx]: eps, v_1..v_kx
    meats = _meats(zf, resid, clusters, cov_type)
    cov = _sandwich_scale(n, k, cov_type, debiased, n_clusters) * ainv @ (pi.T @ meats[0] @ pi) @ ainv
  cov = 0.5 * (cov + cov.T)
  yy, ysum = gram[1, 1], gram[0, 1]
  tss_y = jnp.where(xf_const, yy - ysum**2 / n, yy)

  xx, xsum = jnp.diag(sub(ix, ix)), gram[0, ix]
  tss_x = jnp.where(zf_const, xx - xsum**2 / n, xx)
  if kw:
    gwx = sub(iw, ix)
    rss_w = xx - jnp.sum(gwx * spd_solve(sub(iw, iw), gwx), axis=0)
  else:
    rss_w = jnp.where(z_const, xx - xsum**2 / n, xx)
  gzz_inv = spd_inv(gzz)
  theta = pix[kw:, :]                            # [kz, kx] excluded-instrument coefficients
  if cov_type == "unadjusted":
    s2 = _sandwich_scale(n, kzf, cov_type, debiased, n_clusters) * rss / n
    fs_stat = jnp.sum(theta * spd_solve(gzz_inv[kw:, kw:], theta), axis=0) / s2 / kz
  else:
    fs_scale = _sandwich_scale(n, kzf, cov_type, debiased, n_clusters)

    def wald(meat_j, theta_j):
      c = (fs_scale * gzz_inv @ meat_j @ gzz_inv)[kw:, kw:]
      return theta_j @ jnp.linalg.solve(0.5 * (c + c.T), theta_j)

    fs_stat = jax.vmap(wald, in_axes=(0, 1))(meats[1:], theta)
  shea = jnp.diag(spd_inv(sub(ixf, ixf)))[kw:] / jnp.diag(ainv)[kw:]

  # Overidentification (Sargan) and endogeneity (Durbin, Wu-Hausman).
  ze = gram[izf] @ c_eps                         # Zf' eps
  e_pz_e = ze @ spd_solve(gzz, ze)               # eps' P_Zf eps
  b_ols = spd_solve(sub(ixf, ixf), gram[ixf, 1])
  c_e0 = _combo(m, iy, ixf, b_ols)               # OLS residuals
  ih = np.concatenate([izf, ix])
  c0 = gram[ih] @ c_e0
  e1e1 = c0 @ spd_solve(sub(ih, ih), c0)         # e0' P_[Zf, X] e0

  # Anderson-Rubin quadratic forms of u = [y, X] on W and on [W, Z].
  iyx = np.concatenate([iy, ix])
  c_ry = _combo(m, iy, izf, spd_solve(gzz, gram[izf, 1]))
  c_r = jnp.concatenate([c_ry[None, :], c_v], axis=0)
  q_wz = c_r @ gram @ c_r.T
  g_yx = sub(iyx, iyx)
  if kw:
    g_wyx = sub(iw, iyx)
    q_w = g_yx - g_wyx.T @ spd_solve(sub(iw, iw), g_wyx)
  else:
    q_w = g_yx
  return {"params": params, "cov": cov, "ee": ee, "tss_y": tss_y, "fs_rss": rss, "fs_tss": tss_x,
          "fs_rss_w": rss_w, "fs_stat": fs_stat, "shea": shea, "e_pz_e": e_pz_e,
          "e0e0": quad(c_e0, c_e0), "e1e1": e1e1, "q_w": q_w, "q_wz": q_wz}


# ----------------------------------------------------------------------------- results

def _ar_test(q_w, q_wz, beta0, n, kw, kz, alpha) -> AndersonRubin:
  a = np.concatenate([[1.0], -np.asarray(beta0, dtype=np.float64)])
  rss_wz = a @ q_wz @ a
  rss_w = a @ q_w @ a
  df_denom = n - kw - kz
  stat = ((rss_w - rss_wz) / kz) / (rss_wz / df_denom)
  pval = float(stats.f.sf(stat, kz, df_denom))
  cset, kind = None, "not computed (several endogenous regressors)"
  if q_w.shape[0] == 2:
    crit = stats.f.isf(alpha, kz, df_denom)
    kappa = crit * kz / df_denom
    # b in the set  <=>  [1, -b] (Q_W - (1 + kappa) Q_WZ) [1, -b]' <= 0  <=>  m11 b^2 - 2 m01 b + m00 <= 0
    m = q_w - (1.0 + kappa) * q_wz
    m00, m01, m11 = m[0, 0], m[0, 1], m[1, 1]
    disc = m01**2 - m00 * m11
    tol = 1e-12 * max(abs(q_w[1, 1]), 1e-300)
    if abs(m11) <= tol:
      if abs(m01) <= tol:
        cset, kind = (((-np.inf, np.inf),), "real line") if m00 <= 0 else ((), "empty")
      else:
        root = m00 / (2 * m01)
        cset, kind = (((root, np.inf),), "ray") if m01 > 0 else (((-np.inf, root),), "ray")
    elif m11 > 0:
      if disc < 0:
        cset, kind = (), "empty"
      else:
        s = np.sqrt(disc)
        cset, kind = (((m01 - s) / m11, (m01 + s) / m11),), "bounded"
    else:
      if disc <= 0:
        cset, kind = ((-np.inf, np.inf),), "real line"
      else:
        s = np.sqrt(disc)
        lo, hi = sorted([(m01 - s) / m11, (m01 + s) / m11])
        cset, kind = ((-np.inf, lo), (hi, np.inf)), "union of two rays"
    cset = tuple((float(l), float(h)) for l, h in cset)
  return AndersonRubin(float(stat), pval, int(kz), int(df_denom), np.asarray(beta0, dtype=np.float64),
                       float(alpha), cset, kind)


@dataclasses.dataclass(frozen=True)
class IVResults:
  """Result of `iv2sls`. Arrays are float64 numpy, ordered as `names` = exog then endog."""
  names: tuple[str, ...]
  endog_names: tuple[str, ...]
  instrument_names: tuple[str, ...]
  params: np.ndarray
  std_errors: np.ndarray
  cov: np.ndarray
  nobs: int
  cov_type: str
  debiased: bool
  n_clusters: int | None
  rsquared: float
  first_stage: FirstStage
  wu_hausman: TestStatistic
  durbin: TestStatistic
  sargan: TestStatistic | None
  basmann: TestStatistic | None
  anderson_rubin: AndersonRubin
  _q_w: np.ndarray = dataclasses.field(repr=False)
  _q_wz: np.ndarray = dataclasses.field(repr=False)
  _n_exog: int = dataclasses.field(repr=False)

  @property
  def df_resid(self) -> int:
    return self.nobs - len(self.params)

  @property
  def tstats(self) -> np.ndarray:
    return self.params / self.std_errors

  @property
  def pvalues(self) -> np.ndarray:
    """t(df_resid) if debiased, else normal (as linearmodels)."""
    t = np.abs(self.tstats)
    return 2 * (stats.t.sf(t, self.df_resid) if self.debiased else stats.norm.sf(t))

  def conf_int(self, level: float = 0.95) -> np.ndarray:
    """[k, 2] intervals; t(df_resid) quantiles if debiased, else normal."""
    q = stats.t.ppf(0.5 + level / 2, self.df_resid) if self.debiased else stats.norm.ppf(0.5 + level / 2)
    return np.stack([self.params - q * self.std_errors, self.params + q * self.std_errors], axis=1)

  def params_frame(self) -> pd.DataFrame:
    ci = self.conf_int()
    return pd.DataFrame({"parameter": self.params, "std.err": self.std_errors, "t-stat": self.tstats,
                         "p-value": self.pvalues, "lower ci": ci[:, 0], "upper ci": ci[:, 1]},
                        index=list(self.names))

  def anderson_rubin_test(self, beta0: Any = 0.0, alpha: float = 0.05) -> AndersonRubin:
    """Anderson-Rubin test of H0: coefficients of the endogenous regressors = beta0."""
    beta0 = np.broadcast_to(np.asarray(beta0, dtype=np.float64), (len(self.endog_names),))
    return _ar_test(self._q_w, self._q_wz, beta0, self.nobs, self._n_exog,
                    len(self.instrument_names), alpha)

  def summary(self) -> str:
    """A plain-text summary table (parameters, first stage, tests)."""
    lines = ["IV-2SLS estimation summary", "=" * 78,
             f"No. observations: {self.nobs:<10d} Cov. estimator: {self.cov_type}"
             f"{' (debiased)' if self.debiased else ''}"
             f"{f', {self.n_clusters} clusters' if self.n_clusters else ''}",
             f"R-squared: {self.rsquared:<17.4f} Instruments: {', '.join(self.instrument_names)}",
             "-" * 78, self.params_frame().to_string(float_format=lambda v: f"{v:.4f}"), "-" * 78,
             "First stage", self.first_stage.table().to_string(float_format=lambda v: f"{v:.4f}"),
             "-" * 78, f"Wu-Hausman: {self.wu_hausman}", f"Durbin:     {self.durbin}",
             f"Sargan:     {self.sargan if self.sargan else 'n/a (exactly identified)'}",
             f"Basmann:    {self.basmann if self.basmann else 'n/a (exactly identified)'}"]
    ar = self.anderson_rubin
    cs = "n/a" if ar.confidence_set is None else (
        " U ".join(f"[{lo:.4f}, {hi:.4f}]" for lo, hi in ar.confidence_set) or "empty")
    lines += [f"Anderson-Rubin (H0: endog coef = 0): {ar.statistic:.4f} "
              f"(F({ar.df},{ar.df_denom}), p={ar.pvalue:.4g}); {100 * (1 - ar.alpha):.0f}% set: {cs}",
              "=" * 78]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()


# ----------------------------------------------------------------------------- public entry

def _zero_columns(gram: np.ndarray, cols: np.ndarray, names_all: tuple[str, ...], order: np.ndarray) -> str:
  """A hint naming the all-zero columns among `cols` of D (e.g. the dummy of an unused category)."""
  position = {int(c): i for i, c in enumerate(order)}
  zero = [names_all[position[int(c)]] for c in cols if gram[c, c] == 0]
  if not zero:
    return ""
  return (f"; all-zero column(s) {zero} (an unused category of a Categorical? drop it with "
          ".cat.remove_unused_categories())")


def iv2sls(dependent: Any, exog: Any, endog: Any, instruments: Any, *, cov_type: str = "unadjusted",
           clusters: Any = None, debiased: bool = False, alpha: float = 0.05) -> IVResults:
  """Two-stage least squares, argument names and order as linearmodels' `IV2SLS(...).fit(...)`.

  Every data argument is an array, a pandas Series or a DataFrame. pandas columns
  are coded as linearmodels codes them: numeric, bool and nullable (Int64, Float64,
  boolean) columns become float64; a Categorical column becomes one 0/1 column per
  category except the first in its category order (with or without a constant),
  named "<column>.<category>". Missing values (NaN, pd.NA, a missing category)
  raise; rows are never dropped (linearmodels drops NaN rows with a warning, fails
  on pd.NA beside other columns and codes a missing category as the first level).
  String columns raise TypeError: `.astype("category")` gives linearmodels' coding.

  Args:
    dependent: [n] outcome (array, Series or one-column DataFrame; a two-category
      Categorical becomes the dummy of its second category, as in linearmodels).
    exog: [n, kw] exogenous regressors, or None; add a column of ones for a constant.
    endog: [n, kx] endogenous regressors (kx >= 1).
    instruments: [n, kz] excluded instruments, kz >= kx (counted after expanding categoricals).
    cov_type: "unadjusted" (alias "homoskedastic"), "robust" ("heteroskedastic"), "clustered".
    clusters: [n] cluster labels, required for "clustered" (one-way).
    debiased: small-sample scaling n/(n-k) (and G/(G-1)(n-1)/n for clusters) as linearmodels.
    alpha: level of the Anderson-Rubin confidence set.

  Returns:
    IVResults. Computed in float64 (x64 is enabled for this call only).

  Raises:
    ValueError / TypeError naming the argument for NaN/inf or missing values,
    non-numeric columns, mismatched rows, under-identification, constant or
    collinear instruments/regressors (naming all-zero dummies of unused
    categories), bad cov_type or clusters. Warns (WeakInstrumentWarning) when a
    first-stage partial F is below 10.
  """
  if cov_type not in COV_TYPES:
    raise ValueError(f"cov_type must be one of {sorted(COV_TYPES)}, got {cov_type!r}")
  cov_type = COV_TYPES[cov_type]
  y, y_names = as_matrix("dependent", dependent, allow_none=False, categorical="expand")
  if y.shape[1] != 1:
    raise ValueError(f"dependent must have one column, got {y.shape[1]} ({', '.join(y_names)}); a categorical "
                     "dependent with more than two categories expands to several dummies: pass one numeric column")
  n = y.shape[0]
  w, w_names = as_matrix("exog", exog, n, categorical="expand")
  x, x_names = as_matrix("endog", endog, n, allow_none=False, categorical="expand")
  z, z_names = as_matrix("instruments", instruments, n, allow_none=False, categorical="expand")
  kw, kx, kz = w.shape[1], x.shape[1], z.shape[1]
  if kx == 0:
    raise ValueError("endog has no columns: 2SLS needs at least one endogenous regressor")
  if kz < kx:
    raise ValueError(f"underidentified: {kz} instrument(s) for {kx} endogenous regressor(s); "
                     "instruments must have at least as many columns as endog")
  if n <= kw + kx + kz:
    raise ValueError(f"too few observations ({n}) for {kw + kx} regressors and {kw + kz} instruments")
  codes, n_clusters = None, 0
  if cov_type == "clustered":
    if clusters is None:
      raise ValueError('cov_type="clustered" needs clusters (one label per row)')
    labels = np.asarray(clusters.to_numpy() if hasattr(clusters, "to_numpy") else clusters)
    if labels.ndim == 2 and labels.shape[1] == 1:
      labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n:
      raise ValueError(f"clusters must be 1-D with {n} rows (one-way clustering), got shape {labels.shape}")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
      raise ValueError("clusters contains NaN or inf")
    _, codes = np.unique(labels, return_inverse=True)
    n_clusters = int(codes.max()) + 1
    if n_clusters < 2:
      raise ValueError("clusters has a single group; a clustered covariance needs at least 2")
    codes = codes.astype(np.int32)
  elif clusters is not None:
    raise ValueError(f'clusters given but cov_type={cov_type!r}; use cov_type="clustered"')

  with jax.enable_x64(True):
    data = jax.device_put(data_matrix(y[:, 0], w, x, z))
    gram = np.asarray(jax.device_get(iv_moments(data)), dtype=np.float64)
    iy, iw, ix, iz = _index_blocks(kw, kx, kz)
    order = np.concatenate([iy, iw, ix, iz])
    names_all = y_names + w_names + x_names + z_names
    args_all = ["dependent"] + ["exog"] * kw + ["endog"] * kx + ["instruments"] * kz
    diag = np.diag(gram)[order]
    bad = np.nonzero(~np.isfinite(diag))[0]
    if bad.size:
      raise ValueError("NaN or inf in data: " + ", ".join(f"{args_all[i]} column {names_all[i]!r}" for i in bad)
                       + "; drop or impute those rows first")
    colsum = gram[0]
    for j, col in enumerate(iz):
      mean_sq = gram[col, col] / n
      if mean_sq - (colsum[col] / n) ** 2 <= 1e-12 * mean_sq:
        unused = (" (all zero: the dummy of an unused category? drop it with .cat.remove_unused_categories())"
                  if gram[col, col] == 0 else "")
        raise ValueError(f"instruments column {z_names[j]!r} is constant{unused}; an excluded instrument must "
                         "vary (put a constant in exog)")
    ixf, izf = np.concatenate([iw, ix]), np.concatenate([iw, iz])
    ok, rank = condition_ok(gram[np.ix_(izf, izf)])
    if not ok:
      raise ValueError(f"instruments are rank deficient: [exog, instruments] has rank {rank} < {len(izf)} "
                       f"(collinear or duplicated columns){_zero_columns(gram, izf, names_all, order)}")
    ok, rank = condition_ok(gram[np.ix_(ixf, ixf)])
    if not ok:
      raise ValueError(f"regressors are rank deficient: [exog, endog] has rank {rank} < {len(ixf)}"
                       f"{_zero_columns(gram, ixf, names_all, order)}")
    ih = np.concatenate([izf, ix])
    if not condition_ok(gram[np.ix_(ih, ih)])[0]:
      raise ValueError("an endogenous regressor is an exact linear function of [exog, instruments]")
    flags = dict(xf_const=spans_constant(gram[np.ix_(ixf, ixf)], colsum[ixf], n),
                 zf_const=spans_constant(gram[np.ix_(izf, izf)], colsum[izf], n),
                 z_const=spans_constant(gram[np.ix_(iz, iz)], colsum[iz], n))
    out = iv2sls_arrays(data, jnp.asarray(gram), None if codes is None else jnp.asarray(codes),
                        sizes=(kw, kx, kz), cov_type=cov_type, debiased=jnp.asarray(bool(debiased)),
                        n_clusters=jnp.asarray(float(n_clusters)),
                        **{key: jnp.asarray(val) for key, val in flags.items()})
    out = {key: np.asarray(val, dtype=np.float64) for key, val in jax.device_get(out).items()}
  return _results(out, n=n, kw=kw, kx=kx, kz=kz, names=w_names + x_names, x_names=x_names,
                  z_names=z_names, cov_type=cov_type, debiased=bool(debiased),
                  n_clusters=n_clusters or None, alpha=alpha)


def _results(out, *, n, kw, kx, kz, names, x_names, z_names, cov_type, debiased, n_clusters, alpha):
  k, kzf = kw + kx, kw + kz
  if cov_type == "unadjusted":
    fs_p = stats.f.sf(out["fs_stat"], kz, n - kzf)
    f_dist = f"F({kz},{n - kzf})"
  else:
    fs_p = stats.chi2.sf(out["fs_stat"], kz)
    f_dist = f"chi2({kz})"
  first = FirstStage(x_names, 1 - out["fs_rss"] / out["fs_tss"], 1 - out["fs_rss"] / out["fs_rss_w"],
                     out["shea"], out["fs_stat"], fs_p, f_dist)
  delta = float(out["e1e1"] - out["e_pz_e"])
  e0e0 = float(out["e0e0"])
  wh_den = n - kw - 2 * kx
  null_exo = "all endogenous variables are exogenous"
  wu = f_test((delta / kx) / ((e0e0 - delta) / wh_den), kx, wh_den, null_exo)
  durbin = chi2_test(delta / (e0e0 / n), kx, null_exo)
  sargan = basmann = None
  if kz > kx:
    s = n * float(out["e_pz_e"]) / float(out["ee"])
    null_ov = "the model is not overidentified (instruments are valid)"
    sargan = chi2_test(s, kz - kx, null_ov)
    basmann = chi2_test(s * (n - kzf) / (n - s), kz - kx, null_ov)
  ar = _ar_test(out["q_w"], out["q_wz"], np.zeros(kx), n, kw, kz, alpha)
  res = IVResults(names=tuple(names), endog_names=tuple(x_names), instrument_names=tuple(z_names),
                  params=out["params"], std_errors=np.sqrt(np.diag(out["cov"])), cov=out["cov"], nobs=n,
                  cov_type=cov_type, debiased=debiased, n_clusters=n_clusters,
                  rsquared=float(1 - out["ee"] / out["tss_y"]), first_stage=first, wu_hausman=wu,
                  durbin=durbin, sargan=sargan, basmann=basmann, anderson_rubin=ar,
                  _q_w=out["q_w"], _q_wz=out["q_wz"], _n_exog=kw)
  for name, f_stat in zip(x_names, first.partial_f):
    f_val = f_stat if cov_type == "unadjusted" else f_stat / kz
    if f_val < WEAK_F:
      warnings.warn(f"weak instruments: first-stage partial F for {name!r} is {f_val:.2f} < {WEAK_F:g}; "
                    "2SLS estimates and Wald intervals are unreliable, use the Anderson-Rubin "
                    f"confidence set (result.anderson_rubin: {ar.kind} "
                    f"{ar.confidence_set if ar.confidence_set is not None else ''})",
                    WeakInstrumentWarning, stacklevel=3)
  return res


def wald_ratio(dependent: Any, endog: Any, instrument: Any) -> float:
  """The Wald (ratio) IV estimate cov(z, y) / cov(z, x) for one instrument and one regressor.

  It equals the 2SLS slope with a constant in exog. Inputs are coded as in `iv2sls`
  (a two-category Categorical is the dummy of its second category).

  Args:
    dependent: [n] outcome.
    endog: [n] the endogenous regressor (one column).
    instrument: [n] the instrument (one column).

  Returns:
    The ratio estimate, a float.

  Raises:
    ValueError when an argument has more than one column or cov(z, x) = 0; TypeError
    for non-numeric data.
  """
  y, _ = as_matrix("dependent", dependent, allow_none=False, categorical="expand")
  x, _ = as_matrix("endog", endog, y.shape[0], allow_none=False, categorical="expand")
  z, _ = as_matrix("instrument", instrument, y.shape[0], allow_none=False, categorical="expand")
  if x.shape[1] != 1 or z.shape[1] != 1:
    raise ValueError("wald_ratio takes one endogenous regressor and one instrument")
  zc = z[:, 0] - z[:, 0].mean()
  den = zc @ x[:, 0]
  if den == 0:
    raise ValueError("instrument is uncorrelated with endog (cov(z, x) = 0)")
  return float(zc @ y[:, 0] / den)
