"""PPO-RLHF on the jaxml Llama, with the tricks of "Secrets of RLHF in Large Language Models
Part I: PPO" (Zheng et al. 2023, arXiv 2307.04964) as switches, and GRPO / RLOO on the same
rollout and update.

One call of the step built by `make_step` is one PPO iteration, compiled as one program:

  1. rollout: each prompt (left-padded in `batch["prompts"]`, repeated `group_size`
     times for GRPO/RLOO) is continued by `max_new_tokens` tokens sampled from the
     policy at `temperature` (the compiled decode loop of `jaxml.llama.generate`);
  2. scoring: `reward_fn(tokens_BxT, mask_BxT, P)` on prompt + response, then one
     forward pass each of the policy (rollout log-probs and entropy), the frozen
     reference and the critic, all on the same sequences;
  3. rewards and advantages (below), then `ppo_epochs` passes over the rollout in
     `num_minibatches` shuffled minibatches, each one optimizer update of the policy
     and the critic together.

Layout. A rollout row is `tokens_BxT = [prompt (left-padded to P) | response (N)]`,
T = P + N, so every response starts at column P. `mask_BxT` is 1 on the prompt's real
tokens and on the response up to and including its first EOS (`eos_id`), 0 on the
left padding and after EOS. Positions count from each row's first real token
(`llama.decoder` with `attention_mask`: a padded row scores as the same row unpadded)
and no token attends to padding. Response token t (column P + t) is the action taken
from the state ending at column P + t - 1: its log-probability comes from the logits at
P + t - 1, and so does its value V_t (the critic's scalar head on the hidden state
there). All log-probabilities (rollout, update, reference) are the policy's own, from a
forward pass: log softmax(logits / temperature) with `logprobs_tempered` (TRL), log
softmax(logits) without (MOSS-RLHF); top-p truncation and the repetition penalty shape
only the draw, never these. Everything
per token is `[B, N]` with the response mask; padding after EOS has
mask 0 and contributes to no sum, mean, whitening statistic or running moment.

Where the score lands. `reward_fn` returns one score per row; it is added to the
reward of the row's LAST RESPONSE TOKEN (the EOS when there is one, else token N - 1),
as MOSS-RLHF and OpenRLHF do (TRL 1.12 puts it on the slot after EOS). A reward model
used as `reward_fn` (`reward_model_apply`) reads its score at the last position where
the mask is 1: that same token. Per-token rewards with the token-level KL penalty

    k_t = kl_penalty(logp_old_t, logp_ref_t, kl_estimator)         (jaxml.rl)
    r_t = -kl_coef * k_t + [t = last] * score'

where score' is the processed score: with `reward_scaling` divided by the running
standard deviation of the raw scores, with `reward_norm` standardised by the running
mean and standard deviation (the moments are updated with the batch first, as MOSS's
trainer), then clipped to +-`reward_clip`. The running moments live in
`TrainState.extras["reward_moments"]` (checkpointed with the state), and so does kl_coef,
`extras["kl_coef"]`: fixed at `PPOConfig.kl_coef`, or, with `kl_target` set, moved after
each rollout by the adaptive controller (`adaptive_kl_coef`, Ziegler et al. 2019).

Advantages. "gae": `jaxml.rl.gae` on r_t and the critic's values (gamma, lam); returns
are the critic's targets. "grpo" / "rloo": one advantage per response from the group's
scores (`jaxml.rl.grpo_advantages`, `rloo_advantages`; rows of one prompt are
consecutive, the layout of `jnp.repeat(prompts, group_size, axis=0)`), broadcast over
the response's tokens; no critic. With `kl_mode="as_reward"` the group's scores are
first lowered by `kl_coef * sum_t k_t` (RLOO); with "as_loss" the KL is a loss term
`kl_coef * mean_t kl_penalty(logp_t, logp_ref_t)` on the current policy (GRPO). Then
optionally whitened over the batch's response tokens (`advantage_norm`) and clipped to
+-`advantage_clip`.

Loss of one minibatch (means over its valid response tokens, `loss_reduction`):

    L = L_pi - entropy_coef * H + vf_coef * L_V + [as_loss] kl_coef * KL + ptx_coef * L_ptx

L_pi is PPO's clipped surrogate (`jaxml.rl.ppo_policy_loss`, ratio rho = pi / pi_old);
without `clip_surrogate` the unclipped -A rho; without `importance_sampling` the plain
policy gradient -A log pi (whose gradient equals -A grad rho at rho = 1, a fresh
rollout). L_V is `jaxml.rl.ppo_value_loss` (clipped by `value_clip` around the
rollout's values when set). L_ptx is the next-token loss of the policy on
`batch["ptx_tokens"]` (`llama.loss_fn`; PPO-ptx, InstructGPT), the whole ptx batch in every
minibatch update. The gradients of the
policy and the critic are clipped together to the global norm `max_grad_norm` (one
DeepSpeed engine wraps both in MOSS-RLHF), then each has its own Adam.

Stopping. Every step reports `kl_guard`: the rollout's KL (`kl` below) where it is
finite and at most `max_kl`, NaN otherwise. Train with
`jt.train(..., finite_keys=ppo.FINITE_KEYS)`: the training core then raises its
`NonFiniteLossError` naming `kl_guard`, sets aside the checkpoints of states from
that step on and keeps the last good one, exactly as for a NaN loss.

Metrics (one value per step; update metrics averaged over the minibatches):
reward (mean raw score from `reward_fn`), score (mean processed score'), kl (mean over
rows of the sequence KL estimate sum_t (logp_old_t - logp_ref_t), the k1 estimate of
KL(pi || pi_ref) of the whole response), kl_penalty (the same sum with `kl_estimator`),
kl_guard, kl_coef (the coefficient this rollout used), entropy (mean token entropy of the policy on the response), response_length,
clip_fraction, value_clip_fraction, value_error, approx_kl, ratio, policy_loss,
value_loss, advantages, returns, values, reward_mean/reward_std (running moments),
loss, grad_norm (global norm of the gradient before clipping), plus the means of
`metrics_fn`'s entries (e.g. a true reward beside the reward model's score).

Keys: a step draws only from `jt.step_rng(state)`: the rollout from its
`fold_in(., 0)`, the minibatch shuffles from `fold_in(., 1)`. So a resumed run
samples the same responses as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import llama, rl
from jaxml import train as jt
from jaxml.alignment import reward_model as rm

Array = jax.Array
Params = dict[str, Any]

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")
KL_MODES = ("as_reward", "as_loss")
CRITIC_INITS = ("reward_model", "policy", "random")
POLICY_INITS = ("sft", "random")
ROLLOUT_LOGPROBS = ("forward", "decode")
# The metrics `jt.train` must see finite (pass as `finite_keys`): kl_guard is NaN when the KL is
# NaN or above `max_kl`.
FINITE_KEYS = ("loss", "grad_norm", "kl_guard")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO-RLHF hyper-parameters; the defaults are the PPO-max combination (`ppo_preset("ppo_max")`).

  Sources: [P] the paper (arXiv 2307.04964, Sec. 5 and 5.4), [M] MOSS-RLHF's release
  (`config_ppo.py` defaults, `train_ppo_en.sh` flags, `accelerate_config.yaml`),
  [T] trl 1.12 PPOConfig, trl 1.16 GRPO/RLOO. The numbers are the Figure 5 tricks.
  """
  # (1) token-level KL penalty.
  kl_coef: float = 0.05              # [P] Sec. 5 experiments; [M] 0.02 config default, 0.01 en script; [T] 0.05
  kl_estimator: str = "k1"           # [M][T] log pi - log pi_ref in the reward; "k2", "k3" (jaxml.rl.kl_penalty)
  kl_mode: str = "as_reward"         # [P][M] per-token reward; "as_loss" (GRPO, trl 1.16) a loss term
  # (2) importance sampling: the ratio pi / pi_old (off: -A log pi, the plain policy gradient).
  importance_sampling: bool = True   # [P][M] on
  # (3) entropy bonus.
  entropy_coef: float = 0.0          # [M] entropy_loss_weight 0 (MOSS's term is |H - 35|, not a bonus; [P] off)
  # (4) reward scaling: score / running std.
  reward_scaling: bool = True        # [P] PPO-max scales with running statistics; [M] --use_reward_scaling
  # (5) reward normalisation (running mean and std) and clipping.
  reward_norm: bool = True           # [P] PPO-max: "normalize and clip ... historical mean and variance"
  reward_clip: float | None = 10.0   # [M] reward_clip 10 (config default)
  # (6) advantage normalisation (whitening over the batch's response tokens) and clipping.
  advantage_norm: bool = True        # (verify) [T] whitens; [M] --use_advantage_norm off in the scripts
  advantage_clip: float | None = None  # [P] App. B.1: not with reward normalisation; [M] 0.5 when on
  # (7) value-function loss clipping around the rollout's values.
  value_clip: float | None = 0.2     # [P] PPO-max clips the value loss; [M] value_clip 0.2; [T] 0.2
  # (8) critic initialisation: from the reward model, the policy's decoder (fresh head), or random.
  critic_init: str = "reward_model"  # [P] PPO-max; [M] critic_model_path = the reward model
  # (9) policy initialisation: from the SFT model given to init_state, or random.
  policy_init: str = "sft"           # [P][M]
  # (10) generalised advantage estimation.
  gamma: float = 1.0                 # [P][M][T] 1
  lam: float = 0.95                  # [M][T] 0.95 (the paper's experiments: 0.9)
  # (11) clipped surrogate objective.
  clip_surrogate: bool = True        # [P][M] --use_policy_loss_clip
  clip_eps: float = 0.2              # [M] pg_clip 0.2; [T] cliprange 0.2
  # (12) global gradient clipping (policy and critic together).
  max_grad_norm: float | None = 1.0  # [M] DeepSpeed gradient_clipping 1.0
  # PPO-ptx: next-token loss on batch["ptx_tokens"].
  ptx_coef: float = 0.0              # [P] PPO-max adds it (weight not stated); [M] 0; set > 0 with ptx data
  # Advantage estimator and groups.
  advantage_estimator: str = "gae"   # "gae" (PPO), "grpo", "rloo"
  group_size: int = 1                # responses per prompt ([T] GRPO 8, RLOO 2); 1 for gae
  scale_rewards: str = "group"       # GRPO's std division: "group" | "batch" | "none" ([T] "group")
  # Update.
  vf_coef: float = 1.0               # [M] vf_loss_weight 1; [T] 0.1
  ppo_epochs: int = 1                # [P] a small experience buffer, each rollout used once; [T] 4
  num_minibatches: int = 1           # [M] num_rollouts / batch_size = 4 (config defaults)
  loss_reduction: str = "token"      # "token" ([M] sum over mask / tokens) or "sequence" (GRPO's original)
  policy_lr: float = 5e-7            # [M] lr
  value_lr: float = 1.5e-6           # [M] critic_lr
  adam_b1: float = 0.9               # [M] beta1
  adam_b2: float = 0.95              # [M] beta2
  adam_eps: float = 1e-6             # [M] eps (policy; the critic's 1e-8 there)
  # Adaptive KL controller ([Z] Ziegler et al. 2019, arXiv 1909.08593, Sec. 2.2, and its code
  # lm-human-preferences `AdaptiveKLController`): after each rollout
  #   kl_coef <- kl_coef * (1 + clip(KL / kl_target - 1, -0.2, 0.2) * R / kl_horizon),
  # KL the rollout's mean sequence KL (metric `kl`), R its rows; the rollout's own rewards use the
  # coefficient from before the update. The coefficient lives in TrainState.extras["kl_coef"].
  # Used by [Z] (adaptive_kl, off by default there), trl <= 0.11 PPOTrainer (adap_kl_ctrl=True, init 0.2,
  # target 6, horizon 10000) and OpenRLHF (--kl_target, None: fixed); MOSS-RLHF, trl 1.12 PPO, trl 1.16
  # GRPO/RLOO and the paper's PPO-max use a fixed coefficient, so it is off in every preset.
  kl_target: float | None = None     # None: fixed kl_coef
  kl_horizon: float = 10000.0        # [Z] horizon 10000 (episodes); [T<=0.11] 10000; OpenRLHF 10000
  # Sampling (the rollout's draw only; see logprobs_tempered for the log-probabilities).
  temperature: float = 1.0           # 1: the sampled distribution is the policy that the KL regularises
                                     # ([M] 0.8 with top-p 0.9; [T] 0.7)
  top_p: float | None = None         # nucleus sampling ([M] --topp 0.9; [T] 1.0); None: off
  # CTRL's penalty on ids already in the row ([M] 1.1); None: off.
  repetition_penalty: float | None = None
  # Whether the penalty also covers the prompt's ids (transformers' generate: True); MOSS-RLHF's generate
  # penalises only the ids of the response so far ([M]: False).
  penalize_prompt: bool = True
  # Which log-probabilities the ratio, the KL and the entropy use: always the policy's own distribution
  # from a forward pass (neither top-p truncation nor the repetition penalty enters them: MOSS-RLHF's
  # make_experiences and TRL both score the sampled tokens with a plain forward pass of the model).
  # True: log softmax(logits / temperature) (TRL: `logits /= temperature + 1e-7` before the log-softmax);
  # False: log softmax(logits), the untempered policy (MOSS-RLHF: `logprobs_from_logits(logits)` on its
  # model's plain forward logits; only its generate divides by the temperature). Equal at temperature 1.
  logprobs_tempered: bool = True
  # Where the rollout's log-probabilities come from: "forward" (a separate policy forward pass over the
  # rollout, as TRL and MOSS) or "decode" (those the decode loop computes while sampling, from the same
  # logits: one forward pass fewer; the rollout's entropy metric is then the one-sample estimate
  # mean(-log pi(y_t)), whose expectation is the entropy). "decode" needs logprobs_tempered or temperature 1.
  rollout_logprobs: str = "forward"
  # Stop bound on the rollout's sequence KL (kl_guard); None: only NaN stops.
  max_kl: float | None = None

  def __post_init__(self):
    def need(cond, what):
      if not cond:
        raise ValueError(f"PPOConfig.{what}")
    need(self.kl_estimator in rl.KL_KINDS, f"kl_estimator must be one of {rl.KL_KINDS}, got {self.kl_estimator!r}")
    need(self.kl_mode in KL_MODES, f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
    need(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
    need(self.entropy_coef >= 0, f"entropy_coef must be >= 0, got {self.entropy_coef}")
    for name in ("reward_clip", "advantage_clip", "value_clip", "max_grad_norm", "max_kl"):
      v = getattr(self, name)
      need(v is None or v > 0, f"{name} must be > 0 or None, got {v}")
    need(self.critic_init in CRITIC_INITS, f"critic_init must be one of {CRITIC_INITS}, got {self.critic_init!r}")
    need(self.policy_init in POLICY_INITS, f"policy_init must be one of {POLICY_INITS}, got {self.policy_init!r}")
    need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
    need(self.clip_eps > 0, f"clip_eps must be > 0, got {self.clip_eps}")
    need(self.ptx_coef >= 0, f"ptx_coef must be >= 0, got {self.ptx_coef}")
    need(self.advantage_estimator in ADVANTAGE_ESTIMATORS,
         f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {self.advantage_estimator!r}")
    if self.advantage_estimator == "gae":
      need(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
    else:
      need(self.group_size >= 2, f"group_size must be >= 2 for {self.advantage_estimator}, got {self.group_size}")
    need(self.scale_rewards in rl.SCALE_REWARDS, f"scale_rewards must be one of {rl.SCALE_REWARDS}")
    need(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")
    need(int(self.ppo_epochs) == self.ppo_epochs and self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got "
         f"{self.ppo_epochs}")
    need(int(self.num_minibatches) == self.num_minibatches and self.num_minibatches >= 1,
         f"num_minibatches must be >= 1, got {self.num_minibatches}")
    need(self.loss_reduction in rl.REDUCTIONS, f"loss_reduction must be one of {rl.REDUCTIONS}")
    need(self.policy_lr >= 0 and self.value_lr >= 0, "policy_lr and value_lr must be >= 0")
    need(self.temperature > 0, f"temperature must be > 0 (PPO samples), got {self.temperature}")
    need(self.kl_target is None or self.kl_target > 0, f"kl_target must be > 0 or None, got {self.kl_target}")
    need(self.kl_horizon > 0, f"kl_horizon must be > 0, got {self.kl_horizon}")
    need(self.kl_target is None or self.kl_coef > 0, "kl_coef must be > 0 with kl_target set (the adaptive "
         f"controller multiplies it), got {self.kl_coef}")
    need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must lie in (0, 1] or be None, got {self.top_p}")
    need(self.repetition_penalty is None or self.repetition_penalty > 0,
         f"repetition_penalty must be > 0 or None, got {self.repetition_penalty}")
    need(self.rollout_logprobs in ROLLOUT_LOGPROBS,
         f"rollout_logprobs must be one of {ROLLOUT_LOGPROBS}, got {self.rollout_logprobs!r}")
    need(self.rollout_logprobs == "forward" or self.logprobs_tempered or self.temperature == 1.0,
         "rollout_logprobs='decode' gives log softmax(logits / temperature): it needs logprobs_tempered=True or "
         f"temperature 1, got logprobs_tempered=False at temperature {self.temperature}")

  @property
  def logprob_temperature(self) -> float:
    """The temperature of the distribution whose log-probabilities PPO uses (see logprobs_tempered)."""
    return float(self.temperature) if self.logprobs_tempered else 1.0

  def replace(self, **kw) -> "PPOConfig":
    return dataclasses.replace(self, **kw)


PRESETS = {
    # The paper's PPO-max (Sec. 5.4): the PPOConfig defaults.
    "ppo_max": {},
    # MOSS-RLHF's release: config_ppo.py defaults with the flags train_ppo_en.sh sets
    # (--use_reward_scaling --use_critic_loss_clip --use_policy_loss_clip, kl 0.01; reward clip,
    # reward norm, advantage norm/clip, entropy and ptx flags not set), DeepSpeed clipping 1.0.
    # Sampling: config_ppo.py's temperature 0.8, --topp 0.9, --repetition_penalty 1.1; log-probs of the
    # untempered policy (make_experiences scores the samples with the plain logits).
    "moss": dict(kl_coef=0.01, reward_scaling=True, reward_norm=False, reward_clip=None, advantage_norm=False,
                 advantage_clip=None, value_clip=0.2, vf_coef=1.0, ppo_epochs=1, num_minibatches=4,
                 temperature=0.8, top_p=0.9, repetition_penalty=1.1, penalize_prompt=False,
                 logprobs_tempered=False),
    # PPO with none of the tricks beyond the clipped surrogate, GAE and the KL penalty: critic from
    # the policy's decoder, no reward/advantage processing, no value clipping, no gradient clipping.
    "vanilla": dict(reward_scaling=False, reward_norm=False, reward_clip=None, advantage_norm=False,
                    advantage_clip=None, value_clip=None, critic_init="policy", max_grad_norm=None),
    # trl 1.16 GRPOTrainer: group 8, k3 KL as a loss (beta 0 by default there; 0.04 in the DeepSeekMath paper).
    "grpo": dict(advantage_estimator="grpo", group_size=8, kl_mode="as_loss", kl_estimator="k3", kl_coef=0.04,
                 reward_scaling=False, reward_norm=False, reward_clip=None, advantage_norm=False, value_clip=None,
                 critic_init="random"),
    # trl 1.16 RLOOTrainer: group 2, k1 KL in the reward with beta 0.05.
    "rloo": dict(advantage_estimator="rloo", group_size=2, kl_mode="as_reward", kl_estimator="k1", kl_coef=0.05,
                 reward_scaling=False, reward_norm=False, reward_clip=None, advantage_norm=False, value_clip=None,
                 critic_init="random"),
}


def ppo_preset(name: str, **overrides) -> PPOConfig:
  """A named configuration: "ppo_max", "moss", "vanilla", "grpo" or "rloo" (see `PRESETS`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown PPO preset {name!r}; choose one of {sorted(PRESETS)}")
  return PPOConfig(**{**PRESETS[name], **overrides})


def make_optimizer(ppo_cfg: PPOConfig) -> optax.GradientTransformation:
  """Global-norm clipping over policy and critic, then Adam for each with its own learning rate."""
  def adam(lr):
    return jt.make_optimizer(lr, total_steps=1, kind="adam", schedule="constant", b1=ppo_cfg.adam_b1,
                             b2=ppo_cfg.adam_b2, eps=ppo_cfg.adam_eps, clip_norm=None)[0]

  def labels(params):
    return {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in params.items()}

  tx = optax.multi_transform({"policy": adam(ppo_cfg.policy_lr), "value": adam(ppo_cfg.value_lr)}, labels)
  if ppo_cfg.max_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(ppo_cfg.max_grad_norm), tx)
  return tx


def _check_llama(params, cfg, name):
  try:
    llama.check_params(params, cfg)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{name} do not match the policy's LlamaConfig: {e}") from None


def _check_value(params, cfg, name):
  expected = jax.eval_shape(lambda k: rm.reward_model_init(k, cfg), jax.random.PRNGKey(0))
  want = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
  try:
    got = jax.tree_util.tree_map(np.shape, params)
  except Exception:  # noqa: BLE001 - any unreadable tree is a mismatch
    got = None
  if got != want:
    raise ValueError(f"{name} must be a reward-model tree (`reward_model_init`) of value_cfg: expected shapes "
                     f"{want}, got {got}")


def init_state(rng: jax.Array, policy_params: Params, ref_params: Params, value_params: Params | None,
               ppo_cfg: PPOConfig, *, policy_cfg: llama.LlamaConfig, value_cfg: llama.LlamaConfig | None = None,
               tx: optax.GradientTransformation | None = None) -> jt.TrainState:
  """The PPO train state at step 0.

  Args:
    rng: the run's key (the state's `rng`; a fold of it draws any fresh weights).
    policy_params: the SFT policy (Llama tree), the policy's start with `policy_init="sft"`.
    ref_params: the frozen reference policy (usually the same SFT weights); kept in
      `extras["ref"]`.
    value_params: the critic's start when `critic_init="reward_model"`: a reward-model
      tree (`reward_model_init`, e.g. the trained reward model). Ignored otherwise
      and for "grpo"/"rloo" (no critic: `params["value"]` is `{}`).
    ppo_cfg: the PPO config.
    policy_cfg: the policy's (and reference's) LlamaConfig.
    value_cfg: the critic's LlamaConfig (default `policy_cfg`).
    tx: the optimizer (default `make_optimizer(ppo_cfg)`); the step must get the same.

  Returns:
    `TrainState(params={"policy", "value"}, extras={"ref", "reward_moments", "kl_coef"})`; every
    array is a copy (nothing is shared with the inputs, so a donating step is safe).

  Raises:
    ValueError: a tree does not match its config (naming it), or the reward model is missing.
  """
  value_cfg = policy_cfg if value_cfg is None else value_cfg
  _check_llama(policy_params, policy_cfg, "policy_params")
  _check_llama(ref_params, policy_cfg, "ref_params (the reference policy)")
  rng = jnp.asarray(rng, jnp.uint32)
  k_policy, k_value = jax.random.split(jax.random.fold_in(rng, 7))
  copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731
  policy = copy(policy_params) if ppo_cfg.policy_init == "sft" else llama.init(k_policy, policy_cfg)
  if ppo_cfg.advantage_estimator != "gae":
    value = {}
  elif ppo_cfg.critic_init == "reward_model":
    if value_params is None:
      raise ValueError("value_params is None but critic_init='reward_model': pass the reward model's parameters")
    _check_value(value_params, value_cfg, "value_params")
    value = copy(value_params)
  elif ppo_cfg.critic_init == "policy":
    if value_cfg != policy_cfg:
      raise ValueError("critic_init='policy' needs value_cfg equal to policy_cfg")
    value = rm.from_policy(policy_params, k_value, policy_cfg)
    value = copy(value)
  else:
    value = rm.reward_model_init(k_value, value_cfg)
  params = {"policy": policy, "value": value}
  extras = {"ref": copy(ref_params), "reward_moments": rl.running_moments().init(),
            "kl_coef": jnp.asarray(ppo_cfg.kl_coef, jnp.float32)}
  tx = make_optimizer(ppo_cfg) if tx is None else tx
  return jt.create_train_state(params, tx, rng, extras=extras)


def _response_logits(params, tokens_BxT, mask_BxT, P, cfg, temperature):
  """Hidden states and tempered logits at the positions that predict the response (columns P-1 .. T-2)."""
  h = llama.decoder(params, llama.embed(params, tokens_BxT, cfg), cfg, attention_mask=mask_BxT)
  h = h[:, P - 1:-1]
  if "output" not in params:
    return h, None
  return h, llama.head(params, h, cfg) / temperature


def token_logprobs(params: Params, tokens_BxT: Array, mask_BxT: Array, prompt_len: int, cfg: llama.LlamaConfig, *,
                   temperature: float = 1.0) -> tuple[Array, Array]:
  """Per-token log-probabilities and entropies of the response of each row (module docstring layout).

  Args:
    params: a Llama tree.
    tokens_BxT: `[B, T]` prompt (left-padded to `prompt_len`) then response.
    mask_BxT: `[B, T]` real tokens.
    prompt_len: P, the column where every response starts.
    cfg: the Llama config.
    temperature: the logits are divided by it (the sampling distribution).

  Returns:
    `(logp_BxN, entropy_BxN)`, float32, N = T - P (unmasked).
  """
  _, logits = _response_logits(params, tokens_BxT, mask_BxT, prompt_len, cfg, temperature)
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  resp = tokens_BxT[:, prompt_len:]
  logp = jnp.take_along_axis(logits, resp[..., None], axis=-1)[..., 0] - logz
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = logz - jnp.sum(probs * logits, axis=-1)
  return logp, entropy


def token_values(value_params: Params, tokens_BxT: Array, mask_BxT: Array, prompt_len: int,
                 cfg: llama.LlamaConfig) -> Array:
  """`[B, N]` float32 critic values V_t at the states that pick response token t."""
  h, _ = _response_logits(value_params, tokens_BxT, mask_BxT, prompt_len, cfg, 1.0)
  return h.astype(jnp.float32) @ value_params["score"]



def adaptive_kl_coef(kl_coef: Array, kl: Array, *, target: float, horizon: float, rows: int) -> Array:
  """One update of the adaptive KL controller (Ziegler et al. 2019, Sec. 2.2).

      e = clip(kl / target - 1, -0.2, 0.2),   kl_coef' = kl_coef * (1 + e * rows / horizon)

  the paper's `beta_{t+1} = beta_t (1 + K_beta e_t)` with the gain `K_beta = rows / horizon` of its
  code (lm-human-preferences; trl <= 0.11 and OpenRLHF are the same): `rows` episodes per rollout,
  `horizon` episodes. `kl` is the rollout's mean sequence KL to the reference.
  """
  e = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  return jnp.asarray(kl_coef, jnp.float32) * (1.0 + e * (float(rows) / float(horizon)))


def process_scores(ppo_cfg: PPOConfig, raw_B: Array, moments: rl.MomentsState) -> tuple[Array, rl.MomentsState]:
  """Reward scaling / normalisation with running moments, then clipping (module docstring).

  Args:
    ppo_cfg: reads `reward_scaling`, `reward_norm`, `reward_clip`.
    raw_B: `[B]` scores from `reward_fn`.
    moments: the running moments before this batch.

  Returns:
    `(score_B, moments after this batch)`; the moments are updated first and used at once.
  """
  mom = rl.running_moments().update(moments, raw_B)
  score = jnp.asarray(raw_B, jnp.float32)
  if ppo_cfg.reward_norm:
    score = (score - mom.mean) / rl.moments_std(mom)
  elif ppo_cfg.reward_scaling:
    score = score / rl.moments_std(mom)
  if ppo_cfg.reward_clip is not None:
    score = jnp.clip(score, -ppo_cfg.reward_clip, ppo_cfg.reward_clip)
  return score, mom


def compute_advantages(ppo_cfg: PPOConfig, score_B: Array, old_logp_BxN: Array, ref_logp_BxN: Array,
                       old_values_BxN: Array, mask_BxN: Array, *,
                       kl_coef: float | Array | None = None) -> tuple[Array, Array, Array]:
  """Token rewards and advantages of a rollout (module docstring).

  Args:
    ppo_cfg: the estimator, KL penalty, GAE and advantage switches.
    score_B: processed scores (`process_scores`), landing on each row's last valid token.
    old_logp_BxN, ref_logp_BxN: rollout and reference log-probs of the response tokens.
    old_values_BxN: the critic's values (ignored by "grpo"/"rloo").
    mask_BxN: the response mask (contiguous from column 0).
    kl_coef: the KL coefficient of this rollout (the adaptive controller's current value,
      `extras["kl_coef"]`); None: `ppo_cfg.kl_coef`.

  Returns:
    `(advantages_BxN, returns_BxN, kl_BxN)`, 0 where the mask is 0 (returns are 0 for
    "grpo"/"rloo"); `kl_BxN` the per-token `kl_estimator` values.
  """
  m = jnp.asarray(mask_BxN, jnp.float32)
  N = m.shape[1]
  kl_tok = rl.kl_penalty(old_logp_BxN, ref_logp_BxN, ppo_cfg.kl_estimator) * m
  kl_reward = ppo_cfg.kl_mode == "as_reward" and ppo_cfg.kl_coef > 0
  coef = ppo_cfg.kl_coef if kl_coef is None else kl_coef
  if ppo_cfg.advantage_estimator == "gae":
    last = jnp.maximum(jnp.sum(m, axis=1).astype(jnp.int32) - 1, 0)
    at_last = (jnp.arange(N, dtype=jnp.int32)[None, :] == last[:, None]).astype(jnp.float32) * m
    rewards = score_B[:, None] * at_last - (coef * kl_tok if kl_reward else 0.0)
    advantages, returns = rl.gae(rewards, old_values_BxN * m, m, gamma=ppo_cfg.gamma, lam=ppo_cfg.lam)
  else:
    G = ppo_cfg.group_size
    seq = score_B - (coef * jnp.sum(kl_tok, axis=1) if kl_reward else 0.0)
    if seq.shape[0] % G:
      raise ValueError(f"score_B has {seq.shape[0]} rows, not a multiple of group_size={G}")
    groups = seq.reshape(-1, G)
    if ppo_cfg.advantage_estimator == "grpo":
      adv = rl.grpo_advantages(groups, scale_rewards=ppo_cfg.scale_rewards)
    else:
      adv = rl.rloo_advantages(groups)
    advantages = adv.reshape(-1)[:, None] * m
    returns = jnp.zeros_like(m)
  if ppo_cfg.advantage_norm:
    advantages = rl.whiten(advantages, m)
  if ppo_cfg.advantage_clip is not None:
    advantages = jnp.clip(advantages, -ppo_cfg.advantage_clip, ppo_cfg.advantage_clip) * m
  return advantages, returns, kl_tok

def _check_batch(batch, policy_cfg, ppo_cfg, max_new_tokens, min_prompt_len):
  if not isinstance(batch, dict) or "prompts" not in batch or "prompt_lengths" not in batch:
    raise ValueError("batch must be a dict with 'prompts' [B, P] int32 (left-padded) and 'prompt_lengths' [B]")
  prompts, lengths = batch["prompts"], batch["prompt_lengths"]
  if not jnp.issubdtype(jnp.result_type(prompts), jnp.integer):
    raise TypeError(f"batch['prompts'] must be an integer array, got dtype {jnp.result_type(prompts)}")
  if np.ndim(prompts) != 2 or 0 in np.shape(prompts):
    raise ValueError(f"batch['prompts'] must have shape [B, P] with B, P > 0, got {np.shape(prompts)}")
  B, P = np.shape(prompts)
  if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer) or np.shape(lengths) != (B,):
    raise ValueError(f"batch['prompt_lengths'] must be [B={B}] integers, got {jnp.result_type(lengths)} of shape "
                     f"{np.shape(lengths)}")
  if P + max_new_tokens > policy_cfg.max_seq_len:
    raise ValueError(f"batch['prompts'] width P={P} + max_new_tokens={max_new_tokens} = {P + max_new_tokens} exceeds "
                     f"max_seq_len={policy_cfg.max_seq_len}: the prompt leaves no room for the response")
  if min_prompt_len > P:
    raise ValueError(f"min_prompt_len={min_prompt_len} exceeds the prompt width P={P}")
  if not isinstance(lengths, jax.core.Tracer):
    ln = np.asarray(lengths)
    if ln.min() < min_prompt_len or ln.max() > P:
      raise ValueError(f"batch['prompt_lengths'] must lie in [min_prompt_len={min_prompt_len}, P={P}], got min "
                       f"{ln.min()}, max {ln.max()}")
  if not isinstance(prompts, jax.core.Tracer):
    llama.check_tokens(np.asarray(prompts), policy_cfg, what="batch['prompts']")
  rows = B * ppo_cfg.group_size
  if rows % ppo_cfg.num_minibatches:
    raise ValueError(f"the rollout's {rows} rows (B={B} x group_size={ppo_cfg.group_size}) must divide into "
                     f"num_minibatches={ppo_cfg.num_minibatches}")
  if ppo_cfg.ptx_coef > 0:
    if "ptx_tokens" not in batch:
      raise ValueError("ptx_coef > 0 needs batch['ptx_tokens'] [Bp, Tp + 1] (and optionally 'ptx_mask')")
    llama.check_tokens(batch["ptx_tokens"], policy_cfg, what="batch['ptx_tokens']", max_len=policy_cfg.max_seq_len + 1)


def make_rollout(policy_cfg: llama.LlamaConfig, ppo_cfg: PPOConfig, reward_fn: Callable, *, max_new_tokens: int,
                 eos_id: int | None, value_cfg: llama.LlamaConfig | None = None, min_prompt_len: int = 1,
                 metrics_fn: Callable | None = None):
  """The rollout of one PPO iteration (steps 1-2 of the module docstring) and its advantages.

  Returns:
    `rollout(params, extras, batch, rng) -> (experience, new_extras, metrics)`, pure and
    jit-able; `experience` holds `[R, ...]` arrays (R = B * group_size): tokens, mask,
    response_mask, old_logp, ref_logp, old_values, advantages, returns, scores (processed),
    raw_scores.
  """
  value_cfg = policy_cfg if value_cfg is None else value_cfg
  N = int(max_new_tokens)
  penalty = {} if ppo_cfg.repetition_penalty is None else {"repetition_penalty": float(ppo_cfg.repetition_penalty)}
  decode_penalty = dict(penalty, penalize_prompt=bool(ppo_cfg.penalize_prompt)) if penalty else {}
  top_p = None if ppo_cfg.top_p is None else float(ppo_cfg.top_p)
  llama.check_sampling(policy_cfg, N, ppo_cfg.temperature, None, top_p, eos_id, jax.random.PRNGKey(0), **penalty)
  from_decode = ppo_cfg.rollout_logprobs == "decode"
  lp_temp = ppo_cfg.logprob_temperature
  if int(min_prompt_len) != min_prompt_len or min_prompt_len < 1:
    raise ValueError(f"min_prompt_len must be a positive int, got {min_prompt_len}")
  gae_mode = ppo_cfg.advantage_estimator == "gae"
  G = ppo_cfg.group_size

  def rollout(params, extras, batch, rng):
    _check_batch(batch, policy_cfg, ppo_cfg, N, min_prompt_len)
    policy, ref = params["policy"], extras["ref"]
    _check_llama(ref, policy_cfg, "state.extras['ref'] (the reference policy)")
    prompts = jnp.asarray(batch["prompts"]).astype(jnp.int32)
    lengths = jnp.asarray(batch["prompt_lengths"]).astype(jnp.int32)
    if G > 1:
      prompts, lengths = jnp.repeat(prompts, G, axis=0), jnp.repeat(lengths, G, axis=0)
    R, P = prompts.shape
    cols = jnp.arange(P, dtype=jnp.int32)[None, :]
    prompt_mask = cols >= (P - lengths)[:, None]
    prompts = jnp.where(prompt_mask, prompts, 0)
    # The decode loop reads each prompt from the start of its row (Meta's layout): shift left.
    right = jnp.take_along_axis(prompts, jnp.minimum(cols + (P - lengths)[:, None], P - 1), axis=1)
    right = jnp.where(cols < lengths[:, None], right, 0)
    buf = jnp.zeros((R, P + N), jnp.int32).at[:, :P].set(right)
    new, decode_logp, n_new, bad = llama.decode_loop(
        jax.lax.stop_gradient(policy), buf, lengths, rng, cfg=policy_cfg, min_prompt_len=int(min_prompt_len),
        max_new_tokens=N, temperature=float(ppo_cfg.temperature), top_k=None, top_p=top_p,
        eos_id=None if eos_id is None else int(eos_id), with_logprobs=from_decode, **decode_penalty)
    resp_mask = (jnp.arange(N, dtype=jnp.int32)[None, :] < n_new[:, None])
    tokens = jnp.concatenate([prompts, new], axis=1)
    mask = jnp.concatenate([prompt_mask, resp_mask], axis=1).astype(jnp.int32)
    m = resp_mask.astype(jnp.float32)
    raw = jnp.asarray(reward_fn(tokens, mask, P), jnp.float32)
    if raw.shape != (R,):
      raise ValueError(f"reward_fn must return [B]=[{R}] scores, got shape {raw.shape}")
    sg = jax.lax.stop_gradient
    if from_decode:
      # The decode loop's log-probabilities of softmax(logits / temperature), 0 after EOS.
      old_logp = sg(decode_logp) * m
      entropy = -old_logp
    else:
      old_logp, entropy = token_logprobs(sg(policy), tokens, mask, P, policy_cfg, temperature=lp_temp)
    ref_logp, _ = token_logprobs(sg(ref), tokens, mask, P, policy_cfg, temperature=lp_temp)
    old_values = token_values(sg(params["value"]), tokens, mask, P, value_cfg) * m if gae_mode else jnp.zeros_like(m)
    score, mom = process_scores(ppo_cfg, raw, extras["reward_moments"])
    kl_coef = jnp.asarray(extras.get("kl_coef", ppo_cfg.kl_coef), jnp.float32)
    advantages, returns, kl_tok = compute_advantages(ppo_cfg, score, old_logp, ref_logp, old_values, m,
                                                     kl_coef=kl_coef)
    kl_seq_k1 = jnp.sum((old_logp - ref_logp) * m, axis=1)
    experience = dict(tokens=tokens, mask=mask, response_mask=m, old_logp=old_logp, ref_logp=ref_logp,
                      old_values=old_values, advantages=sg(advantages), returns=sg(returns), scores=score,
                      raw_scores=raw, kl_coef=jnp.full((R,), kl_coef))
    kl = jnp.mean(kl_seq_k1)
    if ppo_cfg.kl_target is not None:
      new_kl_coef = adaptive_kl_coef(kl_coef, kl, target=ppo_cfg.kl_target, horizon=ppo_cfg.kl_horizon, rows=R)
    else:
      new_kl_coef = kl_coef
    generation_ok = jnp.all(bad < 0)
    guard = jnp.isfinite(kl) & generation_ok
    if ppo_cfg.max_kl is not None:
      guard = guard & (kl <= ppo_cfg.max_kl)
    metrics = {
        "reward": jnp.mean(raw),
        "score": jnp.mean(score),
        "kl": kl,
        "kl_penalty": jnp.mean(jnp.sum(kl_tok, axis=1)),
        "kl_guard": jnp.where(guard, kl, jnp.nan),
        "kl_coef": kl_coef,
        "entropy": rl.masked_mean(entropy, m),
        "response_length": jnp.mean(n_new.astype(jnp.float32)),
        "advantages": rl.masked_mean(advantages, m),
        "reward_mean": mom.mean,
        "reward_std": rl.moments_std(mom),
    }
    if gae_mode:
      metrics["returns"] = rl.masked_mean(returns, m)
      metrics["values"] = rl.masked_mean(old_values, m)
    if metrics_fn is not None:
      for name, value in dict(metrics_fn(tokens, mask, P)).items():
        metrics[name] = jnp.mean(jnp.asarray(value, jnp.float32))
    return experience, {**extras, "reward_moments": mom, "kl_coef": new_kl_coef}, metrics

  return rollout


def make_loss(policy_cfg: llama.LlamaConfig, ppo_cfg: PPOConfig, *, value_cfg: llama.LlamaConfig | None = None):
  """The loss of one minibatch (module docstring): `loss(params, mb, ptx) -> (loss, metrics)`."""
  value_cfg = policy_cfg if value_cfg is None else value_cfg
  gae_mode = ppo_cfg.advantage_estimator == "gae"

  def loss(params, mb, ptx=None):
    P = mb["tokens"].shape[1] - mb["old_logp"].shape[1]
    m = mb["response_mask"]
    logp, entropy = token_logprobs(params["policy"], mb["tokens"], mb["mask"], P, policy_cfg,
                                   temperature=ppo_cfg.logprob_temperature)
    adv = mb["advantages"]
    if ppo_cfg.importance_sampling:
      clip = ppo_cfg.clip_eps if ppo_cfg.clip_surrogate else float("inf")
      total, metrics = rl.ppo_policy_loss(logp, mb["old_logp"], adv, m, clip_eps=clip,
                                          reduction=ppo_cfg.loss_reduction)
    else:
      total = rl.masked_reduce(-jax.lax.stop_gradient(adv) * logp, m, ppo_cfg.loss_reduction)
      lr_sg = jax.lax.stop_gradient(logp - mb["old_logp"])
      metrics = {"policy_loss": jax.lax.stop_gradient(total), "clip_fraction": jnp.zeros(()),
                 "approx_kl": rl.masked_mean(jnp.expm1(lr_sg) - lr_sg, m), "ratio": rl.masked_mean(jnp.exp(lr_sg), m)}
    metrics = dict(metrics)
    if ppo_cfg.entropy_coef > 0:
      total = total - ppo_cfg.entropy_coef * rl.masked_reduce(entropy, m, ppo_cfg.loss_reduction)
    if gae_mode:
      values = token_values(params["value"], mb["tokens"], mb["mask"], P, value_cfg)
      vloss, vmetrics = rl.ppo_value_loss(values, mb["old_values"], mb["returns"], m, clip_eps=ppo_cfg.value_clip)
      total = total + ppo_cfg.vf_coef * vloss
      metrics.update(vmetrics)
    if ppo_cfg.kl_mode == "as_loss" and ppo_cfg.kl_coef > 0:
      kl = rl.masked_reduce(rl.kl_penalty(logp, mb["ref_logp"], ppo_cfg.kl_estimator), m, ppo_cfg.loss_reduction)
      coef = jnp.mean(mb["kl_coef"]) if "kl_coef" in mb else ppo_cfg.kl_coef   # the rollout's (adaptive) value
      total = total + coef * kl
      metrics["kl_loss"] = jax.lax.stop_gradient(kl)
    if ppo_cfg.ptx_coef > 0 and ptx is not None:
      ptx_loss, _ = llama.loss_fn(params["policy"], ptx, policy_cfg)
      total = total + ppo_cfg.ptx_coef * ptx_loss
      metrics["ptx_loss"] = jax.lax.stop_gradient(ptx_loss)
    return total, metrics

  return loss


def make_update(policy_cfg: llama.LlamaConfig, ppo_cfg: PPOConfig, tx: optax.GradientTransformation, *,
                value_cfg: llama.LlamaConfig | None = None):
  """The update of one PPO iteration: `ppo_epochs` shuffled passes in `num_minibatches` minibatches.

  Returns:
    `update(params, opt_state, experience, ptx, key) -> (params, opt_state, metrics)`, pure
    and jit-able; `key` draws each epoch's permutation (`fold_in(key, epoch)`); metrics are
    the minibatch losses' metrics plus `loss` and `grad_norm`, averaged over the updates.
  """
  grad_fn = jax.value_and_grad(make_loss(policy_cfg, ppo_cfg, value_cfg=value_cfg), has_aux=True)
  E, M = int(ppo_cfg.ppo_epochs), int(ppo_cfg.num_minibatches)

  def update(params, opt_state, experience, ptx, key):
    R = experience["tokens"].shape[0]
    if R % M:
      raise ValueError(f"the rollout's {R} rows must divide into num_minibatches={M}")
    order = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), R) for e in range(E)])
    order = order.reshape(E * M, R // M)

    def one(carry, idx):
      params, opt_state = carry
      mb = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), experience)
      (loss, lm), grads = grad_fn(params, mb, ptx)
      lm = dict(lm)
      lm["loss"] = loss
      lm["grad_norm"] = optax.tree.norm(grads)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), lm

    (params, opt_state), lms = jax.lax.scan(one, (params, opt_state), order)
    return params, opt_state, {k: jnp.mean(v) for k, v in lms.items()}

  return update


def make_step(policy_cfg: llama.LlamaConfig, ppo_cfg: PPOConfig, reward_fn: Callable, *, max_new_tokens: int,
              eos_id: int | None, value_cfg: llama.LlamaConfig | None = None,
              tx: optax.GradientTransformation | None = None, min_prompt_len: int = 1,
              metrics_fn: Callable | None = None):
  """One PPO iteration as a pure train step `(state, batch) -> (state, metrics)`.

  Args:
    policy_cfg: the policy's (and reference's) LlamaConfig.
    ppo_cfg: the PPO config.
    reward_fn: `reward_fn(tokens_BxT, mask_BxT, prompt_len) -> [B] float32` (pure JAX):
      a true reward, or a reward model, e.g.
      `lambda t, m, p: reward_model_apply(rm_params, t, m, rm_cfg)` (read at the last
      mask == 1 token, the last response token).
    max_new_tokens: N, the response length budget.
    eos_id: a response ends after this id (kept, scored); None: always N tokens.
    value_cfg: the critic's LlamaConfig (default `policy_cfg`).
    tx: the optimizer the state was made with (default `make_optimizer(ppo_cfg)`).
    min_prompt_len: a lower bound on `batch["prompt_lengths"]` (static): the decode
      loop prefills that many tokens at once and teacher-forces the rest of longer
      prompts; 1 is always correct, the prompt width is fastest when all prompts fill it.
    metrics_fn: optional `metrics_fn(tokens_BxT, mask_BxT, prompt_len) -> {name: [B]}`;
      the means join the step's metrics (e.g. the true reward beside a reward model's).

  Returns:
    The step: `batch = {"prompts": int32 [B, P] left-padded, "prompt_lengths": int32 [B]}`
    (+ `"ptx_tokens"` `[Bp, Tp + 1]`, `"ptx_mask"` for PPO-ptx). Jit it (donating the
    state) and run it in `jt.train(..., finite_keys=FINITE_KEYS)`. Bad batches raise
    ValueError/TypeError naming the entry at trace time, before any compute.
  """
  tx = make_optimizer(ppo_cfg) if tx is None else tx
  rollout = make_rollout(policy_cfg, ppo_cfg, reward_fn, max_new_tokens=max_new_tokens, eos_id=eos_id,
                         value_cfg=value_cfg, min_prompt_len=min_prompt_len, metrics_fn=metrics_fn)
  update = make_update(policy_cfg, ppo_cfg, tx, value_cfg=value_cfg)

  def step(state: jt.TrainState, batch: dict) -> tuple[jt.TrainState, dict]:
    key = jt.step_rng(state)
    experience, extras, metrics = rollout(state.params, state.extras, batch, jax.random.fold_in(key, 0))
    ptx = None
    if ppo_cfg.ptx_coef > 0:
      ptx = {"tokens": jnp.asarray(batch["ptx_tokens"]).astype(jnp.int32)}
      if "ptx_mask" in batch:
        ptx["mask"] = jnp.asarray(batch["ptx_mask"])
    params, opt_state, update_metrics = update(state.params, state.opt_state, experience, ptx,
                                               jax.random.fold_in(key, 1))
    metrics.update(update_metrics)
    new_state = state._replace(params=params, opt_state=opt_state, step=state.step + 1, extras=extras)
    return new_state, metrics

  return step
