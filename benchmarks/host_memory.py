"""Per-step wall, user and system time and page faults of a Llama training step under glibc malloc settings.

    python -m benchmarks.host_memory                      # 25m config, one pinned thread, every setting
    python -m benchmarks.host_memory --config=small --threads=2 --steps=8

Each setting runs in a fresh process (glibc reads `GLIBC_TUNABLES` only at start), pinned to the
first `--threads` CPUs this process may use, with `JAXML_HUGE_PAGES=0` so the process keeps exactly the
setting given. It times the `llama_bench` training step (the core's step, AdamW, donated state) for
`--steps` steps after two warm-up steps and reports the medians per step, `getrusage` system time and
minor faults included, and the resident memory at the end. Settings:
  * `plain`: glibc's defaults (each large temporary a fresh mapping, 4 KiB pages);
  * `huge`: `jaxml.train.hostmem.TUNABLE` alone (transparent huge pages for those mappings);
  * `keep`: what the entrypoints relaunch with (`huge_pages_env`: huge pages and freed memory kept);
  * `keep_no_arena`, `keep_no_mmap`, `keep_no_trim`: `keep` without one of its three tunables.
Ends with `name: value` lines: `<setting>_<figure>`, milliseconds / counts / MB.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

from benchmarks.llama_cpu_time import alternate_settings
from jaxml.train import hostmem

_ARENA, _MMAP, _TRIM = hostmem.KEEP_TUNABLES.split(":")
SETTINGS = {
    "plain": "",
    "huge": hostmem.TUNABLE,
    "keep": f"{hostmem.TUNABLE}:{hostmem.KEEP_TUNABLES}",
    "keep_no_arena": f"{hostmem.TUNABLE}:{_MMAP}:{_TRIM}",
    "keep_no_mmap": f"{hostmem.TUNABLE}:{_ARENA}:{_TRIM}",
    "keep_no_trim": f"{hostmem.TUNABLE}:{_ARENA}:{_MMAP}",
}


def _child(config: str, steps: int) -> dict:
  """Runs in the pinned process: per-step medians."""
  import resource  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from benchmarks.llama_bench import BATCH, SEQ, bench_configs, make_train_step  # pylint: disable=import-outside-toplevel
  from jaxml import llama  # pylint: disable=import-outside-toplevel
  from jaxml import train as jt  # pylint: disable=import-outside-toplevel

  cfg = bench_configs()[config]
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  box = [jt.create_train_state(llama.init(jax.random.PRNGKey(0), cfg), tx, jax.random.PRNGKey(0))]
  step = make_train_step(cfg, tx)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
  batch = {"tokens": jax.device_put(tokens)}

  def one():
    box[0], metrics = step(box[0], batch)
    metrics["loss"].block_until_ready()

  one()
  one()
  rows = []
  for _ in range(steps):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    one()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    rows.append((1e3 * wall, 1e3 * (r1.ru_utime - r0.ru_utime), 1e3 * (r1.ru_stime - r0.ru_stime),
                 r1.ru_minflt - r0.ru_minflt))
  wall, user, system, faults = (statistics.median(col) for col in zip(*rows))
  with open("/proc/self/statm", encoding="ascii") as f:
    rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  return {"wall_ms": wall, "user_ms": user, "sys_ms": system, "sys_ms_max": max(r[2] for r in rows),
          "faults": faults, "rss_mb": rss_mb}


def main(argv: list[str]) -> int:
  args = dict(a.lstrip("-").split("=", 1) for a in argv if "=" in a)
  config, steps = args.get("config", "25m"), int(args.get("steps", 6))
  threads, rounds = int(args.get("threads", 1)), int(args.get("rounds", 1))
  names = args.get("settings", ",".join(SETTINGS)).split(",")
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    raise SystemExit(f"unknown --settings {unknown}; known: {sorted(SETTINGS)}")
  cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
  results = alternate_settings(
      names, rounds, lambda name: dict(os.environ, GLIBC_TUNABLES=SETTINGS[name], JAXML_HUGE_PAGES="0"),
      [sys.executable, "-m", "benchmarks.host_memory", "--child", cpus, config, str(steps)])
  for name in names:
    for k, v in results[name].items():
      print(f"{name}_{k}: {statistics.median(v):.1f}")
  return 0


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
    print(json.dumps(_child(sys.argv[3], int(sys.argv[4]))))
    sys.exit(0)
  sys.exit(main(sys.argv[1:]))
