"""One-thread CPU time of jaxml's Llama benchmark steps under several `XLA_FLAGS` settings.

    python -m benchmarks.llama_cpu_time                      # the default and the flags BUILD_NOTES lists
    python -m benchmarks.llama_cpu_time --rounds=3 --settings=default,vec512
    python <this file> --settings=default    # from another checkout's root: times that checkout

Each (setting, round) runs in a fresh process pinned to one core, so XLA gets its flags at start
and a one-thread pool; the settings alternate within each round. A process times, with
`time.process_time()`, the `llama_bench` training step on the `small` (0.8M) and `25m` configs and
greedy `generate` (128 new tokens) at batch 1 and 8, medians over its calls. CPU time of one pinned
thread moves far less with other jobs on the machine than wall time does (BUILD_NOTES, "Where a CPU
training step's time goes"). Ends with `name: value` lines, milliseconds: `<setting>_<figure>_ms`,
medians over rounds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "default": "",
    "vec512": "--xla_cpu_prefer_vector_width=512",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "no_mt_eigen": "--xla_cpu_multi_thread_eigen=false",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    "concurrency_sched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}


def _child(figures: list[str]) -> dict:
  """Runs in the pinned process: the timings, in ms."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from benchmarks.llama_bench import BATCH, NEW_TOKENS, PROMPT_LEN, SEQ, bench_configs, make_train_step
  from jaxml import llama  # pylint: disable=import-outside-toplevel
  from jaxml import train as jt  # pylint: disable=import-outside-toplevel

  def cpu_ms(fn, n):
    times = []
    for _ in range(n):
      start = time.process_time()
      fn()
      times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)

  out, cfgs = {}, bench_configs()
  for name, calls in (("small", 20), ("25m", 4)):
    if f"train_{name}" not in figures:
      continue
    cfg = cfgs[name]
    batch = {"tokens": jax.device_put(np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ + 1),
                                                                         dtype=np.int32))}
    tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    box = [jt.create_train_state(llama.init(jax.random.PRNGKey(0), cfg), tx, jax.random.PRNGKey(0))]
    step = make_train_step(cfg, tx)

    def one():
      box[0], metrics = step(box[0], batch)
      metrics["loss"].block_until_ready()

    for _ in range(3):
      one()
    out[f"train_{name}"] = cpu_ms(one, calls)
  cfg = cfgs["small"]
  params = llama.init(jax.random.PRNGKey(0), cfg)
  for b in (1, 8):
    if f"decode_b{b}" not in figures:
      continue
    prompts = np.random.default_rng(b).integers(1, cfg.vocab_size, (b, PROMPT_LEN)).tolist()
    run = lambda: llama.generate(params, cfg, prompts, NEW_TOKENS)  # noqa: E731
    run()
    run()
    out[f"decode_b{b}"] = cpu_ms(run, 7)
  return out


def alternate_settings(names, rounds, env_for, cmd, *, unit=""):
  """Runs `cmd` in a fresh process per (round, setting), settings alternating within each round.

  `env_for(name)` gives each process's environment; the process prints a JSON object of figures as
  its last line. Prints one line per process; returns `{name: {figure: [values over rounds]}}`.
  """
  results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
  for r in range(rounds):
    for name in names:
      proc = subprocess.run(cmd, env=env_for(name), capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        raise SystemExit(f"setting {name} failed:\n{proc.stderr[-3000:]}")
      got = json.loads(proc.stdout.strip().splitlines()[-1])
      print(f"round {r + 1}/{rounds} {name}: " + ", ".join(f"{k} {v:.1f}{unit}" for k, v in got.items())
            + f" (load {os.getloadavg()[0]:.1f})", flush=True)
      for k, v in got.items():
        results[name].setdefault(k, []).append(v)
  return results


def main(argv: list[str]) -> int:
  args = dict(a.lstrip("-").split("=", 1) for a in argv if "=" in a)
  rounds = int(args.get("rounds", 2))
  names = args.get("settings", ",".join(SETTINGS)).split(",")
  figures = args.get("figures", "train_small,train_25m,decode_b1,decode_b8").split(",")
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    raise SystemExit(f"unknown --settings {unknown}; known: {sorted(SETTINGS)}")
  cpu = sorted(os.sched_getaffinity(0))[0]
  # This file's checkout's malloc tunables (`jaxml.train.hostmem`) for every timed process, whichever
  # checkout it times, so both sides of a before/after comparison allocate alike.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from jaxml.train import hostmem  # pylint: disable=import-outside-toplevel
  tunables = hostmem.huge_pages_env({}, supported=True)["GLIBC_TUNABLES"]
  results = alternate_settings(
      names, rounds, lambda name: dict(os.environ, XLA_FLAGS=SETTINGS[name], GLIBC_TUNABLES=tunables),
      [sys.executable, os.path.abspath(__file__), "--child", str(cpu), ",".join(figures)], unit=" ms")
  for name in names:
    for k, v in results[name].items():
      print(f"{name}_{k}_ms: {statistics.median(v):.2f}")
  return 0


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    # The timed process: pinned, and importing jaxml from the working directory, so this file can time
    # another checkout (run it from that checkout's root: `python <path to this file> ...`).
    os.sched_setaffinity(0, {int(sys.argv[2])})
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_child(sys.argv[3].split(","))))
    sys.exit(0)
  sys.exit(main(sys.argv[1:]))
