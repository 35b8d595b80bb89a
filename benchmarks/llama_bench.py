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

Both sides start from the same random weights: jaxml initialises them and
writes them with `jaxml.llama.to_hf`, the peer loads that folder; the losses
of the first two training steps (before and after one AdamW update) must agree
on both sides (`FIRST_LOSS_RTOL`) or the benchmark stops, so the two sides are
known to compute the same thing.

Measured, on models of identical shapes, in float32 and in bfloat16
(`--precisions`):
  * training tokens/s, batch 8 x 128, full step (forward, backward, AdamW):
    jaxml `jit` with donated state vs PyTorch eager (HF's default SDPA
    attention, no torch.compile) + `torch.optim.AdamW`;
    on a ~0.8M-parameter config (`small`) and a ~25M one (`25m`);
  * decode tokens/s, greedy, 128 new tokens after an 8-token prompt, batch 1
    and 8: `jaxml.llama.generate` vs `model.generate(do_sample=False,
    min_new_tokens=128)`; prefill included, compile time reported apart;
  * train MFU: `flops_per_token * tokens/s` over the FLOP/s of a large float32
    matmul measured in the same process (XLA for jaxml, torch for HF).
  * bfloat16: training keeps float32 weights and computes in bfloat16 on both
    sides (jaxml `LlamaConfig(dtype="bfloat16")`, HF under
    `torch.autocast("cpu", torch.bfloat16)`); decoding casts the weights
    (jaxml `param_dtype="bfloat16"`, HF `model.to(torch.bfloat16)`). Figures
    carry a `_bf16` suffix; MFU is against each side's bfloat16 matmul peak.
  * with `--threads=1`, also each ratio by CPU time (`..._cpu_time`): both
    sides pinned to one core, `time.process_time()` per call; on a machine
    shared with other work this moves far less than wall time.

