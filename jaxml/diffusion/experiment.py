"""The diffusion experiment (`experiments/diffusion.py`): a score model on 2D mixture data and on the 8x8 digits.

`run(config, workdir)` (the experiment contract, `jaxml.experiment`):
2D: an MLP score net is trained with DSM, sampled with every sampler, and
scored by (a) the true mixture log-density of its samples and (b) its own
probability-flow log-likelihood of held-out data (exact trace), next to the
true log-density of that data. Digits: a small U-Net is trained on the
scikit-learn digits, sampled, and its bits/dim (uniform dequantisation,
Hutchinson trace) reported.

Both trainings run on `jaxml.train`: Adam (gradients clipped to norm 1), an
EMA of the parameters with the TF warm-up (what is sampled), the batch drawn
inside the compiled step from the step's key (fresh mixture draws; random
dequantised rows of the digits), `steps_per_call` steps per call. Each has its
own folder, `DIR/2d/` and `DIR/digits/` (`checkpoints/` with the
`run_config.json` it was trained with, `metrics.jsonl`, `loss.png`), so a rerun
resumes each from its newest checkpoint and a changed config raises naming the
fields. Writes `results.json`, `samples_2d.png`, `digits.png` and the samples
behind the figures (`samples_2d.npz`, `samples_digits.npz`: grey levels 0..16).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import experiment, report
from jaxml import train as jt
from jaxml.diffusion import digits as digits_lib
from jaxml.diffusion import likelihood, nets, sampling
from jaxml.diffusion.losses import dsm_loss
from jaxml.diffusion.mixture import GaussianMixture, mixture_log_prob
from jaxml.diffusion.sde import get_sde


@dataclasses.dataclass(frozen=True)
class DiffusionExperimentConfig:
  sde: str = "vp"
  seed: int = 0
  samplers: tuple[str, ...] = sampling.METHODS
  sampler_steps: int = 500
  ema_decay: float = 0.999  # EMA of the parameters (TF warm-up), sampled from
  allow_fresh_start: bool = False  # start a training over when its checkpoints exist but none restores
  # 2D: a ring of 8 Gaussians, radius 2.
  ring_std: float = 0.1
  hidden: int = 128
  depth: int = 3
  steps_2d: int = 4000
  batch_2d: int = 256
  lr_2d: float = 1e-3
  steps_per_call_2d: int = 100  # divides steps_2d and checkpoint_every_2d
  checkpoint_every_2d: int = 2000
  num_samples_2d: int = 2000
  num_eval_ll: int = 256  # held-out points for the likelihood
  ll_steps: int = 100  # RK4 steps of the likelihood ODE
  # digits
  run_digits: bool = True
  unet_base: int = 16
  steps_digits: int = 500
  batch_digits: int = 64
  lr_digits: float = 1e-3
  steps_per_call_digits: int = 10  # divides steps_digits and checkpoint_every_digits
  checkpoint_every_digits: int = 100
  num_samples_digits: int = 64
  digits_samplers: tuple[str, ...] = ("euler_maruyama", "pc")
  digits_sampler_steps: int = 200
  num_eval_bpd: int = 64
  bpd_steps: int = 50

  def __post_init__(self):
    for part in ("2d", "digits"):
      steps, k, every = (getattr(self, f"{n}_{part}") for n in ("steps", "steps_per_call", "checkpoint_every"))
      for name, value in ((f"steps_{part}", steps), (f"steps_per_call_{part}", k),
                          (f"checkpoint_every_{part}", every)):
        if value <= 0:
          raise ValueError(f"DiffusionExperimentConfig.{name} must be positive, got {value}")
      for name, value in ((f"steps_{part}", steps), (f"checkpoint_every_{part}", every)):
        if value % k:
          raise ValueError(f"DiffusionExperimentConfig.{name}={value} must be a multiple of "
                           f"steps_per_call_{part}={k}")
    for m in self.samplers + self.digits_samplers:
      if m not in sampling.METHODS:
        raise ValueError(f"unknown sampler {m!r}; expected one of {sampling.METHODS}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"DiffusionExperimentConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
    get_sde(self.sde)


def _ring(cfg: DiffusionExperimentConfig) -> GaussianMixture:
  a = 2 * np.pi * np.arange(8) / 8
  return GaussianMixture.create(2.0 * np.stack([np.cos(a), np.sin(a)], -1), cfg.ring_std)


def _record(cfg: DiffusionExperimentConfig, part: str, fields: tuple[str, ...]) -> dict:
  """What a training's checkpoints depend on (step counts excluded: a longer rerun continues)."""
  return {"part": part, **{f: getattr(cfg, f) for f in ("sde", "seed", "ema_decay") + fields}}


