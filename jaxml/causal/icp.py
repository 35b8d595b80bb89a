"""Invariant causal prediction (Peters, Buhlmann & Meinshausen 2016, arXiv 1501.01332).

For every subset S of the p predictors, H0_S says one linear model of Y on X_S (with
an intercept) has residuals with the same distribution in every environment. The
fast "approximate" test: pool all rows, regress, and for each environment e compare
the residuals inside e with those outside it by Welch's t-test (means) and a
two-sided F-test (variances); the set's p-value is the smallest of those 2E p-values
times a Bonferroni factor, capped at 1. S is accepted when p > alpha. The estimate is
the intersection of the accepted sets; P(estimate within the true parents) >= 1 - alpha.
If every set is rejected the model is misspecified and the estimate is None.

Coefficient intervals follow the R package / causalicp: for an accepted S,
b_j +- z_{1 - alpha/4} sqrt(sigma^2 [(X_S1'X_S1)^-1]_jj), sigma^2 = RSS / (N - |S| - 1)
(0 for j not in S); the reported interval is the union over accepted sets.
All subsets are fitted at once: one Gram matrix, a vmap of masked solves, and
per-environment sums by segment_sum; p-values use the regularised incomplete beta.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc
from scipy import stats

from jaxml.causal._common import as_matrix, spd_solve

BONFERRONI = ("r", "strict")


@dataclasses.dataclass(frozen=True)
class ICPResult:
  """ICP output. `estimate` is a frozenset of predictor indices, or None if all sets were rejected."""
  estimate: frozenset | None
  accepted_sets: tuple[frozenset, ...]
  rejected_sets: tuple[frozenset, ...]
  set_pvalues: dict
  pvalues: np.ndarray            # [p] per-variable p-value: max over sets without j (1 if all rejected)
  conf_intervals: np.ndarray | None  # [2, p] union of accepted-set intervals; None if all rejected
  names: tuple[str, ...]
  alpha: float

  @property
  def all_rejected(self) -> bool:
    return not self.accepted_sets

  def summary(self) -> str:
    if self.all_rejected:
      return ("ICP: no invariant set - all candidate sets were rejected at alpha="
              f"{self.alpha}; the linear invariant model is violated (hidden variables, "
              "interventions on the target, or non-linearity).")
    est = ", ".join(self.names[j] for j in sorted(self.estimate)) or "(empty set)"
    lines = [f"ICP at alpha={self.alpha}: estimated causal parents: {est}",
             f"{len(self.accepted_sets)} of {len(self.accepted_sets) + len(self.rejected_sets)} sets accepted"]
    for j, name in enumerate(self.names):
      lines.append(f"  {name:>12s}: p={self.pvalues[j]:.4g}  CI=[{self.conf_intervals[0, j]:.4f}, "
                   f"{self.conf_intervals[1, j]:.4f}]")
    return "\n".join(lines)


def _t_pvalue(t, df):
  return betainc(df / 2.0, 0.5, df / (df + t * t))


def _f_pvalue_two_sided(f, d1, d2):
  cdf = betainc(d1 / 2.0, d2 / 2.0, d1 * f / (d1 * f + d2))
  return 2.0 * jnp.minimum(cdf, 1.0 - cdf)


@functools.partial(jax.jit, static_argnames=("n_envs",))
def icp_set_tests(x, y, env, masks, *, n_envs: int):
  """Tests every subset at once.

  x: [n, p]; y: [n]; env: [n] int codes in [0, n_envs); masks: [S, p] bool.
  Returns coefs [S, p] (0 outside S), intercept [S], pvalue [S] (before Bonferroni:
  min over environments and both tests), std_errors [S, p].
  """
  n, p = x.shape
  x1 = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1)
  gram = x1.T @ x1
  xty = x1.T @ y
  m1 = jnp.concatenate([masks, jnp.ones((masks.shape[0], 1), bool)], axis=1).astype(x.dtype)

  def fit(m):
    g = gram * m[:, None] * m[None, :] + jnp.diag(1.0 - m)
    coef = spd_solve(g, xty * m)
    inv_diag = jnp.diag(spd_solve(g, jnp.eye(p + 1, dtype=x.dtype)))
    return coef, inv_diag

  coefs, inv_diag = jax.vmap(fit)(m1)            # [S, p+1]
  resid = y[:, None] - x1 @ coefs.T              # [n, S]
  cnt = jax.ops.segment_sum(jnp.ones((n,), x.dtype), env, num_segments=n_envs)[:, None]
  s1 = jax.ops.segment_sum(resid, env, num_segments=n_envs)     # [E, S]
  s2 = jax.ops.segment_sum(resid * resid, env, num_segments=n_envs)
  n_in, n_out = cnt, n - cnt
  mean_in, mean_out = s1 / n_in, (s1.sum(0) - s1) / n_out
  var_in = (s2 - n_in * mean_in**2) / (n_in - 1)
  var_out = ((s2.sum(0) - s2) - n_out * mean_out**2) / (n_out - 1)
  a, b = var_in / n_in, var_out / n_out
  t = (mean_in - mean_out) / jnp.sqrt(a + b)
  df = (a + b) ** 2 / (a**2 / (n_in - 1) + b**2 / (n_out - 1))
  p_mean = _t_pvalue(t, df)
  p_var = _f_pvalue_two_sided(var_in / var_out, n_in - 1, n_out - 1)
  pmin = jnp.minimum(p_mean.min(0), p_var.min(0))
  rss = jnp.sum(resid * resid, axis=0)
  size = masks.sum(1)
  sigma2 = rss / (n - size - 1)
  se = jnp.sqrt(sigma2[:, None] * inv_diag[:, :p]) * masks
  return {"coefs": coefs[:, :p] * masks, "intercept": coefs[:, p], "pvalue": pmin, "std_errors": se}


def _split_inputs(x, y, environment):
  if environment is None:
    if not isinstance(x, (list, tuple)) or not isinstance(y, (list, tuple)):
      raise ValueError("environment is required unless x and y are lists with one array per environment")
    if len(x) != len(y):
      raise ValueError(f"x has {len(x)} environments but y has {len(y)}")
    for e, (xe, ye) in enumerate(zip(x, y)):
      if np.asarray(xe).shape[0] == 0 or np.asarray(ye).shape[0] == 0:
        raise ValueError(f"environment {e} is empty: every environment needs observations")
    env = np.concatenate([np.full(np.asarray(ye).shape[0], e) for e, ye in enumerate(y)])
    x = np.concatenate([np.asarray(xe, dtype=np.float64).reshape(np.asarray(xe).shape[0], -1) for xe in x])
    y = np.concatenate([np.asarray(ye, dtype=np.float64).reshape(-1) for ye in y])
    return x, y, env
  return x, y, environment


def icp(x: Any, y: Any, environment: Any = None, *, alpha: float = 0.05, bonferroni: str = "r",
        max_set_size: int | None = None, names: Sequence[str] | None = None) -> ICPResult:
  """Invariant causal prediction over all subsets of the columns of x.

  Args:
    x: [n, p] predictors (array or DataFrame), or a list of per-environment [n_e, p] arrays.
    y: [n] target, or a list of per-environment [n_e] arrays.
    environment: [n] environment labels (None when x and y are lists).
    alpha: level; accepted sets have p-value > alpha.
    bonferroni: "r" multiplies the smallest p-value by 2 (E - 1) as the R package
      InvariantCausalPrediction and causalicp do; "strict" by 2 E.
    max_set_size: test only sets with at most this many predictors (default: all, p <= 16).
    names: predictor names (default: DataFrame columns or "x0", "x1", ...).

  Raises ValueError for NaN/inf, mismatched rows, fewer than 2 environments, or an
  environment with fewer than 2 rows (an empty environment).
  """
  if bonferroni not in BONFERRONI:
    raise ValueError(f"bonferroni must be one of {BONFERRONI}, got {bonferroni!r}")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  x, y, environment = _split_inputs(x, y, environment)
  yv, _ = as_matrix("y", y, allow_none=False)
  xv, x_names = as_matrix("x", x, yv.shape[0], allow_none=False)
  if yv.shape[1] != 1:
    raise ValueError(f"y must have one column, got {yv.shape[1]}")
  env = np.asarray(environment.to_numpy() if hasattr(environment, "to_numpy") else environment)
  if env.ndim != 1 or env.shape[0] != yv.shape[0]:
    raise ValueError(f"environment must be 1-D with {yv.shape[0]} rows, got shape {env.shape}")
  for name, arr in (("x", xv), ("y", yv)):
    if not np.isfinite(arr).all():
      raise ValueError(f"{name} contains NaN or inf; drop or impute those rows first")
  labels, codes = np.unique(env, return_inverse=True)
  counts = np.bincount(codes, minlength=len(labels))
  if len(labels) < 2:
    raise ValueError(f"ICP needs at least 2 environments, got {len(labels)}")
  if counts.min() < 2:
    bad = labels[counts < 2]
    raise ValueError(f"environment(s) {list(bad)} have fewer than 2 rows (empty environment); "
                     "every environment needs observations")
  n, p = xv.shape
  if names is None:
    names = x_names if hasattr(x, "columns") else tuple(f"x{j}" for j in range(p))
  names = tuple(str(v) for v in names)
  if len(names) != p:
    raise ValueError(f"names has {len(names)} entries for {p} predictors")
  max_size = p if max_set_size is None else int(max_set_size)
  if max_set_size is None and p > 16:
    raise ValueError(f"{p} predictors give 2^{p} sets; pass max_set_size to limit the search")
  sets = [frozenset(c) for size in range(max_size + 1) for c in itertools.combinations(range(p), size)]
  masks = np.zeros((len(sets), p), bool)
  for i, s in enumerate(sets):
    masks[i, list(s)] = True
  with jax.enable_x64(True):
    out = icp_set_tests(jnp.asarray(xv), jnp.asarray(yv[:, 0]), jnp.asarray(codes.astype(np.int32)),
                        jnp.asarray(masks), n_envs=len(labels))
    out = {k: np.asarray(v, dtype=np.float64) for k, v in jax.device_get(out).items()}
  n_env = len(labels)
  factor = 2 * (n_env - 1) if bonferroni == "r" else 2 * n_env
  pvals = np.minimum(1.0, out["pvalue"] * factor)
  accepted_idx = np.nonzero(pvals > alpha)[0]
  accepted = tuple(sets[i] for i in accepted_idx)
  rejected = tuple(sets[i] for i in range(len(sets)) if pvals[i] <= alpha)
  set_pvalues = {sets[i]: float(pvals[i]) for i in range(len(sets))}
  if accepted:
    estimate = frozenset.intersection(*accepted)
    var_p = np.array([max(pv for s, pv in set_pvalues.items() if j not in s) for j in range(p)])
    q = stats.norm.ppf(1 - alpha / 4)
    lo = out["coefs"][accepted_idx] - q * out["std_errors"][accepted_idx]
    hi = out["coefs"][accepted_idx] + q * out["std_errors"][accepted_idx]
    ci = np.stack([lo.min(0), hi.max(0)])
  else:
    estimate, var_p, ci = None, np.ones(p), None
  return ICPResult(estimate, accepted, rejected, set_pvalues, var_p, ci, names, float(alpha))