The machine (CPU model, the vector and matrix features that decide which
kernels either side can use, huge pages, torch's kernel capability) and both
sides' matmul peaks are printed first and recorded in the results.

Ends with `name: value` lines; `train_speedup_vs_hf_eager`, `train_mfu` and the
decode ratios refer to the `small` config in float32. Targets: train >= 1.5x
(0.8M) and >= 1.2x (25m), decode >= 10x.
"""
from __future__ import annotations

import os
import pathlib
import platform
import tempfile
import time

from absl import app, flags
import jax
import numpy as np
import optax

import jax.numpy as jnp

from benchmarks.common import PeerWorker, cpu_description, matmul_peak_flops, median, pin_threads, print_results
from jaxml.llama import LlamaConfig, flops_per_token, init, loss_fn, param_count, to_hf
from jaxml.llama.generate import generate
from jaxml import train as jt
from jaxml.train import hostmem

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "Alternating jaxml/HF measurement rounds; figures are medians over all of them.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 short rounds, small config only (under a minute).")
flags.DEFINE_integer("threads", None, "CPU threads for both sides (default: CPUs this process may use).")
flags.DEFINE_integer("seed", 0, "Seed for weights, token batches and prompts.")
flags.DEFINE_list("precisions", ["float32", "bfloat16"],
                  "float32 and/or bfloat16 (--quick: float32 unless given).")

BATCH, SEQ = 8, 128  # training batch: 8 sequences of 128 predicted tokens.
PROMPT_LEN, NEW_TOKENS = 8, 128  # decode: short prompt, 128 greedy tokens.
TRAIN_TARGET, TRAIN_TARGET_25M, DECODE_TARGET = 1.5, 1.2, 10.0  # speedups over HF eager / HF generate.
# How closely the two sides' losses of the first two steps (same weights, same batch, then one
# AdamW update each) must agree, relative. Random initial weights put every loss near log(vocab):
# two seeds' first losses differ by only 3e-4 (the tiny test config), 5.5e-4 (small) and 3.4e-3
# (25m) relative, so the bounds must sit below that. float32 differs by summation order only
# (2e-7 measured). bfloat16 rounds different intermediates on the two sides: jaxml's bfloat16
# loss is within 1.6e-5 of its float32 one on all three configs, HF autocast's within 7e-6 of
# jaxml's on small.
FIRST_LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-4}


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


def make_train_step(cfg, tx):
  """The training core's step (`jaxml.train.make_train_step`: the step's key, grad norm), jitted, donated."""
  step = jt.make_train_step(lambda params, batch, rng: loss_fn(params, batch, cfg), tx)
  return jax.jit(step, donate_argnums=0)


def _count(budget_s: float, one_s: float, most: int) -> int:
  """How many timed calls of `one_s` seconds fit `budget_s` (at least 1, at most `most`)."""
  return max(1, min(most, int(budget_s / max(one_s, 1e-6))))


def bench_train(name, cfg, worker, folder, *, precision: str, rounds: int, budget_s: float, seed: int) -> dict:
  """Training tokens/s of both sides on `cfg` in `precision` over `rounds` alternating rounds.

  Both sides start from `init(PRNGKey(seed), cfg)`, which `folder` holds in HF
  form; the losses of the first two steps must agree (`FIRST_LOSS_RTOL`). Each side runs
  about `budget_s` seconds of steps per round (at least one step), so a slow
  side or a busy machine does not stretch the run.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
  token_list = tokens.tolist()
  batch = {"tokens": jax.device_put(tokens)}
  run_cfg = cfg if precision == "float32" else cfg.replace(dtype="bfloat16")
  # torch.optim.AdamW defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every tensor.
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  state = jt.create_train_state(init(jax.random.PRNGKey(seed), cfg), tx, jax.random.PRNGKey(seed))
  step = make_train_step(run_cfg, tx)
  key = f"{name}/train/{precision}"
  worker.request("build", name=key, folder=str(folder),
                 precision="float32" if precision == "float32" else "bf16_autocast")

  def run_jax(n):
    nonlocal state
    times, cpu_times = [], []
    for _ in range(n):
      start, cpu_start = time.perf_counter(), time.process_time()
      state, metrics = step(state, batch)
      loss = metrics["loss"].block_until_ready()
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, float(loss)

  start = time.perf_counter()
  _, _, jax_first_loss = run_jax(1)
  first = time.perf_counter() - start
  (jax_one,), _, jax_second_loss = run_jax(1)
  hf_first_loss = worker.request("train", name=key, tokens=token_list, steps=1)["loss"]  # HF's warm-up
  hf_second = worker.request("train", name=key, tokens=token_list, steps=1)
  hf_second_loss, hf_one = hf_second["loss"], hf_second["times"][0]
  rel = max(abs(jax_first_loss - hf_first_loss) / abs(hf_first_loss),
            abs(jax_second_loss - hf_second_loss) / abs(hf_second_loss))
  if not rel <= FIRST_LOSS_RTOL[precision]:
    raise AssertionError(f"first-step losses differ on {name} ({precision}): jaxml {jax_first_loss:.7f} then "
                         f"{jax_second_loss:.7f}, HF {hf_first_loss:.7f} then {hf_second_loss:.7f} (relative "
                         f"{rel:.2e} > {FIRST_LOSS_RTOL[precision]}): the two sides do not compute the same model")
  jax_n, hf_n = _count(budget_s, jax_one, 50), _count(budget_s, hf_one, 50)

  jax_times, hf_times, jax_cpu, hf_cpu = [], [], [], []
  for _ in range(rounds):
    times, cpu_times, loss = run_jax(jax_n)
    jax_times += times
    jax_cpu += cpu_times
    answer = worker.request("train", name=key, tokens=token_list, steps=hf_n)
    hf_times += answer["times"]
    hf_cpu += answer["cpu_times"]
  if not np.isfinite(loss):
    raise FloatingPointError(f"jaxml training loss is {loss} on config {name}")
  jax_step, hf_step = median(jax_times), median(hf_times)
  return {"jax_tokens_per_s": BATCH * SEQ / jax_step, "hf_tokens_per_s": BATCH * SEQ / hf_step,
          "jax_cpu_tokens_per_s": BATCH * SEQ / median(jax_cpu),
          "hf_cpu_tokens_per_s": BATCH * SEQ / median(hf_cpu),
          "compile_s": max(first - jax_step, 0.0), "jax_samples": len(jax_times), "hf_samples": len(hf_times),
          "first_loss_jax": jax_first_loss, "first_loss_hf": hf_first_loss,
          "second_loss_jax": jax_second_loss, "second_loss_hf": hf_second_loss, "first_loss_rel_diff": rel}


