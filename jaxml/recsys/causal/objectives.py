"""Debiased training objectives as `loss_fn(params, batch, rng) -> (loss, metrics)` for `jaxml.train`.

Every objective scores (user, item) pairs through a backbone `score_fn(params, users_B, items_B) -> [B]`:
`mf.mf_apply` (the default) or a CTR tower through `towers_adapter.tower_score_fn(cfg)`. Hand one
to `jaxml.train.make_train_step` with `functools.partial(objective, score_fn=..., ...)`.

DR-JL (Wang, Zhang, Sun, Qi, "Doubly Robust Joint Learning for Recommendation on Data Missing Not
at Random", ICML 2019). Two models: the predictor r_hat = f(u, i) and an imputation model
r_tilde = g(u, i) whose pseudo-ratings give the imputed error e_hat = (r_hat - r_tilde)^2 of every
cell. On a batch of cells drawn uniformly from all users x items (observed or not), with O the
observation flag and p_hat the propensity:

    prediction   L_DR  = mean_b [ e_hat_b + O_b (e_b - e_hat_b) / p_hat_b ]         (r_tilde fixed)
    imputation   L_IMP = sum_b w_b (e_hat_b - e_b)^2 / sum_b w_b                     (r_hat fixed; "error")
             or  L_IMP = sum_b w_b (r_tilde_b - r_b)^2 / sum_b w_b                   ("rating", the default)

with w = O / p_hat: the paper's weights, self-normalised so that L_IMP is on an MSE's scale and
an L2 on the imputation model means what it means for MF-IPS (`mf.mf_ips_loss`).

with e = (r_hat - r)^2 the true error where observed. The paper alternates the two minimisations
(its Algorithm 1: an imputation update, then a prediction update with the new imputation held
fixed). `dr_jl_loss` under `jaxml.train.make_train_step` takes a gradient step on both at once
(`stop_gradient` keeps each loss from moving the other model), the simultaneous form;
`make_dr_jl_alternating_step` is the paper's: each step updates one model only, `period` steps
of the imputation model, then `period` of the predictor, with one optimizer state per model
(`dr_jl_optimizer`), so the resting model's parameters and moments do not move at all. The paper's imputation model
predicts e_hat directly from features; with e_hat independent of r_hat the gradient of L_DR on
the predictor equals IPS's, so the imputation would never reach the predictor. The pseudo-rating
form above (used by the DR follow-ups, e.g. Guo et al., "Enhanced Doubly Robust Learning", SIGIR
2021) is what makes the unobserved cells pull r_hat toward r_tilde. With e_hat = (r_hat - r_tilde)^2
the paper's imputation loss has two minimisers per cell, r_tilde = r and r_tilde = 2 r_hat - r
(e_hat - e = (r - r_tilde)(2 r_hat - r - r_tilde)), and is quartic in r_tilde; on Coat it left the
imputation model's test MSE at 2.5 (measured, seed 0). The default "rating" form fits r_tilde to
the observed ratings with the same 1 / p_hat weights, which reaches e_hat = e at r_tilde = r.

PDA / PD training (Zhang et al., SIGIR 2021): `pda_loss` is `popularity.pda_bpr_loss` on the
backbone's scores of (user, positive, negative) triples with each item's popularity in the
triple's time stage; gamma = 0 is plain BPR on ELU'(f). Inference: `popularity.pd_inference`,
`popularity.pda_inference`.

MACR (Wei et al., KDD 2021): the backbone gives y_k; an item branch y_i and a user branch y_u are
one free logit per item and per user (the most expressive form of the paper's one-layer branch on
the id embedding, and independent of the backbone); `macr_loss` is `popularity.macr_loss` on them;
`macr_scores` is the counterfactual ranking (y_k - c) sigmoid(y_i) sigmoid(y_u).

DecRS (Wang, Feng, He, Wang, Chua, "Deconfounded Recommendation for Alleviating Bias
Amplification", KDD 2021; DecFM as in the authors' code, WenjieWWJ/DecRS `code/ml-1m/model.py`
and `inference/`). The confounder d_u is user u's distribution over item groups in the training
history. Backdoor adjustment P(Y | do(U = u), I = i) = sum_d P(d) f(u, M(d, u), i) is approximated
by f(u, M(d_bar, u), i) with d_bar = sum_d P(d) d, the prior mean of the users' distributions.
In DecFM, M(d, u) is the FM pair interaction among the user embedding e_u and the group
embeddings weighted by d, {d_g v_g}:

    m = 0.5 [ (e_u + sum_g d_g v_g)^2 - e_u^2 - sum_g d_g^2 v_g^2 ]        (elementwise, [H])

and the score is an FM over {e_u, e_i, m} plus biases:

    y = <e_u, e_i> + <e_u, m> + <e_i, m> + b_u + b_i + b.

Inference mixes DecRS with a plain FM trained beside it, per user:

    score = lambda_u sigmoid(y_DecRS) + (1 - lambda_u) sigmoid(y_FM),
    lambda_u = ((eta_u - min_u eta) / (max_u eta - min_u eta))^alpha,

eta_u the symmetric KL divergence between the group distributions of the first and the second
half of u's interactions, each KL(p || q) = sum_{p_g > 1e-5} p_g log(p_g / ((1 - s) q_g + s p_g)),
s = 0.01 (the authors' `util.kl_div`). Users whose interests drift get the deconfounded score.
With user and item ids as the only features, the FM is MF with biases (`mf.mf_apply`).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import train as jt
from jaxml.recsys.causal import _checks, mf, popularity

Array = jax.Array
ScoreFn = Callable[[dict, Array, Array], Array]


def _require(batch: dict, keys: tuple[str, ...], what: str) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; a {what} batch holds {list(keys)}")


def l2_penalty(params, *, skip: tuple[str, ...] = ("bias",)) -> Array:
  """Sum of squares over every leaf whose last path key is not in `skip` (the global bias by default)."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    if name in skip:
      continue
    total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return total


