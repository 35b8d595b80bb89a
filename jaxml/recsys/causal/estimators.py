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

Replay (off-policy evaluation of a recommender's lists from logged feedback,
Dudik, Langford, Li, "Doubly Robust Policy Evaluation and Learning", ICML
2011). `replay_lists` gathers, for each user's top-K list, the logged reward,
whether the (user, item) pair was logged and its logging propensity, into
[users, K] matrices; the estimators above then read the list's cells as their
"all cells", so with `N = |U| K`

    ips_risk(r, o, p)          = (1 / N) sum_{listed, logged} r / p
    dr_risk(r, o, p, r_hat)    = (1 / N) sum_{listed} [ r_hat + 1[logged] (r - r_hat) / p ]

which are jurity's `CTR(estimation="ips")` and `CTR(estimation="dr")` at
`k = K` (unclipped and not self-normalised; tests/recsys/causal/test_jurity.py
checks both against jurity 2.1.0 run live). `snips_risk` on the same matrices
is the self-normalised replay estimate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
def _replay(top, rewards, logged, propensities, predicted):
  take = lambda x: jnp.take_along_axis(x, top, axis=1)  # noqa: E731
  o = take(logged.astype(bool))
  out = {"rewards_UxK": jnp.where(o, take(rewards.astype(jnp.float32)), 0.0),
         "observed_UxK": o,
         "propensities_UxK": jnp.where(o, take(propensities.astype(jnp.float32)), 1.0)}
  if predicted is not None:
    out["predicted_UxK"] = take(predicted.astype(jnp.float32))
  return out


def replay_lists(top_items_UxK: Array, rewards_UxI: Array, logged_UxI: Array, propensities_UxI: Array,
                 predicted_UxI: Array | None = None) -> dict[str, Array]:
  """The logged feedback at each user's recommended items, for a replay estimate (module docstring).

  Args:
    top_items_UxK: [users, K] integer item ids, each user's list (e.g. `metrics.mf_top_k`).
    rewards_UxI: [users, items] the logged reward (click or rating); read only where logged.
    logged_UxI: [users, items] 0/1 or boolean, 1 where the logging policy showed the item.
    propensities_UxI: [users, items] the logging policy's P(shown), each in (0, 1] where logged
      (cells not logged are never read and may hold anything, NaN included).
    predicted_UxI: [users, items] a reward model's prediction (DR's imputation), or None.

  Returns:
    `{"rewards_UxK", "observed_UxK", "propensities_UxK"}` (+ `"predicted_UxK"`): rewards 0 and
    propensities 1 where not logged, so `ips_risk(r, o, p)`, `snips_risk(r, o, p)` and
    `dr_risk(r, o, p, predicted)` are the replay estimates of the lists' mean reward.
  """
  _checks.matrix("rewards_UxI", rewards_UxI)
  _checks.same_shape("rewards_UxI", rewards_UxI, logged_UxI=logged_UxI, propensities_UxI=propensities_UxI,
                     predicted_UxI=predicted_UxI)
  _checks.mask("logged_UxI", logged_UxI)
  n_u, n_i = np.shape(rewards_UxI)
  if np.ndim(top_items_UxK) != 2 or np.shape(top_items_UxK)[0] != n_u:
    raise ValueError(f"top_items_UxK must be a [users, K] matrix with {n_u} rows (as rewards_UxI), got shape "
                     f"{tuple(np.shape(top_items_UxK))}")
  if not np.issubdtype(np.asarray(top_items_UxK).dtype if _checks.is_concrete(top_items_UxK)
                       else top_items_UxK.dtype, np.integer):
    raise TypeError("top_items_UxK must hold integer item ids")
  _checks.ids_in_range("top_items_UxK", top_items_UxK, n_i)
  if _checks.is_concrete(logged_UxI) and _checks.is_concrete(propensities_UxI):
    shown = np.asarray(logged_UxI).astype(bool)
    _checks.propensities("propensities_UxI (where logged)", np.asarray(propensities_UxI)[shown])
  return _replay(jnp.asarray(top_items_UxK, jnp.int32), jnp.asarray(rewards_UxI), jnp.asarray(logged_UxI),
                 jnp.asarray(propensities_UxI), None if predicted_UxI is None else jnp.asarray(predicted_UxI))


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
