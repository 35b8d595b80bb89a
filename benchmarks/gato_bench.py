"""Gato: evaluation throughput (environment steps/s with the policy acting) and training tokens/s and MFU.

  python -m benchmarks.gato_bench [--num_envs=64] [--repeats=3]

Evaluation, CartPole-v1, `num_envs` parallel episodes, the same jaxml policy (a `tiny`-shaped Gato,
random weights: episodes of a few dozen steps, the loop stops when every episode ended):

  compiled        `jaxml.gato.policy.evaluate`: policy and gymnax environment inside one `lax.while_loop`
  gymnasium loop  Python steps gymnasium's CartPole-v1 (one `gymnasium.make` env per episode, as JAT's
                  evaluator runs) and calls the jitted batched policy (`policy.policy_batch`) once per step
  gymnax loop     `policy.python_loop`: the gymnax environment, one jitted policy call and one jitted
                  environment step per step from Python
  per-env loop    the gymnasium loop with the policy called for one environment at a time (batch 1), as
                  JAT's evaluator calls its model

Each path runs the same number of loop iterations (those the compiled run needed); steps/s counts
`num_envs` environment steps per iteration; medians of `repeats`, the paths interleaved per round.
Training: the masked next-token step (`jaxml.train.make_train_step` on `model.loss_fn`), tokens/s and
MFU against the measured matmul peak (`benchmarks.common`). Ends with `name: value` lines.
"""
from __future__ import annotations

import time

import gymnasium
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import matmul_peak_flops, median, print_results
from jaxml import train as jt
from jaxml.gato import model, policy
from jaxml.gato import sequence as sq
from jaxml.gato.tokens import TokenLayout
from jaxml.train import hostmem

flags.DEFINE_integer("num_envs", 64, "parallel episodes")
flags.DEFINE_integer("repeats", 3, "timed repeats (median)")
flags.DEFINE_integer("keep", 8, "earlier timesteps in the policy's context")
flags.DEFINE_integer("train_batch", 16, "training sequences per step")
flags.DEFINE_integer("train_len", 256, "training sequence length")
FLAGS = flags.FLAGS

LAYOUT = TokenLayout(text_vocab=259, discrete_vocab=8)
SPEC = sq.TaskSpec.create("CartPole-v1", sq.Field("continuous", (4,)), sq.Field("discrete", (), num_values=2))


def gymnasium_loop(params, cfg, prompt, rng, num_envs, keep, iterations):
  """`iterations` steps of `num_envs` gymnasium CartPole-v1 envs driven by the jitted batched policy."""
  envs = [gymnasium.make("CartPole-v1") for _ in range(num_envs)]
  obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(envs)]).astype(np.float32)
  pol = policy.policy_batch(cfg, LAYOUT, SPEC, 1.0)
  ctx = jax.vmap(lambda _: policy.empty_context(SPEC, cfg, keep))(jnp.arange(num_envs))
  for _ in range(iterations):
    rng, k_act, _ = jax.random.split(rng, 3)
    action, ctx = pol(params, prompt, ctx, jnp.asarray(obs), jax.random.split(k_act, num_envs))
    action = np.asarray(action)
    done = np.zeros(num_envs, bool)
    for i, e in enumerate(envs):
      o, _, term, trunc, _ = e.step(int(action[i]))
      if term or trunc:
        o, _ = e.reset()
        done[i] = True
      obs[i] = o
    ctx = policy.reset_contexts(ctx, jnp.asarray(done), cfg, SPEC, keep)
  jax.block_until_ready(ctx)
  return iterations


def gymnasium_loop_per_env(params, cfg, prompt, rng, num_envs, keep, iterations):
  """As `gymnasium_loop`, but the policy is called once per environment step with a batch of one (as JAT's
  evaluator calls its model for one environment at a time)."""
  envs = [gymnasium.make("CartPole-v1") for _ in range(num_envs)]
  obs = [e.reset(seed=i)[0].astype(np.float32)[None] for i, e in enumerate(envs)]
  pol = policy.policy_batch(cfg, LAYOUT, SPEC, 1.0)
  empty = jax.vmap(lambda _: policy.empty_context(SPEC, cfg, keep))(jnp.arange(1))
  ctx = [empty] * num_envs
  for _ in range(iterations):
    rng, k_act, _ = jax.random.split(rng, 3)
    keys = jax.random.split(k_act, num_envs)
    for i, e in enumerate(envs):
      action, ctx[i] = pol(params, prompt, ctx[i], jnp.asarray(obs[i]), keys[i:i + 1])
      o, _, term, trunc, _ = e.step(int(action[0]))
      if term or trunc:
        o, _ = e.reset()
        ctx[i] = empty
      obs[i] = o.astype(np.float32)[None]
  jax.block_until_ready(ctx)
  return iterations