# ----------------------------------------------------------------------------- DR-JL

DR_KEYS = ("users", "items", "observed", "ratings", "propensities")


def dr_jl_init(rng: Array, n_users: int, n_items: int, dim: int, *, global_bias: float = 0.0,
               scale: float = 0.1) -> dict:
  """`{"prediction": MF, "imputation": MF}` (`mf.mf_init`; different keys, the same `global_bias`)."""
  kp, ki = jax.random.split(rng)
  return {"prediction": mf.mf_init(kp, n_users, n_items, dim, scale=scale, global_bias=global_bias),
          "imputation": mf.mf_init(ki, n_users, n_items, dim, scale=scale, global_bias=global_bias)}


def dr_jl_loss(params: dict, batch: dict, rng: Array | None = None, *, l2: float = 0.0,
               imputation_l2: float | None = None, clip: float | None = None, imputation: str = "rating",
               score_fn: ScoreFn = mf.mf_apply) -> tuple[Array, dict]:
  """DR-JL's two losses, each moving only its model (module docstring).

  Args:
    params: `{"prediction": ..., "imputation": ...}`, each a backbone's parameters.
    batch: cells drawn uniformly from users x items: `users`, `items` int [B], `observed` [B] 0/1,
      `ratings` [B] (read where observed), `propensities` [B] in (0, 1] (read where observed).
    rng: unused.
    l2: the predictor's L2 (`l2_penalty`).
    imputation_l2: the imputation model's L2 (default `l2`).
    clip: the minimum propensity, or None.
    imputation: "rating" (L_IMP fits the pseudo-rating r_tilde to r) or "error" (the paper's fit of
      e_hat to e; module docstring for why it is not the default).
    score_fn: the backbone of both models.

  Returns:
    `(L_DR + L_IMP + penalties, {"dr_loss", "imputation_loss", "l2_penalty"})`.
  """
  del rng
  _require(batch, DR_KEYS, "DR-JL")
  _checks.same_shape("users", batch["users"], **{k: batch[k] for k in DR_KEYS[1:]})
  _checks.propensities("batch['propensities']", batch["propensities"])
  _checks.clip_value(clip)
  if imputation not in ("rating", "error"):
    raise ValueError(f"imputation must be 'rating' or 'error', got {imputation!r}")
  o = jnp.asarray(batch["observed"]).astype(jnp.float32)
  p = jnp.asarray(batch["propensities"], jnp.float32)
  if clip is not None:
    p = jnp.maximum(p, clip)
  r = jnp.where(o > 0, jnp.asarray(batch["ratings"], jnp.float32), 0.0)
  r_hat = score_fn(params["prediction"], batch["users"], batch["items"])
  r_tilde = score_fn(params["imputation"], batch["users"], batch["items"])
  e = jnp.square(r_hat - r)
  e_hat = jnp.square(r_hat - jax.lax.stop_gradient(r_tilde))
  dr = jnp.mean(e_hat + o * (e - e_hat) / p)
  if imputation == "error":
    resid = jnp.square(jax.lax.stop_gradient(r_hat) - r_tilde) - jax.lax.stop_gradient(e)
  else:
    resid = r_tilde - r
  w = o / p
  imp = jnp.sum(w * jnp.square(resid)) / jnp.maximum(jnp.sum(w), 1e-12)
  lam_imp = l2 if imputation_l2 is None else imputation_l2
  penalty = l2 * l2_penalty(params["prediction"]) + lam_imp * l2_penalty(params["imputation"])
  return dr + imp + penalty, {"dr_loss": dr, "imputation_loss": imp, "l2_penalty": penalty}


