"""Mode-collapse study: GAN vs VAE vs score-based diffusion on toy multi-modal data.

Every model gets the same MLP body (`hidden` x `depth`), the same number of
gradient steps and the same batch size; seeds are trained in parallel with
`jax.vmap` (one `TrainState` whose leaves carry a leading seed axis), so each
(dataset, model) pair compiles once. Each pair trains through
`jaxml.train.train` in its own folder with checkpoints, so an interrupted pair
resumes mid-training. Samples are scored with
`jaxml.generative.metrics.mode_metrics`.

`run(config, workdir)` (the experiment contract) writes
- `results.json`: `{dataset: {model: {metric: [value per seed]}}}` for
  `modes_captured`, `high_quality_frac`, `reverse_kl`, `gap_mass`;
- `table.md`: mean +- std over seeds beside published GAN figures;
- `samples.png`: one panel of samples (seed 0) per dataset and model;
- `config.json`: the study configuration and the seconds each pair took;
- `pairs/<dataset>_<model>/`: the pair's training (`checkpoints/` with the
  `run_config.json` it was trained with, `metrics.jsonl`, `loss.png`) and, once
  it has finished, `result.json` (per-seed metrics) and `samples.npy` (the seed-0
  samples of the figure). A rerun with the same workdir loads finished pairs,
  resumes an unfinished one from its newest checkpoint, and raises on a changed
  configuration (datasets and models may be added).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import zlib
from typing import Any, Callable

import jax
import numpy as np

from jaxml import experiment, report
from jaxml import train as jt
from jaxml.diffusion import losses as dlosses
from jaxml.diffusion import nets as dnets
from jaxml.diffusion import sampling as dsampling
from jaxml.diffusion import sde as dsde
from jaxml.generative import gan as gan_lib
from jaxml.generative import vae as vae_lib
from jaxml.generative.metrics import mode_metrics
from jaxml.generative.toy import ToyDataset, get_dataset
from jaxml.train.checkpoint import RUN_CONFIG_FILE

MODELS = ("gan", "vae", "diffusion")
METRICS = ("modes_captured", "high_quality_frac", "reverse_kl", "gap_mass")
EMA_DECAY = 0.999  # the diffusion model samples from its EMA (with the TF warm-up, `jaxml.train.step`)
RESULT_FILE = "result.json"    # in a pair's folder: written last, the pair counts as finished only then
SAMPLES_FILE = "samples.npy"   # in a pair's folder: the seed-0 samples of the figure
# Fields that a finished or unfinished pair does not depend on: they may change between runs of a study.
_FREE_FIELDS = ("datasets", "models", "checkpoint_every")

# Published figures (modes captured / % high-quality samples / reverse KL) on the same toy data:
# VEEGAN (Srivastava et al. 2017, Table 1) and PacGAN (Lin et al. 2018, Table 2). NOT yet verified
# against the papers (the grid-25 rows agree with the project's reference notes, which also mark them
# "verify"); the printed table labels them "published, unverified". They are shown for context only and
# no test depends on them. Checked against the authors' released code and project page: the protocol
# (2500 samples, 3-std high quality, a mode counts with one high-quality sample) and the data (grid as
# ours; PacGAN's ring is ours at half the scale); their GANs train far longer (PacGAN: 400k steps).
PUBLISHED = {
    "ring8": [("GAN (VEEGAN T1)", 1.0, 99.3, None), ("ALI (VEEGAN T1)", 2.8, 0.13, None),
              ("Unrolled GAN (VEEGAN T1)", 7.6, 35.6, None), ("VEEGAN (VEEGAN T1)", 8.0, 52.9, None)],
    "grid25": [("GAN (VEEGAN T1)", 3.3, 0.5, None), ("ALI (VEEGAN T1)", 15.8, 1.6, None),
               ("Unrolled GAN (VEEGAN T1)", 23.6, 16.0, None), ("VEEGAN (VEEGAN T1)", 24.6, 40.0, None),
               ("GAN (PacGAN T2)", 17.3, 94.8, 0.70), ("PacGAN2 (PacGAN T2)", 23.8, 91.3, 0.13)],
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  datasets: tuple[str, ...] = ("ring8", "grid25", "mix1d_sep1", "mix1d_sep8")
  models: tuple[str, ...] = MODELS
  num_seeds: int = 3
  seed: int = 0
  num_steps: int = 3000  # gradient steps per model (a GAN step = one D and one G update)
  batch_size: int = 256
  hidden: int = 128
  depth: int = 3
  latent_dim: int = 8  # GAN / VAE latent width
  gan_learning_rate: float = 1e-3  # the same rate for all three models (Adam; b1 = 0.5 for the GAN)
  vae_learning_rate: float = 1e-3
  diffusion_learning_rate: float = 1e-3
  diffusion_time_power: float = 3.0  # t = eps + (1 - eps) u^p in the DSM loss (1: uniform as in the paper; 3 puts
  # more steps on small t, which the 0.02-wide ring modes need; same minimiser)
  gan_spectral_norm: bool = False
  gan_gp_weight: float = 0.0
  sde: str = "vp"
  sampler: str = "euler_maruyama"
  sampler_steps: int = 250
  num_eval: int = 2500  # samples scored per seed
  steps_per_call: int = 250  # training steps per compiled call (lax.scan)
  checkpoint_every: int = 1000  # steps between a pair's checkpoints (a multiple of steps_per_call)
  allow_fresh_start: bool = False  # start a pair over when its checkpoints exist but none restores

  def __post_init__(self):
    for m in self.models:
      if m not in MODELS:
        raise ValueError(f"unknown model {m!r}; expected one of {MODELS}")
    for d in self.datasets:
      get_dataset(d)
    for name in ("num_seeds", "num_steps", "batch_size", "hidden", "depth", "latent_dim", "sampler_steps",
                 "num_eval", "steps_per_call", "checkpoint_every"):
      if getattr(self, name) <= 0:
        raise ValueError(f"StudyConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("num_steps", "checkpoint_every"):
      if getattr(self, name) % self.steps_per_call:
        raise ValueError(f"StudyConfig.{name}={getattr(self, name)} must be a multiple of "
                         f"steps_per_call={self.steps_per_call}")
    if self.sampler not in dsampling.METHODS:
      raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {dsampling.METHODS}")
    dsde.get_sde(self.sde)


def _seed_keys(cfg: StudyConfig, salt: int) -> tuple[jax.Array, jax.Array]:
  """`(train keys [S, 2], eval keys [S, 2])` of a pair's `cfg.num_seeds` seeds."""
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), salt), cfg.num_seeds)
  train_keys, eval_keys = jax.vmap(jax.random.split)(keys).transpose(1, 0, 2)
  return train_keys, eval_keys


