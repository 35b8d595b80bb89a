"""Llama 2 throughput: jaxml vs Hugging Face `LlamaForCausalLM` (torch CPU), one run.

    python -m benchmarks.llama_bench               # full, a few minutes on 2 cores
    python -m benchmarks.llama_bench --quick       # smoke run (small config only), about a minute
    python -m benchmarks.llama_bench --repeats=7 --threads=2

Both sides run on the same machine with the same thread count (`--threads`,
default: the CPUs this process may use; XLA sizes its pool from the CPU
affinity, torch gets `torch.set_num_threads`). The Hugging Face side runs in the
peer environment (`benchmarks/peer_hf_llama.py`) as one long-lived process, and
the two sides are measured in alternating rounds so that both see the same
machine load; each side runs about a fixed time budget of calls per round, and
figures are medians over all calls of all rounds.

Measured, on models of identical shapes (random weights, float32):
  * training tokens/s, batch 8 x 128, full step (forward, backward, AdamW):
    jaxml `jit` with donated state vs PyTorch eager (HF's default SDPA
    attention, no torch.compile) + `torch.optim.AdamW`;
    on a ~0.8M-parameter config (`small`) and a ~25M one (`25m`);
  * decode tokens/s, greedy, 128 new tokens after an 8-token prompt, batch 1
    and 8: `jaxml.llama.generate` vs `model.generate(do_sample=False,
    min_new_tokens=128)`; prefill included, compile time reported apart;
  * train MFU: `flops_per_token * tokens/s` over the FLOP/s of a large float32
    matmul measured in the same process (XLA for jaxml, torch for HF).

Ends with `name: value` lines; `train_speedup_vs_hf_eager`, `train_mfu` and the
decode ratios refer to the `small` config. Targets: train >= 1.5x, decode >= 10x.
"""
from __future__ import annotations

import os
import pathlib
import platform
import time

from absl import app, flags
import jax
import numpy as np
import optax

from benchmarks.common import PeerWorker, matmul_peak_flops, median, pin_threads, print_results
from jaxml.llama import LlamaConfig, flops_per_token, init, loss_fn, param_count
from jaxml.llama.generate import generate
from jaxml import train as jt
from jaxml.train import hostmem

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "Alternating jaxml/HF measurement rounds; figures are medians over all of them.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 short rounds, small config only (under a minute).")
flags.DEFINE_integer("threads", None, "CPU threads for both sides (default: CPUs this process may use).")
flags.DEFINE_integer("seed", 0, "Seed for weights, token batches and prompts.")

BATCH, SEQ = 8, 128  # training batch: 8 sequences of 128 predicted tokens.
PROMPT_LEN, NEW_TOKENS = 8, 128  # decode: short prompt, 128 greedy tokens.
TRAIN_TARGET, DECODE_TARGET = 1.5, 10.0  # from the issue: speedups over HF eager / HF generate.


def bench_configs():
  """The two benchmark shapes (jaxml's `LlamaConfig`; the HF side copies them)."""
  return {
      # 799,616 parameters: vocab 768, width 128, 3 layers, 4 heads of 32, FFN 352.
      "small": LlamaConfig(vocab_size=768, dim=128, n_layers=3, n_heads=4, n_kv_heads=4, multiple_of=32,
                           max_seq_len=256, scan_layers=False),
      # 24,648,192 parameters: vocab 4096, width 512, 6 layers, 8 heads of 64, FFN 1536.
      "25m": LlamaConfig(vocab_size=4096, dim=512, n_layers=6, n_heads=8, n_kv_heads=8, multiple_of=256,
                         max_seq_len=256, scan_layers=False),
  }


def hf_config_dict(cfg) -> dict:
  """What `peer_hf_llama.py` needs to build the same shapes in transformers."""
  return {"vocab_size": cfg.vocab_size, "dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "n_layers": cfg.n_layers,
          "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads, "norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}


def make_train_step(cfg, tx):
  """The training core's step (`jaxml.train.make_train_step`: the step's key, grad norm), jitted, donated."""
  step = jt.make_train_step(lambda params, batch, rng: loss_fn(params, batch, cfg), tx)
  return jax.jit(step, donate_argnums=0)


def _count(budget_s: float, one_s: float, most: int) -> int:
  """How many timed calls of `one_s` seconds fit `budget_s` (at least 1, at most `most`)."""
  return max(1, min(most, int(budget_s / max(one_s, 1e-6))))