def all_cells_batch(ratings_UxI, observed_UxI, propensities_UxI) -> dict:
  """Every cell as one DR-JL batch (numpy, row-major): full-batch DR-JL on a small matrix.

  Args:
    ratings_UxI: [users, items] ratings (read where observed).
    observed_UxI: [users, items] 0/1 or boolean.
    propensities_UxI: [users, items] in (0, 1] (read where observed; 1 may fill the rest).

  Returns:
    `{"users", "items", "observed", "ratings", "propensities"}` of length users * items.
  """
  _checks.matrix("ratings_UxI", ratings_UxI)
  _checks.same_shape("ratings_UxI", ratings_UxI, observed_UxI=observed_UxI, propensities_UxI=propensities_UxI)
  _checks.mask("observed_UxI", observed_UxI)
  o = np.asarray(observed_UxI).astype(bool)
  p = np.where(o, np.asarray(propensities_UxI, np.float64), 1.0)
  _checks.propensities("propensities_UxI", p)
  if not o.any():
    raise ValueError("observed_UxI has no observed cell: DR-JL has nothing to learn from")
  u, i = np.indices(o.shape)
  return {"users": u.ravel().astype(np.int32), "items": i.ravel().astype(np.int32),
          "observed": o.ravel().astype(np.float32), "ratings": np.asarray(ratings_UxI, np.float32).ravel(),
          "propensities": p.ravel().astype(np.float32)}


DR_MODELS = ("prediction", "imputation")


