"""The alignment experiment (`experiments/alignment.py`): every method measured against an exact frontier.

`run(config, workdir)` (the experiment contract, `jaxml.experiment`):

1. A Markov language (`jaxml.alignment.markov`: K content tokens + EOS,
   responses of at most L tokens after the prompt `[EOS]`) and a true reward
   that is a sum over tokens, `r(y) = sum_t f(y_t)`.
2. SFT: a Llama (vocabulary K + 1) trained on fresh draws of the chain with
   `jaxml.train` (`DIR/sft/`).
3. The reference every method is regularised towards is this SFT policy. It
   is not a Markov chain, so its exact sequence distribution is obtained by
   enumerating all `sum_{n<L} K^n + K^L` responses and scoring them with
   `llama.sequence_logprobs` (they sum to 1: the policy can emit nothing
   else). The frontier `(KL(pi*_beta || pi_sft), E_{pi*_beta}[r])` with
   `pi*_beta ~ pi_sft exp(r / beta)` is then exact for the policy's own
   reference; the soft value iteration over positions gives the frontier for
   the chain itself (the data's distribution), drawn for comparison, with
   KL(chain || sft) reported as the SFT's mismatch.
4. Preference pairs: two responses per pair sampled from the SFT policy
   (`llama.generate_arrays`, temperature 1), labelled by Bradley-Terry on the
   true reward. A reward model (the SFT decoder + a scalar head) trained on
   them (`DIR/rm/`); its held-out accuracy, and its exact expected accuracy on
   fresh pairs, next to the Bayes-optimal accuracy.
5. Methods, each from the SFT policy: DPO at several beta, IPO, SLiC-HF direct
   (the same pairs) and sample-and-rank (m SFT samples per group, ranked by
   the reward model), and, when the PPO module is present and `run_online` is
   set, PPO (the `ppo_max` preset) and GRPO on the reward model. Each lands at
   an exact point (true reward, KL(pi || pi_sft)) by enumeration, also
   estimated by Monte Carlo from samples (with standard errors) as a check;
   next to it, the run's population optimum where one is known: DPO's
   `pi_sft exp(r / beta)` (a frontier point), IPO's tilt by the win rate
   against the SFT, PPO's tilt by the reward model at `kl_coef` times the
   running reward std. `dpo_unlimited_betas` adds DPO runs that draw fresh
   Bradley-Terry pairs from pi_sft at every step (no finite-data error).
6. Figures: `frontier.png` (the DPO paper's Figure 2 on an exact frontier) and
   `overoptimisation.png` (the reward-model-optimal policies
   `pi_sft exp(rm / beta)`: their reward-model gain against their true gain
   as KL grows, with each method's point), copied to `docs_figures_dir` when
   set; `results.json` and `results.md` (the tables).

Each training resumes from its own checkpoints; a rerun on the same folder
recomputes every figure from the restored states and gives the same results.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import experiment, llama, report, rl
from jaxml import train as jt
from jaxml.alignment import markov, offline
from jaxml.alignment.losses import dpo_loss
from jaxml.alignment.reward_model import from_policy, reward_model_apply


@dataclasses.dataclass(frozen=True)
class AlignmentExperimentConfig:
  seed: int = 0
  # The task.
  num_tokens: int = 4                      # K content tokens (vocabulary K + 1 with EOS)
  max_len: int = 6                         # L, the longest response
  eos_prob: float = 0.25                   # P(EOS | content token)
  concentration: float = 1.0               # Dirichlet concentration of the chain's rows
  start_eos_prob: float = 0.05             # P(EOS | start): an empty response (> 0 keeps the chain's support full)
  token_rewards: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0)  # f, K + 1 entries (EOS last)
  bt_scale: float = 1.0                    # Bradley-Terry: P(y1 > y2) = sigmoid((r1 - r2) / bt_scale)
  # The Llama.
  dim: int = 32
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  multiple_of: int = 16
  # SFT.
  sft_steps: int = 2000
  sft_batch: int = 128
  sft_lr: float = 3e-3
  # Preference data and reward model.
  num_pairs: int = 2000
  held_out_pairs: int = 1000
  rm_steps: int = 600
  rm_batch: int = 64
  rm_lr: float = 1e-3
  rm_center_coef: float = 0.0
  # Offline methods.
  precompute_ref: bool = True              # reference log-probs scored once and stored with the pairs
  offline_steps: int = 600
  offline_batch: int = 64
  offline_lr: float = 1e-3
  dpo_betas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
  dpo_loss_type: str = "sigmoid"
  dpo_unlimited_betas: tuple[float, ...] = ()  # DPO on fresh Bradley-Terry pairs drawn from pi_sft every step
  ipo_betas: tuple[float, ...] = (0.3,)
  slic_variants: tuple[str, ...] = ("direct", "sample_rank")
  slic_delta: float = 1.0
  slic_reg_weight: float = 0.1
  slic_samples: int = 8                    # m, samples per group for sample-and-rank
  slic_groups: int = 250                   # groups (this task has one prompt: groups are independent draws)
  # Online methods (jaxml.alignment.ppo).
  run_online: bool = False
  online_reward: str = "rm"                # "rm": the reward model scores rollouts; "true": the true reward
  online_steps: int = 200
  online_batch: int = 64                   # rollout rows per iteration (GRPO: online_batch / grpo_group prompts)
  online_lr: float = 3e-4                  # policy Adam rate (the presets' 5e-7 is for billions of parameters)
  online_value_lr: float = 1e-3            # critic Adam rate
  ppo_preset: str = "ppo_max"
  ppo_kl_coefs: tuple[float, ...] = (0.05,)  # one PPO run per KL coefficient
  grpo_group: int = 8                      # GRPO group size (0: no GRPO run)
  grpo_kl_coef: float = 0.04
  ppo_ablation: tuple[str, ...] = ()       # PPOConfig switches turned off one at a time (same seeds)
  online_epochs: int = 2                   # PPO/GRPO epochs over each rollout
  online_minibatches: int = 4              # minibatches per epoch (online_epochs x online_minibatches updates)
  # Seeds: each method's training runs `seeds` times (vmapped: one compiled program), differing in its own
  # randomness (minibatch draws, rollouts); the task, SFT, pairs and reward model are shared.
  seeds: int = 3
  # Evaluation.
  mc_samples: int = 2000                   # Monte Carlo check of each method's point
  frontier_points: int = 60
  steps_per_call: int = 50                 # divides every step count and checkpoint_every
  checkpoint_every: int = 200
  docs_figures_dir: str = ""               # also copy the figures there as alignment_*.png
  allow_fresh_start: bool = False

  def __post_init__(self):
    if len(self.token_rewards) != self.num_tokens + 1:
      raise ValueError(f"token_rewards needs num_tokens + 1 = {self.num_tokens + 1} entries (EOS last), got "
                       f"{len(self.token_rewards)}")
    k = self.steps_per_call
    for name in ("sft_steps", "rm_steps", "offline_steps", "online_steps", "checkpoint_every"):
      v = getattr(self, name)
      if v <= 0 or v % k:
        raise ValueError(f"AlignmentExperimentConfig.{name}={v} must be a positive multiple of steps_per_call={k}")
    for b in self.dpo_betas + self.ipo_betas:
      if not b > 0:
        raise ValueError(f"every beta must be > 0, got {b}")
    for v in self.slic_variants:
      if v not in ("direct", "sample_rank"):
        raise ValueError(f"unknown SLiC-HF variant {v!r}; expected 'direct' or 'sample_rank'")
    if self.online_reward not in ("rm", "true"):
      raise ValueError(f"online_reward must be 'rm' or 'true', got {self.online_reward!r}")
    if self.run_online and self.grpo_group and self.online_batch % self.grpo_group:
      raise ValueError(f"online_batch={self.online_batch} must be a multiple of grpo_group={self.grpo_group}")
    if self.seeds < 1 or self.online_epochs < 1 or self.online_minibatches < 1:
      raise ValueError(f"seeds, online_epochs and online_minibatches must be >= 1, got {self.seeds}, "
                       f"{self.online_epochs}, {self.online_minibatches}")
    if self.run_online and self.online_batch % self.online_minibatches:
      raise ValueError(f"online_batch={self.online_batch} must divide into online_minibatches="
                       f"{self.online_minibatches}")
    if markov.num_sequences(self.num_tokens, self.max_len) > 200_000:
      raise ValueError("num_tokens ** max_len is too large to enumerate the responses exactly "
                       f"({markov.num_sequences(self.num_tokens, self.max_len)} sequences)")


def llama_config(cfg: AlignmentExperimentConfig) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=cfg.num_tokens + 1, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                           n_kv_heads=cfg.n_kv_heads, multiple_of=cfg.multiple_of, max_seq_len=cfg.max_len + 1,
                           scan_layers=False)


def language(cfg: AlignmentExperimentConfig) -> markov.MarkovLanguage:
  return markov.make_language(cfg.seed, cfg.num_tokens, cfg.max_len, eos_prob=cfg.eos_prob,
                              concentration=cfg.concentration, start_eos_prob=cfg.start_eos_prob)


def _record(cfg: AlignmentExperimentConfig, part: str, fields: tuple[str, ...]) -> dict:
  """What a training depends on: its own step count is excluded (a longer rerun continues), those of the
  trainings it starts from (the SFT's, for everything after it) are included."""
  base = ("seed", "num_tokens", "max_len", "eos_prob", "concentration", "start_eos_prob", "dim", "n_layers",
          "n_heads", "n_kv_heads", "multiple_of", "sft_batch", "sft_lr")
  return {"part": part, **{f: getattr(cfg, f) for f in base + fields}}


def _sft_loss(lang: markov.MarkovLanguage, lcfg: llama.LlamaConfig, batch_size: int):
  """Next-token loss on fresh draws of the chain (prompt `[EOS]`, response, EOS padding unscored)."""
  def loss(params, batch, rng):
    del batch
    resp, lengths = markov.sample(lang, rng, batch_size)
    tokens = jnp.concatenate([jnp.full((batch_size, 1), lang.eos_id, jnp.int32), resp], axis=1)
    mask = jnp.concatenate([jnp.zeros((batch_size, 1), jnp.int32),
                            (jnp.arange(lang.max_len)[None, :] < lengths[:, None]).astype(jnp.int32)], axis=1)
    return llama.loss_fn(params, {"tokens": tokens, "mask": mask}, lcfg)
  return loss


class Task:
  """The enumerated response space with the true reward, the SFT reference and the frontier."""

  def __init__(self, cfg: AlignmentExperimentConfig, lang: markov.MarkovLanguage, lcfg: llama.LlamaConfig, sft_params):
    self.cfg, self.lang, self.lcfg = cfg, lang, lcfg
    self.prompt = np.asarray([lang.eos_id], np.int32)
    self.responses, self.lengths = markov.enumerate_sequences(lang.num_tokens, lang.max_len)
    self.enc = offline.encode(self.prompt, self.responses, self.lengths, pad_id=lang.eos_id)
    self.rewards = markov.token_rewards(cfg.token_rewards, self.responses, self.lengths)
    self.logp_chain = markov.sequence_logprobs(lang, self.responses, self.lengths)
    self.logp_sft = self.logps(sft_params)
    self.sft_mass = float(np.exp(self.logp_sft.astype(np.float64)).sum())
    self.logp_ref = self.logp_sft - np.log(self.sft_mass)          # renormalised against float32 rounding
    self.index = {tuple(r[:n]): i for i, (r, n) in enumerate(zip(self.responses, self.lengths))}

  def logps(self, params) -> np.ndarray:
    e = self.enc
    return offline.sequence_logps(params, self.lcfg, e["tokens"], e["attention"], e["loss_mask"],
                                  batch_size=1024).astype(np.float64)

  def stats(self, beta: float, rewards=None) -> tuple[float, float]:
    """(true reward, KL to the SFT) of pi_sft exp(rewards / beta) (rewards: the true ones by default)."""
    lp = markov.tilt(self.logp_ref, self.rewards if rewards is None else rewards, beta)
    return markov.reward_and_kl(lp, self.logp_ref, self.rewards)

  def win_rate(self, scale: float) -> np.ndarray:
    """`[S]` P(y beats y' ~ pi_sft) under Bradley-Terry on the true reward (computed over its distinct values)."""
    values, inverse = np.unique(np.round(self.rewards, 12), return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=np.exp(self.logp_ref), minlength=values.size)
    win = (mass[None, :] / (1.0 + np.exp(-(values[:, None] - values[None, :]) / scale))).sum(1)
    return win[inverse.ravel()]

  def frontier_at(self, kl: float) -> float:
    return markov.frontier_reward_at(kl, self.stats)

  def lookup(self, responses_NxL, lengths_N) -> np.ndarray:
    return np.asarray([self.index[tuple(r[:n])] for r, n in zip(np.asarray(responses_NxL), np.asarray(lengths_N))])


def _sample(params, lcfg, prompt, n: int, max_len: int, eos: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  tokens, logp, lengths = llama.generate_arrays(params, lcfg, np.tile(prompt, (n, 1)), None, max_len,
                                                temperature=1.0, eos_id=eos, rng=rng)
  return np.asarray(tokens), np.asarray(lengths), np.asarray(logp).sum(1)


def evaluate(task: Task, params, rm_scores: np.ndarray, *, rng, mc_samples: int) -> dict[str, float]:
  """A policy's exact point (enumeration) and its Monte Carlo estimate, the frontier at its KL and the gap."""
  lp = task.logps(params)
  mass = float(np.exp(lp).sum())
  reward, kl = markov.reward_and_kl(lp, task.logp_ref, task.rewards)
  p = np.exp(lp - np.log(mass))
  out = {"true_reward": reward, "kl": kl, "mass": mass, "rm_score": float(np.sum(p * rm_scores))}
  front = task.frontier_at(kl)
  out.update(frontier_reward=front, gap=front - reward)
  if mc_samples:
    resp, lengths, logp_gen = _sample(params, task.lcfg, task.prompt, mc_samples, task.lang.max_len,
                                      task.lang.eos_id, rng)
    idx = task.lookup(resp, lengths)
    mc = markov.monte_carlo_reward_kl(task.rewards[idx], logp_gen, task.logp_ref[idx])
    out.update({f"mc_{k}": v for k, v in mc.items()})
  return out


def _pairs(cfg: AlignmentExperimentConfig, task: Task, sft_params):
  """Bradley-Terry pairs from the SFT policy: (train data, held-out data, their exact-index arrays)."""
  n = cfg.num_pairs + cfg.held_out_pairs
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 11)
  resp, lengths, _ = _sample(sft_params, task.lcfg, task.prompt, 2 * n, cfg.max_len, task.lang.eos_id, key)
  idx = task.lookup(resp, lengths)
  i1, i2 = idx[:n], idx[n:]
  first = markov.bradley_terry_labels(np.random.default_rng(cfg.seed + 12), task.rewards[i1], task.rewards[i2],
                                      scale=cfg.bt_scale)
  chosen, rejected = np.where(first, i1, i2), np.where(first, i2, i1)
  # SFT targets for SLiC's regulariser: fresh draws of the SFT data (the chain).
  t_resp, t_len = markov.sample(task.lang, jax.random.fold_in(key, 1), n)
  t_idx = task.lookup(np.asarray(t_resp), np.asarray(t_len))

  def data(sl, c, r, t):
    return offline.preference_data(task.prompt, task.responses[c[sl]], task.lengths[c[sl]], task.responses[r[sl]],
                                   task.lengths[r[sl]], pad_id=task.lang.eos_id, targets_NxL=task.responses[t[sl]],
                                   target_lengths_N=task.lengths[t[sl]])

  train_sl, held_sl = slice(0, cfg.num_pairs), slice(cfg.num_pairs, n)
  return (data(train_sl, chosen, rejected, t_idx), data(held_sl, chosen, rejected, t_idx),
          {"chosen": chosen[train_sl], "rejected": rejected[train_sl], "targets": t_idx[train_sl]})


def unlimited_pairs_dpo_loss(task: Task, *, batch_size: int, beta: float, bt_scale: float, loss_type="sigmoid"):
  """DPO with unlimited data: each step draws fresh pairs y, y' ~ pi_sft (exactly, from the enumeration) and
  labels them by Bradley-Terry on the true reward, inside the compiled step. Its population optimum is
  pi_sft exp(r / (bt_scale beta)): the diagnostic that separates DPO's finite-data error from its optimisation."""
  offline.dpo_loss_fn(task.lcfg, _one_pair(task), batch_size=batch_size, beta=beta, loss_type=loss_type)  # checks
  e = task.enc
  tokens, attention, loss_mask = (jnp.asarray(e[k]) for k in ("tokens", "attention", "loss_mask"))
  logp_ref = jnp.asarray(task.logp_ref, jnp.float32)
  rewards = jnp.asarray(task.rewards, jnp.float32)
  lengths = jnp.asarray(task.lengths, jnp.float32)
  # Draws from pi_sft by inverting its CDF (summed in float64 once): one uniform per draw, where
  # jax.random.categorical draws a Gumbel number per response (5,461 per draw in the small config).
  cdf64 = np.cumsum(np.exp(task.logp_ref))
  cdf = jnp.asarray(cdf64 / cdf64[-1], jnp.float32)

  def draw(key):
    u = jax.random.uniform(key, (batch_size,), jnp.float32)
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), cdf.shape[0] - 1)

  def loss(params, batch, rng):
    del batch
    k1, k2, k3 = jax.random.split(rng, 3)
    i, j = draw(k1), draw(k2)
    first = jax.random.bernoulli(k3, jax.nn.sigmoid((rewards[i] - rewards[j]) / bt_scale))
    c, r = jnp.where(first, i, j), jnp.where(first, j, i)
    both = jnp.concatenate([c, r])
    lp = llama.sequence_logprobs(params, tokens[both], loss_mask[both], task.lcfg, attention_mask_BxT=attention[both])
    pc, pr = jnp.split(lp, 2)
    return dpo_loss(pc, pr, logp_ref[c], logp_ref[r], beta=beta, loss_type=loss_type, chosen_lengths_B=lengths[c],
                    rejected_lengths_B=lengths[r])

  return loss


