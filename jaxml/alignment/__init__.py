"""LLM alignment: preference losses (DPO family, reward model, SLiC-HF) and the PPO pieces.

Modules: `reward_model` (`reward_model_init`, `reward_model_apply`, `reward_model_loss`),
`losses` (`dpo_loss` for every trl 1.16.0 DPO loss type and weighted
combinations, `reward_loss`, `slic_loss`). The policy-gradient pieces live in
`jaxml.rl` (shared with other RL code) and are exposed here under the same
names: `gae`, `kl_penalty`, `whiten`, `ppo_policy_loss`, `ppo_value_loss`,
`masked_mean`, `running_moments`. `ppo`: PPO-RLHF with the PPO-max tricks as switches,
GRPO and RLOO on the same rollout and update (`PPOConfig`, `ppo_preset`, `init_state`,
`make_step`).
"""
from jaxml.alignment import losses  # noqa: F401
from jaxml.alignment.losses import DPO_LOSS_TYPES, dpo_loss, reward_loss, slic_loss  # noqa: F401
from jaxml.rl import (gae, grpo_advantages, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss,  # noqa: F401
                      rloo_advantages, running_moments, whiten)
from jaxml.alignment import reward_model  # noqa: F401,E402
from jaxml.alignment.reward_model import (from_policy, reward_model_apply, reward_model_init,  # noqa: F401,E402
                                          reward_model_loss)
from jaxml.alignment import ppo  # noqa: F401,E402
from jaxml.alignment.ppo import PPOConfig, init_state, make_step, ppo_preset  # noqa: F401,E402
