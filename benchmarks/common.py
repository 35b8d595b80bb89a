"""Helpers shared by the benchmarks: timing, a matmul peak, a peer worker, output.

A benchmark compares jaxml with a reference implementation ("peer") that runs in
the separate peer environment (`.venv-peer`, see `tests/peer.py`). Unlike the
one-shot `tests.peer.run`, `PeerWorker` keeps one peer process alive for the
whole benchmark so that jaxml and peer measurements can be interleaved round by
round: both sides then see the same machine load, which matters on a shared
machine.

Protocol: the worker script reads one JSON object per line on stdin
(`{"op": name, ...}`) and answers one JSON object per line on stdout
(`{"ok": true, ...}` or `{"ok": false, "error": text}`).
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from tests import peer


def pin_threads(threads: int | None) -> int:
  """Restricts this process to its first `threads` allowed CPUs (0/None: all); returns the count used.

  Call before anything runs on JAX's CPU backend: XLA sizes its thread pool from the affinity
  mask when the backend starts, and a peer process started later inherits the mask.
  """
  allowed = sorted(os.sched_getaffinity(0))
  threads = threads or len(allowed)
  if threads < len(allowed):
    os.sched_setaffinity(0, allowed[:threads])
  return min(threads, len(allowed))


def median(xs: Iterable[float]) -> float:
  return float(statistics.median(list(xs)))


def time_call(fn: Callable[[], Any]) -> float:
  """Wall seconds of one call of `fn`, waiting for any JAX arrays it returns."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Measured FLOP/s of one large `n x n` matmul (`2 n^3` FLOPs), median of `repeats`.

  This is the practical peak that model FLOP utilisation (MFU) is reported
  against on hardware without a published figure (a CPU shared with others).
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  return 2.0 * n**3 / median(time_call(lambda: dot(a, b)) for _ in range(repeats))


# The CPU features that decide which kernels XLA:CPU and torch can use (vector width, bfloat16
# dot products, Intel's AMX tile units).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> dict[str, str]:
  """The machine's CPU model, the `CPU_FEATURES` it reports, and the transparent huge page mode (Linux).

  The model carries the CPU family and model numbers where /proc/cpuinfo has them: a virtual machine
  may name every part "AMD EPYC", and a family 25 part (Zen 4 runs AVX-512 on 256-bit units) and a
  family 26 server part (Zen 5, full 512-bit units) then read alike while their float32 matmul rates
  per core and cycle differ twofold.
  """
  model, flags, ids = "unknown", set(), {}
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      key = key.strip()
      if key == "model name" and model == "unknown":
        model = value.strip()
      elif key == "flags" and not flags:
        flags = set(value.split())
      elif key in ("cpu family", "model") and key not in ids:
        ids[key] = value.strip()
  except OSError:
    pass
  if ids:
    model += f" (family {ids.get('cpu family', '?')}, model {ids.get('model', '?')})"
  try:
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
  except OSError:
    thp = "unknown"
  return {"cpu_model": model, "cpu_features": " ".join(f for f in CPU_FEATURES if f in flags) or "none",
          "transparent_hugepages": thp}


class PeerWorker:
  """A long-lived peer-environment process that answers JSON-line requests."""

  def __init__(self, script: str | os.PathLike, *, threads: int, timeout: float = 600.0):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONHASHSEED="0")
    # Idle OpenMP threads sleep instead of spinning. On a machine shared with other jobs a
    # spinning torch thread pool loses most of its time to preempted threads (measured
    # 5-15x slower eager steps at load average 5 on 2 cores); the caller's environment wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    self.timeout = timeout
    self._log = tempfile.TemporaryFile(mode="w+")
    self._proc = subprocess.Popen([peer.python(), str(pathlib.Path(script))], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1, env=env)

  def request(self, op: str, **kwargs) -> dict:
    """Sends `{"op": op, **kwargs}` and returns the answer; raises with the peer's log on failure."""
    if self._proc.poll() is not None:
      raise RuntimeError(f"peer worker exited (code {self._proc.returncode}):\n{self._tail()}")
    self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"peer worker died during {op!r}:\n{self._tail()}")
    answer = json.loads(line)
    if not answer.pop("ok", False):
      raise RuntimeError(f"peer worker failed on {op!r}: {answer.get('error')}\n{self._tail()}")
    return answer

  def _tail(self, n: int = 4000) -> str:
    self._log.seek(0)
    return self._log.read()[-n:]

  def close(self) -> None:
    if self._proc.poll() is None:
      try:
        self.request("quit")
      except (RuntimeError, BrokenPipeError, OSError):
        pass
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._proc.kill()
    self._log.close()

  def __enter__(self) -> "PeerWorker":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return str(value)


def print_results(results: dict[str, Any]) -> None:
  """Prints one `name: value` line per entry (the machine-readable summary)."""
  for name, value in results.items():
    print(f"{name}: {format_value(value)}", flush=True)