def train_score_model(name: str, cfg: DiffusionExperimentConfig, workdir: str, *, init_fn: Callable[[jax.Array], Any],
                      loss: Callable, lr: float, steps: int, steps_per_call: int, checkpoint_every: int,
                      rng: jax.Array, record: dict, log_every: int,
                      log: Callable[[str], None] = print) -> jt.TrainResult:
  """Trains (or resumes) one score model in `workdir/name/` on the core.

  Args:
    name: the training's folder under `workdir` ("2d", "digits").
    cfg: the experiment (ema_decay, allow_fresh_start).
    workdir: the experiment's folder.
    init_fn: `init_fn(rng) -> params`.
    loss: `loss(params, None, rng) -> (loss, metrics)`, drawing its batch from `rng`.
    lr, steps, steps_per_call, checkpoint_every: Adam's rate, the updates, per
      call, between checkpoints.
    rng: the training's key (init and the state's key).
    record: the config its checkpoints must agree with (`jt.check_run_config`).
    log_every: steps per metrics record.
    log: progress lines.

  Returns:
    The loop's `TrainResult` (`state.ema_params` is the model to sample).
  """
  tx, _ = jt.make_optimizer(lr, total_steps=steps, kind="adam", schedule="constant", b2=0.999, clip_norm=1.0)
  return jt.fit(loss, init_fn, tx, rng, num_steps=steps, workdir=os.path.join(workdir, name), record=record,
                record_name=f"{name} training config", checkpoint_every=checkpoint_every,
                steps_per_call=steps_per_call, ema_decay=cfg.ema_decay, ema_warmup=True,
                allow_fresh_start=cfg.allow_fresh_start, log_every=log_every, plot_title=f"DSM loss, {name}",
                print_fn=lambda s: log(f"{name}: {s}"))


def _final_loss(workdir: str, name: str) -> float:
  """The last metrics record's loss: the mean over the final logging window (`log_every` steps)."""
  return float(jt.read_metrics(os.path.join(workdir, name))[-1]["loss"])


def _train_seconds(workdir: str, name: str) -> float:
  """Training time, carried across resumes (the loop's `elapsed_sec`)."""
  return round(float(jt.read_metrics(os.path.join(workdir, name))[-1]["elapsed_sec"]), 1)


def train_2d(cfg: DiffusionExperimentConfig, workdir: str, log: Callable[[str], None] = print):
  """Trains (or resumes) the 2D score MLP in `workdir/2d/`. Returns `(TrainResult, apply, mixture)`."""
  sde = get_sde(cfg.sde)
  mix = _ring(cfg)
  ncfg = nets.ScoreMLPConfig(data_dim=2, hidden=cfg.hidden, depth=cfg.depth)
  apply = lambda p, x, t: nets.mlp_apply(p, x, t, ncfg)  # noqa: E731

  def loss(params, batch, rng):
    del batch  # fresh draws from the mixture, inside the compiled step
    b_rng, l_rng = jax.random.split(rng)
    return dsm_loss(l_rng, sde, functools.partial(nets.precondition, sde, apply, params),
                    mix.sample(b_rng, cfg.batch_2d)), {}

  result = train_score_model(
      "2d", cfg, workdir, init_fn=functools.partial(nets.mlp_init, cfg=ncfg), loss=loss, lr=cfg.lr_2d,
      steps=cfg.steps_2d, steps_per_call=cfg.steps_per_call_2d, checkpoint_every=cfg.checkpoint_every_2d,
      rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1), log_every=100, log=log,
      record=_record(cfg, "2d", ("ring_std", "hidden", "depth", "batch_2d", "lr_2d")))
  return result, apply, mix