def bench_decode(name, cfg, worker, folder, *, batch: int, precision: str, rounds: int, budget_s: float,
                 seed: int) -> dict:
  """Greedy decode tokens/s (new tokens only) at `batch`, both sides from the weights in `folder`.

  bfloat16 decodes with bfloat16 weights on both sides.
  """
  params = init(jax.random.PRNGKey(seed), cfg)
  if precision == "bfloat16":
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  key = f"{name}/decode/{precision}"
  worker.request("build", name=key, folder=str(folder), precision=precision)
  rng = np.random.default_rng(seed + batch)
  prompts = rng.integers(1, cfg.vocab_size, (batch, PROMPT_LEN)).tolist()

  def run_jax(n):
    times, cpu_times = [], []
    for _ in range(n):
      start, cpu_start = time.perf_counter(), time.process_time()
      out = generate(params, cfg, prompts, NEW_TOKENS)
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
      if any(len(row) != NEW_TOKENS for row in out):
        raise AssertionError(f"jaxml generate returned {[len(r) for r in out]} tokens, expected {NEW_TOKENS}")
    return times, cpu_times

  def run_hf(n):
    answer = worker.request("generate", name=key, prompts=prompts, new_tokens=NEW_TOKENS, repeats=n)
    if answer["new_tokens"] != NEW_TOKENS:
      raise AssertionError(f"HF generate returned {answer['new_tokens']} new tokens, expected {NEW_TOKENS}")
    return answer["times"], answer["cpu_times"]

  first = run_jax(1)[0][0]
  jax_one, hf_one = run_jax(1)[0][0], run_hf(1)[0][0]  # HF's first call is a warm-up too.
  jax_n, hf_n = _count(budget_s, jax_one, 20), _count(budget_s, hf_one, 20)
  jax_times, hf_times, jax_cpu, hf_cpu = [], [], [], []
  for _ in range(rounds):
    times, cpu_times = run_jax(jax_n)
    jax_times += times
    jax_cpu += cpu_times
    times, cpu_times = run_hf(hf_n)
    hf_times += times
    hf_cpu += cpu_times
  jax_s, hf_s = median(jax_times), median(hf_times)
  return {"jax_tokens_per_s": batch * NEW_TOKENS / jax_s, "hf_tokens_per_s": batch * NEW_TOKENS / hf_s,
          "jax_cpu_tokens_per_s": batch * NEW_TOKENS / median(jax_cpu),
          "hf_cpu_tokens_per_s": batch * NEW_TOKENS / median(hf_cpu),
          "compile_s": max(first - jax_s, 0.0), "jax_samples": len(jax_times), "hf_samples": len(hf_times)}


