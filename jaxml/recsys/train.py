"""Training a tower: loss_fn, one jitted optax step, batching, prediction and evaluation.

    state = init_state(rng, tower_cfg, opt)
    step = make_step(tower_cfg, train_cfg, opt)          # (state, batch) -> (state, metrics)
    state, m = jax.jit(step, donate_argnums=0)(state, batch)

`shard_step` compiles the same step over a `Mesh` with the batch split over a
data axis and the embedding table split by rows (`features.table_sharding`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxml.recsys import features, losses, metrics, towers
from jaxml.recsys.config import TowerConfig

MODEL_KEYS = ("dense", "cat", "multi")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """loss: "logloss", "logloss+rank" (adds rank_weight * pairwise rank loss within `group`)
  or "distill" (adds distill_lambda * LL(teacher, p), needs batch["teacher"])."""

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
    if self.optimizer not in ("adam", "adagrad", "sgd"):
      raise ValueError(f"optimizer must be 'adam', 'adagrad' or 'sgd', got {self.optimizer!r}")
    if self.batch_size < 1 or self.steps < 0 or self.learning_rate <= 0:
      raise ValueError(f"bad batch_size/steps/learning_rate: {self.batch_size}, {self.steps}, {self.learning_rate}")


class TrainState(NamedTuple):
  params: dict
  opt_state: optax.OptState
  step: jax.Array


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  return {"adam": optax.adam, "adagrad": optax.adagrad, "sgd": optax.sgd}[tc.optimizer](tc.learning_rate)


def init_state(rng: jax.Array, cfg: TowerConfig, opt: optax.GradientTransformation) -> TrainState:
  params = towers.init(rng, cfg)
  return TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))


def loss_fn(params: dict, batch: dict, cfg: TowerConfig, tc: TrainConfig) -> tuple[jax.Array, dict]:
  """Weighted logloss (batch["weight"] optional) plus the configured extra term."""
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
  return loss, {"loss": loss, "logloss": ll, **extra}


def make_step(cfg: TowerConfig, tc: TrainConfig, opt: optax.GradientTransformation):
  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg, tc)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), m

  return step


def shard_step(step, state: TrainState, batch: dict, mesh: Mesh, data_axis: str | tuple[str, ...],
               row_axis: str | tuple[str, ...] | None):
  """`jax.jit(step)` with explicit shardings: batch split over `data_axis`, table rows over `row_axis`.

  Returns (compiled step, sharded state, batch sharding tree). The optimizer
  state mirrors the params' shardings where shapes match (Adam moments).
  """
  p_shard = (features.table_sharding(state.params, mesh, row_axis) if row_axis is not None
             else jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), state.params))
  by_shape = {}
  for leaf, s in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(p_shard)):
    by_shape.setdefault(leaf.shape, s)
  o_shard = jax.tree_util.tree_map(lambda x: by_shape.get(jnp.shape(x), NamedSharding(mesh, P())), state.opt_state)
  s_shard = TrainState(p_shard, o_shard, NamedSharding(mesh, P()))
  b_shard = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(data_axis, *([None] * (np.ndim(x) - 1)))), batch)
  compiled = jax.jit(step, in_shardings=(s_shard, b_shard), out_shardings=(s_shard, NamedSharding(mesh, P())),
                     donate_argnums=0)
  return compiled, jax.device_put(state, s_shard), b_shard


def model_inputs(batch: dict, keys=("label", "group", "weight", "teacher")) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items() if k in MODEL_KEYS or k in keys}


def iterate(data: dict, batch_size: int, steps: int, seed: int = 0) -> Iterator[dict]:
  """`steps` batches of contiguous rows (groups stay together), epochs start at a random group boundary."""
  n = len(data["label"])
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} examples")
  rng = np.random.default_rng(seed)
  starts = np.arange(0, n - batch_size + 1, batch_size)
  order = rng.permutation(starts)
  for i in range(steps):
    if i and i % len(order) == 0:
      order = rng.permutation(starts)
    s = order[i % len(order)]
    yield {k: v[s:s + batch_size] for k, v in data.items()}


def fit(cfg: TowerConfig, tc: TrainConfig, batches: Iterable[dict], check: bool = True,
        log_every: int = 50) -> tuple[dict, dict]:
  """Trains from `batches`; returns (params, info) with the loss history and examples/s.

  The loss is read back every `log_every` steps and after the last one; a NaN/inf
  loss raises FloatingPointError naming the step.
  """
  opt = make_optimizer(tc)
  state = init_state(jax.random.PRNGKey(tc.seed), cfg, opt)
  step = jax.jit(make_step(cfg, tc, opt), donate_argnums=0)
  history, n_ex, t_start = [], 0, None
  m, i = None, -1

  def guard(i, m):
    loss = float(m["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"loss became {loss} at step {i}; lower the learning rate or check the inputs")
    history.append((i, loss))

  for i, batch in enumerate(batches):
    if check:
      features.check_batch(batch, cfg.features)
    b = model_inputs(batch)
    state, m = step(state, b)
    if i == 0:
      jax.block_until_ready(m["loss"])
      t_start = time.perf_counter()
    else:
      n_ex += len(batch["label"])
    if i % log_every == 0:
      guard(i, m)
  if m is not None and (not history or history[-1][0] != i):
    guard(i, m)
  jax.block_until_ready(state.params)
  elapsed = time.perf_counter() - t_start if t_start is not None else 0.0
  return state.params, {"history": history, "examples_per_s": n_ex / elapsed if elapsed > 0 else float("nan"),
                        "steps": int(state.step)}


def predict(params: dict, data: dict, cfg: TowerConfig, batch_size: int = 8192) -> np.ndarray:
  """Click probabilities for every row of `data`."""
  f = jax.jit(lambda p, b: jax.nn.sigmoid(towers.apply(p, b, cfg)))
  n = len(data["label"]) if "label" in data else len(data["cat"])
  out = []
  for s in range(0, n, batch_size):
    chunk = {k: jnp.asarray(v[s:s + batch_size]) for k, v in data.items() if k in MODEL_KEYS}
    out.append(np.asarray(f(params, chunk)))
  return np.concatenate(out)


def evaluate(labels: np.ndarray, probs: np.ndarray) -> dict:
  return {"auc": float(metrics.auc(labels, probs)), "logloss": float(metrics.logloss(labels, probs)),
          "ne": float(metrics.normalized_entropy(labels, probs)), "calibration": float(metrics.calibration(labels, probs))}
