"""The Gato study (`experiments/gato.py`): one multi-task policy against single-task behaviour cloning.

`run(config, workdir)`:

1. Experts (`jaxml.gato.experts`): PPO for CartPole-v1 and Acrobot-v1, scripted experts for
   MountainCar-v0, Pendulum-v1 (continuous torque in [-2, 2]: an energy-based swing-up), Catch-bsuite
   (10 x 5 board) and Breakout-MinAtar (10 x 10 x 4 board, the paddle follows the ball; both boards
   read as images: 5 x 5 patches through the ResNet block), and the CartPole twin (its two actions swapped: identical observations, the
   expert's actions mirrored). Expert and random returns are measured on `num_data_episodes` episodes.
2. Data: expert episodes kept at >= 80% of the expert return; the Python standard library source
   as text (bytes, `jaxml.llama.data.ByteTokenizer`); the scikit-learn digits (padded to 10 x 10)
   captioned with their label as text. One token layout for all.
3. Training on `jaxml.train` (AdamW, the masked next-token loss `jaxml.gato.model.loss_fn`): the
   multi-task model on batches with `rows_per_task` sequences of every control task, of text and
   of captions (prompted with probability `prompt_prob`); one single-task model per control task
   with the same architecture, the same steps and the same `rows_per_task` sequences of its task
   per step (the same budget per task).
4. Evaluation (`jaxml.gato.policy.evaluate`, one compiled loop per task): `eval_episodes` episodes
   per task, the context starting with the last `prompt_timesteps` timesteps of a successful
   demonstration; expert-normalised score `(R - R_random) / (R_expert - R_random)`, mean with a
   95% bootstrap interval. The twin pair with the multi-task model: no prompt, the right
   demonstration, the twin's demonstration, and both demonstrations as the only context (no
   history of the episode: the incremental evaluation with K = 0). The prompt probe
   (`prompt_probe`): teacher-forced action accuracy on expert windows of each twin after the
   right, the twin's or no prompt, per timestep of the window; the same for the single-task
   CartPole model, whose accuracy is the probe's ceiling (the task known, the observation
   alone). Caption accuracy (held-out digits)
   and text loss (held-out stdlib bytes).

Writes `results.json`, `results.md` (the tables), `gato_scores.png`, `gato_twin.png`, and each
training's `metrics.jsonl` / `loss.png` / `checkpoints/` under `DIR/<model>/` (the PPO experts' under
`DIR/experts/<task>/`). Every model and expert trains through `jaxml.train.fit`: a stopped study
(SIGTERM) resumes where it stopped, a finished one reads its models back and only re-evaluates them
(changing an evaluation field is allowed; a field the training depends on raises, naming it).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from gymnax.environments.classic_control.cartpole import CartPole

from jaxml import experiment, report
from jaxml import train as jt
from jaxml.diffusion import digits as digits_lib
from jaxml.gato import experts as ex
from jaxml.gato import model, policy
from jaxml.gato import sequence as sq
from jaxml.gato.tokens import TokenLayout
from jaxml.llama import data as text_data

CONTROL = ("CartPole-v1", "CartPole-twin", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "Catch-bsuite",
           "Breakout-MinAtar")
IMAGE_TASKS = ("Catch-bsuite", "Breakout-MinAtar")  # observations read as images (patches)
SCRIPTED = {"MountainCar-v0": ex.mountain_car_expert, "Pendulum-v1": ex.pendulum_expert,
            "Catch-bsuite": ex.catch_expert, "Breakout-MinAtar": ex.breakout_expert}


@dataclasses.dataclass(frozen=True)
class GatoExperimentConfig:
  seed: int = 0
  tasks: tuple[str, ...] = CONTROL  # control tasks (CartPole-twin needs CartPole-v1)
  ppo_iterations: int = 20  # PPO iterations per PPO expert (16 envs x 500 steps each)
  expert_greedy: bool = True  # PPO experts act greedily when demonstrating (False: sample their policy)
  num_data_episodes: int = 64  # expert episodes collected per task (before the 80% filter)
  keep_fraction: float = 0.8  # keep episodes with at least this fraction of the expert return
  dim: int = 64  # model width
  n_layers: int = 2
  n_heads: int = 4
  context: int = 128  # tokens per training sequence
  prompt_prob: float = 0.25  # fraction of prompted training sequences
  prompt_timesteps: int = 6  # prompt length in timesteps (training and evaluation)
  rows_per_task: int = 4  # sequences per task per step (text and captions too)
  steps: int = 1500  # training steps (every model)
  steps_per_call: int = 20  # divides steps
  checkpoint_every: int = 500  # steps between checkpoints of each model (and at the end; a multiple of steps_per_call)
  lr: float = 1e-3  # AdamW peak (warm-up 5%, cosine)
  text_bytes: int = 400_000  # stdlib source bytes for the text task
  eval_episodes: int = 50  # episodes per task and model
  eval_history: int = 8  # earlier timesteps kept in the evaluation context (after the prompt)
  eval_temperature: float = 1.0  # 1: sample the policy (as Gato deploys); 0: argmax over the valid action ids
  bootstrap: int = 2000  # bootstrap resamples
  probe_rows: int = 128  # windows per condition of the prompt probe (`prompt_probe`)
  probe_episodes: int = 16  # held-out expert episodes per twin for the probe's windows (before the 80% filter)
  figures_dir: str = ""  # also copy the figures there (e.g. docs/figures)

  def __post_init__(self):
    unknown = set(self.tasks) - set(CONTROL)
    if unknown:
      raise ValueError(f"GatoExperimentConfig.tasks has unknown tasks {sorted(unknown)}; choose from {CONTROL}")
    if "CartPole-twin" in self.tasks and "CartPole-v1" not in self.tasks:
      raise ValueError("GatoExperimentConfig.tasks: CartPole-twin needs CartPole-v1")
    if self.checkpoint_every <= 0 or self.checkpoint_every % self.steps_per_call:
      raise ValueError(f"GatoExperimentConfig.checkpoint_every={self.checkpoint_every} must be a positive multiple "
                       f"of steps_per_call={self.steps_per_call}")
    if self.steps % self.steps_per_call:
      raise ValueError(f"GatoExperimentConfig.steps={self.steps} must be a multiple of steps_per_call")


class SwappedCartPole(CartPole):
  """CartPole-v1 with its two actions swapped (the confusable twin)."""

  def step_env(self, key, state, action, params):
    return super().step_env(key, state, 1 - action, params)


@dataclasses.dataclass(frozen=True)
class SwappedPolicy:
  inner: Any

  def __call__(self, obs, key):
    return 1 - self.inner(obs, key)


def _spec(name: str, env, env_params) -> sq.TaskSpec:
  """Vector observations continuous (mu-law), boards as images; discrete actions, or continuous ones declared
  in their box (normalised to [-1, 1] and binned without companding, `sequence.action_ids`)."""
  space = ex.action_space(env, env_params)
  shape = tuple(env.observation_space(env_params).shape)
  obs = sq.Field("image", shape, max_value=1.0) if name in IMAGE_TASKS else sq.Field("continuous", shape)
  act = sq.Field("discrete", (), num_values=space.n) if space.n else \
      sq.Field("continuous", (space.dim,), low=space.low, high=space.high)
  return sq.TaskSpec.create(name, obs, act)


def _image_channels(specs) -> int:
  """The patch channels the model needs: the most of any image field (at least 1: the digits)."""
  return max([1] + [f.shape[2] for spec in specs for _, f in spec.fields if f.kind == "image" and len(f.shape) == 3])


def _horizon(env_params) -> int:
  return int(env_params.max_steps_in_episode) if hasattr(env_params, "max_steps_in_episode") else 500


def _tokens(spec, layout, cfg: model.GatoConfig, eps: ex.Episodes) -> list[sq.Tokens]:
  """Each kept episode's tokens (one compiled tokenization over all their steps)."""
  if len(eps.lengths) == 0:
    raise ValueError(f"no {spec.name} episodes reached the keep threshold")
  obs = np.concatenate([o[:n] for o, n in zip(eps.obs, eps.lengths)])
  acts = np.concatenate([a[:n] for a, n in zip(eps.actions, eps.lengths)])
  acts = acts.astype(np.int32) if spec.action.kind == "discrete" else acts.astype(np.float32)
  allt = sq.episode_tokens(spec, layout, obs, acts, patch_size=cfg.patch_size, channels=cfg.image_channels)
  s = sq.timestep_len(spec, cfg.patch_size)
  cuts = np.cumsum(eps.lengths)[:-1] * s
  return [sq.Tokens(*parts) for parts in zip(*(np.split(x, cuts) for x in allt))]


