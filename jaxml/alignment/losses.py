"""Preference losses on sequence log-probabilities: the DPO family, the reward model's, SLiC-HF's.

Every function takes per-sequence log-probabilities (sums over a completion's
tokens, e.g. from `jaxml.llama.sequence_logprobs`) or scores, returns
`(loss, metrics)`, and checks its arguments before computing (a ValueError
naming the argument; values are checked only where they are concrete, not
under a caller's `jax.jit`).

DPO family, matching `DPOTrainer._compute_loss` of trl 1.16.0 (its default
`f_divergence_type="reverse_kl"`, no `ld_alpha`, no WPO weighting). With
s = sigmoid, beta > 0, eps = label_smoothing, n_c / n_r the completion token
counts (clamped to >= 1), and per pair

    cl = logpi(y_c) - logref(y_c),   rl = logpi(y_r) - logref(y_r),   d = cl - rl

the per-pair losses, each averaged over the batch, are:

    sigmoid       -log s(beta d)                                          (DPO, arXiv 2305.18290)
    hinge         relu(1 - beta d)                                        (RSO, arXiv 2309.06657)
    ipo           (cl / n_c - rl / n_r - 1 / (2 beta))^2                  (IPO, arXiv 2310.12036,
                                                                           per-token log-ratios)
    exo_pair      s(beta d) [log s(beta d) - log(1 - eps)]
                  + s(-beta d) [log s(-beta d) - log eps],  0 < eps < 1   (EXO, arXiv 2402.00856)
    nca_pair      -log s(beta cl) - log s(-beta cl) / 2 - log s(-beta rl) / 2   (NCA, arXiv 2402.05369)
    robust        [-(1 - eps) log s(beta d) + eps log s(-beta d)] / (1 - 2 eps),
                  0 <= eps < 1/2                                          (rDPO, arXiv 2403.00409)
    bco_pair      -log s(beta cl) - log s(-beta rl)                       (BCO, arXiv 2404.04656;
                                                                           no running-mean shift)
    sppo_hard     (cl - 1 / (2 beta))^2 + (rl + 1 / (2 beta))^2           (SPPO, arXiv 2405.00675,
                                                                           hard win probabilities)
    aot           x = sort_B(logpi_c - logpi_r) - sort_B(logref_c - logref_r)
                  -(1 - eps) log s(beta x) - eps log s(-beta x)           (AOT, arXiv 2406.05882)
    aot_unpaired  the same with x = sort_B(cl) - sort_B(rl)
    apo_zero      1 - s(beta cl) + s(beta rl)                             (APO, arXiv 2408.06266)
    apo_down      s(beta cl) + 1 - s(beta d)
    discopop      z = beta d, m = s(z / tau):  -log s(z) (1 - m) + exp(-z) m,  tau = 0.05
                                                                          (DiscoPOP, arXiv 2406.08414)
    sft           -sum_B logpi(y_c) / sum_B n_c  (token mean NLL of the chosen completions)
    sigmoid_norm  -log s(beta (cl / n_c - rl / n_r))

(sort_B sorts over the batch, so the aot losses couple the pairs.) Several
types with weights w_k combine as `sum_k w_k mean_B(L_k)`; MPO (arXiv
2411.10442) is `("sigmoid", "bco_pair", "sft")` with `(0.8, 0.2, 1.0)`.
`label_smoothing` is used by robust, exo_pair, aot and aot_unpaired only.

The reward model's loss (TRL's `RewardTrainer.compute_loss`, trl 1.16.0):

    L = -mean_B log s(r_c - r_r - margin) + center_coef * mean_B (r_c + r_r)^2

the centring term from arXiv 2312.09244 (Eq. 2; TRL's
`center_rewards_coefficient`, 0.01 suggested there, off by default).

SLiC-HF (arXiv 2305.10425, Eq. 1), on unnormalised sequence log-likelihoods
of the policy, without a reference model:

    L = mean_B max(0, delta - log P(y+|x) + log P(y-|x)) - lambda mean_B log P(y_ref|x)

the rank-calibration hinge plus cross-entropy on the SFT target y_ref.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# The loss types that read the completion lengths: (chosen, rejected).
_NEEDS_LENGTHS = {"ipo": (True, True), "sigmoid_norm": (True, True), "sft": (True, False)}


def _label_smoothing_ok(loss_type: str, eps: float) -> tuple[bool, str]:
  """Whether `eps` is in the range `loss_type` allows, and that range in words."""
  if loss_type == "robust":
    return 0.0 <= eps < 0.5, "[0, 0.5) (the probability a label is flipped; 1 - 2 eps divides)"
  if loss_type == "exo_pair":
    return 0.0 < eps < 1.0, "(0, 1) (EXO takes log eps and log(1 - eps); the paper suggests 1e-3)"
  if loss_type in ("aot", "aot_unpaired"):
    return 0.0 <= eps <= 0.5, "[0, 0.5]"
  return eps == 0.0, "{0} (this loss type does not use label smoothing)"


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_logps(name: str, x, shape: tuple[int, ...] | None) -> tuple[int, ...]:
  """Checks a `[B]` array argument: rank, shape (if given) and finiteness where concrete."""
  x_shape = tuple(jnp.shape(x))
  if len(x_shape) != 1:
    raise ValueError(f"{name} must be a [B] array, got shape {x_shape}")
  if shape is not None and x_shape != shape:
    raise ValueError(f"{name} has shape {x_shape}, but the chosen batch has shape {shape}: chosen and rejected "
                     "(and policy and reference) batches must have the same size")
  if _is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
    raise ValueError(f"{name} has non-finite values (NaN or inf)")
  return x_shape


def _loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None) -> tuple[tuple[str, ...],
                                                                                              tuple[float, ...]]:
  types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not types:
    raise ValueError("loss_type is empty; give a name or a sequence of names from " + ", ".join(DPO_LOSS_TYPES))
  for t in types:
    if t not in DPO_LOSS_TYPES:
      raise ValueError(f"loss_type {t!r} is unknown; the valid loss types are " + ", ".join(DPO_LOSS_TYPES))
  if loss_weights is None:
    weights = (1.0,) * len(types)
  else:
    weights = tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
      raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {types}")
    if not all(np.isfinite(weights)):
      raise ValueError(f"loss_weights must be finite, got {weights}")
  return types, weights


def _per_pair_dpo(loss_type: str, *, beta: float, eps: float, tau: float, policy_c: Array, policy_r: Array,
                  ref_c: Array, ref_r: Array, n_c: Array | None, n_r: Array | None) -> Array:
  """The `[B]` per-pair loss of one type (a broadcast scalar for sft); see the module docstring."""
  log_sig = jax.nn.log_sigmoid
  sig = jax.nn.sigmoid
  cl, rl = policy_c - ref_c, policy_r - ref_r
  d = cl - rl
  if loss_type == "sigmoid":
    return -log_sig(beta * d)
  if loss_type == "hinge":
    return jax.nn.relu(1.0 - beta * d)
  if loss_type == "ipo":
    return jnp.square(cl / n_c - rl / n_r - 1.0 / (2.0 * beta))
  if loss_type == "exo_pair":
    z = beta * d
    return sig(z) * (log_sig(z) - np.log1p(-eps)) + sig(-z) * (log_sig(-z) - np.log(eps))
  if loss_type == "nca_pair":
    return -log_sig(beta * cl) - 0.5 * log_sig(-beta * cl) - 0.5 * log_sig(-beta * rl)
  if loss_type == "robust":
    return (-(1.0 - eps) * log_sig(beta * d) + eps * log_sig(-beta * d)) / (1.0 - 2.0 * eps)
  if loss_type == "bco_pair":
    return -log_sig(beta * cl) - log_sig(-beta * rl)
  if loss_type == "sppo_hard":
    return jnp.square(cl - 0.5 / beta) + jnp.square(rl + 0.5 / beta)
  if loss_type in ("aot", "aot_unpaired"):
    if loss_type == "aot":
      x = jnp.sort(policy_c - policy_r) - jnp.sort(ref_c - ref_r)
    else:
      x = jnp.sort(cl) - jnp.sort(rl)
    return -(1.0 - eps) * log_sig(beta * x) - eps * log_sig(-beta * x)
  if loss_type == "apo_zero":
    return 1.0 - sig(beta * cl) + sig(beta * rl)
  if loss_type == "apo_down":
    return sig(beta * cl) + 1.0 - sig(beta * d)
  if loss_type == "discopop":
    z = beta * d
    m = sig(z / tau)
    return -log_sig(z) * (1.0 - m) + jnp.exp(-z) * m
  if loss_type == "sft":
    return jnp.broadcast_to(-jnp.sum(policy_c) / jnp.maximum(jnp.sum(n_c), 1.0), policy_c.shape)
  # sigmoid_norm (the names were checked before).
  return -log_sig(beta * (cl / n_c - rl / n_r))


def dpo_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
             ref_rejected_logps_B: Array, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
             chosen_lengths_B: Array | None = None, rejected_lengths_B: Array | None = None,
             discopop_tau: float = 0.05) -> tuple[Array, dict[str, Array]]:
  """A DPO-family preference loss (any of `DPO_LOSS_TYPES`, or a weighted sum of several).

  The formulas, with their papers, are in the module docstring; each equals
  trl 1.16.0's `DPOTrainer._compute_loss` for the same type and defaults
  (checked live in tests/alignment/test_losses.py). Reference log-probs may be
  precomputed once and stored with the data: they are inputs like the others.

  Args:
    policy_chosen_logps_B: `[B]` log pi(y_c | x), summed over completion tokens.
    policy_rejected_logps_B: `[B]` log pi(y_r | x).
    ref_chosen_logps_B: `[B]` log pi_ref(y_c | x).
    ref_rejected_logps_B: `[B]` log pi_ref(y_r | x).
    beta: the inverse temperature (> 0); for ipo the regulariser tau.
    loss_type: one name from `DPO_LOSS_TYPES` or a sequence of names.
    loss_weights: one weight per name (default all 1): the loss is
      `sum_k w_k mean_B(L_k)`.
    label_smoothing: eps for robust ([0, 0.5)), exo_pair ((0, 1)), aot and
      aot_unpaired ([0, 0.5]); must be 0 when none of those is selected (TRL
      1.16.0 silently ignores it for the other types; sigmoid has no
      label smoothing there).
    chosen_lengths_B: `[B]` completion token counts of the chosen responses;
      needed by ipo, sigmoid_norm and sft. Counts below 1 count as 1 (as TRL
      clamps them).
    rejected_lengths_B: `[B]` token counts of the rejected responses; needed
      by ipo and sigmoid_norm.
    discopop_tau: DiscoPOP's temperature (TRL's `discopop_tau`, default 0.05).

  Returns:
    `(loss, metrics)`: the scalar loss (float32 for float32 inputs) and, with
    TRL's names, "rewards/chosen" (mean beta cl), "rewards/rejected" (mean
    beta rl), "rewards/margins" (mean beta d), "rewards/accuracies" (fraction
    with beta cl > beta rl), "logps/chosen", "logps/rejected" (means of the
    policy's log-probs), plus "loss/<type>" (each type's unweighted mean).
  """
  types, weights = _loss_types(loss_type, loss_weights)
  if not (np.isfinite(beta) and beta > 0):
    raise ValueError(f"beta must be a finite number > 0, got {beta}")
  if not (np.isfinite(discopop_tau) and discopop_tau > 0):
    raise ValueError(f"discopop_tau must be a finite number > 0, got {discopop_tau}")
  eps = float(label_smoothing)
  users = [t for t in types if t in ("robust", "exo_pair", "aot", "aot_unpaired")]
  for t in users or types[:1]:
    ok, allowed = _label_smoothing_ok(t, eps)
    if not ok:
      raise ValueError(f"label_smoothing={eps} is outside the range {allowed} for loss_type {t!r}")
  shape = _check_logps("policy_chosen_logps_B", policy_chosen_logps_B, None)
  _check_logps("policy_rejected_logps_B", policy_rejected_logps_B, shape)
  _check_logps("ref_chosen_logps_B", ref_chosen_logps_B, shape)
  _check_logps("ref_rejected_logps_B", ref_rejected_logps_B, shape)
  needs_c = any(_NEEDS_LENGTHS.get(t, (False, False))[0] for t in types)
  needs_r = any(_NEEDS_LENGTHS.get(t, (False, False))[1] for t in types)
  for name, lengths, needed in (("chosen_lengths_B", chosen_lengths_B, needs_c),
                                ("rejected_lengths_B", rejected_lengths_B, needs_r)):
    if lengths is None:
      if needed:
        users_of = [t for t in types if t in _NEEDS_LENGTHS]
        raise ValueError(f"{name} is required by loss_type {users_of} (completion token counts)")
      continue
    _check_logps(name, lengths, shape)
    if _is_concrete(lengths) and np.any(np.asarray(lengths) < 0):
      raise ValueError(f"{name} has negative token counts")

  dtype = jnp.result_type(policy_chosen_logps_B, jnp.float32)
  policy_c, policy_r, ref_c, ref_r = (jnp.asarray(x, dtype) for x in (
      policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B))
  n_c = None if chosen_lengths_B is None else jnp.maximum(jnp.asarray(chosen_lengths_B, dtype), 1.0)
  n_r = None if rejected_lengths_B is None else jnp.maximum(jnp.asarray(rejected_lengths_B, dtype), 1.0)

  loss = jnp.zeros((), dtype)
  metrics = {}
  for t, w in zip(types, weights):
    term = jnp.mean(_per_pair_dpo(t, beta=beta, eps=eps, tau=discopop_tau, policy_c=policy_c, policy_r=policy_r,
                                  ref_c=ref_c, ref_r=ref_r, n_c=n_c, n_r=n_r))
    loss = loss + w * term
    metrics[f"loss/{t}"] = jax.lax.stop_gradient(term)
  chosen_rewards = jax.lax.stop_gradient(beta * (policy_c - ref_c))
  rejected_rewards = jax.lax.stop_gradient(beta * (policy_r - ref_r))
  metrics.update({
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(policy_c)),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(policy_r)),
  })
  return loss, metrics


def reward_loss(r_chosen_B: Array, r_rejected_B: Array, *, margin_B: Array | None = None,
                center_coef: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """The Bradley-Terry reward-model loss, as trl 1.16.0's `RewardTrainer.compute_loss`.

  `-mean log sigmoid(r_c - r_r - margin) + center_coef * mean (r_c + r_r)^2`.

  Args:
    r_chosen_B: `[B]` scores of the chosen responses.
    r_rejected_B: `[B]` scores of the rejected responses.
    margin_B: optional `[B]` margins the chosen score must exceed the
      rejected one by (TRL's "margin" column).
    center_coef: weight of the centring term (TRL's
      `center_rewards_coefficient`; 0 turns it off), >= 0.

  Returns:
    `(loss, metrics)`; metrics (TRL's names): "accuracy" (fraction with
    r_c > r_r) and "margin" (mean of r_c - r_r, without the given margins).
  """
  shape = _check_logps("r_chosen_B", r_chosen_B, None)
  _check_logps("r_rejected_B", r_rejected_B, shape)
  if margin_B is not None:
    _check_logps("margin_B", margin_B, shape)
  if not (np.isfinite(center_coef) and center_coef >= 0):
    raise ValueError(f"center_coef must be a finite number >= 0, got {center_coef}")
  dtype = jnp.result_type(r_chosen_B, jnp.float32)
  r_c, r_r = jnp.asarray(r_chosen_B, dtype), jnp.asarray(r_rejected_B, dtype)
  diff = r_c - r_r
  logits = diff if margin_B is None else diff - jnp.asarray(margin_B, dtype)
  loss = -jnp.mean(jax.nn.log_sigmoid(logits))
  if center_coef:
    loss = loss + center_coef * jnp.mean(jnp.square(r_c + r_r))
  diff = jax.lax.stop_gradient(diff)
  return loss, {"accuracy": jnp.mean((diff > 0).astype(dtype)), "margin": jnp.mean(diff)}


def slic_loss(logp_pos_B: Array, logp_neg_B: Array, logp_ref_target_B: Array, *, delta: float,
              reg_weight: float) -> tuple[Array, dict[str, Array]]:
  """SLiC-HF's loss: rank-calibration hinge plus cross-entropy on the SFT target (arXiv 2305.10425, Eq. 1).

  `mean max(0, delta - logp_pos + logp_neg) + reg_weight * mean(-logp_ref_target)`,
  all three the policy's own unnormalised sequence log-likelihoods; no
  reference model is involved (the regulariser keeps the policy near the SFT
  data instead of a KL term to a frozen copy).

  Where TRL's `hinge` DPO loss differs: TRL's is `relu(1 - beta d)` on the
  beta-scaled log-ratios against a reference model, d = (logpi_c - logref_c)
  - (logpi_r - logref_r) (RSO's normalised hinge, margin 1 / beta on d), and
  it has no regulariser. With a uniform reference (logref_c = logref_r) and
  delta = 1 / beta, TRL's hinge is beta times SLiC's calibration term.

  Args:
    logp_pos_B: `[B]` log P(y+ | x) of the preferred response.
    logp_neg_B: `[B]` log P(y- | x) of the other one.
    logp_ref_target_B: `[B]` log P(y_ref | x) of the SFT target for the same
      prompt.
    delta: the margin (>= 0).
    reg_weight: lambda, the regulariser's weight (>= 0).

  Returns:
    `(loss, metrics)`; metrics: "calibration_loss" (the hinge mean),
    "regularizer" (mean -logp_ref_target), "accuracy" (fraction with
    logp_pos > logp_neg), "margin" (mean of logp_pos - logp_neg).
  """
  shape = _check_logps("logp_pos_B", logp_pos_B, None)
  _check_logps("logp_neg_B", logp_neg_B, shape)
  _check_logps("logp_ref_target_B", logp_ref_target_B, shape)
  if not (np.isfinite(delta) and delta >= 0):
    raise ValueError(f"delta must be a finite number >= 0, got {delta}")
  if not (np.isfinite(reg_weight) and reg_weight >= 0):
    raise ValueError(f"reg_weight must be a finite number >= 0, got {reg_weight}")
  dtype = jnp.result_type(logp_pos_B, jnp.float32)
  pos, neg, target = (jnp.asarray(x, dtype) for x in (logp_pos_B, logp_neg_B, logp_ref_target_B))
  calibration = jnp.mean(jax.nn.relu(delta - pos + neg))
  regularizer = -jnp.mean(target)
  loss = calibration + reg_weight * regularizer
  diff = jax.lax.stop_gradient(pos - neg)
  return loss, {"calibration_loss": jax.lax.stop_gradient(calibration),
                "regularizer": jax.lax.stop_gradient(regularizer),
                "accuracy": jnp.mean((diff > 0).astype(dtype)), "margin": jnp.mean(diff)}
