"""Policy-gradient building blocks: GAE, KL estimators, whitening, PPO's clipped losses.

Pure functions over arrays, jit-able, no state; shared by the alignment code
(PPO-RLHF, GRPO/RLOO) and anything else that runs PPO. Every masked reduction
counts only entries where the mask is nonzero; the mask may be 0/1, bool or
float weights.

Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438), per
row over the valid tokens t_1 < t_2 < ... < t_n (mask 1), with V after the last
valid token taken as 0 (the episode ends there):

    delta_k = r_k + gamma * V_{k+1} - V_k
    A_k     = delta_k + gamma * lam * A_{k+1},      A_{n+1} = V_{n+1} = 0
    R_k     = A_k + V_k                              (the value target)

Masked-out tokens are skipped (the recursion links each valid token to the
next valid one), and get A = R = 0. For the usual contiguous response mask
this is the textbook recursion on the response.

Rows holding several episodes (an environment that auto-resets inside a
rollout) pass `dones_BxT`: d_k = 1 at a valid step after which its episode
ended, so nothing is bootstrapped across the boundary,

    delta_k = r_k + gamma * (1 - d_k) * V_{k+1} - V_k
    A_k     = delta_k + gamma * lam * (1 - d_k) * A_{k+1},

and `last_values_B` gives V_{n+1}, the value of the state after a row's last
valid step when the row was cut mid-episode (0 when not given). Without them
the recursion above is unchanged.

KL estimators (Schulman, "Approximating KL Divergence", 2020) of
KL(pi || pi_ref) from samples of pi, with log r = logp_ref - logp:

    k1 = -log r = logp - logp_ref                       unbiased, can be < 0
    k2 = (log r)^2 / 2                                   biased, >= 0, low variance
    k3 = (r - 1) - log r = exp(logp_ref - logp) - 1 - (logp_ref - logp)
                                                         unbiased, >= 0

PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), with
ratio rho = exp(logp - old_logp) and advantages A (constants):

    L_pi = mean over valid tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high))

Its gradient is the plain policy gradient -A grad rho where the max picks the
unclipped term, and 0 where the clipped term is larger (rho beyond the trust
region on the side the advantage pushes towards). PPO2's value loss with
optional clipping around the rollout's values (as in OpenAI baselines and
MOSS-RLHF):

    L_V = 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

Group advantages for G responses to one prompt with rewards r_1..r_G (one
sequence-level advantage per response; as trl 1.16.0's GRPO and RLOO trainers):

    GRPO (Shao et al. 2024, arXiv 2402.03300):   A_i = (r_i - mean r) / (std r + 1e-4)
             std with Bessel's correction (N - 1), per group ("group") or over
             the whole batch ("batch"); "none" leaves A_i = r_i - mean r
    RLOO (Ahmadian et al. 2024, arXiv 2402.14740):  A_i = r_i - mean_{j != i} r_j
                                                     = G / (G - 1) * (r_i - mean r)

Running moments of a stream (reward scaling / normalisation with statistics
kept across rollouts, as MOSS-RLHF's `RunningMoments`): after batches
x^(1..k) with counts n_j, means m_j and (1/n) variances v_j, the state holds
the count, mean and (1/N) variance of their concatenation, merged one batch at
a time (Chan et al. 1979):

    N' = N + n,   d = m - M,   M' = M + d n / N',
    V' = (N V + n v + d^2 N n / N') / N'

`moments_std` is the standard deviation with Bessel's correction,
sqrt(V N / (N - 1)) (MOSS-RLHF's `running.std`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

KL_KINDS = ("k1", "k2", "k3")
REDUCTIONS = ("token", "sequence")


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
  """`sum(x * mask)` over `axis` (all axes when None)."""
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
  """Mean of `x` over the entries where `mask` is nonzero (weighted by `mask`).

  Args:
    x: any shape.
    mask: broadcastable to `x` (0/1, bool or float weights).
    axis: the axes to reduce; None reduces all.

  Returns:
    `sum(x * mask) / sum(mask)` over `axis`; 0 where the mask sums to 0.
  """
  mask = jnp.broadcast_to(jnp.asarray(mask, x.dtype), x.shape)
  total = jnp.sum(mask, axis=axis)
  safe = jnp.where(total > 0, total, 1)
  return jnp.where(total > 0, jnp.sum(x * mask, axis=axis) / safe, 0)


def masked_var(x: Array, mask: Array) -> Array:
  """Variance over the masked entries (the biased, 1/N form)."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(x - mean), mask)


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """Normalises `x` to zero mean and unit variance over the masked entries.

  `(x - mean) / sqrt(var + eps)` with the masked mean and (biased) variance;
  with `shift_mean=False` the mean is added back (only the scale changes, as
  for rewards whose sign matters). Used for advantages over the valid tokens
  of a batch.

  Args:
    x: any shape, e.g. advantages `[B, T]`.
    mask: broadcastable to `x`.
    shift_mean: subtract the mean (True) or keep it (False).
    eps: added to the variance.

  Returns:
    same shape as `x`, 0 where the mask is 0.
  """
  mask = jnp.broadcast_to(jnp.asarray(mask, x.dtype), x.shape)
  mean = masked_mean(x, mask)
  out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask > 0, out, 0)


