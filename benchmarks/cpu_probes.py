"""Small XLA:CPU measurements behind the README's notes on what bounds the benchmarks.

    python -m benchmarks.cpu_probes                 # all CPUs this process may use
    python -m benchmarks.cpu_probes --threads=1     # pinned to one core (XLA sizes its pool then)

Each figure is the median over `--repeats` (default 5) calls of a compiled loop, divided by
its trip count (microseconds per iteration):
  * `matmul_us_<M>x<K>x<N>`: `x @ w` (plus a `tanh` to carry the loop) for the
    shapes of a Llama decode step at batch 1 and 8 and of the diffusion score
    MLP's hidden layer at batch 64;
  * `matmul_us_64x128x128_two_halves`: the same batch-64 product as two
    independent batch-32 products in one program (do they run concurrently?);
  * `llama_decode_us_per_token_b<B>`: `jaxml.llama.generate`, 128 greedy tokens
    after an 8-token prompt, on the benchmark's `small` config, prefill included;
  * `diffusion_net_us_per_call_b64`: the 2-D score MLP (hidden 128 x 3) at batch 64;
  * `top_k_us_per_row_n<N>_k<K>`: `jax.lax.top_k` on `[128, N]` rows under `lax.map` (160 chunks),
    per row: the cost the full-ranking benchmark's two `top_k`s pay (N = 250 block maxima, 800 candidates);
    at N = 10,000 also `_blocked` (`recsys.causal.metrics.top_k_blocked`, blocks of 40) and `_kernel`
    (`jaxml.cpu_kernels.top_k`, the ranking functions' default), which return the same ids, over 20 chunks
    read from memory and (`_one_chunk`) over one chunk again and again, held in cache;
  * `top_k_ms_whole` / `top_k_ms_two_in_one_program` / `top_k_ms_two_host_threads`: top-20 of 160 x
    [128, 800], as one call, as two halves inside one jitted program, and as the same program called on
    the two halves from two Python threads (does XLA:CPU overlap them? `recsys.causal.mf_top_k`'s shards);
  * `feature_attention_ms_f<F>_<form>`: forward + backward (`value_and_grad`) of DHEN's feature
    attention on one of `ctr_bench`'s DHEN batch slices (`[512, F, 16]`, 2 heads of 8; F = 27 and 43 are
    its two layers' rows), milliseconds per call, in three forms that agree to float32 rounding:
    `recsys.modules.feature_attention` (`nn.attention_core`'s batched products), `batch_minor` (batch
    as the last axis, scores and outputs as broadcast products summed by XLA's loop fusions) and
    `head_masked` (both heads in one `[2F, 16] x [16, F]` product per example, queries masked to their
    head's channels: twice the multiply-adds, half the products).
`--probes=` chooses groups (`matmul,decode,diffusion,top_k,attention`; default all).
Ends with `name: value` lines.
"""
from __future__ import annotations

import concurrent.futures
import os
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

# The Llama benchmark's module defines the `--threads` and `--repeats` flags used here too.
from benchmarks.llama_bench import bench_configs
from jaxml import cpu_kernels, llama
import jaxml.diffusion as jd
from jaxml.recsys import modules
from jaxml.recsys.causal import metrics
from jaxml.train import hostmem

flags.DEFINE_list("probes", ["matmul", "decode", "diffusion", "top_k", "attention"], "which probe groups to run")
FLAGS = flags.FLAGS


def _per_iter_us(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e6 * statistics.median(times) / iters


def matmul_us(m: int, k: int, n: int, halves: bool = False, iters: int = 1000) -> float:
  x0 = jax.random.normal(jax.random.PRNGKey(0), (m, k))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, n)) / k**0.5

  def body(_, x):
    if halves:
      top, bottom = jnp.split(x, 2)
      y = jnp.concatenate([top @ w, bottom @ w])
    else:
      y = x @ w
    return jnp.tanh(y[:, :k])

  return _per_iter_us(jax.jit(lambda x: jax.lax.fori_loop(0, iters, body, x)), (x0,), iters)