def _experts(cfg: GatoExperimentConfig, workdir: str, log) -> dict[str, dict]:
  """Per task: env, params, spec, expert act_fn, expert/random returns and episodes."""
  out = {}
  rng = jax.random.PRNGKey(cfg.seed)
  for i, name in enumerate(cfg.tasks):
    t0 = time.perf_counter()
    if name == "CartPole-twin":
      env, env_params = SwappedCartPole(), out["CartPole-v1"]["env_params"]
      act_fn = SwappedPolicy(out["CartPole-v1"]["act_fn"])
    else:
      env, env_params = gymnax.make(name)
      space = ex.action_space(env, env_params)
      if name in ("CartPole-v1", "Acrobot-v1"):
        params, _ = ex.train_ppo(env, env_params, ex.PPOConfig(iterations=cfg.ppo_iterations),
                                 jax.random.fold_in(rng, i),
                                 os.path.join(workdir, "experts", name), log=lambda s, n=name: log(f"ppo {n}: {s}"))
        act_fn = ex.PPOPolicy(params, space, greedy=cfg.expert_greedy)
      else:
        act_fn = ex.ScriptedPolicy(SCRIPTED[name])
    space = ex.action_space(env, env_params)
    horizon = _horizon(env_params)
    k = jax.random.fold_in(rng, 100 + i)
    eps = ex.collect(act_fn, env, env_params, k, cfg.num_data_episodes, horizon)
    rand = ex.collect(ex.RandomPolicy(space), env, env_params, jax.random.fold_in(k, 1), cfg.num_data_episodes, horizon)
    r_exp, r_rand = float(eps.returns.mean()), float(rand.returns.mean())
    kept = ex.keep_good(eps, r_exp, r_rand, cfg.keep_fraction)
    out[name] = dict(env=env, env_params=env_params, spec=_spec(name, env, env_params), act_fn=act_fn,
                     expert_return=r_exp, random_return=r_rand, episodes=kept, horizon=horizon,
                     kept=int(len(kept.returns)))
    if name in ("CartPole-v1", "CartPole-twin") and "CartPole-twin" in cfg.tasks:
      # Held-out expert episodes (never trained on) for the prompt probe's windows.
      held = ex.collect(act_fn, env, env_params, jax.random.fold_in(k, 2), cfg.probe_episodes, horizon)
      out[name]["heldout"] = ex.keep_good(held, r_exp, r_rand, cfg.keep_fraction)
    log(f"expert {name}: return {r_exp:.1f} (random {r_rand:.1f}), kept {len(kept.returns)}/{len(eps.returns)} "
        f"episodes, {time.perf_counter() - t0:.1f}s")
  return out