def bench_train(name, cfg, worker, *, rounds: int, budget_s: float, seed: int) -> dict:
  """Training tokens/s of both sides on `cfg` over `rounds` alternating rounds.

  Each side runs about `budget_s` seconds of steps per round (at least one
  step), so a slow side or a busy machine does not stretch the run.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
  token_list = tokens.tolist()
  batch = {"tokens": jax.device_put(tokens)}
  # torch.optim.AdamW defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every tensor.
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  params = init(jax.random.PRNGKey(seed), cfg)
  state = jt.create_train_state(params, tx, jax.random.PRNGKey(seed))
  step = make_train_step(cfg, tx)
  worker.request("build", name=name, config=hf_config_dict(cfg), seed=seed)

  def run_jax(n):
    nonlocal state
    times = []
    for _ in range(n):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      loss = metrics["loss"].block_until_ready()
      times.append(time.perf_counter() - start)
    return times, float(loss)

  start = time.perf_counter()
  run_jax(1)
  first = time.perf_counter() - start
  jax_one = run_jax(1)[0][0]
  hf_one = worker.request("train", name=name, tokens=token_list, steps=1)["times"][0]  # warm-up
  jax_n, hf_n = _count(budget_s, jax_one, 50), _count(budget_s, hf_one, 50)

  jax_times, hf_times = [], []
  for _ in range(rounds):
    times, loss = run_jax(jax_n)
    jax_times += times
    hf_times += worker.request("train", name=name, tokens=token_list, steps=hf_n)["times"]
  if not np.isfinite(loss):
    raise FloatingPointError(f"jaxml training loss is {loss} on config {name}")
  jax_step, hf_step = median(jax_times), median(hf_times)
  return {"jax_tokens_per_s": BATCH * SEQ / jax_step, "hf_tokens_per_s": BATCH * SEQ / hf_step,
          "compile_s": max(first - jax_step, 0.0), "jax_samples": len(jax_times), "hf_samples": len(hf_times)}


def bench_decode(name, cfg, params, worker, *, batch: int, rounds: int, budget_s: float, seed: int) -> dict:
  """Greedy decode tokens/s (new tokens only) at `batch`; HF model `name` must be built."""
  rng = np.random.default_rng(seed + batch)
  prompts = rng.integers(1, cfg.vocab_size, (batch, PROMPT_LEN)).tolist()

  def run_jax(n):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      out = generate(params, cfg, prompts, NEW_TOKENS)
      times.append(time.perf_counter() - start)
      if any(len(row) != NEW_TOKENS for row in out):
        raise AssertionError(f"jaxml generate returned {[len(r) for r in out]} tokens, expected {NEW_TOKENS}")
    return times

  def run_hf(n):
    answer = worker.request("generate", name=name, prompts=prompts, new_tokens=NEW_TOKENS, repeats=n)
    if answer["new_tokens"] != NEW_TOKENS:
      raise AssertionError(f"HF generate returned {answer['new_tokens']} new tokens, expected {NEW_TOKENS}")
    return answer["times"]

  first = run_jax(1)[0]
  jax_one, hf_one = run_jax(1)[0], run_hf(1)[0]  # HF's first call is a warm-up too.
  jax_n, hf_n = _count(budget_s, jax_one, 20), _count(budget_s, hf_one, 20)
  jax_times, hf_times = [], []
  for _ in range(rounds):
    jax_times += run_jax(jax_n)
    hf_times += run_hf(hf_n)
  jax_s, hf_s = median(jax_times), median(hf_times)
  return {"jax_tokens_per_s": batch * NEW_TOKENS / jax_s, "hf_tokens_per_s": batch * NEW_TOKENS / hf_s,
          "compile_s": max(first - jax_s, 0.0), "jax_samples": len(jax_times), "hf_samples": len(hf_times)}


def main(argv):
  del argv
  cpus = len(os.sched_getaffinity(0))
  threads = pin_threads(FLAGS.threads)  # before JAX's CPU backend starts
  rounds = 2 if FLAGS.quick else FLAGS.repeats
  budget = 0.3 if FLAGS.quick else 1.5  # seconds per side per round (small config and decode).
  configs = bench_configs()
  names = ("small",) if FLAGS.quick else ("small", "25m")
  load_start = os.getloadavg()[0]
  wall_start = time.perf_counter()

  def say(msg):
    print(f"[{time.perf_counter() - wall_start:6.1f}s] {msg}", flush=True)

  script = pathlib.Path(__file__).with_name("peer_hf_llama.py")
  with PeerWorker(script, threads=threads) as worker:
    hello = worker.request("hello", threads=threads)
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}), torch {hello['torch']}, "
        f"transformers {hello['transformers']}; threads {threads} (torch {hello['threads']}); {rounds} rounds; "
        f"load average {load_start:.1f}")
    if load_start > cpus:
      say(f"note: load average {load_start:.1f} > {cpus} CPUs: the machine is shared, timings are noisy "
          f"(medians of interleaved rounds; compare with --threads=1)")

    jax_peak = matmul_peak_flops(2048, repeats=3 if FLAGS.quick else 5)
    torch_peak = worker.request("matmul_peak", n=2048, repeats=3 if FLAGS.quick else 5)["flops"]
    say(f"float32 2048^3 matmul: XLA {jax_peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s")

    train = {}
    for name in names:
      cfg = configs[name]
      train[name] = r = bench_train(name, cfg, worker, rounds=rounds, seed=FLAGS.seed,
                                    budget_s=budget if name == "small" else 2 * budget)
      fpt = flops_per_token(cfg, SEQ)
      r["jax_mfu"] = r["jax_tokens_per_s"] * fpt / jax_peak
      r["hf_mfu"] = r["hf_tokens_per_s"] * fpt / torch_peak
      say(f"train {name} ({param_count(cfg):,} params, {r['jax_samples']}/{r['hf_samples']} steps): "
          f"jaxml {r['jax_tokens_per_s']:.0f} tok/s (MFU {r['jax_mfu']:.1%}, compile {r['compile_s']:.1f}s), "
          f"HF eager {r['hf_tokens_per_s']:.0f} tok/s (MFU {r['hf_mfu']:.1%}): "
          f"{r['jax_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x")

    cfg = configs["small"]
    params = init(jax.random.PRNGKey(FLAGS.seed), cfg)
    decode = {}
    for b in (1, 8):
      decode[b] = r = bench_decode("small", cfg, params, worker, batch=b, rounds=rounds, budget_s=budget,
                                   seed=FLAGS.seed)
      say(f"decode small, batch {b} ({r['jax_samples']}/{r['hf_samples']} runs): jaxml generate "
          f"{r['jax_tokens_per_s']:.0f} tok/s (compile {r['compile_s']:.1f}s), HF generate "
          f"{r['hf_tokens_per_s']:.0f} tok/s: {r['jax_tokens_per_s'] / r['hf_tokens_per_s']:.1f}x")

  s = train["small"]
  res = {"threads": threads, "rounds": rounds, "load_average_start": round(load_start, 2),
         "load_average_end": round(os.getloadavg()[0], 2), "matmul_peak_gflops_xla": jax_peak / 1e9,
         "matmul_peak_gflops_torch": torch_peak / 1e9}
  for name in names:
    suffix = "" if name == "small" else f"_{name}"
    r = train[name]
    res[f"params{suffix or '_small'}"] = param_count(configs[name])
    res[f"jaxml_train_tokens_per_s{suffix}"] = r["jax_tokens_per_s"]
    res[f"hf_train_tokens_per_s{suffix}"] = r["hf_tokens_per_s"]
    res[f"jaxml_train_compile_s{suffix}"] = r["compile_s"]
    res[f"hf_train_mfu{suffix}"] = r["hf_mfu"]
    if suffix:
      res[f"train_mfu{suffix}"] = r["jax_mfu"]
      res[f"train_speedup_vs_hf_eager{suffix}"] = r["jax_tokens_per_s"] / r["hf_tokens_per_s"]
  for b in (1, 8):
    res[f"jaxml_decode_tokens_per_s_b{b}"] = decode[b]["jax_tokens_per_s"]
    res[f"hf_decode_tokens_per_s_b{b}"] = decode[b]["hf_tokens_per_s"]
    res[f"jaxml_decode_compile_s_b{b}"] = decode[b]["compile_s"]
  res["train_mfu"] = s["jax_mfu"]
  res["train_speedup_vs_hf_eager"] = s["jax_tokens_per_s"] / s["hf_tokens_per_s"]
  res["decode_speedup_vs_hf_b1"] = decode[1]["jax_tokens_per_s"] / decode[1]["hf_tokens_per_s"]
  res["decode_speedup_vs_hf_b8"] = decode[8]["jax_tokens_per_s"] / decode[8]["hf_tokens_per_s"]
  met = {"train": res["train_speedup_vs_hf_eager"] >= TRAIN_TARGET,
         "decode_b1": res["decode_speedup_vs_hf_b1"] >= DECODE_TARGET,
         "decode_b8": res["decode_speedup_vs_hf_b8"] >= DECODE_TARGET}
  res["targets_met"] = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in met.items())
  res["benchmark_seconds"] = time.perf_counter() - wall_start
  print_results(res)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
