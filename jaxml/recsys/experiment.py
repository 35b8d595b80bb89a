"""CTR experiments (`experiments/ctr.py`): `run(config, workdir)`, the experiment contract.

`config.mode` (see `experiments/configs/ctr.py`):
  "train"    `config.model` trained once per seed of `config.seeds`, on the simulator or on
             Criteo-format files; AUC, logloss, NE, calibration, PD between the first two seeds.
  "compare"  the comparison table: architectures at matched FLOPs, bottleneck widths, ReLU vs
             SmeLU PD, logloss vs logloss + rank, distillation, ensembles.

Every (tower, seed) trains through `jaxml.train` in its own folder, `train_tower`:
checkpoints, SIGTERM-safe resume, `metrics.jsonl`, TensorBoard, progress lines, the NaN
guard (`jaxml.train.NonFiniteLossError`) and `loss.png`. Layout of `workdir`:

    train:    seed_<s>/            one run (below); results.json, calibration.png
    compare:  runs/<row>/seed_<s>/ one run per row and seed; results.json, comparison.md, comparison.png
    a run:    checkpoints/ (run_config.json records its configuration), metrics.jsonl, tb/,
              loss.png, result.json and predictions.npz once it is finished

A rerun on the same workdir resumes: a finished run (its `result.json` is at the configured
`steps`) is loaded, not retrained; an interrupted one continues from its newest checkpoint.
A run's recorded configuration is its tower, its training config without `steps`, the data
config and (distilled students) the teacher's; a rerun with another raises
`jaxml.train.ConfigMismatchError` naming the fields, before anything is touched. `steps`
may grow: the learning rate is constant and `train.batches` is a function of the step, so
a run extended from k to N steps ends bitwise where one trained for N steps from the start
ends. A run that is already past the configured steps raises.

The experiment config is read only here; the library sees `TowerConfig`, `TrainConfig`,
`SimulatorConfig` and `LoopConfig`, built with `jaxml.experiment.from_config`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxml import experiment, report
from jaxml import train as jt
from jaxml.recsys import criteo, features, metrics, simulator, towers, train
from jaxml.recsys.config import FeatureConfig, TowerConfig

RESULT_FILE = "result.json"            # a finished run: its evaluation, steps and speed
PREDICTIONS_FILE = "predictions.npz"   # a finished run: test (and, for a teacher, train) probabilities


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How each run executes (none of it changes the numbers a run computes).

  mesh: (data, fsdp, tensor) sizes for `jaxml.train.make_mesh`; -1 = the remaining devices;
    without a -1, the first data * fsdp * tensor devices.
  checkpoint_every: save every this many steps (and at the end / on SIGTERM).
  keep: the newest checkpoints kept per run.
  log_every: steps per metrics record and progress line.
  async_checkpoint: write checkpoints in a background thread.
  tensorboard: write TensorBoard events under `<run>/tb`.
  allow_fresh_start: start a run over when its checkpoints exist but none restores.
  """

  mesh: tuple[int, int, int] = (-1, 1, 1)
  checkpoint_every: int = 200
  keep: int = 2
  log_every: int = 50
  async_checkpoint: bool = True
  tensorboard: bool = True
  allow_fresh_start: bool = False

  def __post_init__(self):
    if len(self.mesh) != 3:
      raise ValueError(f"mesh must give (data, fsdp, tensor) sizes, got {self.mesh}")
    if self.checkpoint_every < 1 or self.keep < 1 or self.log_every < 1:
      raise ValueError(f"checkpoint_every, keep and log_every must be >= 1, got {self.checkpoint_every}, "
                       f"{self.keep}, {self.log_every}")


class Preempted(Exception):
  """A run stopped at SIGTERM after saving a checkpoint (`run` returns `preempted=True`)."""


def make_mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
  """`jt.make_mesh(*shape)`; a shape without -1 takes the first data * fsdp * tensor devices."""
  shape = tuple(int(s) for s in shape)
  if -1 in shape:
    return jt.make_mesh(*shape)
  n = math.prod(shape)
  if n > jax.device_count():
    raise ValueError(f"mesh {shape} needs {n} devices, have {jax.device_count()}")
  return jt.make_mesh(*shape, devices=jax.devices()[:n])