def _digit_split(cfg: DiffusionExperimentConfig):
  images, _ = digits_lib.load_digits()
  perm = np.random.default_rng(cfg.seed).permutation(len(images))
  return images, perm[cfg.num_eval_bpd:], perm[:cfg.num_eval_bpd]


def train_digits(cfg: DiffusionExperimentConfig, workdir: str, log: Callable[[str], None] = print):
  """Trains (or resumes) the digits U-Net in `workdir/digits/`. Returns `(TrainResult, apply)`."""
  sde = get_sde(cfg.sde)
  images, train_idx, _ = _digit_split(cfg)
  data = jnp.asarray(digits_lib.to_model_space(images[train_idx]))
  ucfg = nets.UNetConfig(base=cfg.unet_base)
  apply = lambda p, x, t: nets.unet_apply(p, x, t, ucfg)  # noqa: E731

  def loss(params, batch, rng):
    del batch  # random rows of the training digits, inside the compiled step
    i_rng, u_rng, l_rng = jax.random.split(rng, 3)
    x = data[jax.random.randint(i_rng, (cfg.batch_digits,), 0, data.shape[0])]
    # Dequantised: uniform noise within each grey level (matches the bits/dim model).
    x = x + (jax.random.uniform(u_rng, x.shape) - 0.5) * (2.0 / digits_lib.NUM_LEVELS)
    return dsm_loss(l_rng, sde, functools.partial(nets.precondition, sde, apply, params), x), {}

  result = train_score_model(
      "digits", cfg, workdir, init_fn=functools.partial(nets.unet_init, cfg=ucfg), loss=loss, lr=cfg.lr_digits,
      steps=cfg.steps_digits, steps_per_call=cfg.steps_per_call_digits,
      checkpoint_every=cfg.checkpoint_every_digits, rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 6),
      log_every=50, log=log, record=_record(cfg, "digits", ("num_eval_bpd", "unet_base", "batch_digits", "lr_digits")))
  return result, apply


def _sample_all(rng, sde, score_fn, shape, methods, steps):
  out, secs = {}, {}
  for m in methods:
    t0 = time.time()
    out[m] = np.asarray(sampling.sample(rng, sde, score_fn, shape, method=m, num_steps=steps))
    secs[m] = round(time.time() - t0, 2)
  return out, secs


def _plot_2d(samples: dict, mix: GaussianMixture, path: str) -> None:
  cols = ["data"] + list(samples)
  ref = np.asarray(mix.sample(jax.random.PRNGKey(1), 2000))
  with report.figure(path, figsize=(2.6 * len(cols), 2.6), dpi=80) as fig:
    for i, name in enumerate(cols):
      ax = fig.add_subplot(1, len(cols), i + 1)
      x = ref if name == "data" else samples[name]
      ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
      ax.set_xlim(-3, 3)
      ax.set_ylim(-3, 3)
      ax.set_title(name)


def _plot_digits(samples: dict, path: str, data: np.ndarray | None = None) -> None:
  """One grid per sampler, after a grid of real digits (`data`, grey levels 0..16) when given."""
  panels = {name: digits_lib.from_model_space(x)[..., 0] for name, x in samples.items()}
  if data is not None:
    panels = {"data": np.asarray(data), **panels}
  with report.figure(path, figsize=(3 * len(panels), 3), dpi=80) as fig:
    for i, (name, imgs) in enumerate(panels.items()):
      ax = fig.add_subplot(1, len(panels), i + 1)
      n = int(math.sqrt(len(imgs)))
      grid = imgs[:n * n].reshape(n, n, 8, 8).transpose(0, 2, 1, 3).reshape(8 * n, 8 * n)
      ax.imshow(grid, cmap="gray_r", vmin=0, vmax=16)
      ax.set_title(name)
      ax.axis("off")


