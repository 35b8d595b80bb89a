"""CTR tower training throughput and model FLOP utilisation (MFU).

  python -m benchmarks.ctr_bench [--batch=4096] [--quick] [--dhen_batch_chunks=1]

For each tower (MLP, DCN-v2, DLRM, DHEN) on Criteo-shaped inputs (13 dense,
26 hashed fields): examples/s of the full Adam training step (`jaxml.train`'s step on
`recsys.train.loss_fn`, as the experiments train), and the MFU of its
dense part (interaction + top MLP, forward and backward, on given embeddings)
against a measured matmul peak (median of repeats, `benchmarks.common`). Then
how the step cost grows with the embedding-table size and with the number of
DHEN layers. Matmul FLOPs are counted from the traced step (`towers.matmul_flops`).
Ends with `name: value` lines, including `mfu_dcnv2`, `mfu_dhen` (from the
median repeat), `mfu_<tower>_repeats_range` (the same from the slowest and the
fastest repeat: on a shared VM one run's repeats can spread widely),
`examples_per_s_<tower>`, the peak's measurements (before the towers and after
each; the largest is used) and `mfu_valid` (0 when a dense part ran faster than
every peak measurement, so the peak was read in busy moments and no MFU of the
run holds).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import matmul_peak_flops, median, print_results
from jaxml import train as jt
from jaxml.recsys import losses, modules, towers, train
from jaxml.recsys.config import FeatureConfig, TowerConfig
from jaxml.train import hostmem

flags.DEFINE_integer("batch", 4096, "training batch size")
flags.DEFINE_integer("repeats", 3, "timed repeats (median)")
flags.DEFINE_integer("steps", 3, "steps per timed repeat")
flags.DEFINE_bool("quick", False, "smaller sweeps (smoke test)")
flags.DEFINE_integer("dhen_batch_chunks", 0, "DHEN batch slices (TowerConfig.dhen_batch_chunks; 0 = automatic, "
                     "1 = whole batch)")
FLAGS = flags.FLAGS


def tower_configs(vocab: int = 10_000, dhen_chunks: int = 0) -> dict[str, TowerConfig]:
  fc = FeatureConfig(n_dense=13, vocab_sizes=(vocab,) * 26, embed_dim=16, dense_hidden=(64,))
  hidden = (1024, 512, 256)
  return {
      "mlp": TowerConfig(features=fc, kind="mlp", hidden=hidden),
      "dcnv2": TowerConfig(features=fc, kind="dcnv2", hidden=hidden, cross_layers=3),
      "dlrm": TowerConfig(features=fc, kind="dlrm", hidden=hidden),
      "dhen": TowerConfig(features=fc, kind="dhen", hidden=hidden, dhen_modules=("attention", "linear"),
                          dhen_rows=(None, 16), dhen_layers=2, attention_heads=2, dhen_batch_chunks=dhen_chunks),
  }


def random_batch(cfg: TowerConfig, b: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  fc = cfg.features
  return {"dense": jnp.asarray(rng.standard_normal((b, fc.n_dense)), jnp.float32),
          "cat": jnp.asarray(rng.integers(-1, 1 << 30, (b, len(fc.vocab_sizes))), jnp.int32),
          "label": jnp.asarray(rng.random(b) < 0.25, jnp.float32)}


class Timing(NamedTuple):
  """Seconds per step over the timed repeats: their median, fastest and slowest."""
  median: float
  fastest: float
  slowest: float


def time_steps(step, state, batch, repeats: int, steps: int) -> Timing:
  """Seconds per step over `repeats` timed runs of `steps` steps (after one compile + warm-up call)."""
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / steps)
  return Timing(median(times), min(times), max(times))


def full_step(cfg: TowerConfig, b: int, repeats: int, steps: int) -> tuple[Timing, int]:
  """(seconds per full training step, its matmul FLOPs): the core's step (`jaxml.train.make_train_step`)
  on the tower's loss (`train.loss_fn`) with Adam (`train.optimizer`), as the experiments train."""
  tc = train.TrainConfig()
  tx, _ = train.optimizer(tc)
  state, _ = jt.init_train_state(lambda r: towers.init(r, cfg), tx, jax.random.PRNGKey(0))
  batch = random_batch(cfg, b)
  step_fn = jt.make_train_step(functools.partial(train.loss_fn, cfg=cfg, tc=tc), tx)
  flops = towers.matmul_flops(step_fn, state, batch)
  return time_steps(jax.jit(step_fn, donate_argnums=0), state, batch, repeats, steps), flops


