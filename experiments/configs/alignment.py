"""Alignment on a Markov language with an exact reward-vs-KL frontier.

    python -m experiments.alignment --workdir=workdirs/alignment
    python -m experiments.alignment --workdir=workdirs/alignment_small --config=experiments/configs/alignment.py:small

Every field of `jaxml.alignment.experiment.AlignmentExperimentConfig` is listed (so that each can be set with
--config.<field>=...); the default variant equals the dataclass's defaults (a test keeps them equal).
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the chain, the models, the samples and the labels
  c.num_tokens = 4  # K content tokens; the vocabulary is K + 1 with EOS (also the prompt token)
  c.max_len = 6  # L, the longest response (sum_{n<L} K^n + K^L responses are enumerated exactly)
  c.eos_prob = 0.25  # P(EOS | content token) in the chain
  c.concentration = 1.0  # Dirichlet concentration of the chain's transition rows
  c.token_rewards = (1.0, 0.0, 0.0, 0.0, 0.0)  # f(token), K + 1 entries (EOS last): r(y) = sum_t f(y_t)
  c.start_eos_prob = 0.05  # P(EOS | start) in the chain: an empty response (> 0 keeps the chain's support full)
  c.bt_scale = 1.0  # Bradley-Terry labels: P(y1 preferred) = sigmoid((r1 - r2) / bt_scale)
  c.dim = 32  # Llama width
  c.n_layers = 2  # Llama blocks
  c.n_heads = 4  # attention heads
  c.n_kv_heads = 2  # key/value heads (GQA)
  c.multiple_of = 16  # SwiGLU hidden width rounding
  c.sft_steps = 2000  # SFT updates on fresh draws of the chain
  c.sft_batch = 128  # SFT sequences per update
  c.sft_lr = 3e-3  # SFT Adam rate (constant, gradients clipped to norm 1)
  c.num_pairs = 2000  # training preference pairs, both responses sampled from the SFT policy
  c.held_out_pairs = 1000  # held-out pairs for the reward model's accuracy
  c.rm_steps = 600  # reward-model updates (from the SFT decoder + a fresh scalar head)
  c.rm_batch = 64  # pairs per reward-model update
  c.rm_lr = 1e-3  # reward-model Adam rate
  c.rm_center_coef = 0.0  # TRL's center_rewards_coefficient (0: off)
  c.precompute_ref = True  # score the reference once and store its log-probs with the pairs
  c.offline_steps = 600  # updates of each offline method (DPO, IPO, SLiC)
  c.offline_batch = 64  # pairs per offline update
  c.offline_lr = 1e-3  # offline Adam rate
  c.dpo_betas = (0.1, 0.3, 1.0, 3.0)  # one DPO run per beta
  c.dpo_loss_type = "sigmoid"  # any jaxml.alignment.DPO_LOSS_TYPES name
  c.dpo_unlimited_betas = ()  # diagnostic DPO runs on fresh pairs from pi_sft every step (unlimited data)
  c.ipo_betas = (0.3,)  # one IPO run per beta (tau; the paper's sequence-level form)
  c.slic_variants = ("direct", "sample_rank")  # SLiC-HF variants run: direct (the pairs) and/or sample_rank
  c.slic_delta = 1.0  # SLiC-HF hinge margin delta
  c.slic_reg_weight = 0.1  # SLiC-HF cross-entropy regulariser weight lambda
  c.slic_samples = 8  # m SFT samples per group for sample-and-rank
  c.slic_groups = 250  # sample-and-rank groups (this task has one prompt)
  c.run_online = False  # also run PPO (ppo_preset) and GRPO through jaxml.alignment.ppo
  c.online_reward = "rm"  # what scores the rollouts: "rm" (the reward model) or "true" (the true reward)
  c.online_steps = 200  # PPO/GRPO iterations (one rollout + update each)
  c.online_batch = 64  # rollout rows per iteration (GRPO: online_batch / grpo_group prompts x grpo_group)
  c.online_lr = 3e-4  # policy Adam rate (the presets' 5e-7 is MOSS-RLHF's for 7B models)
  c.online_value_lr = 1e-3  # critic Adam rate
  c.ppo_preset = "ppo_max"  # ppo.ppo_preset name: ppo_max, moss or vanilla
  c.ppo_kl_coefs = (0.05,)  # one PPO run per token-level KL coefficient
  c.grpo_group = 8  # GRPO group size (0: no GRPO run)
  c.grpo_kl_coef = 0.04  # GRPO's KL-as-loss coefficient (k3)
  c.ppo_ablation = ()  # PPOConfig boolean switches turned off one at a time (same seeds)
  c.online_epochs = 2  # PPO/GRPO epochs over each rollout
  c.online_minibatches = 4  # minibatches per epoch: online_epochs x online_minibatches updates per rollout
  c.seeds = 3  # runs of each method's training (vmapped), differing in their own draws; task/SFT/pairs/RM shared
  c.mc_samples = 2000  # samples per method for the Monte Carlo check of its exact point
  c.frontier_points = 60  # betas on the frontier curve (log-spaced 0.02 .. 50)
  c.steps_per_call = 50  # updates per compiled call; divides every step count and checkpoint_every
  c.checkpoint_every = 200  # updates between checkpoints of each training
  c.docs_figures_dir = ""  # also copy the figures there as alignment_*.png (e.g. docs/figures)
  c.allow_fresh_start = False  # start a training over when its checkpoints exist but none restores
  if variant == "small":  # minutes on 2 CPU cores
    c.sft_steps = 1000
    c.num_pairs = 8000  # with 1500 pairs DPO overfits and lands 0.1-0.8 below the frontier (see the README)
    c.held_out_pairs = 1000
    c.rm_steps = 600
    c.offline_steps = 2000
    c.dpo_betas = (0.1, 0.3, 1.0)
    c.dpo_unlimited_betas = (0.3,)
    c.run_online = True
    c.online_steps = 250  # 2 epochs x 4 minibatches: 8 updates per rollout
    c.ppo_kl_coefs = (0.5, 0.05)  # the ablations run at the first
    c.ppo_ablation = ("reward_norm", "advantage_norm", "critic_init", "max_grad_norm", "value_clip",
                      "clip_surrogate", "importance_sampling")  # with 2 epochs x 4 minibatches the last three act
    c.mc_samples = 1000
    c.docs_figures_dir = "docs/figures"
  elif variant == "tiny":  # seconds: the end-to-end test (every sampling call draws 128 rows: one compile)
    c.num_tokens = 3
    c.max_len = 4
    c.token_rewards = (1.0, 0.0, 0.0, 0.0)
    c.sft_steps = 40
    c.sft_batch = 32
    c.num_pairs = 48
    c.held_out_pairs = 16
    c.rm_steps = 20
    c.offline_steps = 20
    c.offline_batch = 16
    c.dpo_betas = (0.5,)
    c.ipo_betas = ()
    c.slic_variants = ()
    c.mc_samples = 128
    c.frontier_points = 12
    c.steps_per_call = 10
    c.checkpoint_every = 10
    c.seeds = 1
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; expected '', 'small' or 'tiny'")
  return c