def _data_loss(loss: Callable[[Any, jax.Array, jax.Array], jax.Array], ds: ToyDataset, batch_size: int):
  """`loss(params, None, rng) -> (loss, {})` drawing its batch of `ds` from the step's key."""
  def fn(params, batch, rng):
    del batch  # the data is drawn inside the compiled step
    b_rng, l_rng = jax.random.split(rng)
    return loss(params, l_rng, ds.sample(b_rng, batch_size)), {}
  return fn


class _Pair:
  """One model of the study: the single-seed state initialiser, step and sampler."""

  def __init__(self, model: str, ds: ToyDataset, cfg: StudyConfig):
    self.ema = False
    if model == "gan":
      gcfg = gan_lib.GANConfig(data_dim=ds.dim, latent_dim=cfg.latent_dim, hidden=cfg.hidden, depth=cfg.depth,
                               spectral_norm=cfg.gan_spectral_norm, gp_weight=cfg.gan_gp_weight,
                               learning_rate=cfg.gan_learning_rate)
      self.init = functools.partial(gan_lib.init_state, cfg=gcfg)
      self.step = gan_lib.make_train_step(gcfg, cfg.batch_size, sample_fn=ds.sample)
      self.sample = lambda params, rng: gan_lib.sample(rng, params, cfg.num_eval, gcfg)
      return
    tx, _ = jt.make_optimizer(cfg.vae_learning_rate if model == "vae" else cfg.diffusion_learning_rate,
                              total_steps=cfg.num_steps, kind="adam", schedule="constant", b2=0.999, clip_norm=1.0)
    if model == "vae":
      vcfg = vae_lib.VAEConfig(data_dim=ds.dim, latent_dim=cfg.latent_dim, hidden=cfg.hidden, depth=cfg.depth)
      init_params = functools.partial(vae_lib.init, cfg=vcfg)
      loss = _data_loss(functools.partial(vae_lib.loss_fn, cfg=vcfg), ds, cfg.batch_size)
      self.step = jt.make_train_step(loss, tx)
      self.sample = lambda params, rng: vae_lib.sample(rng, params, cfg.num_eval, vcfg)
    elif model == "diffusion":
      sde = dsde.get_sde(cfg.sde)
      ncfg = dnets.ScoreMLPConfig(data_dim=ds.dim, hidden=cfg.hidden, depth=cfg.depth)
      apply = lambda p, x, t: dnets.mlp_apply(p, x, t, ncfg)  # noqa: E731

      def dsm(params, rng, x):
        return dlosses.dsm_loss(rng, sde, functools.partial(dnets.precondition, sde, apply, params), x,
                                time_power=cfg.diffusion_time_power)

      def draw(params, rng):
        score_fn = functools.partial(dnets.precondition, sde, apply, params)
        parts = dsampling.sampler_parts(sde, score_fn, (cfg.num_eval, ds.dim), method=cfg.sampler,
                                        num_steps=cfg.sampler_steps)
        return parts.finish(jax.lax.fori_loop(0, parts.num_steps, parts.step, parts.init(rng)))

      self.ema = True
      init_params = functools.partial(dnets.mlp_init, cfg=ncfg)
      self.step = jt.make_train_step(_data_loss(dsm, ds, cfg.batch_size), tx, ema_decay=EMA_DECAY, ema_warmup=True)
      self.sample = draw
    else:
      raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")

    def init(rng):
      p_rng, s_rng = jax.random.split(rng)
      return jt.create_train_state(init_params(p_rng), tx, s_rng, ema=self.ema)

    self.init = init