def _one_pair(task: Task) -> dict:
  resp, n = task.responses[:1], task.lengths[:1]
  data = offline.preference_data(task.prompt, resp, n, resp, n, pad_id=task.lang.eos_id)
  return dict(data, ref_chosen_logps=np.zeros(1), ref_rejected_logps=np.zeros(1))


def _slic_sample_rank(cfg, task: Task, sft_params, rm_scores, workdir: str, off: dict, rec: tuple):
  """SLiC-HF sample-and-rank: m SFT samples per group, ranked by the reward model, trained from the SFT."""
  lang, lcfg = task.lang, task.lcfg
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 14)
  m = cfg.slic_samples
  resp, lengths, _ = _sample(sft_params, lcfg, task.prompt, cfg.slic_groups * m, cfg.max_len, lang.eos_id, key)
  idx = task.lookup(resp, lengths)
  c, cl, r, rl = offline.sample_and_rank(resp.reshape(cfg.slic_groups, m, -1), lengths.reshape(cfg.slic_groups, m),
                                         rm_scores[idx].reshape(cfg.slic_groups, m))
  t_resp, t_len = markov.sample(lang, jax.random.fold_in(key, 1), c.shape[0])
  data = offline.preference_data(task.prompt, c, cl, r, rl, pad_id=lang.eos_id, targets_NxL=np.asarray(t_resp),
                                 target_lengths_N=np.asarray(t_len))
  loss = offline.slic_loss_fn(lcfg, data, batch_size=cfg.offline_batch, delta=cfg.slic_delta,
                              reg_weight=cfg.slic_reg_weight)
  return offline.train("slic_sample_rank", workdir, sft_params, loss, record=_record(
      cfg, "slic_sample_rank", rec + ("slic_samples", "slic_groups", "rm_steps", "rm_lr")), **off)


