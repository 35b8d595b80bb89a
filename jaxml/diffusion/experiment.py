"""`train_and_evaluate`: a score model on 2D mixture data and on the 8x8 digits.

2D: an MLP score net is trained with DSM, sampled with every sampler, and
scored by (a) the true mixture log-density of its samples and (b) its own
probability-flow log-likelihood of held-out data (exact trace), next to the
true log-density of that data. Digits: a small U-Net is trained on the
scikit-learn digits, sampled, and its bits/dim (uniform dequantisation,
Hutchinson trace) reported. Writes `results.json`, `samples_2d.png`, `digits.png`
and the samples behind the figures (`samples_2d.npz`, `samples_digits.npz`: grey levels 0..16).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.diffusion import digits as digits_lib
from jaxml.diffusion import likelihood, nets, sampling
from jaxml.diffusion.losses import dsm_loss
from jaxml.diffusion.mixture import GaussianMixture, mixture_log_prob
from jaxml.diffusion.sde import get_sde
from jaxml.diffusion.train import fit


@dataclasses.dataclass(frozen=True)
class DiffusionExperimentConfig:
  sde: str = "vp"
  seed: int = 0
  samplers: tuple[str, ...] = sampling.METHODS
  sampler_steps: int = 500
  # 2D: a ring of 8 Gaussians, radius 2.
  ring_std: float = 0.1
  hidden: int = 128
  depth: int = 3
  steps_2d: int = 4000
  batch_2d: int = 256
  lr_2d: float = 1e-3
  num_samples_2d: int = 2000
  num_eval_ll: int = 256  # held-out points for the likelihood
  ll_steps: int = 100  # RK4 steps of the likelihood ODE
  # digits
  run_digits: bool = True
  unet_base: int = 16
  steps_digits: int = 500
  batch_digits: int = 64
  lr_digits: float = 1e-3
  num_samples_digits: int = 64
  digits_samplers: tuple[str, ...] = ("euler_maruyama", "pc")
  digits_sampler_steps: int = 200
  num_eval_bpd: int = 64
  bpd_steps: int = 50


def _ring(cfg) -> GaussianMixture:
  a = 2 * np.pi * np.arange(8) / 8
  return GaussianMixture.create(2.0 * np.stack([np.cos(a), np.sin(a)], -1), cfg.ring_std)


def _sample_all(rng, sde, score_fn, shape, methods, steps):
  out, secs = {}, {}
  for m in methods:
    t0 = time.time()
    out[m] = np.asarray(sampling.sample(rng, sde, score_fn, shape, method=m, num_steps=steps))
    secs[m] = round(time.time() - t0, 2)
  return out, secs


def _save_2d(samples, mix, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  cols = ["data"] + list(samples)
  fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 2.6), squeeze=False)
  ref = np.asarray(mix.sample(jax.random.PRNGKey(1), 2000))
  for ax, name in zip(axes[0], cols):
    x = ref if name == "data" else samples[name]
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_title(name)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _save_digits(samples, path, data=None):
  """One grid per sampler, after a grid of real digits (`data`, grey levels 0..16) when given."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = {name: digits_lib.from_model_space(x)[..., 0] for name, x in samples.items()}
  if data is not None:
    panels = {"data": np.asarray(data), **panels}
  fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), squeeze=False)
  for ax, (name, imgs) in zip(axes[0], panels.items()):
    n = int(math.sqrt(len(imgs)))
    grid = imgs[:n * n].reshape(n, n, 8, 8).transpose(0, 2, 1, 3).reshape(8 * n, 8 * n)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=16)
    ax.set_title(name)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def train_and_evaluate(cfg: DiffusionExperimentConfig, workdir: str, log=print) -> dict:
  os.makedirs(workdir, exist_ok=True)
  sde = get_sde(cfg.sde)
  rng = jax.random.PRNGKey(cfg.seed)
  results = {"sde": cfg.sde}

  # ---- 2D
  mix = _ring(cfg)
  ncfg = nets.ScoreMLPConfig(data_dim=2, hidden=cfg.hidden, depth=cfg.depth)
  apply = lambda p, x, t: nets.mlp_apply(p, x, t, ncfg)  # noqa: E731
  loss_fn = lambda p, r, b: dsm_loss(r, sde, functools.partial(nets.precondition, sde, apply, p), b)  # noqa: E731
  t0 = time.time()
  state, losses = fit(jax.random.fold_in(rng, 1), loss_fn, nets.mlp_init(jax.random.fold_in(rng, 2), ncfg),
                      lambda r: mix.sample(r, cfg.batch_2d), num_steps=cfg.steps_2d, learning_rate=cfg.lr_2d,
                      chunk=min(500, cfg.steps_2d), log_every=max(cfg.steps_2d // 4, 1), log=log)
  train_s = time.time() - t0
  score_fn = nets.score_fn_from_net(sde, apply, state.ema_params)
  samples, secs = _sample_all(jax.random.fold_in(rng, 3), sde, score_fn, (cfg.num_samples_2d, 2), cfg.samplers,
                              cfg.sampler_steps)
  held_out = mix.sample(jax.random.fold_in(rng, 4), cfg.num_eval_ll)
  model_ll = likelihood.log_likelihood(jax.random.fold_in(rng, 5), sde, score_fn, held_out, exact_trace=True,
                                       num_steps=cfg.ll_steps)
  true_ll = mixture_log_prob(mix, held_out)
  results["2d"] = {
      "train_seconds": round(train_s, 1), "final_loss": float(losses[-100:].mean()),
      "sampler_seconds": secs,
      "sample_true_logp": {m: float(jnp.mean(mixture_log_prob(mix, jnp.asarray(x)))) for m, x in samples.items()},
      "data_true_logp": float(jnp.mean(true_ll)),
      "model_loglik_nats": float(jnp.mean(model_ll)),
  }
  np.savez(os.path.join(workdir, "samples_2d.npz"), **samples)
  _save_2d(samples, mix, os.path.join(workdir, "samples_2d.png"))
  log(f"2D: {json.dumps(results['2d'])}")

  # ---- digits
  if cfg.run_digits:
    images, _ = digits_lib.load_digits()
    perm = np.random.default_rng(cfg.seed).permutation(len(images))
    test_idx, train_idx = perm[:cfg.num_eval_bpd], perm[cfg.num_eval_bpd:]
    data = jnp.asarray(digits_lib.to_model_space(images[train_idx]))
    ucfg = nets.UNetConfig(base=cfg.unet_base)
    uapply = lambda p, x, t: nets.unet_apply(p, x, t, ucfg)  # noqa: E731
    uloss = lambda p, r, b: dsm_loss(r, sde, functools.partial(nets.precondition, sde, uapply, p), b)  # noqa: E731
    # Dequantised training data: uniform noise within each grey level (matches the bits/dim model).
    def batch_fn(r):
      i_rng, u_rng = jax.random.split(r)
      x = data[jax.random.randint(i_rng, (cfg.batch_digits,), 0, data.shape[0])]
      return x + (jax.random.uniform(u_rng, x.shape) - 0.5) * (2.0 / digits_lib.NUM_LEVELS)

    t0 = time.time()
    ustate, ulosses = fit(jax.random.fold_in(rng, 6), uloss, nets.unet_init(jax.random.fold_in(rng, 7), ucfg),
                          batch_fn, num_steps=cfg.steps_digits, learning_rate=cfg.lr_digits,
                          chunk=min(100, cfg.steps_digits), log_every=max(cfg.steps_digits // 4, 1), log=log)
    utrain_s = time.time() - t0
    uscore = nets.score_fn_from_net(sde, uapply, ustate.ema_params)
    dsamples, dsecs = _sample_all(jax.random.fold_in(rng, 8), sde, uscore, (cfg.num_samples_digits, 8, 8, 1),
                                  cfg.digits_samplers, cfg.digits_sampler_steps)
    bpd = likelihood.bits_per_dim(jax.random.fold_in(rng, 9), sde, uscore, images[test_idx][..., None],
                                  num_levels=digits_lib.NUM_LEVELS, exact_trace=False, num_steps=cfg.bpd_steps)
    results["digits"] = {"train_seconds": round(utrain_s, 1), "final_loss": float(ulosses[-50:].mean()),
                         "sampler_seconds": dsecs, "bits_per_dim": float(jnp.mean(bpd)),
                         "uniform_bits_per_dim": math.log2(digits_lib.NUM_LEVELS)}
    np.savez(os.path.join(workdir, "samples_digits.npz"), **{m: digits_lib.from_model_space(x) for m, x in dsamples.items()})
    _save_digits(dsamples, os.path.join(workdir, "digits.png"), data=images[train_idx[:cfg.num_samples_digits]])
    log(f"digits: {json.dumps(results['digits'])}")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def run_from_config(config, workdir: str, log=print) -> dict:
  d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  fields = {f.name for f in dataclasses.fields(DiffusionExperimentConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"unknown diffusion config keys: {sorted(unknown)}")
  for k in ("samplers", "digits_samplers"):
    if k in d:
      d[k] = tuple(d[k])
  return train_and_evaluate(DiffusionExperimentConfig(**d), workdir, log=log)