def main(argv):
  del argv
  cpus = len(os.sched_getaffinity(0))
  threads = pin_threads(FLAGS.threads)  # before JAX's CPU backend starts
  rounds = 2 if FLAGS.quick else FLAGS.repeats
  budget = 0.3 if FLAGS.quick else 1.5  # seconds per side per round (small config and decode).
  configs = bench_configs()
  names = ("small",) if FLAGS.quick else ("small", "25m")
  quick_default = FLAGS.quick and not FLAGS["precisions"].present
  precisions = ("float32",) if quick_default else tuple(FLAGS.precisions)
  for p in precisions:
    if p not in FIRST_LOSS_RTOL:
      raise app.UsageError(f"--precisions takes float32 and/or bfloat16, got {p!r}")
  load_start = os.getloadavg()[0]
  wall_start = time.perf_counter()
  machine = cpu_description()

  def say(msg):
    print(f"[{time.perf_counter() - wall_start:6.1f}s] {msg}", flush=True)

  def cpu_note(r):
    # One thread per side, both pinned to the same core: CPU time counts only the time each side ran,
    # so on a shared machine it moves far less than wall time (BUILD_NOTES, "Where a CPU training step's
    # time goes"). With more threads it also counts idle pool threads spinning: not reported then.
    if threads != 1:
      return ""
    return (f"; by CPU time: jaxml {r['jax_cpu_tokens_per_s']:.0f}, HF {r['hf_cpu_tokens_per_s']:.0f} tok/s: "
            f"{r['jax_cpu_tokens_per_s'] / r['hf_cpu_tokens_per_s']:.2f}x")

  script = pathlib.Path(__file__).with_name("peer_hf_llama.py")
  with PeerWorker(script, threads=threads) as worker, tempfile.TemporaryDirectory() as tmp:
    hello = worker.request("hello", threads=threads)
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}), torch {hello['torch']}, "
        f"transformers {hello['transformers']}; threads {threads} (torch {hello['threads']}); {rounds} rounds; "
        f"load average {load_start:.1f}")
    say(f"cpu {machine['cpu_model']} ({cpus} usable); features: {machine['cpu_features']}; torch kernels "
        f"{hello['cpu_capability']}, oneDNN {'yes' if hello['mkldnn'] else 'no'}; transparent huge pages "
        f"{machine['transparent_hugepages']}; malloc huge pages {os.environ.get('JAXML_HUGE_PAGES', 'on')}")
    if load_start > cpus:
      say(f"note: load average {load_start:.1f} > {cpus} CPUs: the machine is shared, timings are noisy "
          f"(medians of interleaved rounds; compare with --threads=1)")

    peaks = {}
    for p in precisions:
      reps = 3 if FLAGS.quick else 5
      peaks[p] = (matmul_peak_flops(2048, repeats=reps, dtype=jnp.dtype(p)),
                  worker.request("matmul_peak", n=2048, repeats=reps, dtype=p)["flops"])
      say(f"{p} 2048^3 matmul: XLA {peaks[p][0] / 1e9:.1f} GFLOP/s, torch {peaks[p][1] / 1e9:.1f} GFLOP/s")

    folders = {}
    for name in names:  # the initial weights, in HF form, for the peer
      folders[name] = to_hf(configs[name], init(jax.random.PRNGKey(FLAGS.seed), configs[name]),
                            pathlib.Path(tmp) / name)

    train, decode = {}, {}
    for p in precisions:
      for name in names:
        cfg = configs[name]
        train[p, name] = r = bench_train(name, cfg, worker, folders[name], precision=p, rounds=rounds,
                                         seed=FLAGS.seed, budget_s=budget if name == "small" else 2 * budget)
        fpt = flops_per_token(cfg, SEQ)
        r["jax_mfu"] = r["jax_tokens_per_s"] * fpt / peaks[p][0]
        r["hf_mfu"] = r["hf_tokens_per_s"] * fpt / peaks[p][1]
        say(f"train {name} {p} ({param_count(cfg):,} params, {r['jax_samples']}/{r['hf_samples']} steps; first "
            f"loss {r['first_loss_jax']:.6f} / {r['first_loss_hf']:.6f}): jaxml {r['jax_tokens_per_s']:.0f} tok/s "
            f"(MFU {r['jax_mfu']:.1%}, compile {r['compile_s']:.1f}s), HF eager {r['hf_tokens_per_s']:.0f} tok/s "
            f"(MFU {r['hf_mfu']:.1%}): {r['jax_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x{cpu_note(r)}")
      for b in (1, 8):
        decode[p, b] = r = bench_decode("small", configs["small"], worker, folders["small"], batch=b, precision=p,
                                        rounds=rounds, budget_s=budget, seed=FLAGS.seed)
        say(f"decode small {p}, batch {b} ({r['jax_samples']}/{r['hf_samples']} runs): jaxml generate "
            f"{r['jax_tokens_per_s']:.0f} tok/s (compile {r['compile_s']:.1f}s), HF generate "
            f"{r['hf_tokens_per_s']:.0f} tok/s: {r['jax_tokens_per_s'] / r['hf_tokens_per_s']:.1f}x{cpu_note(r)}")

  res = {"threads": threads, "rounds": rounds, "load_average_start": round(load_start, 2),
         "load_average_end": round(os.getloadavg()[0], 2), "cpu_model": machine["cpu_model"],
         "cpu_features": machine["cpu_features"], "torch_cpu_capability": hello["cpu_capability"]}
  met = {}
  for p in precisions:
    tag = "" if p == "float32" else "_bf16"
    res[f"matmul_peak_gflops_xla{tag}"] = peaks[p][0] / 1e9
    res[f"matmul_peak_gflops_torch{tag}"] = peaks[p][1] / 1e9
    for name in names:
      suffix = ("" if name == "small" else f"_{name}") + tag
      r = train[p, name]
      if not tag:
        res[f"params{'_small' if name == 'small' else '_' + name}"] = param_count(configs[name])
      res[f"jaxml_train_tokens_per_s{suffix}"] = r["jax_tokens_per_s"]
      res[f"hf_train_tokens_per_s{suffix}"] = r["hf_tokens_per_s"]
      res[f"jaxml_train_compile_s{suffix}"] = r["compile_s"]
      res[f"first_loss_rel_diff{suffix}"] = r["first_loss_rel_diff"]
      res[f"hf_train_mfu{suffix}"] = r["hf_mfu"]
      res[f"train_mfu{suffix}"] = r["jax_mfu"]
      res[f"train_speedup_vs_hf_eager{suffix}"] = r["jax_tokens_per_s"] / r["hf_tokens_per_s"]
      if threads == 1:
        res[f"train_speedup_vs_hf_eager_cpu_time{suffix}"] = r["jax_cpu_tokens_per_s"] / r["hf_cpu_tokens_per_s"]
      target = TRAIN_TARGET if name == "small" else TRAIN_TARGET_25M
      met[f"train{suffix}"] = res[f"train_speedup_vs_hf_eager{suffix}"] >= target
    for b in (1, 8):
      res[f"jaxml_decode_tokens_per_s_b{b}{tag}"] = decode[p, b]["jax_tokens_per_s"]
      res[f"hf_decode_tokens_per_s_b{b}{tag}"] = decode[p, b]["hf_tokens_per_s"]
      res[f"jaxml_decode_compile_s_b{b}{tag}"] = decode[p, b]["compile_s"]
      res[f"decode_speedup_vs_hf_b{b}{tag}"] = decode[p, b]["jax_tokens_per_s"] / decode[p, b]["hf_tokens_per_s"]
      if threads == 1:
        res[f"decode_speedup_vs_hf_cpu_time_b{b}{tag}"] = (decode[p, b]["jax_cpu_tokens_per_s"]
                                                           / decode[p, b]["hf_cpu_tokens_per_s"])
      met[f"decode_b{b}{tag}"] = res[f"decode_speedup_vs_hf_b{b}{tag}"] >= DECODE_TARGET
  res["targets_met"] = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in met.items())
  res["benchmark_seconds"] = time.perf_counter() - wall_start
  print_results(res)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