def dr_jl_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` run separately on DR-JL's two models: state `{"prediction": ..., "imputation": ...}`.

  For a per-leaf optimizer (Adam, SGD) the joint step under it equals the joint step under `tx`;
  a global transform (clipping by global norm) then sees each model on its own. Required by
  `make_dr_jl_alternating_step`, which updates one model's state at a time.
  """
  def init(params):
    return {k: tx.init(params[k]) for k in DR_MODELS}

  def update(grads, state, params=None):
    out = {k: tx.update(grads[k], state[k], None if params is None else params[k]) for k in DR_MODELS}
    return {k: out[k][0] for k in DR_MODELS}, {k: out[k][1] for k in DR_MODELS}

  return optax.GradientTransformation(init, update)


def make_dr_jl_alternating_step(tx: optax.GradientTransformation, *, period: int = 1, steps_per_call: int = 1,
                                **loss_kwargs):
  """DR-JL's alternating updates (the paper's Algorithm 1) as a `(state, batch) -> (state, metrics)` step.

  Step t updates the imputation model when `(t // period) % 2 == 0` and the predictor otherwise, each
  with its own gradient of `dr_jl_loss` (the other model held fixed; only that gradient is computed,
  under `lax.cond`) and its own optimizer state; the other model's parameters and state are left
  exactly as they were.

  Args:
    tx: the optimizer of each model; the state must be built with `dr_jl_optimizer(tx)`
      (`jaxml.train.init_train_state(init_fn, dr_jl_optimizer(tx), rng)`); no EMA.
    period: steps per phase.
    steps_per_call: k steps per call (`jaxml.train.scan_steps`).
    **loss_kwargs: `dr_jl_loss`'s keywords (l2, imputation_l2, clip, imputation, score_fn).

  Returns:
    The step; metrics: `dr_jl_loss`'s (at the parameters before the update), `loss`, `grad_norm` (of
    the updated model) and `phase` (0 imputation, 1 prediction).
  """
  if isinstance(period, bool) or int(period) != period or period < 1:
    raise ValueError(f"period must be a positive integer, got {period}")
  loss = functools.partial(dr_jl_loss, **loss_kwargs)

  def update(state, batch, name):
    other = "imputation" if name == "prediction" else "prediction"
    part = lambda sub: loss({name: sub, other: state.params[other]}, batch)  # noqa: E731
    (total, metrics), grads = jax.value_and_grad(part, has_aux=True)(state.params[name])
    updates, sub_state = tx.update(grads, state.opt_state[name], state.params[name])
    params = {**state.params, name: optax.apply_updates(state.params[name], updates)}
    return params, {**state.opt_state, name: sub_state}, total, metrics, optax.tree.norm(grads)

  def step(state, batch):
    _require(batch, DR_KEYS, "DR-JL")
    if not isinstance(state.opt_state, dict) or set(state.opt_state) != set(DR_MODELS):
      raise ValueError("state.opt_state must hold one optimizer state per model; build the state with "
                       "dr_jl_optimizer(tx)")
    imputing = (state.step // period) % 2 == 0
    params, opt_state, total, metrics, grad_norm = jax.lax.cond(
        imputing, lambda: update(state, batch, "imputation"), lambda: update(state, batch, "prediction"))
    metrics = {**metrics, "loss": total, "grad_norm": grad_norm, "phase": jnp.where(imputing, 0, 1)}
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

  return jt.scan_steps(step, steps_per_call)


# ----------------------------------------------------------------------------- PDA / BPR

PDA_KEYS = ("users", "pos_items", "neg_items", "pos_pop", "neg_pop")


def pda_loss(params, batch: dict, rng: Array | None = None, *, gamma: float, l2: float = 0.0,
             score_fn: ScoreFn = mf.mf_apply) -> tuple[Array, dict]:
  """PDA's popularity-aware BPR on the backbone (module docstring; gamma = 0: BPR on ELU'(f)).

  Args:
    params: the backbone's parameters.
    batch: `users`, `pos_items`, `neg_items` int [B]; `pos_pop`, `neg_pop` [B] the items'
      popularity in the stage the positive interaction came from (`popularity.stage_popularity`).
    rng: unused.
    gamma: the popularity exponent.
    l2: L2 on the backbone (`l2_penalty`).
    score_fn: the backbone.

  Returns:
    `(loss, {"bpr", "bpr_accuracy", "l2_penalty"})`.
  """
  del rng
  _require(batch, PDA_KEYS, "PDA")
  f_pos = score_fn(params, batch["users"], batch["pos_items"])
  f_neg = score_fn(params, batch["users"], batch["neg_items"])
  bpr, m = popularity.pda_bpr_loss(f_pos, f_neg, batch["pos_pop"], batch["neg_pop"], gamma=gamma)
  penalty = l2 * l2_penalty(params) if l2 else jnp.zeros((), jnp.float32)
  return bpr + penalty, {"bpr": bpr, "bpr_accuracy": m["bpr_accuracy"], "l2_penalty": penalty}


# ----------------------------------------------------------------------------- MACR

CLICK_KEYS = ("users", "items", "labels")


def macr_init(backbone_params, n_users: int, n_items: int) -> dict:
  """`{"backbone": ..., "user_logit": zeros [U], "item_logit": zeros [I]}`: MACR's branches."""
  return {"backbone": backbone_params, "user_logit": jnp.zeros((n_users,), jnp.float32),
          "item_logit": jnp.zeros((n_items,), jnp.float32)}