def _text_and_captions(cfg: GatoExperimentConfig, layout: TokenLayout, mcfg: model.GatoConfig):
  tok = text_data.ByteTokenizer()
  text = text_data.tokenize(text_data.read_texts(text_data.corpus_files(max_bytes=cfg.text_bytes)), tok)
  train_text, eval_text = text_data.split_tokens(text, 0.05)
  images, labels = digits_lib.load_digits()
  images = np.pad(images, ((0, 0), (1, 1), (1, 1)))            # 8 x 8 -> 10 x 10 (patches of 5)
  field = sq.Field("image", (10, 10), max_value=16.0)
  caps = [sq.caption_tokens(im, tok.encode(str(int(lab)), bos=False, eos=True), field, layout,
                            patch_size=mcfg.patch_size, channels=mcfg.image_channels)
          for im, lab in zip(images, labels)]
  n_eval = len(caps) // 5
  return train_text, eval_text, caps[n_eval:], caps[:n_eval], labels[:n_eval], tok


def _text_rows(rng, tokens, n, context, layout, patch_dim):
  starts = rng.integers(0, len(tokens) - context, n)
  return [sq.text_tokens(tokens[s:s + context], layout, patch_dim) for s in starts]


def prompt_probe(params, mcfg: model.GatoConfig, layout: TokenLayout, spec: sq.TaskSpec, own: list[sq.Tokens],
                 twin: list[sq.Tokens], *, step_len: int, prompt_timesteps: int, context: int, rows: int,
                 seed: int) -> dict:
  """Does the policy read its prompt? Teacher-forced action accuracy on `rows` windows of `own` episodes
  (the greedy action over the task's valid ids against the expert's), per timestep of the window, after
  the last `prompt_timesteps` timesteps of another `own` episode ("right"), of a `twin` episode ("twin"),
  or no prompt ("none"). The same windows in every condition. On the confusable twin pair the expert
  actions are mirrored on identical observations, so an accuracy above 0.5 at the window's first
  timestep (no history yet) can only come from the prompt (or from remembering a training state: the
  study passes held-out episodes as `own`); "twin" below "right" shows the prompt is used.
  Also `prob_shift`: the mean total-variation distance between the first action's distributions after
  the right and the twin prompts."""
  lo, hi = policy._valid_range(spec, layout)
  p = prompt_timesteps * step_len
  k = (context - p) // step_len
  fwd = jax.jit(lambda t: model.apply(params, t, mcfg))
  out = {}
  probs = {}
  for cond in ("right", "twin", "none"):
    rng = np.random.default_rng(seed)   # the same episodes, windows and prompt draws in every condition
    seqs = []
    for _ in range(rows):
      i = int(rng.integers(len(own)))
      j = int(rng.integers(len(own) - 1)) if len(own) > 1 else 0
      j = j + (j >= i and len(own) > 1)
      tj = int(rng.integers(len(twin)))
      ep = own[i]
      n = ep.length // step_len
      start = int(rng.integers(0, max(n - k, 0) + 1))
      window = sq.Tokens(*(x[start * step_len:(start + min(k, n - start)) * step_len] for x in ep))
      prompt = {"right": own[j], "twin": twin[tj]}.get(cond)
      # "none": the window starts the sequence, as an unprompted training sequence does.
      parts = [] if prompt is None else [sq.prompt_window(rng, prompt, step_len, prompt_timesteps, from_end=True)]
      seqs.append(sq.pad_to(sq.concat(parts + [window]), context))
    batch = sq.stack(seqs)
    logits = np.asarray(fwd(jax.tree.map(jnp.asarray, batch)))[..., lo:hi]
    offset = 0 if cond == "none" else p
    act_pos = offset + np.arange(k) * step_len + step_len - spec.action_len  # each timestep's first action token
    target = batch.ids[:, act_pos] - lo
    real = batch.loss_mask[:, act_pos]
    pred = logits[:, act_pos - 1].argmax(-1)
    acc = np.where(real, pred == target, np.nan)
    out[cond] = {"first_timestep": float(np.nanmean(acc[:, 0])), "all": float(np.nanmean(acc)),
                 "by_timestep": [float(x) for x in np.nanmean(acc, 0)]}
    z = logits[:, act_pos[0] - 1]
    probs[cond] = np.exp(z - z.max(-1, keepdims=True))
    probs[cond] /= probs[cond].sum(-1, keepdims=True)
  out["prob_shift"] = float(0.5 * np.abs(probs["right"] - probs["twin"]).sum(-1).mean())
  return out