def train_speed(cfg, batch, length, repeats):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 259, (batch, length)).astype(np.int32)
  toks = sq.Tokens(ids=jnp.asarray(ids), patches=jnp.zeros((batch, length, cfg.patch_dim)),
                   is_patch=jnp.zeros((batch, length), bool), local_pos=jnp.full((batch, length), -1, jnp.int32),
                   rows=jnp.zeros((batch, length, 2), jnp.int32), cols=jnp.zeros((batch, length, 2), jnp.int32),
                   loss_mask=jnp.ones((batch, length), bool))
  tx, _ = jt.make_optimizer(1e-3, total_steps=100)
  state, _ = jt.init_train_state(lambda r: model.init(r, cfg), tx, jax.random.PRNGKey(0))
  step = jax.jit(jt.make_train_step(lambda p, b, r: model.loss_fn(p, b, cfg, r), tx), donate_argnums=0)
  state, m = step(state, toks)
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(3):
      state, m = step(state, toks)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t0) / 3)
  return median(times)


def main(_):
  t_start = time.perf_counter()
  n, keep = FLAGS.num_envs, FLAGS.keep
  cfg = model.preset("tiny", vocab_size=LAYOUT.vocab_size)
  params = model.init(jax.random.PRNGKey(0), cfg)
  env, env_params = gymnax.make("CartPole-v1")
  prompt = sq.Tokens(*(jnp.asarray(x) for x in sq.empty_tokens(0, cfg.patch_dim)))
  kw = dict(cfg=cfg, layout=LAYOUT, spec=SPEC, env=env, env_params=env_params, num_envs=n, keep=keep)
  first = policy.evaluate(params, prompt, jax.random.PRNGKey(0), max_steps=500, **kw)   # compile
  iters = int(first.steps)
  policy.evaluate(params, prompt, jax.random.PRNGKey(0), max_steps=iters, **kw)        # compile (max_steps is static)
  policy.python_loop(params, prompt, jax.random.PRNGKey(0), max_steps=2, **kw)          # compile
  gymnasium_loop(params, cfg, prompt, jax.random.PRNGKey(0), n, keep, 2)
  gymnasium_loop_per_env(params, cfg, prompt, jax.random.PRNGKey(0), 2, keep, 2)
  t_c, t_g, t_x, t_1 = [], [], [], []
  for r in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(policy.evaluate(params, prompt, jax.random.PRNGKey(0), max_steps=iters, **kw))
    t_c.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gymnasium_loop(params, cfg, prompt, jax.random.PRNGKey(r), n, keep, iters)
    t_g.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(policy.python_loop(params, prompt, jax.random.PRNGKey(0), max_steps=iters, **kw))
    t_x.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gymnasium_loop_per_env(params, cfg, prompt, jax.random.PRNGKey(r), n, keep, iters)
    t_1.append(time.perf_counter() - t0)
  steps = n * iters
  res = {"eval_num_envs": n, "eval_loop_iterations": iters,
         "eval_steps_per_s_compiled": steps / median(t_c),
         "eval_steps_per_s_gymnasium_loop": steps / median(t_g),
         "eval_steps_per_s_gymnax_python_loop": steps / median(t_x),
         "eval_steps_per_s_gymnasium_loop_per_env": steps / median(t_1)}
  res["eval_speedup_vs_gymnasium_loop"] = median(t_g) / median(t_c)
  res["eval_speedup_vs_gymnax_python_loop"] = median(t_x) / median(t_c)
  res["eval_speedup_vs_gymnasium_loop_per_env"] = median(t_1) / median(t_c)

  peak = matmul_peak_flops()
  for name in ("tiny", "small"):
    c = model.preset(name, vocab_size=LAYOUT.vocab_size, max_seq_len=FLAGS.train_len)
    sec = train_speed(c, FLAGS.train_batch, FLAGS.train_len, FLAGS.repeats)
    tokens = FLAGS.train_batch * FLAGS.train_len
    res[f"train_tokens_per_s_{name}"] = tokens / sec
    res[f"train_mfu_{name}"] = model.flops_per_token(c, FLAGS.train_len) * tokens / sec / peak
    res[f"params_{name}"] = model.param_count(c)
  res["matmul_peak_gflops"] = peak / 1e9
  res["wall_s"] = time.perf_counter() - t_start
  print_results(res)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