def _rm_scores(rm_params, task: Task) -> np.ndarray:
  e = task.enc
  fn = jax.jit(lambda p, t, m: reward_model_apply(p, t, m, task.lcfg))
  out = [np.asarray(fn(rm_params, e["tokens"][i:i + 1024], e["attention"][i:i + 1024]))
         for i in range(0, len(e["tokens"]), 1024)]
  return np.concatenate(out).astype(np.float64)


def ablated(pcfg, switch: str):
  """`pcfg` with one PPO-max trick turned off: a bool switch False, a clip/bound None, the critic from
  scratch for critic_init, k1 for kl_estimator, a zero coefficient for *_coef."""
  value = getattr(pcfg, switch)
  if isinstance(value, bool):
    off = False
  elif switch == "critic_init":
    off = "random"
  elif switch.endswith("_coef"):
    off = 0.0
  elif value is None or isinstance(value, float):
    off = None
  else:
    raise ValueError(f"ppo_ablation: {switch!r} is not a PPOConfig switch that can be turned off")
  return pcfg.replace(**{switch: off})


def online_configs(cfg: AlignmentExperimentConfig) -> dict[str, Any]:
  """The PPOConfig of each online run: PPO at each KL coefficient, GRPO, and the ablations of the first PPO."""
  from jaxml.alignment import ppo  # optional: only with run_online
  lr = dict(policy_lr=cfg.online_lr, value_lr=cfg.online_value_lr, ppo_epochs=cfg.online_epochs,
            num_minibatches=cfg.online_minibatches)
  runs = {}
  for c in cfg.ppo_kl_coefs:
    runs[f"ppo_kl{c:g}"] = ppo.ppo_preset(cfg.ppo_preset, kl_coef=c, **lr)
  if cfg.grpo_group:
    runs[f"grpo_kl{cfg.grpo_kl_coef:g}"] = ppo.ppo_preset("grpo", group_size=cfg.grpo_group,
                                                          kl_coef=cfg.grpo_kl_coef, **lr)
  if cfg.ppo_ablation and cfg.ppo_kl_coefs:
    base = runs[f"ppo_kl{cfg.ppo_kl_coefs[0]:g}"]
    for switch in cfg.ppo_ablation:
      runs[f"ppo_kl{cfg.ppo_kl_coefs[0]:g}_no_{switch}"] = ablated(base, switch)
  return runs