def _check_same_shape(ref_name: str, ref: Array, **others: Array) -> None:
  for name, value in others.items():
    if value is not None and jnp.shape(value) != jnp.shape(ref):
      raise ValueError(f"{name} has shape {jnp.shape(value)}, expected {jnp.shape(ref)} (the shape of {ref_name})")


def gae(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, *, gamma: float, lam: float,
        dones_BxT: Array | None = None, last_values_B: Array | None = None) -> tuple[Array, Array]:
  """Generalised advantage estimates and value targets (see the module docstring).

  Runs one reverse `lax.scan` over time. Tokens with mask 0 are skipped: they
  get advantage and return 0 and the recursion links each valid token to the
  next valid one; the value after a row's last valid token is 0.

  Args:
    rewards_BxT: per-token rewards `[B, T]` (e.g. -kl_coef * KL_t plus the
      score on the last response token).
    values_BxT: critic values `[B, T]` at the same tokens.
    mask_BxT: `[B, T]`, 1 on the tokens that were acted on.
    gamma: discount.
    lam: the GAE lambda (0: one-step TD, 1: Monte-Carlo returns minus V).
    dones_BxT: optional `[B, T]`, nonzero at a valid step that ended its
      episode (terminated or truncated): neither V nor A of the next valid
      step is bootstrapped into it. Ignored at masked-out steps.
    last_values_B: optional `[B]`, the value after each row's last valid
      step (bootstrapping a row cut mid-episode); 0 when None.

  Returns:
    `(advantages_BxT, returns_BxT)`, float, 0 where the mask is 0;
    `returns = advantages + values` elsewhere.
  """
  _check_same_shape("rewards_BxT", rewards_BxT, values_BxT=values_BxT, mask_BxT=mask_BxT, dones_BxT=dones_BxT)
  if jnp.ndim(rewards_BxT) != 2:
    raise ValueError(f"rewards_BxT must be [B, T], got shape {jnp.shape(rewards_BxT)}")
  if last_values_B is not None and jnp.shape(last_values_B) != jnp.shape(rewards_BxT)[:1]:
    raise ValueError(f"last_values_B has shape {jnp.shape(last_values_B)}, expected {jnp.shape(rewards_BxT)[:1]}")
  dtype = jnp.result_type(rewards_BxT, values_BxT, jnp.float32)
  rewards = jnp.asarray(rewards_BxT, dtype)
  values = jnp.asarray(values_BxT, dtype)
  valid = jnp.asarray(mask_BxT) > 0

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m, d = xs
    keep = jnp.where(d, 0.0, 1.0).astype(dtype)  # 1 everywhere without dones: the plain recursion, bit for bit
    adv = r + gamma * keep * next_value - v + gamma * lam * keep * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0)

  zeros = jnp.zeros(rewards.shape[0], dtype)
  last = zeros if last_values_B is None else jnp.asarray(last_values_B, dtype)
  ended = jnp.zeros_like(valid) if dones_BxT is None else valid & (jnp.asarray(dones_BxT) > 0)
  _, adv_TxB = jax.lax.scan(step, (last, zeros), (rewards.T, values.T, valid.T, ended.T), reverse=True)
  advantages = adv_TxB.T
  returns = jnp.where(valid, advantages + values, 0)
  return advantages, returns


def kl_penalty(logp_BxT: Array, ref_logp_BxT: Array, kind: str = "k1") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

  Args:
    logp_BxT: log pi of the sampled tokens, any shape (usually `[B, T]`).
    ref_logp_BxT: log pi_ref of the same tokens, same shape.
    kind: "k1" (logp - ref), "k2" (0.5 (logp - ref)^2) or "k3"
      (exp(ref - logp) - 1 - (ref - logp)); see the module docstring.

  Returns:
    the elementwise estimate, same shape (unmasked: multiply by the mask).
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
  _check_same_shape("logp_BxT", logp_BxT, ref_logp_BxT=ref_logp_BxT)
  log_ratio = logp_BxT - ref_logp_BxT
  if kind == "k1":
    return log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  return jnp.expm1(-log_ratio) + log_ratio


