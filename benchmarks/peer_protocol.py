"""The JSON-line loop every benchmark peer runs; imported by the `benchmarks/peer_*.py` scripts.

Runs in the peer environment (torch CPU) and never imports jaxml. A peer script
defines its ops (`op(**request) -> dict`) and calls `serve(ops)`; see
`benchmarks.common.PeerWorker` for the caller's side. Every peer answers
`hello` (torch thread count and package versions) and `matmul_peak`, which
`serve` adds unless the script defines its own.
"""
import importlib
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch


def op_hello(threads: int, packages: tuple[str, ...] = ()) -> dict:
  """Sets torch's thread count; returns it, the versions of torch and `packages`, and the
  instruction set torch's CPU kernels dispatch to (e.g. AVX512) and whether oneDNN is built in."""
  torch.set_num_threads(threads)
  versions = {name: importlib.import_module(name).__version__ for name in packages}
  return {"torch": torch.__version__, **versions, "threads": torch.get_num_threads(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "mkldnn": bool(torch.backends.mkldnn.is_available())}


def matmul_seconds(m: int, k: int, n: int, repeats: int, dtype: str = "float32") -> float:
  """Median seconds of one `[m, k] @ [k, n]` product in `dtype` (after one warm-up)."""
  a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
  a @ b
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def op_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
  """FLOP/s of one `n x n` matmul in `dtype` ("float32" or "bfloat16"), the median of `repeats`."""
  return {"flops": 2.0 * n**3 / matmul_seconds(n, n, n, repeats, dtype)}


def timed_steps(loss_fn: Callable[[], "torch.Tensor"], opt: "torch.optim.Optimizer", steps: int) -> dict:
  """`steps` full training steps (`loss_fn()`, backward, `opt.step()`, zeroed gradients).

  Returns `{"times": seconds of each step, "cpu_times": this process's CPU
  seconds in each step (all its threads), "losses": each step's loss}`.
  """
  times, cpu_times, losses = [], [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    losses.append(float(loss))
  return {"times": times, "cpu_times": cpu_times, "losses": losses}


def serve(ops: dict[str, Callable[..., dict]], *, packages: tuple[str, ...] = ()) -> int:
  """Answers one JSON object per stdin line until `{"op": "quit"}`; returns the exit status.

  Anything the libraries print goes to stderr, so stdout carries only answers:
  `{"ok": true, ...}` or `{"ok": false, "error": text}` (the caller raises with it).
  `packages` are the modules whose versions `hello` reports.
  """
  ops = {"hello": lambda threads: op_hello(threads, packages), "matmul_peak": op_matmul_peak, **ops}
  channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  sys.stdout = sys.stderr
  for line in sys.stdin:
    request = json.loads(line)
    op = request.pop("op")
    if op == "quit":
      channel.write(json.dumps({"ok": True}) + "\n")
      return 0
    try:
      answer = {"ok": True, **ops[op](**request)}
    except Exception as e:  # reported to the caller, which raises with this text.
      answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    channel.write(json.dumps(answer) + "\n")
  return 0
