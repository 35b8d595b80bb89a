"""The Perceiver experiment (`experiments/perceiver.py`): four studies, each a switch of `mode`.

- "digits": the scikit-learn 8x8 digits classified from raw pixels. The
  Perceiver reads each pixel with the Fourier features of its position; an
  MLP (flattened pixels) and a ViT-style transformer (2x2 patches, learned
  positions) of similar parameter count are trained the same way (same
  optimizer, steps, batches); test accuracy and parameter counts reported.
- "permutation": one fixed random permutation of the 64 pixels. The
  Perceiver reads the permuted pixels, each still carrying its own position
  features (the same set of inputs in another order), trained from the same
  init on the same batches; a conv net (3x3 convolutions, global pooling) is
  trained on the original and on the permuted images; the MLP on the permuted
  ones. Also: the largest change of the trained Perceiver's logits when its
  inputs are permuted (exactly invariant up to float rounding: attention sums
  over keys).
- "byte_lm": Perceiver IO masked byte language model on the Python standard
  library source (`jaxml.llama.data`'s corpus reader), bytes as the 262-id
  vocabulary, `lm_mask_rate` of the bytes of each window replaced by MASK
  (a fresh draw at every step from the step's key); held-out masked-byte
  accuracy and bits per byte on fixed windows and masks from the corpus's
  tail, against a byte-level transformer encoder of similar size.
- "multitask": one encoder, two query sets trained jointly: one learned
  query decoding the class label, 64 Fourier-feature queries decoding each
  pixel's value (Perceiver IO's multi-task decoding).
  "all" runs the four in turn.

Every model trains through `jaxml.train` (AdamW, warm-up + cosine, clipping)
in its own folder `DIR/<model>/` (checkpoints with the `run_config.json` they
were trained with, `metrics.jsonl`, `loss.png`), `eval_every` steps per
compiled call; the step evaluates the held-out set after each call, so the
test curves live in `metrics.jsonl` (`test_accuracy`, ...) and a rerun resumes
each model from its newest checkpoint. Writes `results.json`, `results.md`
(the tables) and `digits.png`, `permutation.png`, `byte_lm.png`,
`multitask.png` (curves).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import experiment, nn, report
from jaxml import train as jt
from jaxml.diffusion import digits as digits_lib
from jaxml.llama import data as text_data
from jaxml.perceiver import baselines as bl
from jaxml.perceiver import model as pm
from jaxml.perceiver.config import BYTE_OFFSET, BYTE_VOCAB_SIZE, MASK_ID, DecoderConfig, PerceiverConfig

MODES = ("digits", "permutation", "byte_lm", "multitask")


@dataclasses.dataclass(frozen=True)
class PerceiverExperimentConfig:
  mode: str = "all"
  seed: int = 0
  eval_every: int = 50
  checkpoint_every: int = 500
  weight_decay: float = 1e-4
  warmup_steps: int = 50
  # digits (image studies)
  digits_test: int = 360
  digits_steps: int = 1500
  digits_batch: int = 64
  digits_lr: float = 1e-3
  num_bands: int = 4
  num_latents: int = 32
  d_latents: int = 64
  num_blocks: int = 2
  self_attends: int = 2
  latent_heads: int = 4
  mlp_hidden: tuple[int, ...] = (288, 288)
  vit_width: int = 64
  vit_layers: int = 3
  vit_patch: int = 2
  conv_channels: tuple[int, ...] = (64, 128)
  recon_weight: float = 1.0
  # byte LM
  lm_seq_len: int = 128
  lm_batch: int = 16
  lm_steps: int = 3000
  lm_lr: float = 1e-3
  lm_mask_rate: float = 0.15
  lm_corpus_bytes: int = 1_000_000
  lm_eval_fraction: float = 0.05
  lm_eval_windows: int = 64
  lm_d_model: int = 64
  lm_num_latents: int = 64
  lm_d_latents: int = 128
  lm_self_attends: int = 4
  lm_heads: int = 4
  lm_tf_width: int = 128
  lm_tf_layers: int = 4
  lm_position_init: str = "sinusoid"  # Perceiver IO input positions and decoder queries: "sinusoid" or "normal"
  lm_query_gain: float = 2.0  # Perceiver IO: init of the encoder's and decoder's cross-attention query weights x this

  def __post_init__(self):
    if self.mode != "all" and self.mode not in MODES:
      raise ValueError(f"PerceiverExperimentConfig.mode must be 'all' or one of {MODES}, got {self.mode!r}")
    object.__setattr__(self, "mlp_hidden", tuple(self.mlp_hidden))
    object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
    for name in ("eval_every", "checkpoint_every", "digits_steps", "lm_steps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"PerceiverExperimentConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("digits_steps", "lm_steps", "checkpoint_every"):
      if getattr(self, name) % self.eval_every:
        raise ValueError(f"PerceiverExperimentConfig.{name}={getattr(self, name)} must be a multiple of "
                         f"eval_every={self.eval_every}")
    if self.lm_position_init not in ("sinusoid", "normal"):
      raise ValueError(f"PerceiverExperimentConfig.lm_position_init must be 'sinusoid' or 'normal', got "
                       f"{self.lm_position_init!r}")
    if not self.lm_query_gain > 0:
      raise ValueError(f"PerceiverExperimentConfig.lm_query_gain must be positive, got {self.lm_query_gain}")
    if not 0.0 < self.lm_mask_rate < 1.0:
      raise ValueError(f"PerceiverExperimentConfig.lm_mask_rate must be in (0, 1), got {self.lm_mask_rate}")

  @property
  def modes(self) -> tuple[str, ...]:
    return MODES if self.mode == "all" else (self.mode,)


# ----------------------------------------------------------------------------- models of the studies


def digits_perceiver_config(cfg: PerceiverExperimentConfig, *, inputs: str = "pixels",
                            multitask: bool = False) -> PerceiverConfig:
  """The digits Perceiver: 1 grey channel + Fourier features of the 8 x 8 grid. `inputs="array"` is the same
  model reading precomputed (e.g. permuted) pixel + position features; `multitask` adds the pixel queries."""
  kw = dict(inputs="pixels", image_channels=1, num_bands=cfg.num_bands, max_resolution=(8, 8),
            num_latents=cfg.num_latents, d_latents=cfg.d_latents, num_cross_attention_heads=1,
            num_self_attention_heads=cfg.latent_heads, num_blocks=cfg.num_blocks,
            num_self_attends_per_block=cfg.self_attends, self_attention_widening_factor=2, num_classes=10)
  if multitask:
    kw.update(task="multitask", decoders=(
        DecoderConfig(name="label", queries="learned", index_dims=(1,), output_channels=10, use_query_residual=True,
                      loss="cross_entropy"),
        DecoderConfig(name="pixels", queries="fourier", index_dims=(8, 8), num_bands=cfg.num_bands,
                      output_channels=1, loss="mse", loss_weight=cfg.recon_weight)))
  else:
    kw.update(task="classifier")
  pixels = PerceiverConfig(**kw)
  if inputs == "pixels":
    return pixels
  return pixels.replace(inputs="array", d_model=pixels.d_model)


def lm_perceiver_config(cfg: PerceiverExperimentConfig) -> PerceiverConfig:
  """Perceiver IO masked LM on byte windows of `lm_seq_len`; its decoder: one learned query per position,
  `lm_heads` heads of `lm_d_model` channels (transformers' hard-coded 8 x 32 qk is the default elsewhere)."""
  M, C = cfg.lm_seq_len, cfg.lm_d_model
  return PerceiverConfig(
      task="masked_lm", inputs="bytes", d_model=C, num_latents=cfg.lm_num_latents, d_latents=cfg.lm_d_latents,
      num_cross_attention_heads=1, num_self_attention_heads=cfg.lm_heads, num_blocks=1,
      num_self_attends_per_block=cfg.lm_self_attends, self_attention_widening_factor=2,
      max_position_embeddings=M,
      decoders=(DecoderConfig(name="masked_lm", queries="learned", index_dims=(M,), query_channels=C,
                              num_heads=cfg.lm_heads, qk_channels=C, v_channels=C, use_query_residual=False),))


def lm_perceiver_init(rng: jax.Array, cfg: PerceiverExperimentConfig, pcfg: PerceiverConfig):
  """`pm.init`, then the byte LM's starting point (`lm_position_init`, `lm_query_gain`); the model is unchanged.

  From transformers' init (every position row and decoder query an independent
  `N(0, 0.02^2)` draw) the masked LM sits on the unigram plateau: a decoder
  query knows only its position, so it must learn to find the latents holding
  its neighbours, and each query row and position row learns alone, from the
  few times its position is masked. "sinusoid" starts both tables at
  `0.02 sinusoidal_embedding(pi t)` (periods 2 to 512 positions): neighbouring
  positions start with similar rows, so whatever one position learns carries
  to its neighbours. `lm_query_gain` scales the cross-attention query weights
  of the encoder and the decoder, so their initial attention is less uniform.
  """
  params = pm.init(rng, pcfg)
  if cfg.lm_position_init == "sinusoid":
    for table in (params["input"], params["decoders"]["masked_lm"]):
      key = "positions" if "positions" in table else "queries"
      n, c = table[key].shape
      table[key] = 0.02 * nn.sinusoidal_embedding(jnp.pi * jnp.arange(n), c, max_period=256.0)
  for layer in (params["cross_attend"], params["decoders"]["masked_lm"]["cross_attend"]):
    layer["query"] = {**layer["query"], "w": layer["query"]["w"] * cfg.lm_query_gain}
  return params


def lm_transformer_config(cfg: PerceiverExperimentConfig) -> bl.TransformerConfig:
  return bl.TransformerConfig(inputs="bytes", width=cfg.lm_tf_width, num_layers=cfg.lm_tf_layers,
                              num_heads=cfg.lm_heads, widening_factor=2, vocab_size=BYTE_VOCAB_SIZE,
                              max_len=cfg.lm_seq_len)


# ----------------------------------------------------------------------------- data


def digits_split(cfg: PerceiverExperimentConfig):
  """`(x_train [N, 8, 8, 1] in [-1, 1], y_train, x_test, y_test)`: a seeded split of the 1797 digits."""
  images, labels = digits_lib.load_digits()
  x = digits_lib.to_model_space(images)
  perm = np.random.default_rng(cfg.seed).permutation(len(images))
  test, train = perm[:cfg.digits_test], perm[cfg.digits_test:]
  return x[train], labels[train].astype(np.int32), x[test], labels[test].astype(np.int32)


def pixel_permutation(cfg: PerceiverExperimentConfig) -> np.ndarray:
  """The study's one fixed permutation of the 64 pixel positions (raster order)."""
  return np.random.default_rng([cfg.seed, 64]).permutation(64)


def permute_pixels(x_BxHxWxC: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Images with their pixels moved: output pixel i (raster order) is input pixel `perm[i]`."""
  B, H, W, C = x_BxHxWxC.shape
  return x_BxHxWxC.reshape(B, H * W, C)[:, perm].reshape(B, H, W, C)


def corpus_byte_ids(max_bytes: int) -> np.ndarray:
  """The standard library source (`jaxml.llama.data.corpus_files`, sorted, bounded) as Perceiver byte ids."""
  texts = text_data.read_texts(text_data.corpus_files(None, max_bytes=max_bytes))
  raw = np.frombuffer("\n".join(texts).encode("utf-8"), np.uint8)
  return raw.astype(np.int32) + BYTE_OFFSET


def mask_bytes(rng: jax.Array, tokens_BxM: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
  """`(inputs, weights)`: each byte hidden (replaced by MASK) with probability `rate`; weights mark them."""
  hide = jax.random.bernoulli(rng, rate, tokens_BxM.shape)
  return jnp.where(hide, MASK_ID, tokens_BxM), hide.astype(jnp.float32)


# ----------------------------------------------------------------------------- training


def _classify_metrics(logits, labels):
  loss, _ = nn.cross_entropy(logits, labels)
  return loss, {"accuracy": jnp.mean((nn.first_argmax(logits) == labels).astype(jnp.float32))}


def train_model(name: str, cfg: PerceiverExperimentConfig, workdir: str, *, init_fn: Callable, loss: Callable,
                evaluate: Callable, lr: float, steps: int, rng: jax.Array, record: dict,
                batch_fn: Callable | None = None, log: Callable[[str], None] = print):
  """Trains (or resumes) one model in `workdir/name/` on `jaxml.train`; `eval_every` steps per compiled call.

  Args:
    loss: `loss(params, batch, rng) -> (loss, metrics)`; with `batch_fn` None it draws its batch from `rng`.
    evaluate: `evaluate(params) -> {name: scalar}` on the held-out data, run inside the step after each
      call; logged as `test_<name>`.
    record: what the checkpoints depend on (`jt.check_run_config`).

  Returns:
    `(TrainResult, curve)`: curve is the list of `metrics.jsonl` records (step, test_*, loss, elapsed_sec).
  """
  k = cfg.eval_every
  tx, _ = jt.make_optimizer(lr, total_steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 2),
                            weight_decay=cfg.weight_decay, clip_norm=1.0, kind="adamw", schedule="cosine",
                            b2=0.999)
  train_dir = os.path.join(workdir, name)

  def with_evaluation(inner):
    def step(state, batch):
      state, metrics = inner(state, batch)
      held_out = evaluate(state.params)
      metrics.update({f"test_{n}": jnp.broadcast_to(v, (k,)) if k > 1 else v for n, v in held_out.items()})
      return state, metrics
    return step

  result = jt.fit(loss, init_fn, tx, rng, num_steps=steps, batch_fn=batch_fn, workdir=train_dir, record=record,
                  record_name=f"{name} training config", checkpoint_every=cfg.checkpoint_every, steps_per_call=k,
                  wrap_step=with_evaluation, log_every=k, plot_title=f"training loss, {name}",
                  print_fn=lambda s: log(f"{name}: {s}"))
  curve = [r for r in jt.read_metrics(train_dir) if "step" in r and "loss" in r]
  return result, curve


def _summary(curve: list[dict], params, keys: tuple[str, ...]) -> dict:
  last = curve[-1]
  out = {k: float(last[f"test_{k}"]) for k in keys}
  out.update(params=bl.param_count(params), train_seconds=round(float(last["elapsed_sec"]), 1),
             steps=int(last["step"]))
  return out


def _image_trainer(cfg, workdir, log, x_train, y_train, x_test, y_test):
  """`fit(name, apply, init_fn, seed_offset, x_train=..., x_test=...)`: one classifier on the digits."""

  def fit(name: str, apply: Callable, init_fn: Callable, record: dict, *, xtr=None, xte=None, init_seed: int = 1):
    xtr_j = jnp.asarray(x_train if xtr is None else xtr)
    xte_j = jnp.asarray(x_test if xte is None else xte)
    ytr_j, yte_j = jnp.asarray(y_train), jnp.asarray(y_test)

    def loss(params, batch, rng):
      del batch  # random training rows, drawn inside the compiled step from its key
      idx = jax.random.randint(rng, (cfg.digits_batch,), 0, xtr_j.shape[0])
      return _classify_metrics(apply(params, xtr_j[idx]), ytr_j[idx])

    def evaluate(params):
      return {"accuracy": _classify_metrics(apply(params, xte_j), yte_j)[1]["accuracy"]}

    rec = {"model": name, "seed": cfg.seed, "digits_test": cfg.digits_test, "batch": cfg.digits_batch,
           "lr": cfg.digits_lr, "weight_decay": cfg.weight_decay, **record}
    result, curve = train_model(name, cfg, workdir, init_fn=init_fn, loss=loss, evaluate=evaluate,
                                lr=cfg.digits_lr, steps=cfg.digits_steps,
                                rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), init_seed), record=rec, log=log)
    return result, curve

  return fit


def _plot_curves(path: str, panels: dict[str, dict[str, list[dict]]], key: str, ylabel: str) -> None:
  with report.figure(path, figsize=(5.0 * len(panels), 3.6), dpi=90) as fig:
    for i, (title, curves) in enumerate(panels.items()):
      ax = fig.add_subplot(1, len(panels), i + 1)
      for label, curve in curves.items():
        ax.plot([r["step"] for r in curve], [r[f"test_{key}"] for r in curve], label=label)
      ax.set_xlabel("training step")
      ax.set_ylabel(ylabel)
      ax.set_title(title)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)


def run_digits(cfg: PerceiverExperimentConfig, workdir: str, log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """Perceiver (pixels + Fourier features) vs MLP vs ViT-style transformer on the digits."""
  x_train, y_train, x_test, y_test = digits_split(cfg)
  fit = _image_trainer(cfg, workdir, log, x_train, y_train, x_test, y_test)
  pcfg = digits_perceiver_config(cfg)
  mcfg = bl.MLPConfig(in_dim=64, hidden=cfg.mlp_hidden, num_classes=10)
  vcfg = bl.TransformerConfig(inputs="patches", width=cfg.vit_width, num_layers=cfg.vit_layers,
                              num_heads=cfg.latent_heads, widening_factor=2, patch_size=cfg.vit_patch)
  runs = {
      "perceiver": (lambda p, x: pm.apply(p, x, pcfg), functools.partial(pm.init, cfg=pcfg), pcfg),
      "mlp": (lambda p, x: bl.mlp_apply(p, x, mcfg), functools.partial(bl.mlp_init, cfg=mcfg), mcfg),
      "vit": (lambda p, x: bl.transformer_apply(p, x, vcfg), functools.partial(bl.transformer_init, cfg=vcfg), vcfg),
  }
  results, curves = {}, {}
  for name, (apply, init_fn, mcfg_) in runs.items():
    result, curve = fit(name, apply, init_fn, {"model_config": experiment.to_dict(mcfg_)})
    if result.preempted:
      return {"preempted": True}, {}
    results[name] = _summary(curve, result.state.params, ("accuracy",))
    curves[name] = curve
    log(f"digits {name}: {results[name]}")
  return results, curves


def run_permutation(cfg: PerceiverExperimentConfig, workdir: str, log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """One fixed pixel permutation: the Perceiver (positions travel with the pixels) vs a conv net (and the MLP)."""
  x_train, y_train, x_test, y_test = digits_split(cfg)
  perm = pixel_permutation(cfg)
  fit = _image_trainer(cfg, workdir, log, x_train, y_train, x_test, y_test)
  pix_cfg = digits_perceiver_config(cfg)
  arr_cfg = digits_perceiver_config(cfg, inputs="array")
  feats = jax.jit(pm.pixel_features, static_argnums=1)
  f_train, f_test = np.asarray(feats(x_train, pix_cfg)), np.asarray(feats(x_test, pix_cfg))
  ccfg = bl.ConvConfig(image_channels=1, channels=cfg.conv_channels, num_classes=10)
  mcfg = bl.MLPConfig(in_dim=64, hidden=cfg.mlp_hidden, num_classes=10)
  conv_apply = lambda p, x: bl.conv_apply(p, x, ccfg)  # noqa: E731
  runs = {
      # The permuted features are the same set of (value, position) inputs in another order.
      "perceiver_permuted": (lambda p, x: pm.apply(p, x, arr_cfg), functools.partial(pm.init, cfg=arr_cfg), arr_cfg,
                             f_train[:, perm], f_test[:, perm]),
      "conv": (conv_apply, functools.partial(bl.conv_init, cfg=ccfg), ccfg, x_train, x_test),
      "conv_permuted": (conv_apply, functools.partial(bl.conv_init, cfg=ccfg), ccfg, permute_pixels(x_train, perm),
                        permute_pixels(x_test, perm)),
      "mlp_permuted": (lambda p, x: bl.mlp_apply(p, x, mcfg), functools.partial(bl.mlp_init, cfg=mcfg), mcfg,
                       permute_pixels(x_train, perm), permute_pixels(x_test, perm)),
  }
  results, curves = {}, {}
  for name, (apply, init_fn, mcfg_, xtr, xte) in runs.items():
    result, curve = fit(name, apply, init_fn, {"model_config": experiment.to_dict(mcfg_), "permuted": "permuted" in name},
                        xtr=xtr, xte=xte)
    if result.preempted:
      return {"preempted": True}, {}
    results[name] = _summary(curve, result.state.params, ("accuracy",))
    curves[name] = curve
    log(f"permutation {name}: {results[name]}")
    if name == "perceiver_permuted":
      # The trained model on the un-permuted order of the same inputs: logits move only by float rounding.
      fwd = jax.jit(lambda p, x: pm.apply(p, x, arr_cfg))
      a, b = fwd(result.state.params, f_test[:, perm]), fwd(result.state.params, f_test)
      results[name]["max_logit_change_unpermuted"] = float(jnp.max(jnp.abs(a - b)))
      results[name]["logit_scale"] = float(jnp.max(jnp.abs(a)))
  results["permutation"] = [int(i) for i in perm]
  return results, curves


def run_byte_lm(cfg: PerceiverExperimentConfig, workdir: str, log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """Perceiver IO vs a byte-level transformer encoder, masked byte LM on the stdlib source."""
  ids = corpus_byte_ids(cfg.lm_corpus_bytes)
  train_ids, eval_ids = text_data.split_tokens(ids, cfg.lm_eval_fraction)
  M = cfg.lm_seq_len
  batches = text_data.TokenBatcher(train_ids, cfg.lm_batch, M - 1, seed=cfg.seed)  # rows of M bytes
  ev = np.random.default_rng([cfg.seed, 7])
  starts = ev.integers(0, len(eval_ids) - M, size=cfg.lm_eval_windows)
  eval_tokens = jnp.asarray(eval_ids[starts[:, None] + np.arange(M)[None]])
  eval_inputs, eval_weights = mask_bytes(jax.random.PRNGKey(cfg.seed + 7), eval_tokens, cfg.lm_mask_rate)
  pcfg, tcfg = lm_perceiver_config(cfg), lm_transformer_config(cfg)
  logits_fns = {"perceiver_io": lambda p, x: pm.apply(p, x, pcfg),
                "transformer": lambda p, x: bl.transformer_apply(p, x, tcfg)}
  inits = {"perceiver_io": (functools.partial(lm_perceiver_init, cfg=cfg, pcfg=pcfg), pcfg),
           "transformer": (functools.partial(bl.transformer_init, cfg=tcfg), tcfg)}

  def scored(logits, targets, weights):
    loss, n = nn.cross_entropy(logits, targets, weights)
    acc = ((nn.first_argmax(logits) == targets) * weights).sum() / n
    return loss, {"accuracy": acc, "bits_per_byte": loss / math.log(2.0)}

  results, curves = {"corpus_bytes": int(len(ids)), "heldout_bytes": int(len(eval_ids)),
                     "heldout_scored_bytes": int(eval_weights.sum())}, {}
  for name, logits_fn in logits_fns.items():
    init_fn, mcfg_ = inits[name]

    def loss(params, batch, rng, logits_fn=logits_fn):
      tokens = batch["tokens"]
      inputs, weights = mask_bytes(rng, tokens, cfg.lm_mask_rate)
      return scored(logits_fn(params, inputs), tokens, weights)

    def evaluate(params, logits_fn=logits_fn):
      return scored(logits_fn(params, eval_inputs), eval_tokens, eval_weights)[1]

    rec = {"model": name, "seed": cfg.seed, "seq_len": M, "batch": cfg.lm_batch, "lr": cfg.lm_lr,
           "mask_rate": cfg.lm_mask_rate, "corpus_bytes": cfg.lm_corpus_bytes, "eval_fraction": cfg.lm_eval_fraction,
           "model_config": experiment.to_dict(mcfg_)}
    if name == "perceiver_io":
      rec.update(position_init=cfg.lm_position_init, query_gain=cfg.lm_query_gain)
    result, curve = train_model(name, cfg, workdir, init_fn=init_fn, loss=loss, evaluate=evaluate, lr=cfg.lm_lr,
                                steps=cfg.lm_steps, rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 3),
                                record=rec, batch_fn=batches, log=log)
    if result.preempted:
      return {"preempted": True}, {}
    results[name] = _summary(curve, result.state.params, ("accuracy", "bits_per_byte"))
    curves[name] = curve
    log(f"byte_lm {name}: {results[name]}")
  # Context: the unigram entropy of the held-out bytes (a model that ignores the context).
  counts = np.bincount(eval_ids, minlength=BYTE_VOCAB_SIZE).astype(np.float64)
  prob = counts[counts > 0] / counts.sum()
  results["heldout_unigram_bits_per_byte"] = float(-(prob * np.log2(prob)).sum())
  return results, curves


def run_multitask(cfg: PerceiverExperimentConfig, workdir: str, log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """One encoder, two query sets (the label; each pixel's value), trained jointly on the digits."""
  x_train, y_train, x_test, y_test = digits_split(cfg)
  mt = digits_perceiver_config(cfg, multitask=True)
  xtr, ytr, xte, yte = (jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))

  def targets(x, y):
    return {"label": y[:, None], "pixels": x.reshape(x.shape[0], 64, 1)}

  def loss(params, batch, rng):
    del batch
    idx = jax.random.randint(rng, (cfg.digits_batch,), 0, xtr.shape[0])
    return pm.loss_fn(params, {"inputs": xtr[idx], "targets": targets(xtr[idx], ytr[idx])}, None, mt)

  def evaluate(params):
    _, m = pm.loss_fn(params, {"inputs": xte, "targets": targets(xte, yte)}, None, mt)
    return {"accuracy": m["label/accuracy"], "pixel_mse": m["pixels/loss"]}

  rec = {"model": "multitask", "seed": cfg.seed, "digits_test": cfg.digits_test, "batch": cfg.digits_batch,
         "lr": cfg.digits_lr, "weight_decay": cfg.weight_decay, "model_config": experiment.to_dict(mt)}
  result, curve = train_model("multitask", cfg, workdir, init_fn=functools.partial(pm.init, cfg=mt), loss=loss,
                              evaluate=evaluate, lr=cfg.digits_lr, steps=cfg.digits_steps,
                              rng=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1), record=rec, log=log)
  if result.preempted:
    return {"preempted": True}, {}
  out = _summary(curve, result.state.params, ("accuracy", "pixel_mse"))
  out["mean_image_mse"] = float(np.mean((x_test - x_train.mean(0, keepdims=True)) ** 2))  # predicting the mean
  recon = jax.jit(lambda p, x: pm.apply(p, x, mt)["pixels"])(result.state.params, xte[:8])
  np.savez(os.path.join(workdir, "multitask_reconstructions.npz"), inputs=x_test[:8],
           reconstructions=np.asarray(recon).reshape(8, 8, 8))
  log(f"multitask: {out}")
  return {"multitask": out}, {"multitask": curve, "reconstructions": (x_test[:8], np.asarray(recon).reshape(8, 8, 8))}


def _plot_multitask(path: str, curve: list[dict], images: tuple[np.ndarray, np.ndarray]) -> None:
  x, r = images
  with report.figure(path, figsize=(11, 3.4), dpi=90) as fig:
    ax = fig.add_subplot(1, 3, 1)
    ax.plot([c["step"] for c in curve], [c["test_accuracy"] for c in curve])
    ax.set_title("label queries: test accuracy")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 3, 2)
    ax.plot([c["step"] for c in curve], [c["test_pixel_mse"] for c in curve])
    ax.set_title("pixel queries: test MSE ([-1, 1] scale)")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 3, 3)
    grid = np.concatenate([np.concatenate(list(x[:, :, :, 0]), axis=1), np.concatenate(list(r), axis=1)], axis=0)
    ax.imshow(grid, cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title("test digits (top), decoded pixels (bottom)")
    ax.axis("off")


def _tables(results: dict) -> str:
  parts = []
  rows = [[n, r["params"], r["accuracy"], r["train_seconds"]] for n, r in results.get("digits", {}).items()]
  if rows:
    parts.append("Digits, test accuracy\n\n" + report.markdown_table(["model", "params", "test accuracy",
                                                                        "train s"], rows))
  perm = results.get("permutation", {})
  rows = [[n, r["params"], r["accuracy"]] for n, r in perm.items() if isinstance(r, dict)]
  if rows:
    parts.append("Fixed pixel permutation, test accuracy\n\n" + report.markdown_table(["model", "params",
                                                                                         "test accuracy"], rows))
  lm = results.get("byte_lm", {})
  rows = [[n, lm[n]["params"], lm[n]["accuracy"], lm[n]["bits_per_byte"], lm[n]["train_seconds"]]
          for n in ("perceiver_io", "transformer") if n in lm]
  if rows:
    parts.append("Masked byte LM, held-out masked bytes\n\n" + report.markdown_table(
        ["model", "params", "accuracy", "bits/byte", "train s"], rows))
  mt = results.get("multitask", {}).get("multitask")
  if mt:
    parts.append("Multi-task\n\n" + report.markdown_table(
        ["params", "test accuracy", "pixel MSE", "mean-image MSE"],
        [[mt["params"], mt["accuracy"], mt["pixel_mse"], mt["mean_image_mse"]]], digits=4))
  return "\n".join(parts)


def run(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """The experiment contract (module docstring): runs the studies of `config.mode`, resumable.

  Args:
    config: a `ml_collections.ConfigDict` or dict of `PerceiverExperimentConfig` fields
      (`experiments/configs/perceiver.py`); unknown keys raise.
    workdir: the experiment's folder; a rerun resumes every model from its newest checkpoint.
    log: progress lines.

  Returns:
    `results.json`'s content (one entry per study run) plus `preempted`.
  """
  cfg = experiment.from_config(PerceiverExperimentConfig, config)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  results: dict[str, Any] = {"mode": cfg.mode}
  studies = {"digits": run_digits, "permutation": run_permutation, "byte_lm": run_byte_lm,
             "multitask": run_multitask}
  curves: dict[str, dict] = {}
  for mode in cfg.modes:
    out, curves[mode] = studies[mode](cfg, workdir, log)
    if out.get("preempted"):
      return {**results, "preempted": True}
    results[mode] = out
  if "digits" in curves:
    _plot_curves(os.path.join(workdir, "digits.png"), {"digits from raw pixels": curves["digits"]}, "accuracy",
                 "test accuracy")
  if "permutation" in curves:
    panels = {"one fixed pixel permutation": curves["permutation"]}
    if "digits" in curves:
      panels = {"digits from raw pixels": curves["digits"], **panels}
    _plot_curves(os.path.join(workdir, "permutation.png"), panels, "accuracy", "test accuracy")
  if "byte_lm" in curves:
    with report.figure(os.path.join(workdir, "byte_lm.png"), figsize=(10, 3.6), dpi=90) as fig:
      for i, (key, label) in enumerate((("accuracy", "held-out masked-byte accuracy"),
                                        ("bits_per_byte", "held-out bits per masked byte"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, curve in curves["byte_lm"].items():
          ax.plot([r["step"] for r in curve], [r[f"test_{key}"] for r in curve], label=name)
        ax.set_xlabel("training step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
  if "multitask" in curves:
    _plot_multitask(os.path.join(workdir, "multitask.png"), curves["multitask"]["multitask"],
                    curves["multitask"]["reconstructions"])
  results["wall_seconds"] = round(time.perf_counter() - t0, 1)
  report.save_json(results, os.path.join(workdir, "results.json"))
  report.save_text(_tables(results), os.path.join(workdir, "results.md"))
  log(_tables(results))
  return {**results, "preempted": False}