def llama_decode_us(batch: int, new_tokens: int = 128) -> float:
  cfg = bench_configs()["small"]
  params = llama.init(jax.random.PRNGKey(0), cfg)
  prompts = [list(range(1, 9)) for _ in range(batch)]
  return _per_iter_us(lambda: llama.generate(params, cfg, prompts, new_tokens), (), new_tokens)


def diffusion_net_us(batch: int = 64, iters: int = 1000) -> float:
  cfg = jd.ScoreMLPConfig(data_dim=2, hidden=128, depth=3)
  params = jd.mlp_init(jax.random.PRNGKey(0), cfg)

  def body(i, x):
    t = jnp.full((batch,), 1.0 - i / iters)
    return x - 1e-3 * jd.mlp_apply(params, x, t, cfg)

  x0 = jax.random.normal(jax.random.PRNGKey(1), (batch, 2))
  return _per_iter_us(jax.jit(lambda x: jax.lax.fori_loop(0, iters, body, x)), (x0,), iters)


def _median_ms(fn, repeats: int = 8) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


TOP_K_FORMS = {
    "": lambda s, k: jax.lax.top_k(s, k),
    "_blocked": lambda s, k: metrics.top_k_blocked(s, k, metrics.auto_block(s.shape[-1], k) or s.shape[-1]),
    "_kernel": lambda s, k: cpu_kernels.top_k(s, k),
}


def top_k_us_per_row(n: int, k: int, chunks: int = 160, form: str = "") -> float:
  x = jax.random.normal(jax.random.PRNGKey(0), (chunks, 128, n))
  f = jax.jit(lambda x: jax.lax.map(lambda s: TOP_K_FORMS[form](s, k)[1], x))
  return _median_ms(lambda: f(x), repeats=8 if chunks > 1 else 60) * 1e3 / (chunks * 128)


def top_k_overlap(chunks: int = 160) -> dict[str, float]:
  x = jax.random.normal(jax.random.PRNGKey(0), (chunks, 128, 800))
  one = jax.jit(lambda x: jax.lax.map(lambda s: jax.lax.top_k(s, 20)[1], x))
  two = jax.jit(lambda x: jax.lax.map(lambda s: jnp.concatenate([jax.lax.top_k(s[:64], 20)[1],
                                                                 jax.lax.top_k(s[64:], 20)[1]]), x))
  halves = (x[:chunks // 2], x[chunks // 2:])
  jax.block_until_ready([one(h) for h in halves])

  def threads():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      return list(pool.map(lambda h: jax.block_until_ready(one(h)), halves))

  return {"top_k_ms_whole": _median_ms(lambda: one(x)), "top_k_ms_two_in_one_program": _median_ms(lambda: two(x)),
          "top_k_ms_two_host_threads": _median_ms(threads)}


def _attention_batch_minor(p, x_BxFxD, n_heads):
  """DHEN's feature attention with the batch as the minor axis: products as broadcasts summed by loop fusions."""
  b, f, d = x_BxFxD.shape
  dh = d // n_heads
  w = jnp.concatenate([p["wq"] / jnp.sqrt(jnp.float32(dh)), p["wk"], p["wv"]], axis=1)
  qkv = jnp.transpose((x_BxFxD.reshape(b * f, d) @ w).reshape(b, f, 3, n_heads, dh), (2, 3, 1, 4, 0))
  q, k, v = qkv[0], qkv[1], qkv[2]  # each [H, F, Dh, B]
  s = jnp.sum(q[:, :, None] * k[:, None], axis=3)  # [H, F, F, B]
  probs = jax.nn.softmax(s, axis=2)
  o = jnp.sum(probs[:, :, :, None] * v[:, None], axis=2)  # [H, F, Dh, B]
  return (jnp.transpose(o, (3, 1, 0, 2)).reshape(b * f, d) @ p["wo"]).reshape(b, f, d)


def _attention_head_masked(p, x_BxFxD, n_heads):
  """DHEN's feature attention with both heads in one product per example (queries masked to their head)."""
  b, f, d = x_BxFxD.shape
  dh = d // n_heads
  w = jnp.concatenate([p["wq"] / jnp.sqrt(jnp.float32(dh)), p["wk"], p["wv"]], axis=1)
  qkv = (x_BxFxD.reshape(b * f, d) @ w).reshape(b, f, 3, d)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  head_HxD = (jnp.arange(d) // dh)[None, :] == jnp.arange(n_heads)[:, None]
  q_masked = (q[:, None] * head_HxD[None, :, None]).reshape(b, n_heads * f, d)
  probs = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q_masked, k), axis=-1)
  o = jnp.einsum("bqk,bkd->bqd", probs, v).reshape(b, n_heads, f, d)
  o = jnp.sum(o * head_HxD[None, :, None], axis=1)  # each channel from its own head
  return (o.reshape(b * f, d) @ p["wo"]).reshape(b, f, d)


def feature_attention_ms(rows: int, batch: int = 512, dim: int = 16, heads: int = 2) -> dict[str, float]:
  params = modules.attention_init(jax.random.PRNGKey(0), dim)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, rows, dim))
  cot = jax.random.normal(jax.random.PRNGKey(2), (batch, rows, dim))
  forms = {"modules": modules.feature_attention, "batch_minor": _attention_batch_minor,
           "head_masked": _attention_head_masked}
  grads = {name: jax.jit(jax.value_and_grad(lambda p, x, fn=fn: jnp.sum(fn(p, x, heads) * cot), argnums=(0, 1)))
           for name, fn in forms.items()}
  ref = grads["modules"](params, x)
  for name, g in grads.items():  # the three forms compute the same function
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(g(params, x))):
      if not jnp.allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(a).max())):
        raise AssertionError(f"feature attention form {name} disagrees with modules.feature_attention")
  return {f"feature_attention_ms_f{rows}_{name}": _median_ms(lambda g=g: g(params, x)) for name, g in grads.items()}