def macr_train_loss(params: dict, batch: dict, rng: Array | None = None, *, alpha: float = 1e-3, beta: float = 1e-3,
                    l2: float = 0.0, score_fn: ScoreFn = mf.mf_apply) -> tuple[Array, dict]:
  """MACR's multi-task BCE (`popularity.macr_loss`) on labelled (user, item) pairs.

  Args:
    params: from `macr_init`.
    batch: `users`, `items` int [B], `labels` [B] in {0, 1} (clicks and sampled negatives).
    rng: unused.
    alpha, beta: the item and user branch weights.
    l2: L2 on the backbone.
    score_fn: the backbone (gives y_k).

  Returns:
    `(loss, {"main", "item", "user", "l2_penalty"})`.
  """
  del rng
  _require(batch, CLICK_KEYS, "MACR")
  y_k = score_fn(params["backbone"], batch["users"], batch["items"])
  y_i = params["item_logit"][batch["items"]]
  y_u = params["user_logit"][batch["users"]]
  loss, m = popularity.macr_loss(y_k, y_i, y_u, jnp.asarray(batch["labels"], jnp.float32), alpha=alpha, beta=beta)
  penalty = l2 * l2_penalty(params["backbone"]) if l2 else jnp.zeros((), jnp.float32)
  return loss + penalty, {**m, "l2_penalty": penalty}


def macr_scores(params: dict, y_k_UxI: Array, c: float) -> Array:
  """MACR's counterfactual ranking `(y_k - c) sigmoid(y_i) sigmoid(y_u)` for a full score matrix.

  Args:
    params: from `macr_init` (its branches).
    y_k_UxI: [U, I] backbone scores (e.g. `mf.mf_scores(params["backbone"])`).
    c: the reference matching score (0: the training score).
  """
  return popularity.macr_score(y_k_UxI, params["item_logit"][None, :], params["user_logit"][:, None], c)


def bce_loss(params, batch: dict, rng: Array | None = None, *, l2: float = 0.0,
             score_fn: ScoreFn = mf.mf_apply) -> tuple[Array, dict]:
  """Plain BCE on labelled pairs (the FM / MF baseline next to MACR and DecRS)."""
  del rng
  _require(batch, CLICK_KEYS, "BCE")
  logits = score_fn(params, batch["users"], batch["items"])
  y = jnp.asarray(batch["labels"], jnp.float32)
  ll = jnp.mean(jax.nn.softplus(logits) - y * logits)
  penalty = l2 * l2_penalty(params) if l2 else jnp.zeros((), jnp.float32)
  return ll + penalty, {"logloss": ll, "l2_penalty": penalty}


# ----------------------------------------------------------------------------- DecRS


def decrs_init(rng: Array, n_users: int, n_items: int, n_groups: int, dim: int, *, scale: float = 0.1) -> dict:
  """DecFM parameters: MF's (`mf.mf_init`) plus group embeddings `group` [G, H]."""
  k_mf, k_g = jax.random.split(rng)
  p = mf.mf_init(k_mf, n_users, n_items, dim, scale=scale)
  p["group"] = scale * jax.random.normal(k_g, (n_groups, dim), jnp.float32)
  return p


def decrs_mediator(params: dict, users_B: Array, d_G: Array) -> Array:
  """M(d, u): the FM pair interaction among e_u and {d_g v_g} (module docstring). Returns [B, H]."""
  e_u = params["user"][users_B]
  d = jnp.asarray(d_G, jnp.float32)
  if d.ndim != 1 or d.shape[0] != params["group"].shape[0]:
    raise ValueError(f"d_G must be a [{params['group'].shape[0]}] group distribution, got shape {d.shape}")
  weighted = d[:, None] * params["group"]                                  # [G, H]
  total = e_u + jnp.sum(weighted, 0)[None]
  return 0.5 * (jnp.square(total) - jnp.square(e_u) - jnp.sum(jnp.square(weighted), 0)[None])


def decrs_apply(params: dict, users_B: Array, items_B: Array, d_G: Array) -> Array:
  """DecFM's logit f(u, M(d, u), i) (module docstring). Returns [B]."""
  _checks.same_shape("users_B", users_B, items_B=items_B)
  _checks.ids_in_range("users_B", users_B, params["user"].shape[0])
  _checks.ids_in_range("items_B", items_B, params["item"].shape[0])
  e_u, e_i = params["user"][users_B], params["item"][items_B]
  m = decrs_mediator(params, users_B, d_G)
  return (jnp.sum(e_u * e_i + e_u * m + e_i * m, -1) + params["user_bias"][users_B] + params["item_bias"][items_B]
          + params["bias"])