def _online(cfg, task, sft_params, rm_params, workdir, log) -> dict[str, Any]:
  """PPO and GRPO through `jaxml.alignment.ppo` on the reward model (or the true reward), each in `DIR/<name>/`."""
  from jaxml.alignment import ppo  # optional: only with run_online
  lcfg = task.lcfg
  f = jnp.asarray(cfg.token_rewards, jnp.float32)

  def true_reward(tokens_BxT, mask_BxT, prompt_len):
    return jnp.sum(f[tokens_BxT[:, prompt_len:]] * mask_BxT[:, prompt_len:], axis=1)

  def rm_reward(tokens_BxT, mask_BxT, prompt_len):
    del prompt_len
    return reward_model_apply(rm_params, tokens_BxT, mask_BxT, lcfg)

  reward_fn = rm_reward if cfg.online_reward == "rm" else true_reward
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  S = cfg.seeds
  out = {}
  for name, pcfg in online_configs(cfg).items():
    prompts_n = cfg.online_batch // pcfg.group_size
    batch = {"prompts": np.tile(task.prompt, (prompts_n, 1)).astype(np.int32),
             "prompt_lengths": np.ones((prompts_n,), np.int32)}
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 31)           # the same seed for every run
    train_dir = os.path.join(workdir, name)
    ckpt = jt.Checkpointer(os.path.join(train_dir, "checkpoints"), every=cfg.checkpoint_every, keep=2)
    try:
      jt.check_run_config(ckpt.directory, {"ppo": experiment.to_dict(pcfg), **_record(
          cfg, name, ("sft_steps", "bt_scale", "token_rewards", "num_pairs", "held_out_pairs", "rm_steps", "rm_lr",
                      "rm_batch", "online_batch", "online_reward", "seeds"))}, fields=f"{name} training config")
      one = functools.partial(ppo.init_state, policy_params=sft_params, ref_params=sft_params,
                              value_params=rm_params, ppo_cfg=pcfg, policy_cfg=lcfg)
      if S == 1:
        init = functools.partial(one, rng)
      else:   # S runs in one state: seed s's key is fold_in(rng, s); the loop counts by seed 0's step
        init = lambda: jax.vmap(one)(jax.vmap(lambda s: jax.random.fold_in(rng, s))(  # noqa: E731
            jnp.arange(S, dtype=jnp.uint32)))
      abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                        jax.eval_shape(init))
      state, start = jt.restore_or_init(ckpt, abstract, init, allow_fresh_start=cfg.allow_fresh_start)
      step = ppo.make_step(lcfg, pcfg, reward_fn, max_new_tokens=cfg.max_len, eos_id=task.lang.eos_id,
                           metrics_fn=lambda t, m, p: {"true_reward": true_reward(t, m, p)})
      step = jax.jit(step if S == 1 else jax.vmap(step, in_axes=(0, None)), donate_argnums=0)
      result = jt.train(step, state, lambda s: batch, num_steps=cfg.online_steps, workdir=train_dir,
                        start_step=start, checkpointer=ckpt, log_every=max(cfg.online_steps // 5, 1),
                        finite_keys=ppo.FINITE_KEYS, plot_title=f"{name} loss", print_fn=lambda s: log(f"{name}: {s}"))
    finally:
      ckpt.close()
    if result.preempted:
      return {"preempted": True}
    # Per seed: the policy, and the reward std and KL coefficient its run ended with (its PPO target).
    final = jax.device_get(result.state)
    policies = _split_seeds(final.params["policy"], S)
    moments = _split_seeds(final.extras["reward_moments"], S)
    coefs = _split_seeds(final.extras["kl_coef"], S)
    infos = [{"kl_coef": float(c), "reward_std": float(rl.moments_std(mom)) if float(mom.count) > 1 else None,
              "advantage_estimator": pcfg.advantage_estimator} for c, mom in zip(coefs, moments)]
    out[name] = (policies, infos)
  return out


def _split_seeds(tree, seeds: int) -> list:
  """A tree with a leading seed axis as one tree per seed (a single-seed tree as itself)."""
  if seeds == 1:
    return [tree]
  return [jax.tree_util.tree_map(lambda a, s=s: a[s], tree) for s in range(seeds)]


def _plot(task: Task, results: dict, path_frontier: str, path_over: str) -> None:
  front = results["frontier"]
  with report.figure(path_frontier, figsize=(7.0, 4.6), dpi=90) as fig:
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(front["kl"], front["reward"], "k-", lw=2, label="exact frontier (SFT reference)")
    ax.plot(front["chain_kl"], front["chain_reward"], "k:", lw=1, label="frontier of the Markov chain itself")
    markers = {"dpo_unlimited": "h", "dpo": "o", "ipo": "s", "slic_direct": "^", "slic_sample_rank": "v",
               "ppo": "*", "grpo": "P"}
    for name, m in results["methods"].items():
      if "_no_" in name:                                   # the PPO-max ablations: in the table only
        continue
      family = next(f for f in list(markers) + [name] if name.startswith(f))
      line, = ax.plot([m["kl"]], [m["true_reward"]], markers.get(family, "x"), ms=8, label=name)
      if m.get("seeds", 1) > 1:   # each seed's exact point, small
        ax.plot(m["per_seed"]["kl"], m["per_seed"]["true_reward"], markers.get(family, "x"), ms=3,
                color=line.get_color(), alpha=0.6)
      if "mc_kl" in m:
        ax.errorbar([m["mc_kl"]], [m["mc_reward"]], xerr=[2 * m["mc_kl_se"]], yerr=[2 * m["mc_reward_se"]],
                    fmt="none", ecolor="grey", lw=0.8)
      if m.get("target_kl") is not None:
        ax.plot([m["target_kl"]], [m["target_reward"]], markers.get(family, "x"), ms=8, mfc="none",
                color=line.get_color())
    ax.plot([0.0], [results["sft"]["true_reward"]], "kD", ms=6, label="SFT")
    ax.set_xlabel("KL(pi || pi_sft)  (nats, exact)")
    ax.set_ylabel("true reward E[r]")
    ax.set_title("reward vs KL on the exact frontier (hollow: each run's population optimum)")
    ax.legend(fontsize=7, loc="lower right")
  over = results["overoptimisation"]
  with report.figure(path_over, figsize=(7.0, 4.2), dpi=90) as fig:
    ax = fig.add_subplot(1, 1, 1)
    r0, s0 = results["sft"]["true_reward"], results["sft"]["rm_score"]
    ax.plot(over["kl"], np.asarray(over["rm_gain"]), "C0-", label="RM-optimal policy: RM score gain")
    ax.plot(over["kl"], np.asarray(over["true_gain"]), "C1-", label="RM-optimal policy: true reward gain")
    ax.plot(front["kl"], np.asarray(front["reward"]) - r0, "k--", lw=1, label="exact frontier (true gain)")
    for name, m in results["methods"].items():
      if "_no_" in name:                                   # the PPO-max ablations: in the table only
        continue
      ax.plot([m["kl"]], [m["rm_score"] - s0], "C0o", ms=4)
      ax.plot([m["kl"]], [m["true_reward"] - r0], "C1o", ms=4)
      ax.annotate(name, (m["kl"], m["true_reward"] - r0), fontsize=6)
    ax.set_xlim(0, max(max(m["kl"] for m in results["methods"].values()) * 1.2, 1.0))
    ax.set_xlabel("KL(pi || pi_sft)")
    ax.set_ylabel("gain over SFT")
    ax.set_title("reward-model over-optimisation (dots: methods)")
    ax.legend(fontsize=7)


def _targets(cfg, task: Task, name: str, info: dict, pcfg, rm_scores) -> dict:
  """A run's population optimum (hollow markers in the figure) and the run's own settings."""
  out = {k: v for k, v in info.items() if k in ("beta", "kl_coef", "reward_std")}
  if "beta" in info and name.startswith("dpo"):
    # DPO's population optimum with Bradley-Terry labels of scale s is pi_sft exp(r / (s beta)).
    out["target_reward"], out["target_kl"] = task.stats(info["beta"] * cfg.bt_scale)
  if "beta" in info and name.startswith("ipo"):
    # IPO's population optimum (pairs from pi_sft, the sequence-level form): log pi - log pi_sft =
    # E_{y' ~ pi_sft} P(y > y') / beta + c, a tilt by the win rate against the SFT (a saturating function of r).
    out["target_reward"], out["target_kl"] = task.stats(info["beta"], task.win_rate(cfg.bt_scale))
  if info.get("advantage_estimator") == "gae":
    # PPO's objective E[score'] - kl_coef KL, score' = the score over the running std (reward scaling or
    # normalisation): optimum pi_sft exp(score / (kl_coef std)); the reward model's tilt (or the true one's).
    # kl_coef is the run's final value (the adaptive controller's, or the fixed one).
    scaled = pcfg.reward_norm or pcfg.reward_scaling
    out["beta"] = info["kl_coef"] * (info["reward_std"] if scaled and info["reward_std"] else 1.0)
    out["target_reward"], out["target_kl"] = task.stats(out["beta"], rm_scores if cfg.online_reward == "rm" else None)
  return out


def _over_seeds(evs: list[dict]) -> dict:
  """One method's figures over its seeds: the mean of each number (seed 0's Monte Carlo check), the min and
  max of reward, KL and distance, and every seed's values under `per_seed`."""
  out = dict(evs[0])
  for key in evs[0]:
    vals = [e.get(key) for e in evs]
    if all(isinstance(v, (int, float)) and v is not None for v in vals):
      out[key] = float(np.mean(vals))
  for key in ("true_reward", "kl", "gap"):
    vals = [e[key] for e in evs]
    out[f"{key}_min"], out[f"{key}_max"] = float(np.min(vals)), float(np.max(vals))
  out["seeds"] = len(evs)
  out["per_seed"] = {key: [e[key] for e in evs] for key in ("true_reward", "kl", "gap")}
  return out


def _tables(results: dict) -> str:
  rows = []
  for name, m in results["methods"].items():
    rows.append([name, m.get("seeds", 1), m.get("beta"), m["true_reward"], m["kl"], m["frontier_reward"], m["gap"],
                 m.get("gap_min"), m.get("gap_max"), m.get("target_reward"), m.get("target_kl"),
                 m["rm_score"] - results["sft"]["rm_score"], m.get("mc_reward"), m.get("mc_reward_se"),
                 m.get("mc_kl"), m.get("mc_kl_se")])
  methods = report.markdown_table(
      ["method", "seeds", "beta", "true reward", "KL", "frontier reward at KL", "distance", "min", "max",
       "pi*_beta reward", "pi*_beta KL", "RM gain", "MC reward (seed 0)", "se", "MC KL", "se"], rows)
  ablation = [n for n in results["methods"] if "_no_" in n]
  if ablation:
    base_name = ablation[0].split("_no_")[0]
    base = results["methods"][base_name]

    def paired(n, key):   # run minus full, seed by seed (the same seeds): mean, min, max
      d = np.asarray(results["methods"][n]["per_seed"][key]) - np.asarray(base["per_seed"][key])
      return [float(d.mean()), float(d.min()), float(d.max())]

    rows = [[n, results["methods"][n]["true_reward"], results["methods"][n]["kl"], results["methods"][n]["gap"],
             results["methods"][n]["gap_min"], results["methods"][n]["gap_max"], *paired(n, "true_reward"),
             *paired(n, "kl"), *paired(n, "gap")] for n in [base_name] + ablation]
    methods += "\nPPO-max ablation (one switch off; seed-by-seed differences from the full run, same seeds)\n\n" + \
        report.markdown_table(["run", "true reward", "KL", "distance", "min", "max", "reward - full", "min", "max",
                               "KL - full", "min", "max", "distance - full", "min", "max"], rows)
  over = results["overoptimisation"]
  pick = np.unique(np.linspace(0, len(over["kl"]) - 1, 8).round().astype(int))
  over_rows = [[over["beta"][i], over["kl"][i], over["rm_gain"][i], over["true_gain"][i],
                over["frontier_gain"][i]] for i in pick]
  over_t = report.markdown_table(["beta", "KL", "RM gain", "true gain", "frontier true gain at KL"], over_rows)
  rm = results["reward_model"]
  head = (f"SFT: KL(chain || sft) = {results['sft']['kl_chain_to_sft']:.4f}, KL(sft || chain) = "
          f"{results['sft']['kl_sft_to_chain']:.4f}, true reward {results['sft']['true_reward']:.4f} "
          f"(chain {results['sft']['chain_reward']:.4f}).\n\n"
          f"Reward model: held-out accuracy {rm['held_out_accuracy']:.4f} (exact expected "
          f"{rm['expected_accuracy']:.4f})"
          f", Bayes-optimal {rm['bayes_accuracy']:.4f}.\n\n")
  return head + "Methods (exact points by enumeration; MC: sampled check with standard errors)\n\n" + methods + \
      "\nReward-model over-optimisation: pi_sft exp(rm / beta)\n\n" + over_t


def run(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """The experiment contract (module docstring).

  Args:
    config: a ConfigDict or dict of `AlignmentExperimentConfig` fields (`experiments/configs/alignment.py`).
    workdir: the experiment's folder; a rerun resumes every training.
    log: progress lines.

  Returns:
    `results.json`'s content plus `preempted`.
  """
  cfg = experiment.from_config(AlignmentExperimentConfig, config)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  lang = language(cfg)
  lcfg = llama_config(cfg)
  k = cfg.steps_per_call
  common = dict(steps_per_call=k, checkpoint_every=cfg.checkpoint_every, allow_fresh_start=cfg.allow_fresh_start,
                log=log)
  seconds: dict[str, float] = {}

  # ---- SFT
  t = time.time()
  sft = offline.train("sft", workdir, functools.partial(llama.init, cfg=lcfg), _sft_loss(lang, lcfg, cfg.sft_batch),
                      lr=cfg.sft_lr, steps=cfg.sft_steps, seed=cfg.seed, record=_record(cfg, "sft", ()), **common)
  if sft.preempted:
    return {"preempted": True}
  sft_params = sft.state.params
  seconds["sft"] = time.time() - t
  task = Task(cfg, lang, lcfg, sft_params)
  p_chain = np.exp(task.logp_chain)
  p_sft = np.exp(task.logp_ref)
  sft_reward, _ = markov.reward_and_kl(task.logp_ref, task.logp_ref, task.rewards)
  results: dict[str, Any] = {"num_sequences": len(task.rewards), "sft": {
      "mass": task.sft_mass, "true_reward": sft_reward, "chain_reward": float(np.sum(p_chain * task.rewards)),
      "kl_chain_to_sft": markov.reward_and_kl(task.logp_chain, task.logp_ref, task.rewards)[1],
      "kl_sft_to_chain": markov.reward_and_kl(task.logp_ref, task.logp_chain, task.rewards)[1],
      "final_loss": float(jt.read_metrics(os.path.join(workdir, "sft"))[-1]["loss"])}}

  # ---- the frontier (exact for the SFT reference; the chain's by soft value iteration)
  betas = np.geomspace(0.02, 50.0, cfg.frontier_points)
  fr, fk = markov.frontier(task.logp_ref, task.rewards, betas)
  cr, ck = markov.markov_frontier(lang, cfg.token_rewards, betas)
  results["frontier"] = {"beta": betas, "reward": fr, "kl": fk, "chain_reward": cr, "chain_kl": ck,
                         "max_reward": float(task.rewards.max())}

  # ---- preference pairs and the reward model
  t = time.time()
  train_data, held_data, pair_idx = _pairs(cfg, task, sft_params)
  rm_init = from_policy(sft_params, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 13), lcfg)
  rm = offline.train("rm", workdir, rm_init,
                     offline.reward_loss_fn(lcfg, train_data, batch_size=cfg.rm_batch, center_coef=cfg.rm_center_coef),
                     lr=cfg.rm_lr, steps=cfg.rm_steps, seed=cfg.seed + 1,
                     record=_record(cfg, "rm", ("sft_steps", "bt_scale", "token_rewards", "num_pairs",
                                                "held_out_pairs", "rm_batch", "rm_lr", "rm_center_coef")), **common)
  if rm.preempted:
    return {"preempted": True}
  rm_params = rm.state.params
  rm_scores = _rm_scores(rm_params, task)
  hc, hr = task.lookup(held_data["chosen"][:, 1:], held_data["chosen_lengths"]), \
      task.lookup(held_data["rejected"][:, 1:], held_data["rejected_lengths"])
  results["reward_model"] = {
      "held_out_accuracy": float(np.mean(rm_scores[hc] > rm_scores[hr])),
      "held_out_pairs": cfg.held_out_pairs,
      "expected_accuracy": markov.expected_accuracy(p_sft, task.rewards, rm_scores, scale=cfg.bt_scale),
      "bayes_accuracy": markov.bayes_accuracy(p_sft, task.rewards, scale=cfg.bt_scale),
      "true_reward_as_scorer_held_out": float(np.mean(np.where(task.rewards[hc] == task.rewards[hr], 0.5,
                                                               task.rewards[hc] > task.rewards[hr])))}
  seconds["pairs_and_rm"] = time.time() - t

  # ---- over-optimisation: the RM-optimal policies pi_sft exp(rm / beta)
  rm_c = rm_scores - np.sum(p_sft * rm_scores)
  over = {"beta": [], "kl": [], "rm_gain": [], "true_gain": [], "frontier_gain": []}
  for b in betas:
    lp = markov.tilt(task.logp_ref, rm_c, b)
    r_true, kl = markov.reward_and_kl(lp, task.logp_ref, task.rewards)
    over["beta"].append(float(b))
    over["kl"].append(kl)
    over["rm_gain"].append(float(np.sum(np.exp(lp) * rm_c)))
    over["true_gain"].append(r_true - sft_reward)
    over["frontier_gain"].append(task.frontier_at(kl) - sft_reward)
  results["overoptimisation"] = over

  # ---- offline methods
  t = time.time()
  data = offline.precompute_reference(train_data, sft_params, lcfg) if cfg.precompute_ref else train_data
  ref = None if cfg.precompute_ref else sft_params
  methods: dict[str, tuple[Any, dict]] = {}
  off = dict(lr=cfg.offline_lr, steps=cfg.offline_steps, seed=cfg.seed + 2, seeds=cfg.seeds, **common)
  rec = ("sft_steps", "bt_scale", "token_rewards", "num_pairs", "held_out_pairs", "offline_batch", "offline_lr")
  for beta in cfg.dpo_betas:
    name = f"dpo_beta{beta:g}"
    loss = offline.dpo_loss_fn(lcfg, data, batch_size=cfg.offline_batch, beta=beta, loss_type=cfg.dpo_loss_type,
                               ref_params=ref)
    methods[name] = (offline.train(name, workdir, sft_params, loss, record=_record(cfg, name, rec + (
        "dpo_loss_type",)), **off), {"beta": beta})
  for beta in cfg.dpo_unlimited_betas:
    name = f"dpo_unlimited_beta{beta:g}"
    loss = unlimited_pairs_dpo_loss(task, batch_size=cfg.offline_batch, beta=beta, bt_scale=cfg.bt_scale,
                                    loss_type=cfg.dpo_loss_type)
    methods[name] = (offline.train(name, workdir, sft_params, loss, record=_record(cfg, name, rec + (
        "dpo_loss_type",)), **off), {"beta": beta})
  for beta in cfg.ipo_betas:
    name = f"ipo_beta{beta:g}"
    loss = offline.dpo_loss_fn(lcfg, data, batch_size=cfg.offline_batch, beta=beta, loss_type="ipo",
                               length_normalise=False, ref_params=ref)
    methods[name] = (offline.train(name, workdir, sft_params, loss, record=_record(cfg, name, rec), **off),
                     {"beta": beta})
  slic_rec = rec + ("slic_delta", "slic_reg_weight")
  if "direct" in cfg.slic_variants:
    loss = offline.slic_loss_fn(lcfg, train_data, batch_size=cfg.offline_batch, delta=cfg.slic_delta,
                                reg_weight=cfg.slic_reg_weight)
    methods["slic_direct"] = (offline.train("slic_direct", workdir, sft_params, loss,
                                            record=_record(cfg, "slic_direct", slic_rec), **off), {})
  if "sample_rank" in cfg.slic_variants:
    methods["slic_sample_rank"] = (_slic_sample_rank(cfg, task, sft_params, rm_scores, workdir, off, slic_rec), {})
  for name, (res, _) in methods.items():
    if res.preempted:
      return {"preempted": True}
  seconds["offline"] = time.time() - t

  # ---- online methods (PPO / GRPO through jaxml.alignment.ppo)
  policies = {name: _split_seeds(jax.device_get(res.state.params), cfg.seeds) for name, (res, _) in methods.items()}
  extra = {name: [info] * cfg.seeds for name, (_, info) in methods.items()}
  if cfg.run_online:
    t = time.time()
    online = _online(cfg, task, sft_params, rm_params, workdir, log)
    if online.get("preempted"):
      return {"preempted": True}
    policies.update({name: params for name, (params, _) in online.items()})
    extra.update({name: info for name, (_, info) in online.items()})
    seconds["online"] = time.time() - t

  # ---- evaluation
  t = time.time()
  sft_eval = evaluate(task, sft_params, rm_scores, rng=jax.random.PRNGKey(cfg.seed + 40), mc_samples=0)
  results["sft"].update(rm_score=sft_eval["rm_score"])
  results["methods"] = {}
  pcfgs = online_configs(cfg) if cfg.run_online else {}
  for i, (name, per_seed) in enumerate(policies.items()):
    evs = []
    for s, (params, info) in enumerate(zip(per_seed, extra[name])):
      # The Monte Carlo check of the exact point on seed 0 only.
      ev = evaluate(task, params, rm_scores, rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 41), i),
                    mc_samples=cfg.mc_samples if s == 0 else 0)
      ev.update(_targets(cfg, task, name, dict(info), pcfgs.get(name), rm_scores))
      evs.append(ev)
    results["methods"][name] = _over_seeds(evs)
    m = results["methods"][name]
    log(f"{name}: reward {m['true_reward']:.4f}  KL {m['kl']:.4f}  frontier {m['frontier_reward']:.4f}  "
        f"distance {m['gap']:.4f} (min {m['gap_min']:.4f}, max {m['gap_max']:.4f} over {len(evs)} seeds)")
  seconds["evaluation"] = time.time() - t
  seconds["total"] = time.time() - t0
  results["seconds"] = seconds

  _plot(task, results, os.path.join(workdir, "frontier.png"), os.path.join(workdir, "overoptimisation.png"))
  report.save_text(_tables(results), os.path.join(workdir, "results.md"))
  if cfg.docs_figures_dir:
    os.makedirs(cfg.docs_figures_dir, exist_ok=True)
    for f in ("frontier", "overoptimisation"):
      shutil.copyfile(os.path.join(workdir, f"{f}.png"), os.path.join(cfg.docs_figures_dir, f"alignment_{f}.png"))
  report.save_json(results, os.path.join(workdir, "results.json"))
  log(json.dumps({k: v for k, v in results.items() if k in ("sft", "reward_model", "seconds")}, default=float))
  return {**report.to_jsonable(results), "preempted": False}