def main(argv):
  del argv
  allowed = sorted(os.sched_getaffinity(0))
  if FLAGS.threads and FLAGS.threads < len(allowed):
    os.sched_setaffinity(0, allowed[:FLAGS.threads])  # before XLA's CPU backend starts
  res = {"threads": len(os.sched_getaffinity(0))}
  unknown = set(FLAGS.probes) - {"matmul", "decode", "diffusion", "top_k", "attention"}
  if unknown:
    raise app.UsageError(f"unknown --probes {sorted(unknown)}")
  if "matmul" in FLAGS.probes:
    for m, k, n in ((1, 128, 768), (8, 128, 128), (8, 128, 768), (64, 128, 128)):
      res[f"matmul_us_{m}x{k}x{n}"] = matmul_us(m, k, n)
    res["matmul_us_64x128x128_two_halves"] = matmul_us(64, 128, 128, halves=True)
  if "decode" in FLAGS.probes:
    for b in (1, 8):
      res[f"llama_decode_us_per_token_b{b}"] = llama_decode_us(b)
  if "diffusion" in FLAGS.probes:
    res["diffusion_net_us_per_call_b64"] = diffusion_net_us()
  if "top_k" in FLAGS.probes:
    for n in (250, 800, 10000):
      res[f"top_k_us_per_row_n{n}_k20"] = top_k_us_per_row(n, 20, chunks=160 if n < 10000 else 20)
    if not cpu_kernels.available():
      raise SystemExit("jaxml.cpu_kernels.top_k is not available here (see the warning above)")
    for form in ("_blocked", "_kernel"):
      res[f"top_k_us_per_row_n10000_k20{form}"] = top_k_us_per_row(10000, 20, chunks=20, form=form)
    for form in ("", "_blocked", "_kernel"):     # one chunk, held in cache as a freshly scored chunk is
      res[f"top_k_us_per_row_n10000_k20{form}_one_chunk"] = top_k_us_per_row(10000, 20, chunks=1, form=form)
    res.update(top_k_overlap())
  if "attention" in FLAGS.probes:
    for rows in (27, 43):
      res.update(feature_attention_ms(rows))
  for name, value in res.items():
    print(f"{name}: {value:.1f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