def masked_reduce(x: Array, mask: Array, reduction: str = "token") -> Array:
  """The loss reduction PPO's losses use, over the entries where `mask` is nonzero.

  Args:
    x: `[B, T, ...]` per-token values.
    mask: broadcastable to `x`.
    reduction: "token" (the mean over all valid tokens of the batch) or
      "sequence" (each row's mean over its valid tokens, then the mean over
      rows with any valid token).

  Returns:
    a scalar.
  """
  if reduction == "token":
    return masked_mean(x, mask)
  if jnp.ndim(x) < 2:
    raise ValueError(f"reduction='sequence' needs [B, T] inputs, got shape {jnp.shape(x)}")
  axes = tuple(range(1, jnp.ndim(x)))
  rows = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axes) > 0
  return masked_mean(masked_mean(x, mask, axis=axes), rows)


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: float,
                    clip_eps_high: float | None = None, reduction: str = "token") -> tuple[Array, dict[str, Array]]:
  """PPO's clipped surrogate loss `mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps_high))`.

  `old_logp` and `advantages` are data from the rollout: no gradient flows
  into them. The arrays may have any common shape (`[B, T]` per token, or
  `[B]` per sequence).

  Args:
    logp: log pi_theta of the taken actions (differentiated).
    old_logp: log pi_old of the same actions (the rollout policy).
    advantages: advantage estimates, same shape.
    mask: 1 on the valid entries.
    clip_eps: the clip range below 1 (and above 1 unless `clip_eps_high`).
    clip_eps_high: the clip range above 1 if different (DAPO's clip-higher).
    reduction: "token" (mean over all valid tokens of the batch) or
      "sequence" (mean over each row's valid tokens, then over rows; GRPO's
      original normalisation; needs `[B, T]`).

  Returns:
    `(loss, metrics)`; metrics: "policy_loss", "clip_fraction" (fraction of
    valid tokens where the clipped term is active, i.e. the gradient is 0),
    "approx_kl" (the k3 estimate of KL(pi_old || pi_theta), masked mean) and
    "ratio" (masked mean of rho).
  """
  _check_same_shape("logp", logp, old_logp=old_logp, advantages=advantages)
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if not clip_eps > 0:
    raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
  high = clip_eps if clip_eps_high is None else clip_eps_high
  if not high > 0:
    raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
  old_logp = jax.lax.stop_gradient(old_logp)
  advantages = jax.lax.stop_gradient(advantages)
  mask = jnp.broadcast_to(jnp.asarray(mask, logp.dtype), jnp.shape(logp))
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  loss = masked_reduce(jnp.maximum(unclipped, clipped), mask, reduction)
  log_ratio_sg = jax.lax.stop_gradient(log_ratio)
  metrics = {
      "policy_loss": jax.lax.stop_gradient(loss),
      "clip_fraction": masked_mean(jax.lax.stop_gradient(clipped > unclipped).astype(logp.dtype), mask),
      "approx_kl": masked_mean(jnp.expm1(log_ratio_sg) - log_ratio_sg, mask),
      "ratio": masked_mean(jnp.exp(log_ratio_sg), mask),
  }
  return loss, metrics


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array, *,
                   clip_eps: float | None = None) -> tuple[Array, dict[str, Array]]:
  """PPO2's value loss `0.5 mean max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`.

  Without `clip_eps` it is `0.5 mean (V - R)^2`. `old_values` and `returns`
  are rollout data (no gradient).

  Args:
    values: the critic's current values (differentiated), any shape.
    old_values: the values recorded at rollout time, same shape.
    returns: value targets (e.g. GAE returns), same shape.
    mask: 1 on the valid entries.
    clip_eps: the clip range c around `old_values`, or None for no clipping.

  Returns:
    `(loss, metrics)`; metrics: "value_loss", "value_clip_fraction" (fraction
    of valid entries where the clipped error is the larger), "value_error"
    (masked mean of (V - R)^2).
  """
  _check_same_shape("values", values, old_values=old_values, returns=returns)
  if clip_eps is not None and not clip_eps > 0:
    raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
  old_values = jax.lax.stop_gradient(old_values)
  returns = jax.lax.stop_gradient(returns)
  mask = jnp.broadcast_to(jnp.asarray(mask, values.dtype), jnp.shape(values))
  unclipped = jnp.square(values - returns)
  if clip_eps is None:
    per, clip_frac = unclipped, jnp.zeros((), values.dtype)
  else:
    clipped = jnp.square(old_values + jnp.clip(values - old_values, -clip_eps, clip_eps) - returns)
    per = jnp.maximum(unclipped, clipped)
    clip_frac = masked_mean(jax.lax.stop_gradient(clipped > unclipped).astype(values.dtype), mask)
  loss = 0.5 * masked_mean(per, mask)
  metrics = {
      "value_loss": jax.lax.stop_gradient(loss),
      "value_clip_fraction": clip_frac,
      "value_error": masked_mean(jax.lax.stop_gradient(unclipped), mask),
  }
  return loss, metrics


