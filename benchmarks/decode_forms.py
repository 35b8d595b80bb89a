"""The decode step's forms against each other, in one process: an interleaved A/B.

    python -m benchmarks.decode_forms --threads=1            # one pinned core
    python -m benchmarks.decode_forms --rounds=40 --batch=1

`jaxml.llama.generate` of the `llama_bench` `small` config (128 greedy tokens
after an 8-token prompt), compiled once per form, then timed in alternating
rounds (the order reversed every other round) so that every form sees the same
machine load; figures are microseconds per decode step (one new token of every row), by CPU time
(`time.process_time`) and by wall time, and each form's per-round ratio to the
first form (median and quartiles):
  * `concat_softmax`: the split-cache attention as it was before: one softmax
    over the past and recent scores joined by a concatenation, then sliced per
    piece (kept here as the reference, not in the library);
  * `per_piece`: `nn.split_cached_attention` as it is: per-piece softmax
    against the common maximum, matrix-vector products for one query row;
  * `per_piece_joined`: the same with `decode_loop(join=True)` (q/k/v and
    w1/w3 as one product each, `llama.join_projections`).
Every form must produce the same tokens as the first, or the benchmark stops.
`--floor` adds `dots_floor`, a lower bound rather than a form: the same 128
steps with only the step's matrix products (the joined projections, the
attention products against a cache of the loop's mean read length, the output
chunks), chained so that none can be skipped, and no norms, rotations,
softmax, sampling or cache writes. Whatever the decode step's other work cost,
a step cannot run faster than that here.
Ends with `name: value` lines.
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from unittest import mock

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

# The Llama benchmark's module defines the `--threads` flag used here too.
from benchmarks.common import pin_threads
from benchmarks.llama_bench import NEW_TOKENS, PROMPT_LEN, bench_configs
from jaxml import llama
from jaxml.nn import layers
from jaxml.train import hostmem

generate_module = importlib.import_module("jaxml.llama.generate")

flags.DEFINE_integer("rounds", 30, "interleaved rounds")
flags.DEFINE_integer("calls", 4, "timed generate calls per form per round")
flags.DEFINE_integer("batch", 8, "decode batch")
flags.DEFINE_bool("floor", True, "also time `dots_floor`, the step's matrix products alone")
FLAGS = flags.FLAGS


def concat_softmax_attention(q_BxTxHxDh, parts):
  """The earlier `split_cached_attention`: one softmax over the concatenated scores of all pieces."""
  _, T, H, _ = q_BxTxHxDh.shape
  K = parts[0][0].shape[1]
  q = layers._queries_heads_major(q_BxTxHxDh, K)
  scores = []
  for k, _, mask in parts:
    mask = layers._mask_heads_major(mask, H // K)
    s = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    scores.append(s if mask is None else jnp.where(mask, s, jnp.finfo(jnp.float32).min))
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out, start = 0.0, 0
  for k, v, _ in parts:
    n = k.shape[2]
    out = out + jnp.einsum("bkms,bkds->bkmd", probs[..., start:start + n].astype(v.dtype), v)
    start += n
  return layers._heads_minor(out, T, H)


# name -> (attention patch or None, join)
FORMS = {
    "concat_softmax": (concat_softmax_attention, False),
    "per_piece": (None, False),
    "per_piece_joined": (None, True),
}


def dots_floor(cfg, B: int):
  """A jitted `(params, ...) -> x` running NEW_TOKENS steps of only the decode step's products.

  Per layer: `[B, D] x [D, 3D]` (joined q/k/v), the scores and the weighted sum against a
  `[B, H, L, Dh]` cache (`L` the loop's mean read length over its segments), `[B, D] x [D, D]`,
  `[B, D] x [D, 2F]` (joined w1/w3), `[B, F] x [F, D]`; then the output products in chunks of
  256 columns, as `decode_loop` runs them on CPU. Each product feeds the next (a slice or a
  sum where the shapes differ), so none is dead code.
  """
  ends = generate_module._segment_ends(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS, generate_module._SEGMENTS,
                                       generate_module._SEGMENT_MIN_LEN)
  reads, start = [], PROMPT_LEN
  for end in ends:
    reads += [end] * (end - start)
    start = end
  L = int(round(sum(reads) / len(reads)))
  H, Dh, D = cfg.n_heads, cfg.head_dim, cfg.dim

  def run(params, x_BxD, k_BxHxLxDh, v_BxHxLxDh):
    def step(_, x):
      for lp in params["layers"]:
        qkv = x @ lp["wqkv"]
        q = qkv[:, :D].reshape(B, H, 1, Dh)
        s = jnp.einsum("bhqd,bhld->bhql", q, k_BxHxLxDh)
        a = jnp.einsum("bhql,bhld->bhqd", s, v_BxHxLxDh).reshape(B, D)
        h = a @ lp["wo"]
        g = h @ lp["w13"]
        x = g[:, :lp["w2"].shape[0]] @ lp["w2"]
      out = [x @ w for w in params["output"]]
      return x + sum(o[:, :1] for o in out) * 1e-30
    return jax.lax.fori_loop(0, NEW_TOKENS, step, x_BxD)

  return jax.jit(run), L


def compile_floor(params, cfg, B: int):
  """`dots_floor` compiled for `params` (joined and split as `decode_loop` holds them), its
  arguments, and the cache length it reads."""
  fn, L = dots_floor(cfg, B)
  p = llama.model.join_projections(llama.model.split_output_columns(llama.model.unstack_layers(params), 256))
  rng = np.random.default_rng(0)
  k, v = (jnp.asarray(rng.normal(size=(B, cfg.n_heads, L, cfg.head_dim)), jnp.float32) for _ in range(2))
  args = (p, jnp.asarray(rng.normal(size=(B, cfg.dim)), jnp.float32), k, v)
  c = fn.lower(*args).compile()
  return c, args, L


def main(argv):
  del argv
  threads = pin_threads(FLAGS.threads)
  cfg = bench_configs()["small"]
  params = llama.init(jax.random.PRNGKey(0), cfg)
  B, S = FLAGS.batch, PROMPT_LEN + NEW_TOKENS
  buf = np.zeros((B, S), np.int32)
  buf[:, :PROMPT_LEN] = np.random.default_rng(0).integers(1, cfg.vocab_size, (B, PROMPT_LEN))
  args = (params, jnp.asarray(buf), jnp.full((B,), PROMPT_LEN, jnp.int32), jax.random.PRNGKey(0))
  raw = generate_module.decode_loop.__wrapped__
  compiled, tokens = {}, {}
  for name, (attention, join) in FORMS.items():
    patch = mock.patch.object(layers, "split_cached_attention", attention) if attention else contextlib.nullcontext()
    with patch:
      fn = jax.jit(lambda p, t, n, r, join=join: raw(p, t, n, r, cfg=cfg, min_prompt_len=PROMPT_LEN,
                                                     max_new_tokens=NEW_TOKENS, with_logprobs=False, join=join))
      compiled[name] = fn.lower(*args).compile()  # traced under the patch
    tokens[name] = np.asarray(compiled[name](*args)[0])
    if not (tokens[name] == tokens["concat_softmax"]).all():
      raise SystemExit(f"{name} generated other tokens than concat_softmax")
  names = list(FORMS)
  calls_args = {name: (compiled[name], args) for name in names}
  if FLAGS.floor:
    c, floor_args, L = compile_floor(params, cfg, B)
    calls_args["dots_floor"] = (c, floor_args)
    names.append("dots_floor")
    print(f"dots_floor: the products alone, attention against {L} cached positions")
  cpu = {n: [] for n in names}
  wall = {n: [] for n in names}
  for r in range(FLAGS.rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      c, a = calls_args[name]
      jax.block_until_ready(c(*a))
      t0, w0 = time.process_time(), time.perf_counter()
      for _ in range(FLAGS.calls):
        jax.block_until_ready(c(*a))
      per = FLAGS.calls * NEW_TOKENS / 1e6
      cpu[name].append((time.process_time() - t0) / per)
      wall[name].append((time.perf_counter() - w0) / per)
  print(f"threads {threads}, batch {B}, {FLAGS.rounds} rounds x {FLAGS.calls} calls")
  out = {"threads": threads, "batch": B}
  for kind, t in (("cpu", cpu), ("wall", wall)):
    for name in names:
      ratio = np.array(t[name]) / np.array(t[names[0]])
      q1, q3 = np.percentile(ratio, [25, 75])
      print(f"  {kind} {name}: {statistics.median(t[name]):.1f} us per step (one new token per row), ratio to {names[0]} "
            f"{np.median(ratio):.3f} [{q1:.3f}-{q3:.3f}]")
      out[f"{kind}_us_per_step_{name}"] = statistics.median(t[name])
      out[f"{kind}_ratio_{name}"] = float(np.median(ratio))
  for name, value in out.items():
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