# Fields that change only how trained models are evaluated (or saved), not what they learn.
_EVALUATION_FIELDS = ("checkpoint_every", "eval_episodes", "eval_history", "eval_temperature", "bootstrap",
                      "probe_rows", "probe_episodes", "figures_dir")


def _trainer(cfg: GatoExperimentConfig, mcfg: model.GatoConfig):
  """`train(name, batch_fn, workdir, log) -> TrainResult`: one compiled step shared by every model of the study
  (same architecture, optimizer and schedule; batches of one shape compile once)."""
  tx, schedule = jt.make_optimizer(cfg.lr, total_steps=cfg.steps, warmup_steps=max(cfg.steps // 20, 1))
  init_fn = lambda r: model.init(r, mcfg)
  loss = lambda p, b, r: model.loss_fn(p, b, mcfg, r)
  step = jax.jit(jt.make_train_step(loss, tx, schedule=schedule, steps_per_call=cfg.steps_per_call),
                 donate_argnums=0)

  # What a trained model depends on; the evaluation fields are left out, so changing them re-evaluates the
  # checkpointed models instead of raising.
  record = {k: v for k, v in experiment.to_dict(cfg).items() if k not in _EVALUATION_FIELDS}

  def train(name, batch_fn, workdir, log):
    """The trained model's `TrainResult`: resumed from (or, when finished, read back from) `workdir/name/checkpoints`."""
    return jt.fit(None, init_fn, tx, jax.random.PRNGKey(cfg.seed + 1), step=step, num_steps=cfg.steps,
                  batch_fn=batch_fn, workdir=os.path.join(workdir, name), record=record,
                  record_name=f"{name} training config", checkpoint_every=cfg.checkpoint_every,
                  steps_per_call=cfg.steps_per_call, keep=1, log_every=cfg.steps_per_call * 5, tensorboard=False,
                  plot_title=f"Gato {name}", print_fn=lambda s: log(f"{name}: {s}"))

  return train


def run(config: Any, workdir: str) -> dict:
  cfg = experiment.from_config(GatoExperimentConfig, config)
  log = print
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  layout = TokenLayout(text_vocab=text_data.ByteTokenizer.vocab_size, discrete_vocab=8)
  try:
    tasks = _experts(cfg, workdir, log)
  except ex.ExpertPreempted as e:
    log(str(e))
    return {"preempted": True}
  mcfg = model.GatoConfig(vocab_size=layout.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                          multiple_of=32, max_seq_len=cfg.context, max_local=64, patch_size=5,
                          image_channels=_image_channels([t["spec"] for t in tasks.values()]),
                          patch_width=16, patch_groups=8, scan_layers=False)
  toks = {n: _tokens(t["spec"], layout, mcfg, t["episodes"]) for n, t in tasks.items()}
  steps_len = {n: sq.timestep_len(t["spec"], mcfg.patch_size) for n, t in tasks.items()}
  train_text, eval_text, caps, eval_caps, eval_labels, tok = _text_and_captions(cfg, layout, mcfg)
  pd = mcfg.patch_dim

  def control_rows(rng, name):
    b = sq.sample_control_batch(rng, toks[name], step_len=steps_len[name], context=cfg.context,
                                batch=cfg.rows_per_task, prompt_prob=cfg.prompt_prob,
                                prompt_timesteps=cfg.prompt_timesteps)
    return [sq.Tokens(*(x[i] for x in b)) for i in range(cfg.rows_per_task)]

  def multi_batch(step):
    rng = np.random.default_rng([cfg.seed, step])
    rows = [r for n in tasks for r in control_rows(rng, n)]
    rows += _text_rows(rng, train_text, cfg.rows_per_task, cfg.context, layout, pd)
    rows += [sq.pad_to(caps[i], cfg.context) for i in rng.integers(0, len(caps), cfg.rows_per_task)]
    return sq.stack(rows)

  train = _trainer(cfg, mcfg)
  batch_fns = {"multi-task": ("multi-task", multi_batch)}
  for n in tasks:
    if n != "CartPole-twin":
      batch_fns[n] = (f"single-{n}",
                      lambda step, n=n: sq.stack(control_rows(np.random.default_rng([cfg.seed, step, 7]), n)))
  trained = {}
  for key, (name, batch_fn) in batch_fns.items():
    res = train(name, batch_fn, workdir, log)
    if res.preempted:
      return {"preempted": True}
    trained[key] = res.state.params

  # ---------------------------------------------------------------- evaluation
  boot = np.random.default_rng(cfg.seed)

  def demo(name):
    eps = toks[name]
    best = int(np.argmax(tasks[name]["episodes"].returns))
    return jax.tree.map(jnp.asarray, sq.prompt_window(None, eps[best], steps_len[name], cfg.prompt_timesteps,
                                                      from_end=True))

  def score(params, name, prompt, seed, history=True):
    """`history=False`: the context is the prompt and the current observation only (the incremental form with
    K = 0: each step's timestep is dropped before the next), so the prompt is the only task information."""
    t = tasks[name]
    k = max(1, min(cfg.eval_history, (cfg.context - prompt.length) // steps_len[name] - 1)) if history else 0
    r = policy.evaluate(params, prompt, jax.random.PRNGKey(seed), cfg=mcfg, layout=layout, spec=t["spec"],
                        env=t["env"], env_params=t["env_params"], num_envs=cfg.eval_episodes, keep=k,
                        max_steps=t["horizon"], temperature=cfg.eval_temperature, incremental=not history)
    s = ex.normalised_score(np.asarray(r.returns), t["expert_return"], t["random_return"])
    m, lo, hi = ex.bootstrap_interval(s, boot, n=cfg.bootstrap)
    return {"score": m, "lo": lo, "hi": hi, "return": float(np.mean(r.returns))}

  results: dict[str, Any] = {"tasks": {}, "twin": {}}
  for name in tasks:
    t0 = time.perf_counter()
    row = {"expert_return": tasks[name]["expert_return"], "random_return": tasks[name]["random_return"],
           "kept_episodes": tasks[name]["kept"],
           "multi-task": score(trained["multi-task"], name, demo(name), cfg.seed + 11)}
    single = "CartPole-v1" if name == "CartPole-twin" else name
    if name != "CartPole-twin":
      row["single-task"] = score(trained[single], name, demo(name), cfg.seed + 11)
    results["tasks"][name] = row
    log(f"eval {name}: {row} ({time.perf_counter() - t0:.1f}s)")
  if "CartPole-twin" in tasks:
    results["prompt_probe"] = {}
    for env_name, other in (("CartPole-v1", "CartPole-twin"), ("CartPole-twin", "CartPole-v1")):
      heldout = _tokens(tasks[env_name]["spec"], layout, mcfg, tasks[env_name]["heldout"])
      results["prompt_probe"][env_name] = prompt_probe(
          trained["multi-task"], mcfg, layout, tasks[env_name]["spec"], heldout, toks[other],
          step_len=steps_len[env_name], prompt_timesteps=cfg.prompt_timesteps, context=cfg.context,
          rows=cfg.probe_rows, seed=cfg.seed + 13)
      pr = results["prompt_probe"][env_name]
      log(f"prompt probe {env_name}: first-timestep accuracy right {pr['right']['first_timestep']:.3f} twin "
          f"{pr['twin']['first_timestep']:.3f} none {pr['none']['first_timestep']:.3f}; all timesteps right "
          f"{pr['right']['all']:.3f} twin {pr['twin']['all']:.3f} none {pr['none']['all']:.3f}; "
          f"TV(right, twin) {pr['prob_shift']:.3f}")
    if "CartPole-v1" in trained:
      # The ceiling of the probe: the single-task CartPole model knows its task, so its accuracy on the same
      # windows is what the observation alone allows once the task is known.
      heldout = _tokens(tasks["CartPole-v1"]["spec"], layout, mcfg, tasks["CartPole-v1"]["heldout"])
      pr = prompt_probe(trained["CartPole-v1"], mcfg, layout, tasks["CartPole-v1"]["spec"], heldout,
                        toks["CartPole-twin"], step_len=steps_len["CartPole-v1"],
                        prompt_timesteps=cfg.prompt_timesteps, context=cfg.context, rows=cfg.probe_rows,
                        seed=cfg.seed + 13)
      results["prompt_probe_single_task"] = {"CartPole-v1": pr}
      log(f"prompt probe CartPole-v1, single-task BC (the ceiling): first-timestep accuracy right "
          f"{pr['right']['first_timestep']:.3f} none {pr['none']['first_timestep']:.3f}; all timesteps right "
          f"{pr['right']['all']:.3f} none {pr['none']['all']:.3f}")
    none = sq.Tokens(*(jnp.asarray(x) for x in sq.empty_tokens(0, pd)))
    for env_name, other in (("CartPole-v1", "CartPole-twin"), ("CartPole-twin", "CartPole-v1")):
      results["twin"][env_name] = {
          "no prompt": score(trained["multi-task"], env_name, none, cfg.seed + 12),
          "right demonstration": score(trained["multi-task"], env_name, demo(env_name), cfg.seed + 12),
          "twin's demonstration": score(trained["multi-task"], env_name, demo(other), cfg.seed + 12),
          "right demonstration, no history": score(trained["multi-task"], env_name, demo(env_name), cfg.seed + 12,
                                                   history=False),
          "twin's demonstration, no history": score(trained["multi-task"], env_name, demo(other), cfg.seed + 12,
                                                    history=False)}
      log(f"twin {env_name}: {results['twin'][env_name]}")

  # ---------------------------------------------------------------- text and captions
  p = trained["multi-task"]
  rng = np.random.default_rng(cfg.seed + 5)
  text_batch = jax.tree.map(jnp.asarray, sq.stack(_text_rows(rng, eval_text, 16, cfg.context, layout, pd)))
  results["text_loss"] = float(model.loss_fn(p, text_batch, mcfg)[0])
  results["text_loss_uniform"] = float(np.log(layout.text_vocab))
  cap_batch = jax.tree.map(jnp.asarray, sq.stack([sq.pad_to(c, 8) for c in eval_caps]))
  logits = np.asarray(model.apply(p, cap_batch, mcfg))[:, 3, :layout.text_vocab]   # 4 patches: the label follows
  digit_ids = np.array([tok.encode(str(d), bos=False)[0] for d in range(10)])
  pred = np.argmax(logits[:, digit_ids], -1)
  results["caption_accuracy"] = float(np.mean(pred == eval_labels))
  results["caption_chance"] = 0.1
  results["param_count"] = model.param_count(mcfg)
  results["seconds"] = time.perf_counter() - t_start

  _write(results, cfg, workdir)
  return results


def _write(results: dict, cfg: GatoExperimentConfig, workdir: str) -> None:
  rows = []
  for name, r in results["tasks"].items():
    cell = lambda m: f"{m['score']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]" if m else "-"
    rows.append([name, r["expert_return"], r["random_return"], r["kept_episodes"], cell(r["multi-task"]),
                 cell(r.get("single-task"))])
  table = report.markdown_table(["task", "R expert", "R random", "episodes kept", "multi-task score [95% CI]",
                                 "single-task BC score [95% CI]"], rows, digits=1)
  twin_rows = [[env] + [f"{m['score']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]" for m in conds.values()]
               for env, conds in results["twin"].items()]
  twin_heads = list(next(iter(results["twin"].values()))) if results["twin"] else []
  twin = report.markdown_table(["environment"] + twin_heads, twin_rows) if twin_rows else ""
  probe_rows = [[env, f"{r['right']['first_timestep']:.2f}", f"{r['twin']['first_timestep']:.2f}",
                 f"{r['none']['first_timestep']:.2f}", f"{r['right']['all']:.2f}", f"{r['twin']['all']:.2f}",
                 f"{r['none']['all']:.2f}", f"{r['prob_shift']:.3f}"]
                for env, r in list(results.get("prompt_probe", {}).items())
                + [(f"{e} (single-task BC: the ceiling)", r)
                   for e, r in results.get("prompt_probe_single_task", {}).items()]]
  probe = report.markdown_table(["environment", "acc. 1st step, right prompt", "twin's prompt", "no prompt",
                                 "acc. all steps, right", "twin's", "none", "TV(right, twin) 1st step"],
                                probe_rows) if probe_rows else ""
  extra = (f"caption accuracy {results['caption_accuracy']:.3f} (chance 0.1); held-out text loss "
           f"{results['text_loss']:.3f} nats/byte (uniform {results['text_loss_uniform']:.3f}); "
           f"{results['param_count']:,} parameters; {results['seconds']:.0f} s")
  report.save_text("\n\n".join([table, twin, probe, extra]) + "\n", os.path.join(workdir, "results.md"))
  report.save_json(results, os.path.join(workdir, "results.json"))
  names = list(results["tasks"])
  with report.figure(os.path.join(workdir, "gato_scores.png"), figsize=(7, 3.2), dpi=90) as fig:
    ax = fig.add_subplot(1, 1, 1)
    for j, kind in enumerate(("multi-task", "single-task")):
      xs = [i + 0.2 * (2 * j - 1) for i, n in enumerate(names) if kind in results["tasks"][n]]
      ms = [results["tasks"][n][kind] for n in names if kind in results["tasks"][n]]
      ax.bar(xs, [m["score"] for m in ms], width=0.4, label=kind,
             yerr=np.array([[m["score"] - m["lo"], m["hi"] - m["score"]] for m in ms]).T, capsize=3)
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("expert-normalised score")
    ax.legend(fontsize=7)
  figs = ["gato_scores.png"]
  if results["twin"]:
    with report.figure(os.path.join(workdir, "gato_twin.png"), figsize=(7, 3.4), dpi=90) as fig:
      ax = fig.add_subplot(1, 1, 1)
      conds = list(next(iter(results["twin"].values())))
      for j, (env, r) in enumerate(results["twin"].items()):
        ms = [r[c] for c in conds]
        ax.bar([i + 0.2 * (2 * j - 1) for i in range(len(conds))], [m["score"] for m in ms], width=0.4, label=env,
               yerr=np.array([[m["score"] - m["lo"], m["hi"] - m["score"]] for m in ms]).T, capsize=3)
      ax.set_xticks(range(len(conds)), [c.replace(", ", ",\n").replace(" demonstration", "\ndemonstration")
                                        for c in conds], fontsize=7)
      ax.set_ylabel("expert-normalised score")
      ax.legend(fontsize=7)
    figs.append("gato_twin.png")
  if cfg.figures_dir:
    os.makedirs(cfg.figures_dir, exist_ok=True)
    for f in figs:
      shutil.copy(os.path.join(workdir, f), os.path.join(cfg.figures_dir, f))