SCALE_REWARDS = ("group", "batch", "none")


def _check_groups(name: str, rewards: Array) -> None:
  if jnp.ndim(rewards) != 2 or jnp.shape(rewards)[1] < 2:
    raise ValueError(f"{name} must be [prompts, G] with G >= 2 responses per prompt, got shape {jnp.shape(rewards)}")


def grpo_advantages(rewards_PxG: Array, *, scale_rewards: str = "group", eps: float = 1e-4) -> Array:
  """GRPO's group-relative advantages (module docstring).

  Args:
    rewards_PxG: `[P, G]` rewards of G responses to each of P prompts.
    scale_rewards: "group" (divide by each group's std), "batch" (by the
      std over all P * G rewards) or "none" (no division), as trl's GRPO.
    eps: added to the std (trl: 1e-4).

  Returns:
    `[P, G]` float32 advantages.
  """
  _check_groups("rewards_PxG", rewards_PxG)
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
  r = jnp.asarray(rewards_PxG, jnp.float32)
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if scale_rewards == "none":
    return centred
  if scale_rewards == "group":
    std = jnp.std(r, axis=1, keepdims=True, ddof=1)
  else:
    std = jnp.std(r, ddof=1)
  return centred / (std + eps)


def rloo_advantages(rewards_PxG: Array) -> Array:
  """RLOO's leave-one-out advantages (module docstring).

  Args:
    rewards_PxG: `[P, G]` rewards of G >= 2 responses to each of P prompts.

  Returns:
    `[P, G]` float32: each reward minus the mean of its G - 1 siblings.
  """
  _check_groups("rewards_PxG", rewards_PxG)
  r = jnp.asarray(rewards_PxG, jnp.float32)
  g = r.shape[1]
  return r - (jnp.sum(r, axis=1, keepdims=True) - r) / (g - 1)


class MomentsState(NamedTuple):
  """Count, mean and (1/N) variance of every value seen so far (float32 scalars)."""
  count: Array
  mean: Array
  var: Array


class RunningMoments(NamedTuple):
  """Running mean/variance as a pair of pure functions (the optax style).

  Attributes:
    init: `init() -> MomentsState` (count 0, mean 0, variance 0).
    update: `update(state, x, mask=None) -> MomentsState`: merges the entries
      of `x` where `mask` is nonzero (all of them without a mask).
  """
  init: Callable[[], MomentsState]
  update: Callable[..., MomentsState]


def running_moments() -> RunningMoments:
  """The running moments of the module docstring.

  Returns:
    A `RunningMoments`; its state is a pytree (it can live in
    `TrainState.extras` and be checkpointed).
  """

  def init() -> MomentsState:
    # Three buffers, not one shared: a step that donates its state donates each leaf once.
    return MomentsState(count=jnp.zeros((), jnp.float32), mean=jnp.zeros((), jnp.float32),
                        var=jnp.zeros((), jnp.float32))

  def update(state: MomentsState, x: Array, mask: Array | None = None) -> MomentsState:
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.ones(x.shape, jnp.float32) if mask is None else jnp.broadcast_to(jnp.asarray(mask, jnp.float32),
                                                                              x.shape)
    n = jnp.sum(mask)
    m = masked_mean(x, mask)
    v = masked_mean(jnp.square(x - m), mask)
    total = state.count + n
    safe = jnp.where(total > 0, total, 1.0)
    delta = m - state.mean
    mean = state.mean + delta * n / safe
    var = (state.count * state.var + n * v + jnp.square(delta) * state.count * n / safe) / safe
    return MomentsState(count=total, mean=jnp.where(total > 0, mean, 0.0), var=jnp.where(total > 0, var, 0.0))

  return RunningMoments(init=init, update=update)


def moments_std(state: MomentsState, eps: float = 0.0) -> Array:
  """The standard deviation with Bessel's correction, `sqrt(V N / (N - 1) + eps)` (1 while N <= 1)."""
  n = state.count
  corrected = state.var * n / jnp.where(n > 1, n - 1, 1.0)
  return jnp.where(n > 1, jnp.sqrt(corrected + eps), 1.0)
