"""One-thread float32 GEMM rates on the 24.6M Llama step's shapes: XLA:CPU against torch.

    python -m benchmarks.gemm_shapes [--repeats=15]

For each projection of the `llama_bench` 25m config at 1,024 tokens (q/o `[512, 512]`, w1/w3
`[512, 1536]`, w2 `[1536, 512]`, the output `[512, 4096]`, and the joined q/k/v `[512, 1536]` and
w1/w3 `[512, 3072]`): the forward product, the input gradient (`dy @ w^T`) and the weight gradient
(`x^T @ dy`). Each side runs in its own process pinned to one core (XLA in this environment, torch in
the peer environment, one thread each) and times every product by `time.process_time()`, median of
`--repeats` calls. This is the measurement behind BUILD_NOTES' "A second machine": where the two
libraries are level on these shapes, the training ratio is set by each side's fraction of its peak.
Ends with `name: value` lines: `<xla|torch>_gflops_<shape>` and `xla_over_torch_<shape>`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

TOKENS = 1024
SHAPES = []
for _name, _k, _n in (("q", 512, 512), ("w1", 512, 1536), ("w2", 1536, 512), ("out", 512, 4096),
                      ("qkv", 512, 1536), ("w13", 512, 3072)):
  SHAPES += [(f"{_name}_fwd", TOKENS, _k, _n, "NN"), (f"{_name}_dx", TOKENS, _n, _k, "NT"),
             (f"{_name}_dw", _k, TOKENS, _n, "TN")]


def _rates(side: str, repeats: int) -> dict:
  """GFLOP/s of every shape on `side` ("xla" or "torch"), in this (pinned) process."""
  out = {}
  if side == "xla":
    import jax  # pylint: disable=import-outside-toplevel
    products = {"NN": lambda a, b: a @ b, "NT": lambda a, b: a @ b.T, "TN": lambda a, b: a.T @ b}
    for name, m, k, n, lay in SHAPES:
      a_shape = (k, m) if lay == "TN" else (m, k)
      b_shape = (n, k) if lay == "NT" else (k, n)
      a = jax.random.normal(jax.random.PRNGKey(0), a_shape)
      b = jax.random.normal(jax.random.PRNGKey(1), b_shape)
      f = jax.jit(products[lay])
      f(a, b).block_until_ready()
      times = []
      for _ in range(repeats):
        start = time.process_time()
        f(a, b).block_until_ready()
        times.append(time.process_time() - start)
      out[name] = 2 * m * k * n / statistics.median(times) / 1e9
  else:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(1)
    products = {"NN": lambda a, b: a @ b, "NT": lambda a, b: a @ b.t(), "TN": lambda a, b: a.t() @ b}
    for name, m, k, n, lay in SHAPES:
      a = torch.randn((k, m) if lay == "TN" else (m, k))
      b = torch.randn((n, k) if lay == "NT" else (k, n))
      products[lay](a, b)
      times = []
      for _ in range(repeats):
        start = time.process_time()
        products[lay](a, b)
        times.append(time.process_time() - start)
      out[name] = 2 * m * k * n / statistics.median(times) / 1e9
  return out


def main(argv: list[str]) -> int:
  args = dict(a.lstrip("-").split("=", 1) for a in argv if "=" in a)
  repeats = args.get("repeats", "15")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import peer  # pylint: disable=import-outside-toplevel
  cpu = str(min(os.sched_getaffinity(0)))
  env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
  res = {}
  for side, python in (("xla", sys.executable), ("torch", peer.python())):
    proc = subprocess.run([python, os.path.abspath(__file__), "--child", side, cpu, repeats], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise SystemExit(f"{side} side failed:\n{proc.stderr[-3000:]}")
    res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
  for side in ("xla", "torch"):
    for name, rate in res[side].items():
      print(f"{side}_gflops_{name}: {rate:.1f}")
  for name in res["xla"]:
    print(f"xla_over_torch_{name}: {res['xla'][name] / res['torch'][name]:.2f}")
  return 0


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    os.sched_setaffinity(0, {int(sys.argv[3])})
    print(json.dumps(_rates(sys.argv[2], int(sys.argv[4]))))
    sys.exit(0)
  sys.exit(main(sys.argv[1:]))