def _is_main() -> bool:
  return jax.process_index() == 0


def _without_steps(tc: train.TrainConfig) -> dict:
  d = experiment.to_dict(tc)
  d.pop("steps")
  return d


@functools.lru_cache(maxsize=32)
def _compiled(cfg: TowerConfig, tc: train.TrainConfig, mesh: jax.sharding.Mesh):
  """`(abstract state, init, step)` for `cfg` and `tc` (given without its steps and seed, which change
  neither program): the seeds of a tower share one compiled init and one compiled step.

  `init(rng)` is `jt.init_train_state(...)` under one cached `jax.jit` (the seed is its argument);
  `step` is `jt.jit_train_step` of `jt.make_train_step(loss_fn, tx)`.
  """
  tx, schedule = train.optimizer(tc)
  init_fn = lambda r: towers.init(r, cfg)  # noqa: E731
  abstract, shardings = jt.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh, train.RECSYS_RULES)
  init = jax.jit(lambda r: jt.init_train_state(init_fn, tx, r, mesh, train.RECSYS_RULES)[0], out_shardings=shardings)
  loss = functools.partial(train.loss_fn, cfg=cfg, tc=tc)
  step = jt.jit_train_step(jt.make_train_step(loss, tx, schedule=schedule), shardings, jt.batch_sharding(mesh))
  return abstract, init, step


def run_record(cfg: TowerConfig, tc: train.TrainConfig, **extra: Any) -> dict:
  """What a run's `checkpoints/run_config.json` records: tower, training without `steps`, and `extra`."""
  return {"tower": experiment.to_dict(cfg), "train": _without_steps(tc),
          **{k: experiment.to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in extra.items()}}


def train_tower(cfg: TowerConfig, tc: train.TrainConfig, batch_fn: Callable[[int], dict], workdir: str,
                loop: LoopConfig = LoopConfig(), *, num_steps: int | None = None, record: dict | None = None,
                print_fn: Callable[[str], None] = print) -> jt.TrainResult:
  """Trains (or resumes) one tower in `workdir` through `jaxml.train`.

  Args:
    cfg: the tower.
    tc: its training; `PRNGKey(tc.seed)` initialises the state.
    batch_fn: `batch_fn(step)` -> the host batch of update `step + 1` (`train.batches`),
      deterministic in the step; `batch_size` rows, a multiple of the mesh's data * fsdp.
    workdir: the run's folder (checkpoints, metrics.jsonl, tb/, loss.png).
    loop: mesh, checkpoints, logging.
    num_steps: train up to this many updates; default `tc.steps`.
    record: the configuration recorded in `checkpoints/run_config.json` (default
      `run_record(cfg, tc)`); a rerun with another raises `jt.ConfigMismatchError`.
    print_fn: progress lines.

  Returns:
    The loop's `jt.TrainResult` (`preempted` after SIGTERM; the state is sharded over the mesh).

  Raises:
    jt.NonFiniteLossError: a NaN/inf loss or gradient; the last good checkpoint stays.
    ValueError: the batch does not split over the mesh, or the checkpoint is past `num_steps`.
  """
  num_steps = tc.steps if num_steps is None else int(num_steps)
  mesh = make_mesh(loop.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.batch_size % shards:
    raise ValueError(f"batch_size {tc.batch_size} must be divisible by the mesh's data * fsdp = {shards} "
                     f"(mesh {dict(mesh.shape)})")
  abstract, init, step_fn = _compiled(cfg, dataclasses.replace(tc, steps=0, seed=0), mesh)
  directory = os.path.join(workdir, "checkpoints")
  jt.check_run_config(directory, run_record(cfg, tc) if record is None else record, fields="run config")
  ckpt = jt.Checkpointer(directory, every=loop.checkpoint_every, keep=loop.keep, async_save=loop.async_checkpoint)
  try:
    state, start = jt.restore_or_init(ckpt, abstract, lambda: init(jax.random.PRNGKey(tc.seed)),
                                      allow_fresh_start=loop.allow_fresh_start)
    if start > num_steps:
      raise ValueError(f"{workdir} holds a run at step {start}, past the requested {num_steps} steps; use a new "
                       "workdir or at least as many steps")
    return jt.train(step_fn, state, batch_fn, num_steps=num_steps, workdir=workdir, start_step=start,
                    batch_sharding=jt.batch_sharding(mesh), checkpointer=ckpt, log_every=loop.log_every,
                    tensorboard=loop.tensorboard, plot_title=f"{cfg.kind} tower: training loss", print_fn=print_fn)
  finally:
    ckpt.close()


def restore_params(workdir: str, cfg: TowerConfig, tc: train.TrainConfig,
                   loop: LoopConfig = LoopConfig()) -> tuple[dict | None, int | None]:
  """`(params, step)` of the newest good checkpoint of the run in `workdir`, or `(None, None)`."""
  abstract, _, _ = _compiled(cfg, dataclasses.replace(tc, steps=0, seed=0), make_mesh(loop.mesh))
  ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=loop.checkpoint_every)
  try:
    state, step = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  return (None, None) if state is None else (state.params, step)


