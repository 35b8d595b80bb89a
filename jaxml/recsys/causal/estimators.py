"""Estimators of a predictor's risk from logged, missing-not-at-random feedback.

Notation (Schnabel et al., "Recommendations as Treatments: Debiasing Learning
and Evaluation", ICML 2016): a predictor makes an error `e_ui` (any per-cell
loss, e.g. the squared error `(Yhat_ui - Y_ui)^2`) on every cell of the
users x items matrix; its risk is the mean over all cells

    R = (1 / (|U| |I|)) sum_{u,i} e_ui.

Only the cells with `O_ui = 1` are observed, each with propensity
`P_ui = P(O_ui = 1)`. With `N = |U| |I|`:

    naive   R_naive = sum_{O=1} e / sum_{O=1} 1                (biased when O depends on e)
    IPS     R_IPS   = (1 / N) sum_{O=1} e / P                  (unbiased: E_O[R_IPS] = R)
    SNIPS   R_SNIPS = sum_{O=1} (e / P) / sum_{O=1} (1 / P)    (consistent; lower variance)

The doubly robust estimator (Wang, Zhang, Sun, Qi, "Doubly Robust Joint
Learning for Recommendation on Data Missing Not at Random", ICML 2019) adds
an imputed error `e_hat_ui` for every cell and estimated propensities `p_hat`:

    DR      R_DR = (1 / N) sum_{u,i} [ e_hat_ui + O_ui (e_ui - e_hat_ui) / p_hat_ui ].

Its bias is `E_O[R_DR] - R = (1 / N) sum_{u,i} (e_hat_ui - e_ui) (1 - P_ui / p_hat_ui)`:
zero when either the propensities (`p_hat = P`) or the imputations
(`e_hat = e`) are right, cell by cell.

Clipping (`clip = c`): every propensity is replaced by `max(P, c)` before it
divides, which bounds the weights by `1 / c` at the price of a bias toward the
low-propensity cells' errors being under-counted.

Errors at unobserved cells are never read (they may be NaN: the true rating
there is unknown); only `dr_risk` reads `imputed_errors_UxI` everywhere.
All functions return a float scalar, are jit-able and vmap-able (value checks
run where inputs are concrete; shape checks always).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxml.recsys.causal import _checks

Array = jax.Array


def _prepare(errors_UxI, observed_UxI, propensities_UxI=None, clip=None, **extra):
  _checks.matrix("errors_UxI", errors_UxI)
  for name, value in extra.items():
    if value is None:
      raise ValueError(f"{name} is required (a [users, items] matrix like errors_UxI)")
  _checks.same_shape("errors_UxI", errors_UxI, observed_UxI=observed_UxI, propensities_UxI=propensities_UxI,
                     **extra)
  _checks.mask("observed_UxI", observed_UxI)
  if propensities_UxI is not None:
    _checks.propensities("propensities_UxI", propensities_UxI)
  _checks.clip_value(clip)
  e = jnp.asarray(errors_UxI)
  dtype = jnp.result_type(e.dtype, jnp.float32)
  o = jnp.asarray(observed_UxI).astype(dtype)
  e = jnp.where(o > 0, e.astype(dtype), jnp.zeros((), dtype))   # unobserved errors never enter
  if propensities_UxI is None:
    return e, o, None
  p = jnp.asarray(propensities_UxI).astype(dtype)
  if clip is not None:
    p = jnp.maximum(p, jnp.asarray(clip, dtype))
  return e, o, p


@jax.jit
def _naive(e, o):
  return jnp.sum(e) / jnp.sum(o)


@jax.jit
def _ips(e, o, p):
  return jnp.sum(o * e / p) / o.size


@jax.jit
def _snips(e, o, p):
  return jnp.sum(o * e / p) / jnp.sum(o / p)


@jax.jit
def _dr(e, o, p, e_hat):
  return jnp.mean(e_hat + o * (e - e_hat) / p)


def naive_risk(errors_UxI: Array, observed_UxI: Array) -> Array:
  """The mean error over the observed cells (module docstring).

  Args:
    errors_UxI: [users, items] per-cell errors (unobserved entries ignored).
    observed_UxI: [users, items] 0/1 or boolean, 1 where observed.

  Returns:
    A float scalar; NaN when nothing is observed.
  """
  e, o, _ = _prepare(errors_UxI, observed_UxI)
  return _naive(e, o)


def ips_risk(errors_UxI: Array, observed_UxI: Array, propensities_UxI: Array, *, clip: float | None = None) -> Array:
  """The inverse-propensity-scored risk `(1 / N) sum_{O=1} e / P` (module docstring).

  Args:
    errors_UxI: [users, items] per-cell errors (unobserved entries ignored).
    observed_UxI: [users, items] 0/1 or boolean, 1 where observed.
    propensities_UxI: [users, items] P(O = 1), each in (0, 1].
    clip: the minimum propensity (weights capped at 1 / clip), or None.

  Returns:
    A float scalar.
  """
  e, o, p = _prepare(errors_UxI, observed_UxI, propensities_UxI, clip)
  return _ips(e, o, p)


def snips_risk(errors_UxI: Array, observed_UxI: Array, propensities_UxI: Array, *,
               clip: float | None = None) -> Array:
  """The self-normalised IPS risk `sum_{O=1} (e / P) / sum_{O=1} (1 / P)` (module docstring).

  Invariant to a common scale of the propensities, so propensities known only
  up to a constant (popularity counts) serve here but not in `ips_risk`.

  Args:
    errors_UxI: [users, items] per-cell errors (unobserved entries ignored).
    observed_UxI: [users, items] 0/1 or boolean, 1 where observed.
    propensities_UxI: [users, items] P(O = 1), each in (0, 1].
    clip: the minimum propensity, or None.

  Returns:
    A float scalar; NaN when nothing is observed.
  """
  e, o, p = _prepare(errors_UxI, observed_UxI, propensities_UxI, clip)
  return _snips(e, o, p)


def dr_risk(errors_UxI: Array, observed_UxI: Array, propensities_UxI: Array, imputed_errors_UxI: Array, *,
            clip: float | None = None) -> Array:
  """The doubly robust risk `(1 / N) sum [e_hat + O (e - e_hat) / p_hat]` (module docstring).

  Args:
    errors_UxI: [users, items] per-cell errors (unobserved entries ignored).
    observed_UxI: [users, items] 0/1 or boolean, 1 where observed.
    propensities_UxI: [users, items] estimated P(O = 1), each in (0, 1].
    imputed_errors_UxI: [users, items] the imputation model's error for every cell.
    clip: the minimum propensity, or None.

  Returns:
    A float scalar.
  """
  e, o, p = _prepare(errors_UxI, observed_UxI, propensities_UxI, clip, imputed_errors_UxI=imputed_errors_UxI)
  return _dr(e, o, p, jnp.asarray(imputed_errors_UxI).astype(e.dtype))


def dr_bias(errors_UxI: Array, true_propensities_UxI: Array, propensities_UxI: Array,
            imputed_errors_UxI: Array) -> Array:
  """The exact bias of `dr_risk`: `(1 / N) sum (e_hat - e) (1 - P / p_hat)` (module docstring).

  Needs the full error matrix and the true propensities, so it serves
  simulations, where both are known.

  Args:
    errors_UxI: [users, items] the true per-cell errors (every cell).
    true_propensities_UxI: [users, items] the true P(O = 1).
    propensities_UxI: [users, items] the propensities the estimator uses.
    imputed_errors_UxI: [users, items] the imputed errors.

  Returns:
    A float scalar, `E_O[dr_risk] - mean(errors_UxI)`.
  """
  _checks.matrix("errors_UxI", errors_UxI)
  _checks.same_shape("errors_UxI", errors_UxI, true_propensities_UxI=true_propensities_UxI,
                     propensities_UxI=propensities_UxI, imputed_errors_UxI=imputed_errors_UxI)
  _checks.propensities("true_propensities_UxI", true_propensities_UxI)
  _checks.propensities("propensities_UxI", propensities_UxI)
  e = jnp.asarray(errors_UxI, jnp.float32)
  return jnp.mean((jnp.asarray(imputed_errors_UxI) - e) * (1.0 - jnp.asarray(true_propensities_UxI)
                                                            / jnp.asarray(propensities_UxI)))