def run(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """The experiment contract: trains (or resumes) both score models, samples and scores them.

  Args:
    config: a `ml_collections.ConfigDict` or dict of `DiffusionExperimentConfig`
      fields (`experiments/configs/diffusion.py`); unknown keys raise.
    workdir: the experiment's folder (module docstring); a rerun resumes.
    log: progress lines.

  Returns:
    `results.json`'s content (`sde`, `2d`, `digits` when run) plus `preempted`:
    True when SIGTERM stopped a training (its checkpoint was saved; the
    evaluation is left to the rerun).
  """
  cfg = experiment.from_config(DiffusionExperimentConfig, config)
  os.makedirs(workdir, exist_ok=True)
  sde = get_sde(cfg.sde)
  rng = jax.random.PRNGKey(cfg.seed)
  results: dict[str, Any] = {"sde": cfg.sde}

  # ---- 2D
  trained, apply, mix = train_2d(cfg, workdir, log)
  if trained.preempted:
    return {**results, "preempted": True}
  score_fn = nets.score_fn_from_net(sde, apply, trained.state.ema_params)
  samples, secs = _sample_all(jax.random.fold_in(rng, 3), sde, score_fn, (cfg.num_samples_2d, 2), cfg.samplers,
                              cfg.sampler_steps)
  held_out = mix.sample(jax.random.fold_in(rng, 4), cfg.num_eval_ll)
  model_ll = likelihood.log_likelihood(jax.random.fold_in(rng, 5), sde, score_fn, held_out, exact_trace=True,
                                       num_steps=cfg.ll_steps)
  true_ll = mixture_log_prob(mix, held_out)
  results["2d"] = {
      "train_seconds": _train_seconds(workdir, "2d"), "final_loss": _final_loss(workdir, "2d"),
      "sampler_seconds": secs,
      "sample_true_logp": {m: float(jnp.mean(mixture_log_prob(mix, jnp.asarray(x)))) for m, x in samples.items()},
      "data_true_logp": float(jnp.mean(true_ll)),
      "model_loglik_nats": float(jnp.mean(model_ll)),
  }
  np.savez(os.path.join(workdir, "samples_2d.npz"), **samples)
  _plot_2d(samples, mix, os.path.join(workdir, "samples_2d.png"))
  log(f"2D: {json.dumps(results['2d'])}")

  # ---- digits
  if cfg.run_digits:
    utrained, uapply = train_digits(cfg, workdir, log)
    if utrained.preempted:
      return {**results, "preempted": True}
    images, train_idx, test_idx = _digit_split(cfg)
    uscore = nets.score_fn_from_net(sde, uapply, utrained.state.ema_params)
    dsamples, dsecs = _sample_all(jax.random.fold_in(rng, 8), sde, uscore, (cfg.num_samples_digits, 8, 8, 1),
                                  cfg.digits_samplers, cfg.digits_sampler_steps)
    bpd = likelihood.bits_per_dim(jax.random.fold_in(rng, 9), sde, uscore, images[test_idx][..., None],
                                  num_levels=digits_lib.NUM_LEVELS, exact_trace=False, num_steps=cfg.bpd_steps)
    results["digits"] = {"train_seconds": _train_seconds(workdir, "digits"),
                         "final_loss": _final_loss(workdir, "digits"),
                         "sampler_seconds": dsecs, "bits_per_dim": float(jnp.mean(bpd)),
                         "uniform_bits_per_dim": math.log2(digits_lib.NUM_LEVELS)}
    np.savez(os.path.join(workdir, "samples_digits.npz"),
             **{m: digits_lib.from_model_space(x) for m, x in dsamples.items()})
    _plot_digits(dsamples, os.path.join(workdir, "digits.png"), data=images[train_idx[:cfg.num_samples_digits]])
    log(f"digits: {json.dumps(results['digits'])}")
  report.save_json(results, os.path.join(workdir, "results.json"))
  return {**results, "preempted": False}
