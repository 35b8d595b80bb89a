"""The CTR family's own training pieces; the training itself runs on `jaxml.train`.

    tx, schedule = train.optimizer(tc)                       # jt.make_optimizer with tc's settings
    loss = functools.partial(train.loss_fn, cfg=cfg, tc=tc)  # loss(params, batch, rng) -> (loss, metrics)
    step = jt.make_train_step(loss, tx, schedule=schedule)
    state, shardings = jt.init_train_state(lambda r: towers.init(r, cfg), tx, rng, mesh, train.RECSYS_RULES)
    batch_fn = train.batches(data, tc.batch_size, tc.seed)   # batch_fn(step): the same at every resume

`jaxml.recsys.experiment.train_tower` puts these together with checkpoints and
the loop. `predict` and `evaluate` score a trained tower.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxml import train as jt
from jaxml.recsys import losses, metrics, towers
from jaxml.recsys.config import TowerConfig

MODEL_KEYS = ("dense", "cat", "multi")
TARGET_KEYS = ("label", "group", "weight", "teacher")
OPTIMIZERS = ("adam", "adagrad", "sgd")

# Partition rules for `jaxml.train`'s (data, fsdp, tensor) mesh. The shared embedding table
# `[R, D]` (`features`) is split by rows over every mesh axis: each device holds R / n rows
# (`FeatureConfig.row_multiple` pads R so that n divides it), and its optimizer moments
# (`opt_state/.../features/table`) follow. The dense layers are small and stay replicated: the
# batch is split over (data, fsdp), so they train data-parallel.
RECSYS_RULES = (
    (r"(^|/)features/table$", P(("data", "fsdp", "tensor"), None)),   # [R, D]
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a tower is trained.

  learning_rate: the constant learning rate.
  batch_size: examples per step (a multiple of the simulator's group size keeps query groups whole).
  steps: optimizer steps of a run.
  loss: "logloss", "logloss+rank" (adds rank_weight * pairwise rank loss within `group`)
    or "distill" (adds distill_lambda * LL(teacher, p), needs batch["teacher"]).
  rank_weight, distill_lambda: weights of the extra loss terms.
  optimizer: "adam" (optax's defaults b1 0.9, b2 0.999, eps 1e-8), "adagrad" or "sgd".
  seed: parameter init and data order.
  """

  learning_rate: float = 3e-3
  batch_size: int = 512
  steps: int = 400
  loss: str = "logloss"
  rank_weight: float = 1.0
  distill_lambda: float = 1.0
  optimizer: str = "adam"
  seed: int = 0

  def __post_init__(self):
    if self.loss not in ("logloss", "logloss+rank", "distill"):
      raise ValueError(f"loss must be 'logloss', 'logloss+rank' or 'distill', got {self.loss!r}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.steps < 0:
      raise ValueError(f"steps must be >= 0, got {self.steps}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def optimizer(tc: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`jt.make_optimizer` for `tc`: constant rate, no clipping, no weight decay.

  The update equals `optax.adam(lr)` / `optax.adagrad(lr)` / `optax.sgd(lr)` (Adam with
  optax's defaults b1 = 0.9, b2 = 0.999, eps = 1e-8; the core's own default b2 is 0.95).

  Returns:
    `(tx, schedule)`.
  """
  return jt.make_optimizer(tc.learning_rate, total_steps=max(tc.steps, 1), kind=tc.optimizer, schedule="constant",
                           clip_norm=None, b1=0.9, b2=0.999, eps=1e-8)


def loss_fn(params: dict, batch: dict, rng: jax.Array | None = None, *, cfg: TowerConfig,
            tc: TrainConfig) -> tuple[jax.Array, dict]:
  """Weighted logloss (batch["weight"] optional) plus the configured extra term.

  Args:
    params: the tower's parameters (`towers.init`).
    batch: model inputs (`MODEL_KEYS`) with `label` [B] and, as the loss needs,
      `group` [B] (rank loss), `teacher` [B] (distillation), `weight` [B].
    rng: the step's key (`jaxml.train` passes one); the loss draws nothing.
    cfg: the tower.
    tc: the loss and its weights.

  Returns:
    `(loss, {"logloss": ..., "rank_loss" | "distill_loss": ...})`.
  """
  del rng
  logits = towers.apply(params, batch, cfg)
  w = batch.get("weight")
  ll = losses.logloss_from_logits(logits, batch["label"], w)
  loss, extra = ll, {}
  if tc.loss == "logloss+rank":
    rank = losses.pairwise_rank_loss(logits, batch["label"], batch["group"], w)
    loss = ll + tc.rank_weight * rank
    extra["rank_loss"] = rank
  elif tc.loss == "distill":
    soft = losses.logloss_from_logits(logits, batch["teacher"], w)
    loss = ll + tc.distill_lambda * soft
    extra["distill_loss"] = soft
  return loss, {"logloss": ll, **extra}


def model_inputs(batch: dict, keys=TARGET_KEYS) -> dict:
  """The entries of `batch` a step reads (`MODEL_KEYS` and `keys`), as device arrays."""
  return {k: jnp.asarray(v) for k, v in batch.items() if k in MODEL_KEYS or k in keys}


def batch_starts(n: int, batch_size: int) -> np.ndarray:
  """First rows of the contiguous batches an epoch over `n` examples is cut into."""
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} examples")
  return np.arange(0, n - batch_size + 1, batch_size)


def batches(data: dict, batch_size: int, seed: int = 0, keys=TARGET_KEYS) -> Callable[[int], dict]:
  """`batch_fn(step)`: the host batch of update `step + 1`, a function of (seed, step) alone.

  Batches are contiguous rows (query groups stay together when `batch_size` is a
  multiple of the group size). Epoch `e = step // n_batches` visits the batches in the
  order `np.random.default_rng([seed, e]).permutation(batch_starts(...))`, so a run
  resumed at any step sees the batches an uninterrupted run saw.

  Args:
    data: numpy arrays with a common leading axis (extra keys such as "prob" are dropped).
    batch_size: rows per batch.
    seed: the data-order seed.
    keys: target entries kept next to `MODEL_KEYS`.

  Returns:
    `batch_fn(step) -> {key: [batch_size, ...] numpy}` (views into `data`).
  """
  fields = {k: v for k, v in data.items() if k in MODEL_KEYS or k in keys}
  starts = batch_starts(len(data["label"]), batch_size)
  cache: dict[int, np.ndarray] = {}

  def at(step: int) -> dict:
    epoch, i = divmod(int(step), len(starts))
    if epoch not in cache:
      cache.clear()
      cache[epoch] = np.random.default_rng([seed, epoch]).permutation(starts)
    s = cache[epoch][i]
    return {k: v[s:s + batch_size] for k, v in fields.items()}

  return at


_probs = jax.jit(lambda params, chunk, cfg: jax.nn.sigmoid(towers.apply(params, chunk, cfg)), static_argnums=2)


def predict(params: dict, data: dict, cfg: TowerConfig, batch_size: int = 8192) -> np.ndarray:
  """Click probabilities `[n]` for every row of `data` (compiled once per config and chunk shape)."""
  n = len(data["label"]) if "label" in data else len(data["cat"])
  out = []
  for s in range(0, n, batch_size):
    chunk = {k: jnp.asarray(v[s:s + batch_size]) for k, v in data.items() if k in MODEL_KEYS}
    out.append(np.asarray(_probs(params, chunk, cfg)))
  return np.concatenate(out)


def evaluate(labels: np.ndarray, probs: np.ndarray) -> dict:
  """AUC, logloss, normalized entropy and calibration of `probs` against `labels`."""
  return {"auc": float(metrics.auc(labels, probs)), "logloss": float(metrics.logloss(labels, probs)),
          "ne": float(metrics.normalized_entropy(labels, probs)),
          "calibration": float(metrics.calibration(labels, probs))}