def decrs_scores(params: dict, d_G: Array) -> Array:
  """DecFM's logits for every cell at the group distribution `d_G`: [U, I]."""
  users = jnp.arange(params["user"].shape[0])
  m = decrs_mediator(params, users, d_G)                                   # [U, H]
  e_u, e_i = params["user"], params["item"]
  return ((e_u + m) @ e_i.T + jnp.sum(e_u * m, -1)[:, None] + params["user_bias"][:, None]
          + params["item_bias"][None, :] + params["bias"])


def decrs_loss(params: dict, batch: dict, rng: Array | None = None, *, prior_G: Array,
               l2: float = 0.0) -> tuple[Array, dict]:
  """BCE of DecFM at the prior mean d_bar = `prior_G` (the backdoor approximation) plus L2."""
  del rng
  _require(batch, CLICK_KEYS, "DecRS")
  logits = decrs_apply(params, batch["users"], batch["items"], prior_G)
  y = jnp.asarray(batch["labels"], jnp.float32)
  ll = jnp.mean(jax.nn.softplus(logits) - y * logits)
  penalty = l2 * l2_penalty(params) if l2 else jnp.zeros((), jnp.float32)
  return ll + penalty, {"logloss": ll, "l2_penalty": penalty}


def group_distribution(interactions_UxI, item_groups_IxG) -> np.ndarray:
  """d_u: each user's distribution over item groups in `interactions_UxI` (numpy).

  Args:
    interactions_UxI: [U, I] 0/1 or boolean (or counts).
    item_groups_IxG: [I, G] each item's group membership, rows summing to 1 (one-hot, or
      1 / (its number of groups) each, as the authors split multi-genre items).

  Returns:
    float64 [U, G], rows summing to 1 (a user without interactions gets the uniform row).
  """
  _checks.matrix("interactions_UxI", interactions_UxI)
  _checks.matrix("item_groups_IxG", item_groups_IxG)
  x, g = np.asarray(interactions_UxI, np.float64), np.asarray(item_groups_IxG, np.float64)
  if g.shape[0] != x.shape[1]:
    raise ValueError(f"item_groups_IxG has {g.shape[0]} rows but interactions_UxI has {x.shape[1]} items")
  if not np.allclose(g.sum(1), 1.0):
    raise ValueError("item_groups_IxG rows must sum to 1")
  counts = x @ g
  n = counts.sum(1, keepdims=True)
  return np.where(n > 0, counts / np.maximum(n, 1e-12), 1.0 / g.shape[1])


def smoothed_kl(p_UxG, q_UxG, smoothing: float = 0.01) -> np.ndarray:
  """Row-wise KL(p || (1 - s) q + s p), skipping p_g < 1e-5 (the authors' `kl_div`). Returns [U]."""
  p, q = np.asarray(p_UxG, np.float64), np.asarray(q_UxG, np.float64)
  _checks.same_shape("p_UxG", p, q_UxG=q)
  mix = (1.0 - smoothing) * q + smoothing * p
  keep = p >= 1e-5
  return np.sum(np.where(keep, p * np.log(np.where(keep, p, 1.0) / np.where(keep, mix, 1.0)), 0.0), axis=-1)


def decrs_lambda(first_UxG, second_UxG, alpha: float) -> np.ndarray:
  """lambda_u = ((eta_u - min eta) / (max eta - min eta))^alpha, eta the symmetric smoothed KL. Returns [U]."""
  eta = smoothed_kl(first_UxG, second_UxG) + smoothed_kl(second_UxG, first_UxG)
  lo, hi = eta.min(), eta.max()
  if hi <= lo:
    return np.ones_like(eta)
  return ((eta - lo) / (hi - lo)) ** alpha


def decrs_mix(decrs_logits_UxI: Array, fm_logits_UxI: Array, lambda_U: Array) -> Array:
  """lambda_u sigmoid(y_DecRS) + (1 - lambda_u) sigmoid(y_FM): DecRS's inference score [U, I]."""
  _checks.same_shape("decrs_logits_UxI", decrs_logits_UxI, fm_logits_UxI=fm_logits_UxI)
  lam = jnp.asarray(lambda_U, jnp.float32)[:, None]
  return lam * jax.nn.sigmoid(decrs_logits_UxI) + (1.0 - lam) * jax.nn.sigmoid(fm_logits_UxI)