def dense_step(cfg: TowerConfig, b: int, repeats: int, steps: int) -> tuple[Timing, int]:
  """(seconds per step of the dense part alone, its matmul FLOPs): embeddings x0 given,
  forward + backward of interaction + top MLP + head, the core's step with the same Adam on
  the dense weights."""
  fc = cfg.features
  x0 = jax.random.normal(jax.random.PRNGKey(1), (b, fc.n_slots, fc.embed_dim))
  y = (jax.random.uniform(jax.random.PRNGKey(2), (b,)) < 0.25).astype(jnp.float32)
  tx, _ = train.optimizer(train.TrainConfig())

  def init_fn(rng):
    return {k: v for k, v in towers.init(rng, cfg).items() if k != "features"}

  def loss(p, x, rng):
    del rng
    h = towers.interact(p, x, cfg)
    if "top" in p:
      h = modules.mlp(p["top"], h)
    return losses.logloss_from_logits(modules.linear(p["out"], h)[:, 0], y), {}

  state, _ = jt.init_train_state(init_fn, tx, jax.random.PRNGKey(0))
  step = jt.make_train_step(loss, tx)
  flops = towers.matmul_flops(step, state, x0)
  return time_steps(jax.jit(step, donate_argnums=0), state, x0, repeats, steps), flops


def main(argv):
  del argv
  b, reps, steps = FLAGS.batch, FLAGS.repeats, FLAGS.steps
  t0 = time.perf_counter()
  say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
  res: dict = {"devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "batch": b}
  n_peak = 1024 if FLAGS.quick else 2048
  peak = matmul_peak_flops(n=n_peak, repeats=5)
  say(f"matmul peak {peak / 1e9:.1f} GFLOP/s")

  measured, peaks = {}, [peak]
  for name, cfg in tower_configs(dhen_chunks=FLAGS.dhen_batch_chunks).items():
    measured[name] = full_step(cfg, b, reps, steps) + dense_step(cfg, b, reps, steps)
    sec, flops, dsec, dflops = measured[name]
    sec, dsec = sec.median, dsec.median
    say(f"{name}: {b / sec:,.0f} ex/s, {1e3 * sec:.0f} ms/step, dense part {dflops / dsec / 1e9:.1f} GFLOP/s")
    # The CPU may be shared: measure the peak again after each tower and keep the largest
    # median, so a busy moment during one measurement cannot inflate the MFU.
    peaks.append(matmul_peak_flops(n=n_peak, repeats=5))
  peak = max(peaks)
  res["matmul_peak_gflops"] = peak / 1e9
  res["matmul_peak_gflops_measurements"] = ", ".join(f"{p / 1e9:.0f}" for p in peaks)
  # A dense part faster than the peak means every peak measurement met a busy machine: then no MFU
  # of this run is valid, and the run says so instead of printing utilisations above 1.
  fastest = max(m[3] / m[2].fastest for m in measured.values())
  res["mfu_valid"] = int(fastest <= peak)
  if fastest > peak:
    say(f"WARNING: a dense part ran at {fastest / 1e9:.0f} GFLOP/s, above every matmul peak measured "
        f"({res['matmul_peak_gflops_measurements']} GFLOP/s): the peak was read in busy moments, so this "
        "run's MFUs are not valid; rerun on a quieter machine")
  for name, (timing, flops, dtiming, dflops) in measured.items():
    cfg = tower_configs(dhen_chunks=FLAGS.dhen_batch_chunks)[name]
    sec, dsec = timing.median, dtiming.median
    res[f"examples_per_s_{name}"] = b / sec
    res[f"step_ms_{name}"] = 1e3 * sec
    res[f"train_gflops_per_step_{name}"] = flops / 1e9
    res[f"mfu_{name}_full_step"] = flops / sec / peak
    res[f"mfu_{name}"] = dflops / dsec / peak
    # the same over the slowest and the fastest timed repeat: how far one run's figure can be trusted
    res[f"mfu_{name}_repeats_range"] = f"{dflops / dtiming.slowest / peak:.3f}-{dflops / dtiming.fastest / peak:.3f}"
    res[f"params_{name}"] = towers.param_count(towers.init(jax.random.PRNGKey(0), cfg))

  vocabs = (1_000, 10_000) if FLAGS.quick else (1_000, 10_000, 100_000)
  for v in vocabs:  # cost vs table size: a dense Adam update touches every row each step
    cfg = tower_configs(v)["mlp"]
    sec = full_step(cfg, b, reps, steps)[0].median
    res[f"step_ms_mlp_table_rows_{cfg.features.table_rows}"] = 1e3 * sec
    say(f"table {cfg.features.table_rows:,} rows: {1e3 * sec:.1f} ms/step")

  base = tower_configs(dhen_chunks=FLAGS.dhen_batch_chunks)["dhen"]
  for depth in ((1, 2) if FLAGS.quick else (1, 2, 4)):
    cfg = dataclasses.replace(base, dhen_layers=depth)
    timing, flops = dense_step(cfg, b, reps, steps)
    sec = timing.median
    res[f"step_ms_dhen_dense_layers_{depth}"] = 1e3 * sec
    res[f"gflops_dhen_dense_layers_{depth}"] = flops / 1e9
    say(f"DHEN {depth} layers: {1e3 * sec:.1f} ms/step dense part, {flops / 1e9:.2f} GFLOP")
  res["wall_s"] = time.perf_counter() - t0
  print_results(res)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