# ----------------------------------------------------------------------------- runs over seeds


def _examples_per_s(run_dir: str, batch_size: int) -> float:
  """Median over the run's metric records (those before a resume too) of steps/s times the batch."""
  speeds = [r["steps_per_sec"] for r in jt.read_metrics(run_dir) if "steps_per_sec" in r]
  return float(np.median(speeds)) * batch_size if speeds else float("nan")


def _load_finished(run_dir: str, steps: int) -> dict | None:
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  result = report.load_json(path)
  if result["steps"] != steps:
    return None   # trained for another number of steps: resume (or raise) through train_tower
  with np.load(os.path.join(run_dir, PREDICTIONS_FILE)) as z:
    result["predictions"] = {k: z[k] for k in z.files}
  return result


def train_one(cfg: TowerConfig, tc: train.TrainConfig, batch_fn: Callable[[int], dict], test: dict, run_dir: str,
              loop: LoopConfig, *, record: dict, predict_on: dict | None = None, name: str = "",
              log: Callable[[str], None] = print) -> dict:
  """One finished run: loaded from `run_dir` when it is done, else trained (or resumed) and saved.

  Returns:
    `{"steps", "eval" (on `test`), "examples_per_s", "seconds", "predictions": {"test": [n_test],
    "train": [n] (with `predict_on`)}}`.

  Raises:
    Preempted: SIGTERM stopped the run (its checkpoint is saved).
  """
  jt.check_run_config(os.path.join(run_dir, "checkpoints"), record, fields="run config")
  done = _load_finished(run_dir, tc.steps)
  if done is not None:
    log(f"{name} seed {tc.seed}: finished earlier, loaded {os.path.join(run_dir, RESULT_FILE)}")
    return done
  t0 = time.perf_counter()
  result = train_tower(cfg, tc, batch_fn, run_dir, loop, record=record,
                       print_fn=lambda line: log(f"{name} seed {tc.seed}: {line}"))
  if result.preempted:
    raise Preempted(f"{run_dir} stopped at step {result.step}")
  preds = {"test": train.predict(result.state.params, test, cfg)}
  if predict_on is not None:
    preds["train"] = train.predict(result.state.params, predict_on, cfg)
  out = {"steps": result.step, "eval": train.evaluate(test["label"], preds["test"]),
         "examples_per_s": _examples_per_s(run_dir, tc.batch_size),
         "seconds": time.perf_counter() - t0}
  if _is_main():
    np.savez(os.path.join(run_dir, PREDICTIONS_FILE), **preds)
  report.save_json(out, os.path.join(run_dir, RESULT_FILE))   # last: marks the run finished
  return dict(out, predictions=preds)


