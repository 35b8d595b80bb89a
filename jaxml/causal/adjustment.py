"""Backdoor and frontdoor adjustment: plug-in/regression estimators and numpyro posteriors.

Backdoor (Z blocks every backdoor path X <- ... -> Y):
    E[Y | do(x)] = sum_z E[Y | x, z] P(z)                        (discrete Z, plug-in)
    E[Y | do(x)] = E_Z[ m(x, Z) ],  m = linear regression in (X, Z, X*Z)   (g-formula)
Frontdoor (X -> M -> Y, U hides X <-> Y, M unconfounded given X):
    E[Y | do(x)] = sum_m P(m | x) sum_x' E[Y | m, x'] P(x')      (discrete)
    linear-Gaussian: effect = sum_k a_k b_k, a_k from M_k ~ 1 + X, b from Y ~ 1 + M + X
    (dowhy's frontdoor.two_stage_regression for one mediator; any number here).

Effects are E[Y | do(treatment)] - E[Y | do(control)]. Standard errors: delta method
(gradients by jax.grad of the plug-in formula over cell probabilities and cell means)
for the discrete formulas, HC0 sandwich for the g-formula, and the usual OLS
covariances for the two-stage product (the stages' estimates are asymptotically
independent). The numpyro versions fit the factors with Dirichlet / Normal models on
cell sufficient statistics (cost independent of n) and push each posterior draw
through the same formula.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy import stats

from jaxml.causal._bayes import PosteriorSummary, run_nuts, summarize
from jaxml.causal._common import as_matrix, check_finite, condition_ok, spd_solve


class EffectEstimate(NamedTuple):
  """A point estimate of an average causal effect with a normal-approximation interval."""
  effect: float
  std_error: float
  lower: float
  upper: float
  level: float
  method: str
  nobs: int

  def __str__(self) -> str:
    return (f"{self.method}: {self.effect:.4f} (se {self.std_error:.4f}; {100 * self.level:.0f}% CI "
            f"[{self.lower:.4f}, {self.upper:.4f}])")


def _estimate(effect, se, level, method, n) -> EffectEstimate:
  q = stats.norm.ppf(0.5 + level / 2)
  effect, se = float(effect), float(se)
  return EffectEstimate(effect, se, effect - q * se, effect + q * se, level, method, int(n))


def _vector(name, value, n=None):
  arr, _ = as_matrix(name, value, n, allow_none=False)
  check_finite(name, arr)
  if arr.shape[1] != 1:
    raise ValueError(f"{name} must have one column, got {arr.shape[1]}")
  return arr[:, 0]


def _codes(name: str, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows of a discrete [n, k] array -> (levels [L, k], codes [n])."""
  levels, codes = np.unique(value, axis=0, return_inverse=True)
  return levels, codes.reshape(-1).astype(np.int32)


def _level_index(name: str, levels: np.ndarray, value: float) -> int:
  hit = np.nonzero(np.all(levels == value, axis=1))[0]
  if hit.size == 0:
    raise ValueError(f"{name}={value!r} never occurs in x (levels: {levels[:, 0].tolist()[:10]})")
  return int(hit[0])


@functools.partial(jax.jit, static_argnames=("n_rows", "n_cols"))
def cell_statistics(y, row, col, *, n_rows: int, n_cols: int):
  """Counts, sums and sums of squares of y over the cells (row, col): each [n_rows, n_cols]."""
  cell = row * n_cols + col
  size = n_rows * n_cols
  seg = lambda v: jax.ops.segment_sum(v, cell, num_segments=size).reshape(n_rows, n_cols)
  return seg(jnp.ones_like(y)), seg(y), seg(y * y)