def _pair_dir(workdir: str, dname: str, model: str) -> str:
  return os.path.join(workdir, "pairs", f"{dname}_{model}")


def _pair_record(cfg: StudyConfig) -> dict:
  """What a pair's training and evaluation depend on: the study config without `_FREE_FIELDS`."""
  return {k: v for k, v in experiment.to_dict(cfg).items() if k not in _FREE_FIELDS}


def train_pair(model: str, ds: ToyDataset, cfg: StudyConfig, pair_dir: str, *, salt: int = 0,
               log: Callable[[str], None] = print) -> tuple[np.ndarray | None, jt.TrainResult]:
  """Trains (or resumes) `cfg.num_seeds` vmapped copies of `model` on `ds` in `pair_dir`.

  Args:
    model: one of `MODELS`.
    ds: the data set (batches are drawn inside the compiled step).
    cfg: the study.
    pair_dir: the pair's folder (`checkpoints/`, `metrics.jsonl`, `loss.png`).
    salt: mixed into the seed keys (`_pair_salt`: from the pair's names).
    log: progress lines.

  Returns:
    `(samples [S, num_eval, D], result)`; samples are None when the run was
    preempted (`result.preempted`).

  Raises:
    jaxml.train.ConfigMismatchError: `pair_dir` was trained with another config.
    jaxml.train.NonFiniteLossError: a seed's loss (or gradient) turned non-finite.
  """
  pair = _Pair(model, ds, cfg)
  train_keys, eval_keys = _seed_keys(cfg, salt)
  k = cfg.steps_per_call
  ckpt = jt.Checkpointer(os.path.join(pair_dir, "checkpoints"), every=cfg.checkpoint_every)
  try:
    jt.check_run_config(ckpt.directory, _pair_record(cfg), fields="study config")
    init = jax.vmap(pair.init)
    state, start = jt.restore_or_init(ckpt, jax.eval_shape(init, train_keys),
                                      lambda: jax.jit(init)(train_keys), allow_fresh_start=cfg.allow_fresh_start)
    step = jax.jit(jt.scan_steps(jax.vmap(pair.step), k), donate_argnums=0)
    result = jt.train(step, state, None, num_steps=cfg.num_steps, workdir=pair_dir, start_step=start,
                      steps_per_call=k, checkpointer=ckpt, log_every=max(cfg.num_steps // 4, k),
                      tensorboard=False, plot_title=f"{ds.name}, {model} (mean over {cfg.num_seeds} seeds)",
                      print_fn=lambda s: log(f"{ds.name:>12s} {model:>9s}: {s}"))
  finally:
    ckpt.close()
  if result.preempted:
    return None, result
  final = result.state.ema_params if pair.ema else result.state.params
  samples = jax.jit(jax.vmap(pair.sample))(final, eval_keys)
  return np.asarray(samples), result


def _fmt(values, scale=1.0, digits=2):
  vals = [v for v in values if v is not None]
  if not vals:
    return "n/a"
  arr = np.asarray(vals, np.float64) * scale
  extra = "" if len(vals) == len(values) else f" ({len(values) - len(vals)} n/a)"
  return f"{arr.mean():.{digits}f} +- {arr.std():.{digits}f}{extra}"


def results_table(results: dict, cfg: StudyConfig) -> str:
  """The markdown table of `table.md`: mean +- std over seeds, then the published rows."""
  rows = []
  for dname, per_model in results.items():
    k = len(get_dataset(dname).centers)
    for model, m in per_model.items():
      rows.append([dname, f"{model} (ours, {cfg.num_seeds} seeds)", f"{_fmt(m['modes_captured'], digits=1)} / {k}",
                   _fmt(m["high_quality_frac"], 100, 1), _fmt(m["reverse_kl"]), _fmt(m["gap_mass"], 100, 1)])
    for name, modes, hq, rkl in PUBLISHED.get(dname, []):
      rows.append([dname, f"{name} (published, unverified)", f"{modes} / {k}", str(hq),
                   "-" if rkl is None else str(rkl), "-"])
  return report.markdown_table(["dataset", "model", "modes captured", "high quality %", "reverse KL", "gap mass %"],
                               rows)


def _plot(samples: dict, path: str) -> None:
  """One row per data set: the data, then each model's seed-0 samples."""
  names = list(samples)
  cols = ["data"] + list(next(iter(samples.values())))
  with report.figure(path, figsize=(2.6 * len(cols), 2.4 * len(names)), dpi=80) as fig:
    axes = fig.subplots(len(names), len(cols), squeeze=False)
    for r, dname in enumerate(names):
      ds = get_dataset(dname)
      ref = np.asarray(ds.sample(jax.random.PRNGKey(123), 2500))
      lo = ds.centers.min(axis=0) - 1.5
      hi = ds.centers.max(axis=0) + 1.5
      for c, col in enumerate(cols):
        ax = axes[r, c]
        x = ref if col == "data" else samples[dname][col]
        if ds.dim == 1:
          ax.hist(np.clip(x[:, 0], lo[0], hi[0]), bins=120, range=(lo[0], hi[0]), color="C0")
          ax.set_yticks([])
        else:
          ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
          ax.scatter(ds.centers[:, 0], ds.centers[:, 1], s=6, c="red", marker="x")
          ax.set_xlim(lo[0], hi[0])
          ax.set_ylim(lo[1], hi[1])
        if r == 0:
          ax.set_title(col)
        if c == 0:
          ax.set_ylabel(dname)


def _pair_salt(dname: str, model: str) -> int:
  """Seed salt of a pair, from its names (not its position: adding a dataset changes no other pair)."""
  return zlib.crc32(f"{dname}/{model}".encode()) % (2**31)


def _check_pairs(cfg: StudyConfig, workdir: str) -> None:
  """Raises `ConfigMismatchError` (naming the fields) if any pair in `workdir` was trained with another config."""
  pairs = os.path.join(workdir, "pairs")
  record = _pair_record(cfg)
  for name in sorted(os.listdir(pairs)):
    ckpt_dir = os.path.join(pairs, name, "checkpoints")
    if os.path.exists(os.path.join(ckpt_dir, RUN_CONFIG_FILE)):
      jt.check_run_config(ckpt_dir, record, fields=f"study config (pair {name})")


def run(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """The experiment contract: runs every (dataset, model) pair over `num_seeds` vmapped seeds.

  Args:
    config: a `ml_collections.ConfigDict` or dict of `StudyConfig` fields
      (`experiments/configs/mode_collapse.py`); unknown keys raise.
    workdir: the study's folder (module docstring); a rerun resumes.
    log: progress lines.

  Returns:
    `{dataset: {model: {metric: [value per seed]}}}` (as `results.json`) plus
    `preempted`: True when SIGTERM stopped a pair (its checkpoint was saved; the
    remaining pairs and the final files are left to the rerun).

  Raises:
    jaxml.train.ConfigMismatchError: `workdir` holds pairs of a study with
      another configuration (before anything is trained).
  """
  cfg = experiment.from_config(StudyConfig, config)
  os.makedirs(os.path.join(workdir, "pairs"), exist_ok=True)
  _check_pairs(cfg, workdir)
  config_path = os.path.join(workdir, "config.json")
  timings = report.load_json(config_path).get("seconds", {}) if os.path.exists(config_path) else {}
  results: dict = {}
  panel: dict = {}
  for dname in cfg.datasets:
    ds = get_dataset(dname)
    results[dname], panel[dname] = {}, {}
    for model in cfg.models:
      pair_dir = _pair_dir(workdir, dname, model)
      result_path = os.path.join(pair_dir, RESULT_FILE)
      if os.path.exists(result_path):
        results[dname][model] = report.load_json(result_path)
        panel[dname][model] = np.load(os.path.join(pair_dir, SAMPLES_FILE))
        log(f"{dname:>12s} {model:>9s}: finished in an earlier run, loaded from {result_path}")
        continue
      t0 = time.time()
      samples, trained = train_pair(model, ds, cfg, pair_dir, salt=_pair_salt(dname, model), log=log)
      if trained.preempted:
        log(f"{dname:>12s} {model:>9s}: preempted at step {trained.step}; a rerun resumes from its checkpoint")
        return {**results, "preempted": True}
      per_seed = []
      for s in range(cfg.num_seeds):
        x = samples[s]
        finite = np.all(np.isfinite(x), axis=-1)
        per_seed.append(mode_metrics(np.where(finite[:, None], x, 1e6), ds.centers, ds.std, ds.weights))
      results[dname][model] = {k: [m[k] for m in per_seed] for k in METRICS}
      panel[dname][model] = samples[0]
      timings[f"{dname}/{model}"] = round(time.time() - t0, 1)
      np.save(os.path.join(pair_dir, SAMPLES_FILE), samples[0])
      report.save_json(results[dname][model], result_path)  # written last: the pair counts as finished only now
      report.save_json({"config": cfg, "seconds": timings}, config_path)
      records = jt.read_metrics(pair_dir)
      log(f"{dname:>12s} {model:>9s}: modes {[m['modes_captured'] for m in per_seed]} "
          f"hq {[round(m['high_quality_frac'], 3) for m in per_seed]} "
          f"final loss {records[-1]['loss']:.3f} (mean over seeds) ({timings[f'{dname}/{model}']} s)")
  report.save_json({"config": cfg, "seconds": timings}, config_path)
  table = results_table(results, cfg)
  report.save_json(results, os.path.join(workdir, "results.json"))
  report.save_text(table, os.path.join(workdir, "table.md"))
  _plot(panel, os.path.join(workdir, "samples.png"))
  log(table)
  return {**results, "preempted": False}