def train_seeds(cfg: TowerConfig, tc: train.TrainConfig, train_data: Any, test: dict, base_dir: str,
                loop: LoopConfig, *, seeds=(0, 1), record: dict | None = None, predict_train: bool = False,
                name: str = "", log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
  """Trains `cfg` once per seed (init and data order), each in `base_dir/seed_<s>`.

  Args:
    train_data: a dict of numpy arrays (`train.batches` per seed) or a `batch_fn`
      shared by every seed.
    record: extra entries of each run's recorded configuration (the data config).
    predict_train: also save the probabilities on `train_data` (a teacher's).

  Returns:
    `(summary, runs)`: metrics averaged over seeds with `auc_std`, `pd` between the first two
    seeds' test predictions, `dense_mflops`, `params` and `examples_per_s`; the per-seed runs.
  """
  runs = []
  for s in seeds:
    tcs = dataclasses.replace(tc, seed=int(s))
    batch_fn = train.batches(train_data, tc.batch_size, int(s)) if isinstance(train_data, dict) else train_data
    runs.append(train_one(cfg, tcs, batch_fn, test, os.path.join(base_dir, f"seed_{s}"), loop,
                          record=run_record(cfg, tcs, **(record or {})),
                          predict_on=train_data if predict_train else None, name=name, log=log))
  evals = [r["eval"] for r in runs]
  out = {k: float(np.mean([e[k] for e in evals])) for k in evals[0]}
  out["auc_std"] = float(np.std([e["auc"] for e in evals]))
  p = [r["predictions"]["test"] for r in runs]
  out["pd"] = float(metrics.prediction_difference(p[0], p[1])) if len(p) > 1 else float("nan")
  out["dense_mflops"] = towers.dense_flops_per_example(cfg) / 1e6
  out["params"] = towers.param_count(jax.eval_shape(lambda: towers.init(jax.random.PRNGKey(0), cfg)))
  out["examples_per_s"] = float(np.median([r["examples_per_s"] for r in runs]))
  return out, runs


# ----------------------------------------------------------------------------- configs and data


def tower_config(config, fc: FeatureConfig) -> TowerConfig:
  """`config.model` (TowerConfig fields plus `embed_dim`, already in `fc`) as a TowerConfig."""
  m = dict(config.model)
  m.pop("embed_dim", None)
  return experiment.from_config(TowerConfig, m, features=fc)


def _embed_dim(config) -> int:
  return int(config.model.get("embed_dim", FeatureConfig().embed_dim))


def simulator_data(config):
  """`(SimulatorConfig, CTRSimulator, train examples, test examples)` of `config.simulator` / `config.data`."""
  sc = experiment.from_config(simulator.SimulatorConfig, config.simulator)
  sim = simulator.CTRSimulator(sc)
  return sc, sim, sim.sample(config.data.n_train, seed=1), sim.sample(config.data.n_test, seed=2)


class CriteoBatches:
  """`batch_fn(step)` over Criteo-format files read in order, epoch after epoch.

  Batch `step` is the `step`-th full batch of the stream (the files repeated): a resumed
  run re-reads the stream up to its start step, so it sees the batches it would have seen.
  Every batch is checked against `fc` (`features.check_batch`).
  """

  def __init__(self, path, batch_size: int, fc: FeatureConfig):
    self.path, self.batch_size, self.fc = path, batch_size, fc
    self.reader = None
    self._it, self._next, self._in_epoch = None, None, 0

  def _open(self):
    self.reader = criteo.read(self.path, batch_size=self.batch_size, drop_remainder=True)
    self._it, self._in_epoch = iter(self.reader), 0

  def _read(self) -> dict:
    try:
      batch = next(self._it)
    except StopIteration:
      if self._in_epoch == 0:
        raise ValueError(f"{self.path} holds fewer than batch_size={self.batch_size} valid lines") from None
      self._open()
      batch = next(self._it)
    self._in_epoch += 1
    return batch

  def __call__(self, step: int) -> dict:
    if step != self._next:
      self._open()
      for _ in range(step):
        self._read()
    batch = self._read()
    self._next = step + 1
    features.check_batch(batch, self.fc)
    return {k: v for k, v in batch.items() if k in train.MODEL_KEYS or k in train.TARGET_KEYS}


# ----------------------------------------------------------------------------- train mode


def _calibration_figure(path: str, labels: np.ndarray, preds: list[np.ndarray], oracle: np.ndarray | None):
  """Reliability diagram: observed click rate against mean prediction in 10 quantile bins."""
  with report.figure(path, figsize=(4.5, 4)) as fig:
    ax = fig.add_subplot(1, 1, 1)
    curves = [(f"seed {i}", p) for i, p in enumerate(preds)] + ([("oracle", oracle)] if oracle is not None else [])
    top = 0.0
    for label, p in curves:
      edges = np.quantile(p, np.linspace(0, 1, 11))
      idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
      x = np.array([p[idx == b].mean() for b in range(10) if np.any(idx == b)])
      y = np.array([labels[idx == b].mean() for b in range(10) if np.any(idx == b)])
      ax.plot(x, y, "o-", ms=3, label=label)
      top = max(top, x.max(), y.max())
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlabel("mean predicted click probability")
    ax.set_ylabel("observed click rate")
    ax.set_title("calibration (test set)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def train_and_evaluate(config, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Train mode: `config.model` over `config.seeds` on the simulator (default) or on Criteo-format
  files (`config.data.criteo_train` / `criteo_test`). Writes `results.json` and `calibration.png`.

  Returns:
    Metrics averaged over seeds (see `train_seeds`) with `per_seed`, `oracle` (simulator),
    `tower`, `train` and `steps`.

  Raises:
    Preempted: a run stopped at SIGTERM (the finished ones stay on disk).
  """
  loop = experiment.from_config(LoopConfig, config.loop)
  tc = experiment.from_config(train.TrainConfig, config.train)
  seeds = tuple(int(s) for s in config.seeds)
  data_record = {"data": experiment.to_dict(config.data)}
  if config.data.criteo_train:
    fc = FeatureConfig(embed_dim=_embed_dim(config), **criteo.feature_config_kwargs(config.data.criteo_buckets))
    cfg = tower_config(config, fc)
    test_reader = criteo.read(config.data.criteo_test or config.data.criteo_train, batch_size=config.data.n_test,
                              drop_remainder=False)
    test = next(iter(test_reader))
    train_data, oracle_probs = CriteoBatches(config.data.criteo_train, tc.batch_size, fc), None
  else:
    sc, sim, train_data, test = simulator_data(config)
    fc = sim.feature_config(_embed_dim(config))
    features.check_batch(train_data, fc)
    cfg = tower_config(config, fc)
    data_record["simulator"] = sc
    oracle_probs = test["prob"]
  out, runs = train_seeds(cfg, tc, train_data, test, workdir, loop, seeds=seeds, record=data_record, name=cfg.kind,
                          log=log)
  if isinstance(train_data, CriteoBatches) and train_data.reader is not None:
    log(f"criteo: the last pass read {train_data.reader.n_lines} lines, {train_data.reader.n_malformed} malformed")
  out["per_seed"] = [dict(r["eval"], seed=s, examples_per_s=r["examples_per_s"]) for s, r in zip(seeds, runs)]
  if oracle_probs is not None:
    out["oracle"] = train.evaluate(test["label"], oracle_probs)
  out.update(tower=cfg, train=tc, steps=tc.steps)
  report.save_json(out, os.path.join(workdir, "results.json"))
  _calibration_figure(os.path.join(workdir, "calibration.png"), np.asarray(test["label"]),
                      [r["predictions"]["test"] for r in runs], oracle_probs)
  log(f"{cfg.kind}: auc {out['auc']:.4f} logloss {out['logloss']:.4f} pd {out['pd']:.4f}; "
      f"results in {os.path.join(workdir, 'results.json')}")
  return out


# ----------------------------------------------------------------------------- compare mode


def match_width(base: TowerConfig, target_flops: float, widths=(8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)):
  """The top-MLP width w (hidden = (w, w // 2)) whose dense FLOPs are closest to `target_flops`."""
  best = min(widths, key=lambda w: abs(towers.dense_flops_per_example(dataclasses.replace(base, hidden=(w, w // 2)))
                                       - target_flops))
  return dataclasses.replace(base, hidden=(best, best // 2))


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")


def _logit(p):
  p = np.clip(p, 1e-7, 1 - 1e-7)
  return np.log(p) - np.log1p(-p)


TABLE_HEADER = ("section", "model", "AUC", "logloss", "NE", "calib", "PD", "dense MFLOPs/ex", "params", "train ex/s")


def format_table(rows: list[dict], oracle: dict) -> str:
  """The comparison as a markdown table (`jaxml.report.markdown_table`), the oracle first."""
  cells = [["oracle", "true probabilities", f"{oracle['auc']:.4f}", f"{oracle['logloss']:.4f}", f"{oracle['ne']:.4f}",
            f"{oracle['calibration']:.3f}", None, None, None, None]]
  for r in rows:
    cells.append([r["section"], r["name"], f"{r['auc']:.4f}", f"{r['logloss']:.4f}", f"{r['ne']:.4f}",
                  f"{r['calibration']:.3f}", f"{r['pd']:.4f}", f"{r['dense_mflops']:.3f}", f"{r['params']:,}",
                  f"{r['examples_per_s']:,.0f}"])
  return report.markdown_table(TABLE_HEADER, cells)


def _comparison_figure(path: str, rows: list[dict], oracle: dict) -> None:
  """AUC against dense MFLOPs per example, and PD, for every row."""
  with report.figure(path, figsize=(11, 4.5)) as fig:
    ax, bx = fig.subplots(1, 2)
    for i, r in enumerate(rows):
      ax.scatter(r["dense_mflops"], r["auc"], s=18)
      ax.annotate(str(i + 1), (r["dense_mflops"], r["auc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(oracle["auc"], color="k", ls="--", lw=0.8, label="oracle")
    ax.set_xscale("log")
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())   # minor labels of a narrow log range overlap
    ax.set_xlabel("dense MFLOPs / example")
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = [f"{i + 1}. {r['name']}" for i, r in enumerate(rows)]
    bx.barh(range(len(rows)), [r["pd"] for r in rows])
    bx.set_yticks(range(len(rows)), names, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("prediction difference between seeds")
    bx.grid(alpha=0.3, axis="x")


def compare(config, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Compare mode (module docstring). Writes `results.json` (oracle, rows), `comparison.md`
  and `comparison.png`; every (row, seed) run under `runs/`.

  Returns:
    `{"rows": [...], "oracle": {...}, "table": markdown, "seconds": ...}`.

  Raises:
    Preempted: a run stopped at SIGTERM (the finished ones stay on disk).
  """
  t0 = time.time()
  loop = experiment.from_config(LoopConfig, config.loop)
  tc = experiment.from_config(train.TrainConfig, config.train)
  sc, sim, tr, te = simulator_data(config)
  fc = sim.feature_config(_embed_dim(config))
  features.check_batch(tr, fc)
  m = tower_config(config, fc)   # validates config.model; the rows take the fields they need
  data_record = {"data": experiment.to_dict(config.data), "simulator": sc}
  oracle = train.evaluate(te["label"], te["prob"])
  rows, slugs = [], set()

  def add(section, name, cfg, tc_=tc, seeds=(0, 1), data=tr, record=None, folder=None, predict_train=False):
    folder = folder or _slug(f"{section}_{name}")
    if folder in slugs:
      raise ValueError(f"two rows of the comparison share the run folder {folder!r}; give them distinct names")
    slugs.add(folder)
    r, runs = train_seeds(cfg, tc_, data, te, os.path.join(workdir, "runs", folder), loop, seeds=seeds,
                          record={**data_record, **(record or {})}, predict_train=predict_train, name=name, log=log)
    r.update(section=section, name=name, run_dir=os.path.join("runs", folder))
    rows.append(r)
    log(f"[{time.time() - t0:6.1f}s] {section:14s} {name:28s} auc={r['auc']:.4f} ll={r['logloss']:.4f} "
        f"pd={r['pd']:.4f} mflops={r['dense_mflops']:.3f}")
    return runs

  dcn = TowerConfig(features=fc, kind="dcnv2", hidden=m.hidden, cross_layers=m.cross_layers, cross_rank=m.cross_rank)
  target = towers.dense_flops_per_example(dcn)
  mlp = match_width(TowerConfig(features=fc, kind="mlp"), target)
  dhen = match_width(TowerConfig(features=fc, kind="dhen", dhen_modules=m.dhen_modules, dhen_layers=m.dhen_layers,
                                 dhen_rows=m.dhen_rows, attention_heads=m.attention_heads,
                                 dhen_batch_chunks=m.dhen_batch_chunks), target)
  mlp_name = f"MLP {mlp.hidden}"
  mlp_runs = add("architecture", mlp_name, mlp)
  add("architecture", f"DCN-v2 x{m.cross_layers} {dcn.hidden}", dcn)
  add("architecture", f"DHEN x{m.dhen_layers} {dhen.hidden}", dhen)

  wide = TowerConfig(features=fc, kind="mlp", hidden=tuple(config.bottleneck.hidden))
  for k in config.bottleneck.ranks:
    add("bottleneck", f"MLP {wide.hidden} k={k or 'none'}", dataclasses.replace(wide, bottleneck=k))

  add("activation", f"MLP SmeLU b={config.smelu_beta}",
      dataclasses.replace(mlp, activation="smelu", smelu_beta=config.smelu_beta))
  add("loss", "MLP logloss + rank", mlp, dataclasses.replace(tc, loss="logloss+rank", rank_weight=config.rank_weight))

  teacher_cfg = TowerConfig(features=fc, kind="dcnv2", hidden=tuple(config.distill.teacher_hidden),
                            cross_layers=m.cross_layers)
  teacher_tc = dataclasses.replace(tc, steps=config.distill.teacher_steps)
  teacher = add("distillation", f"teacher DCN-v2 {teacher_cfg.hidden}", teacher_cfg, teacher_tc, seeds=(0,),
                predict_train=True)
  student = TowerConfig(features=fc, kind="mlp", hidden=tuple(config.distill.student_hidden))
  add("distillation", f"student MLP {student.hidden}", student)
  add("distillation", f"student + distill l={config.distill.lam}", student,
      dataclasses.replace(tc, loss="distill", distill_lambda=config.distill.lam),
      data=dict(tr, teacher=teacher[0]["predictions"]["train"]),
      record={"teacher": run_record(teacher_cfg, teacher_tc), "teacher_steps": teacher_tc.steps})

  # Ensembles of 2: PD between two ensembles built from disjoint seeds, against single-model PD. Seeds 2
  # and 3 of the architecture MLP train beside its seeds 0 and 1.
  _, more = train_seeds(mlp, tc, tr, te, os.path.join(workdir, "runs", _slug(f"architecture_{mlp_name}")), loop,
                        seeds=(2, 3), record=data_record, name=mlp_name, log=log)
  ens_a = np.asarray(jax.nn.sigmoid(np.mean([_logit(r["predictions"]["test"]) for r in mlp_runs], 0)))
  ens_b = np.asarray(jax.nn.sigmoid(np.mean([_logit(r["predictions"]["test"]) for r in more], 0)))
  ev = train.evaluate(te["label"], ens_a)
  rows.append(dict(rows[0], section="ensemble", name=f"2 x {mlp_name} (mean logit)", **ev, auc_std=float("nan"),
                   pd=float(metrics.prediction_difference(ens_a, ens_b)),
                   dense_mflops=2 * rows[0]["dense_mflops"], params=2 * rows[0]["params"]))
  log(f"[{time.time() - t0:6.1f}s] ensemble done")
  table = format_table(rows, oracle)
  seconds = time.time() - t0
  report.save_json({"oracle": oracle, "rows": rows, "seconds": seconds, "train": tc},
                   os.path.join(workdir, "results.json"))
  report.save_text(table, os.path.join(workdir, "comparison.md"))
  _comparison_figure(os.path.join(workdir, "comparison.png"), rows, oracle)
  log(table)
  log(f"total {seconds:.0f}s")
  return {"rows": rows, "oracle": oracle, "table": table, "seconds": seconds}


# ----------------------------------------------------------------------------- the contract


MODES = ("train", "compare")


def run(config, workdir: str, log: Callable[[str], None] = print) -> dict:
  """The experiment contract: `config.mode` "train" (`train_and_evaluate`) or "compare" (`compare`).

  Returns:
    The mode's results with `preempted` (True when SIGTERM stopped a run after its checkpoint;
    a rerun on `workdir` resumes).
  """
  mode = config.get("mode", "train")
  if mode not in MODES:
    raise ValueError(f"config.mode must be one of {MODES}, got {mode!r}")
  if not workdir:
    raise ValueError("the CTR experiment needs a workdir (checkpoints, metrics, results)")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    out = (train_and_evaluate if mode == "train" else compare)(config, workdir, log)
  except Preempted as e:
    log(f"preempted: {e}; rerun on {workdir} to resume (finished runs are kept)")
    return {"preempted": True}
  return dict(out, preempted=False)
