"""CTR experiments: train one tower (simulator or Criteo file) or run the comparison table.

`train_and_evaluate(config, workdir)` and `compare(config, workdir)` read an
experiment ConfigDict (see experiments/configs/ctr.py) and turn it into the
frozen `TowerConfig`/`TrainConfig` the library sees.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from jaxml.recsys import criteo, metrics, simulator, towers, train
from jaxml.recsys.config import FeatureConfig, TowerConfig

_TOWER_FIELDS = {f.name for f in dataclasses.fields(TowerConfig)} - {"features"}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(train.TrainConfig)}


def tower_config(features: FeatureConfig, **kw) -> TowerConfig:
  bad = set(kw) - _TOWER_FIELDS
  if bad:
    raise ValueError(f"unknown tower fields {sorted(bad)}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
  return TowerConfig(features=features, **kw)


def _train_config(d: dict, **over) -> train.TrainConfig:
  kw = {k: v for k, v in d.items() if k in _TRAIN_FIELDS}
  kw.update(over)
  return train.TrainConfig(**kw)


def _simulator(config):
  sc = simulator.SimulatorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.simulator.items()})
  sim = simulator.CTRSimulator(sc)
  return sim, sim.sample(config.data.n_train, seed=1), sim.sample(config.data.n_test, seed=2)


def run(cfg: TowerConfig, tc: train.TrainConfig, tr: dict, te: dict, seeds=(0, 1), teacher: np.ndarray | None = None):
  """Trains one config per seed (init and data order); returns (metrics averaged over seeds,
  with PD between the first two seeds' test predictions and the costs; per-seed test
  predictions; per-seed params)."""
  preds, evals, speeds, all_params = [], [], [], []
  data = dict(tr) if teacher is None else dict(tr, teacher=teacher)
  for s in seeds:
    tcs = dataclasses.replace(tc, seed=s)
    params, info = train.fit(cfg, tcs, train.iterate(data, tc.batch_size, tc.steps, seed=s))
    p = train.predict(params, te, cfg)
    all_params.append(params)
    preds.append(p)
    evals.append(train.evaluate(te["label"], p))
    speeds.append(info["examples_per_s"])
  out = {k: float(np.mean([e[k] for e in evals])) for k in evals[0]}
  out["auc_std"] = float(np.std([e["auc"] for e in evals]))
  out["pd"] = float(metrics.prediction_difference(preds[0], preds[1])) if len(preds) > 1 else float("nan")
  out["dense_mflops"] = towers.dense_flops_per_example(cfg) / 1e6
  out["params"] = towers.param_count(all_params[0])
  out["examples_per_s"] = float(np.median(speeds))
  return out, preds, all_params


def match_width(base: TowerConfig, target_flops: float, widths=(8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)):
  """The top-MLP width w (hidden = (w, w // 2)) whose dense FLOPs are closest to `target_flops`."""
  best = min(widths, key=lambda w: abs(towers.dense_flops_per_example(dataclasses.replace(base, hidden=(w, w // 2)))
                                       - target_flops))
  return dataclasses.replace(base, hidden=(best, best // 2))


def compare(config, workdir: str | None = None, log=print) -> list[dict]:
  """The comparison table: architectures at matched FLOPs, bottleneck widths, ReLU vs SmeLU PD,
  logloss vs logloss + rank, distillation, ensembles. Returns the rows; writes comparison.md/json."""
  t0 = time.time()
  sim, tr, te = _simulator(config)
  fc = sim.feature_config(config.model.embed_dim)
  tc = _train_config(config.train)
  oracle = train.evaluate(te["label"], te["prob"])
  rows = []

  def add(section, name, cfg, tc_=tc, **kw):
    r, preds, params = run(cfg, tc_, tr, te, **kw)
    r.update(section=section, name=name)
    rows.append(r)
    log(f"[{time.time() - t0:6.1f}s] {section:14s} {name:28s} auc={r['auc']:.4f} ll={r['logloss']:.4f} "
        f"pd={r['pd']:.4f} mflops={r['dense_mflops']:.3f}")
    return preds, params

  m = config.model
  dcn = tower_config(fc, kind="dcnv2", hidden=tuple(m.hidden), cross_layers=m.cross_layers, cross_rank=m.cross_rank)
  target = towers.dense_flops_per_example(dcn)
  mlp = match_width(tower_config(fc, kind="mlp"), target)
  dhen = match_width(tower_config(fc, kind="dhen", dhen_modules=tuple(m.dhen_modules), dhen_layers=m.dhen_layers,
                                  dhen_rows=tuple(m.dhen_rows), attention_heads=m.attention_heads), target)
  mlp_preds, _ = add("architecture", f"MLP {mlp.hidden}", mlp)
  add("architecture", f"DCN-v2 x{m.cross_layers} {dcn.hidden}", dcn)
  add("architecture", f"DHEN x{m.dhen_layers} {dhen.hidden}", dhen)

  wide = tower_config(fc, kind="mlp", hidden=tuple(config.bottleneck.hidden))
  for k in config.bottleneck.ranks:
    add("bottleneck", f"MLP {wide.hidden} k={k or 'none'}", dataclasses.replace(wide, bottleneck=k))

  add("activation", f"MLP SmeLU b={config.smelu_beta}", dataclasses.replace(mlp, activation="smelu",
                                                                           smelu_beta=config.smelu_beta))
  add("loss", "MLP logloss + rank", mlp, _train_config(config.train, loss="logloss+rank",
                                                        rank_weight=config.rank_weight))

  teacher_cfg = tower_config(fc, kind="dcnv2", hidden=tuple(config.distill.teacher_hidden), cross_layers=m.cross_layers)
  teacher_tc = _train_config(config.train, steps=config.distill.teacher_steps)
  _, tparams = add("distillation", f"teacher DCN-v2 {teacher_cfg.hidden}", teacher_cfg, teacher_tc, seeds=(0,))
  teacher_train = train.predict(tparams[0], tr, teacher_cfg)
  student = tower_config(fc, kind="mlp", hidden=tuple(config.distill.student_hidden))
  add("distillation", f"student MLP {student.hidden}", student)
  add("distillation", f"student + distill l={config.distill.lam}", student,
      _train_config(config.train, loss="distill", distill_lambda=config.distill.lam), teacher=teacher_train)

  # ensembles of 2: PD between two ensembles built from disjoint seeds, against single-model PD
  _, more, _ = run(mlp, tc, tr, te, seeds=(2, 3))
  ens_a = np.asarray(jax.nn.sigmoid(np.mean([_logit(p) for p in mlp_preds], 0)))
  ens_b = np.asarray(jax.nn.sigmoid(np.mean([_logit(p) for p in more], 0)))
  ev = train.evaluate(te["label"], ens_a)
  rows.append(dict(rows[0], section="ensemble", name="2 x MLP (mean logit)", **ev, auc_std=float("nan"),
                   pd=float(metrics.prediction_difference(ens_a, ens_b)),
                   dense_mflops=2 * rows[0]["dense_mflops"], params=2 * rows[0]["params"]))
  log(f"[{time.time() - t0:6.1f}s] ensemble done")
  table = format_table(rows, oracle)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "comparison.md"), "w") as fh:
      fh.write(table + "\n")
    with open(os.path.join(workdir, "comparison.json"), "w") as fh:
      json.dump({"oracle": oracle, "rows": rows, "seconds": time.time() - t0}, fh, indent=1)
  log(table)
  log(f"total {time.time() - t0:.0f}s")
  return rows


def _logit(p):
  p = np.clip(p, 1e-7, 1 - 1e-7)
  return np.log(p) - np.log1p(-p)


def format_table(rows: list[dict], oracle: dict) -> str:
  head = ("| section | model | AUC | logloss | NE | calib | PD | dense MFLOPs/ex | params | train ex/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
  lines = [head, f"| oracle | true probabilities | {oracle['auc']:.4f} | {oracle['logloss']:.4f} | {oracle['ne']:.4f} | "
                 f"{oracle['calibration']:.3f} | | | | |"]
  for r in rows:
    lines.append(f"| {r['section']} | {r['name']} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['ne']:.4f} | "
                 f"{r['calibration']:.3f} | {r['pd']:.4f} | {r['dense_mflops']:.3f} | {r['params']:,} | "
                 f"{r['examples_per_s']:,.0f} |")
  return "\n".join(lines)


def train_and_evaluate(config, workdir: str | None = None, log=print) -> dict:
  """Trains `config.model` on the simulator (default) or on Criteo-format files
  (`config.data.criteo_train` / `criteo_test`), over `config.seeds`; reports AUC, logloss,
  NE, calibration, PD between the first two seeds, FLOPs/params and examples/s."""
  m = dict(config.model)
  embed_dim = m.pop("embed_dim")
  if config.data.criteo_train:
    fc = FeatureConfig(embed_dim=embed_dim, **criteo.feature_config_kwargs(config.data.criteo_buckets))
    cfg = tower_config(fc, **m)
    tc = _train_config(config.train)
    test_reader = criteo.read(config.data.criteo_test or config.data.criteo_train, batch_size=config.data.n_test,
                              drop_remainder=False)
    te = next(iter(test_reader))
    preds = []
    for s in config.seeds:
      reader = criteo.read(config.data.criteo_train, batch_size=tc.batch_size, drop_remainder=True)
      batches = (b for i, b in zip(range(tc.steps), reader))
      params, info = train.fit(cfg, dataclasses.replace(tc, seed=s), batches)
      log(f"seed {s}: read {reader.n_lines} lines, {reader.n_malformed} malformed")
      preds.append(train.predict(params, te, cfg))
    evals = [train.evaluate(te["label"], p) for p in preds]
    out = {k: float(np.mean([e[k] for e in evals])) for k in evals[0]}
    out["pd"] = float(metrics.prediction_difference(preds[0], preds[1])) if len(preds) > 1 else float("nan")
    out.update(dense_mflops=towers.dense_flops_per_example(cfg) / 1e6, examples_per_s=info["examples_per_s"])
  else:
    sim, tr, te = _simulator(config)
    cfg = tower_config(sim.feature_config(embed_dim), **m)
    out, _, _ = run(cfg, _train_config(config.train), tr, te, seeds=tuple(config.seeds))
    out["oracle"] = train.evaluate(te["label"], te["prob"])
  log(json.dumps(out, indent=1, default=float))
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.json"), "w") as fh:
      json.dump(out, fh, indent=1, default=float)
  return out