def _delta_se(fn: Callable, cnt: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[float, float]:
  """Effect fn(p, mu) at the plug-in values and its delta-method standard error.

  p = cell probabilities (multinomial), mu = cell means (independent, var s^2 / count).
  """
  n = cnt.sum()
  safe = np.maximum(cnt, 1)
  p = cnt / n
  mu = s1 / safe
  var_y = np.where(cnt > 1, (s2 - cnt * mu**2) / np.maximum(cnt - 1, 1), 0.0)
  with jax.enable_x64(True):
    p_j, mu_j = jnp.asarray(p), jnp.asarray(mu)
    value = float(fn(p_j, mu_j))
    g_p, g_mu = jax.grad(fn, argnums=(0, 1))(p_j, mu_j)
    g_p, g_mu = np.asarray(g_p).ravel(), np.asarray(g_mu).ravel()
  pv = p.ravel()
  var_p = (g_p**2 @ pv - (g_p @ pv) ** 2) / n
  var_mu = np.sum(g_mu**2 * np.where(cnt.ravel() > 0, var_y.ravel() / safe.ravel(), 0.0))
  return value, float(np.sqrt(max(var_p + var_mu, 0.0)))


# ----------------------------------------------------------------------------- backdoor

def _backdoor_formula(t: int, c: int):
  def fn(p, mu):  # p, mu: [levels of x, strata of z]
    pz = p.sum(0)
    return jnp.sum(pz * (mu[t] - mu[c]))
  return fn


def _discrete_cells(y, x, w, w_name, treatment, control):
  """Validates (y, x, w) and returns per-(x level, w stratum) counts and sums of y and y^2.

  Shared by the discrete backdoor (w = z) and frontdoor (w = m) estimators.
  """
  yv = _vector("y", y)
  n = yv.shape[0]
  xv = _vector("x", x, n)
  wv, _ = as_matrix(w_name, w, n, allow_none=False)
  check_finite(w_name, wv)
  x_levels, x_codes = _codes("x", xv[:, None])
  w_levels, w_codes = _codes(w_name, wv)
  t, c = _level_index("treatment", x_levels, treatment), _level_index("control", x_levels, control)
  with jax.enable_x64(True):
    out = cell_statistics(jnp.asarray(yv), jnp.asarray(x_codes), jnp.asarray(w_codes),
                          n_rows=len(x_levels), n_cols=len(w_levels))
    cnt, s1, s2 = (np.asarray(v, dtype=np.float64) for v in out)
  return cnt, s1, s2, t, c, n, x_levels, w_levels


def _prepare_backdoor(y, x, z, treatment, control):
  cnt, s1, s2, t, c, n, _, z_levels = _discrete_cells(y, x, z, "z", treatment, control)
  for arm, idx in (("treatment", t), ("control", c)):
    empty = np.nonzero(cnt[idx] == 0)[0]
    if empty.size:
      raise ValueError(f"positivity violated: no {arm} units (x={[treatment, control][arm == 'control']}) "
                       f"in stratum z={z_levels[empty[0]].tolist()}; merge strata or use method='gformula'")
  return cnt, s1, s2, t, c, n


def backdoor(y: Any, x: Any, z: Any, *, method: str = "discrete", treatment: float = 1.0,
             control: float = 0.0, interactions: bool = True, level: float = 0.95) -> EffectEstimate:
  """Backdoor adjustment for the effect of setting x to `treatment` vs `control`.

  Args:
    y: [n] outcome. x: [n] treatment. z: [n, kz] adjustment set (blocks all backdoor paths).
    method: "discrete" (plug-in over the strata of z; x discrete) or "gformula"
      (linear regression of y on [1, x, z] plus x*z if `interactions`, averaged over
      the empirical z; x may be continuous).
  Returns:
    EffectEstimate with delta-method (discrete) or HC0 sandwich (g-formula) standard error.
  """
  if method == "discrete":
    cnt, s1, s2, t, c, n = _prepare_backdoor(y, x, z, treatment, control)
    value, se = _delta_se(_backdoor_formula(t, c), cnt, s1, s2)
    return _estimate(value, se, level, "backdoor (discrete plug-in)", n)
  if method != "gformula":
    raise ValueError(f"method must be 'discrete' or 'gformula', got {method!r}")
  yv = _vector("y", y)
  n = yv.shape[0]
  xv = _vector("x", x, n)
  zv, _ = as_matrix("z", z, n, allow_none=False)
  check_finite("z", zv)
  with jax.enable_x64(True):
    effect, se, gram = _gformula(jnp.asarray(yv), jnp.asarray(xv), jnp.asarray(zv),
                                 float(treatment) - float(control), interactions=interactions)
    if not condition_ok(np.asarray(gram))[0]:
      raise ValueError("g-formula regressors [1, x, z] are rank deficient (constant or collinear z)")
  return _estimate(effect, se, level, "backdoor (g-formula)", n)


@functools.partial(jax.jit, static_argnames=("interactions",))
def _gformula(y, x, z, contrast, *, interactions: bool):
  n, kz = z.shape
  zbar = z.mean(0)
  zc = z - zbar
  cols = [jnp.ones((n, 1)), x[:, None], zc]
  if interactions:
    cols.append(x[:, None] * zc)                  # centred z: the x coefficient is the ATE slope
  design = jnp.concatenate(cols, axis=1)
  gram = design.T @ design
  coef = spd_solve(gram, design.T @ y)
  resid = y - design @ coef
  score = design * resid[:, None]
  ginv = spd_solve(gram, jnp.eye(gram.shape[0]))
  cov = ginv @ (score.T @ score) @ ginv
  effect = contrast * coef[1]
  var = contrast**2 * cov[1, 1]
  if interactions:
    b_xz = coef[2 + kz:]
    var = var + contrast**2 * (b_xz @ (zc.T @ zc / n) @ b_xz) / n   # sampling error of E[Z]
  return effect, jnp.sqrt(var), gram


# ----------------------------------------------------------------------------- frontdoor

def _frontdoor_formula(t: int, c: int):
  def do_mean(p, mu, x):  # p, mu: [levels of x, levels of m]
    px = p.sum(1)
    pm_given_x = p[x] / px[x]
    inner = (mu * px[:, None]).sum(0)             # sum_x' E[Y | m, x'] P(x')  -> [levels of m]
    return jnp.sum(pm_given_x * inner)

  return lambda p, mu: do_mean(p, mu, t) - do_mean(p, mu, c)


def _prepare_frontdoor(y, x, m, treatment, control):
  cnt, s1, s2, t, c, n, x_levels, m_levels = _discrete_cells(y, x, m, "m", treatment, control)
  used = (cnt[t] > 0) | (cnt[c] > 0)
  holes = np.argwhere((cnt == 0) & used[None, :])
  if holes.size:
    xi, mi = holes[0]
    raise ValueError(f"positivity violated: no units with x={x_levels[xi, 0]!r} and m={m_levels[mi].tolist()}; "
                     "the frontdoor formula needs E[Y | m, x'] for every x'")
  return cnt, s1, s2, t, c, n


@jax.jit
def frontdoor_linear_moments(data):
  """Both stages of the linear frontdoor from one Gram matrix of D = [1, x, M, y] ([n, k + 3]).

  Returns a [k] (M_k ~ 1 + x), b [k] (y ~ 1 + M + x), their OLS covariances, the
  effect a'b and the Gram matrix (whose diagonal is non-finite iff a column has NaN/inf).
  """
  n, k = data.shape[0], data.shape[1] - 3
  g = data.T @ data
  i1, im, iy = np.array([0, 1]), np.arange(2, 2 + k), 2 + k
  sub = lambda r, c: g[np.ix_(r, c)]
  # Stage 1: M ~ 1 + x.
  g1 = sub(i1, i1)
  coef1 = spd_solve(g1, sub(i1, im))               # [2, k]
  resid_cov = (sub(im, im) - coef1.T @ g1 @ coef1) / (n - 2)
  inv1 = spd_solve(g1, jnp.eye(2, dtype=data.dtype))
  a = coef1[1]
  cov_a = resid_cov * inv1[1, 1]
  # Stage 2: y ~ 1 + M + x.
  i2 = np.concatenate([np.array([0]), im, np.array([1])])
  g2 = sub(i2, i2)
  coef2 = spd_solve(g2, g[i2, iy])
  rss = g[iy, iy] - coef2 @ g2 @ coef2
  cov2 = rss / (n - k - 2) * spd_solve(g2, jnp.eye(k + 2, dtype=data.dtype))
  b = coef2[1:1 + k]
  cov_b = cov2[1:1 + k, 1:1 + k]
  return {"a": a, "b": b, "cov_a": cov_a, "cov_b": cov_b, "effect": a @ b, "gram": g}


def frontdoor(y: Any, x: Any, m: Any, *, method: str = "linear", treatment: float = 1.0,
              control: float = 0.0, level: float = 0.95) -> EffectEstimate:
  """Frontdoor adjustment for the effect of x on y through the mediator(s) m.

  Args:
    y: [n] outcome; x: [n] treatment; m: [n] or [n, k] mediators (several allowed).
    method: "linear" (product of coefficients summed over mediators, as dowhy's
      two-stage regression for k = 1) or "discrete" (the frontdoor formula over the
      joint levels of m; x and m discrete).
  """
  if method == "discrete":
    cnt, s1, s2, t, c, n = _prepare_frontdoor(y, x, m, treatment, control)
    value, se = _delta_se(_frontdoor_formula(t, c), cnt, s1, s2)
    return _estimate(value, se, level, "frontdoor (discrete formula)", n)
  if method != "linear":
    raise ValueError(f"method must be 'linear' or 'discrete', got {method!r}")
  yv, _ = as_matrix("y", y, allow_none=False)
  n = yv.shape[0]
  xv, _ = as_matrix("x", x, n, allow_none=False)
  mv, _ = as_matrix("m", m, n, allow_none=False)
  for name, arr in (("y", yv), ("x", xv)):
    if arr.shape[1] != 1:
      raise ValueError(f"{name} must have one column, got {arr.shape[1]}")
  data = np.empty((n, 3 + mv.shape[1]))
  data[:, 0], data[:, 1], data[:, 2:-1], data[:, -1] = 1.0, xv[:, 0], mv, yv[:, 0]
  with jax.enable_x64(True):
    out = jax.device_get(frontdoor_linear_moments(jax.device_put(data)))
  diag = np.diag(np.asarray(out["gram"]))
  for name, cols in (("x", [1]), ("m", list(range(2, 2 + mv.shape[1]))), ("y", [2 + mv.shape[1]])):
    if not np.isfinite(diag[cols]).all():
      raise ValueError(f"{name} contains NaN or inf; drop or impute those rows first")
  if not condition_ok(np.asarray(out["gram"])[:-1, :-1])[0]:
    raise ValueError("frontdoor regressors [1, x, m] are rank deficient (constant or collinear x / m)")
  a, b = np.asarray(out["a"]), np.asarray(out["b"])
  contrast = float(treatment) - float(control)
  var = b @ np.asarray(out["cov_a"]) @ b + a @ np.asarray(out["cov_b"]) @ a
  return _estimate(contrast * float(out["effect"]), abs(contrast) * np.sqrt(var), level,
                   f"frontdoor (linear, {mv.shape[1]} mediator{'s' if mv.shape[1] > 1 else ''})", n)


# ----------------------------------------------------------------------------- numpyro versions

def cells_model(cnt, s1, s2, loc: float, scale: float):
  """Joint cell probabilities p[r, c] ~ Dirichlet(1) (rows: x levels; columns: z or m levels) and,
  per cell, y ~ Normal(mu[r, c], sigma[r, c]); the likelihood uses the cell counts, sums
  and sums of squares, so its cost does not grow with n.

  A Dirichlet on the joint table makes P(x) and every P(m | x) (or P(z) and P(x | z))
  independent Dirichlets, so this fits the factors P(x), P(m | x), P(y | m, x) of the
  frontdoor formula, and P(z), P(y | x, z) of the backdoor formula.
  """
  p = numpyro.sample("p", dist.Dirichlet(jnp.ones(cnt.size)))
  numpyro.factor("cell_counts", jnp.sum(cnt.reshape(-1) * jnp.log(p)))
  mu = numpyro.sample("mu", dist.Normal(loc, 5.0 * scale).expand(list(cnt.shape)).to_event(2))
  sigma = numpyro.sample("sigma", dist.HalfNormal(2.0 * scale).expand(list(cnt.shape)).to_event(2))
  ll = -cnt * jnp.log(sigma) - (s2 - 2.0 * mu * s1 + cnt * mu**2) / (2.0 * sigma**2)
  numpyro.factor("y_loglik", ll.sum())


def _exact_cells(seed, cnt, s1, s2, loc, scale, num_draws):
  """Exact conjugate posterior draws of the cell table (numpy; no MCMC, no compilation).

  p ~ Dirichlet(1 + counts); per cell (mu, sigma^2) from the Normal-Inverse-Gamma
  posterior with prior mu | s^2 ~ N(loc, s^2 / k0), s^2 ~ InvGamma(1, scale^2), k0 = 0.01
  (a conjugate stand-in for the Normal / HalfNormal priors of `cells_model`).
  """
  rng = np.random.default_rng(seed)
  k0, a0, b0 = 0.01, 1.0, scale**2
  p = rng.dirichlet(1.0 + cnt.reshape(-1), size=num_draws).reshape((num_draws,) + cnt.shape)
  safe = np.maximum(cnt, 1.0)
  ybar = np.where(cnt > 0, s1 / safe, loc)
  ss = np.maximum(s2 - cnt * ybar**2, 0.0)
  kn = k0 + cnt
  mn = (k0 * loc + cnt * ybar) / kn
  an = a0 + cnt / 2.0
  bn = b0 + 0.5 * ss + 0.5 * k0 * cnt * (ybar - loc) ** 2 / kn
  var = bn / rng.gamma(an, 1.0, size=(num_draws,) + cnt.shape)
  mu = mn + np.sqrt(var / kn) * rng.standard_normal(var.shape)
  return p, mu


def _posterior(formula, cnt, s1, s2, *, inference, seed, num_warmup, num_samples, num_chains, level):
  n = cnt.sum()
  loc = float(s1.sum() / n)
  scale = float(np.sqrt(max(s2.sum() / n - loc**2, 1e-12)))
  if inference == "nuts":
    with jax.enable_x64(True):
      samples, seconds = run_nuts(cells_model, seed, num_warmup=num_warmup, num_samples=num_samples,
                                  num_chains=num_chains, cnt=jnp.asarray(cnt), s1=jnp.asarray(s1),
                                  s2=jnp.asarray(s2), loc=loc, scale=scale)
    p = samples["p"].reshape(samples["p"].shape[:2] + cnt.shape)
    mu = samples["mu"]
  elif inference == "exact":
    start = time.perf_counter()
    p, mu = _exact_cells(seed, cnt, s1, s2, loc, scale, num_chains * num_samples)
    p = p.reshape((num_chains, num_samples) + cnt.shape)
    mu = mu.reshape((num_chains, num_samples) + cnt.shape)
    seconds = time.perf_counter() - start
  else:
    raise ValueError(f"inference must be 'exact' or 'nuts', got {inference!r}")
  with jax.enable_x64(True):  # push every posterior draw through the adjustment formula
    effect = jax.jit(jax.vmap(jax.vmap(formula)))(jnp.asarray(p), jnp.asarray(mu))
  return summarize(np.asarray(effect), level, seconds)


def backdoor_posterior(y: Any, x: Any, z: Any, *, treatment: float = 1.0, control: float = 0.0,
                       inference: str = "exact", num_warmup: int = 500, num_samples: int = 500,
                       num_chains: int = 2, seed: int = 0, level: float = 0.95) -> PosteriorSummary:
  """Posterior of the backdoor-adjusted effect (discrete z) under `cells_model`.

  inference: "exact" (conjugate draws, no MCMC) or "nuts" (NUTS on `cells_model`).
  """
  cnt, s1, s2, t, c, _ = _prepare_backdoor(y, x, z, treatment, control)
  return _posterior(_backdoor_formula(t, c), cnt, s1, s2, inference=inference, seed=seed,
                    num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains, level=level)


def frontdoor_posterior(y: Any, x: Any, m: Any, *, treatment: float = 1.0, control: float = 0.0,
                        inference: str = "exact", num_warmup: int = 500, num_samples: int = 500,
                        num_chains: int = 2, seed: int = 0, level: float = 0.95) -> PosteriorSummary:
  """Posterior of the frontdoor effect (discrete x, m): fits P(x), P(m | x), P(y | m, x) with
  `cells_model` and pushes each draw through the frontdoor formula.

  inference: "exact" (conjugate draws, no MCMC) or "nuts" (NUTS on `cells_model`).
  """
  cnt, s1, s2, t, c, _ = _prepare_frontdoor(y, x, m, treatment, control)
  return _posterior(_frontdoor_formula(t, c), cnt, s1, s2, inference=inference, seed=seed,
                    num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains, level=level)
