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

Every path runs in two policy forms (`jaxml.gato.policy` module docstring): re-prefill (the whole
window prefilled every step; the names without a suffix) and incremental (a KV cache carried across
steps, refilled with the last `keep // 2` timesteps on overflow; names ending `_incremental`). The
gymnasium loops reset a finished episode's context (cache); the compiled and gymnax loops do not
need to (only first episodes are counted). `eval_speedup_vs_gymnasium_incremental` is the compiled
incremental evaluation's steps/s over the per-env gymnasium loop's calling the same incremental policy (the
issue's comparison); `eval_speedup_incremental_vs_gymnasium_loop_per_env` is it against the per-env
loop with the re-prefill policy (the earlier baseline).

Each path runs the same number of loop iterations (those the compiled run of its form needed); steps/s counts
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


class _Policy:
  """A batched policy for the gymnasium loops: `fresh(n)`, `step(ctx, obs_B, keys_B)`, `reset(ctx, done_B, fresh)`."""

  def __init__(self, params, cfg, prompt, keep, incremental):
    self.params, self.cfg, self.prompt, self.keep, self.incremental = params, cfg, prompt, keep, incremental
    if incremental:
      self.pol = policy.cached_policy_batch(cfg, LAYOUT, SPEC, policy.default_refill(keep, None), 1.0)
    else:
      self.pol = policy.policy_batch(cfg, LAYOUT, SPEC, 1.0)

  def fresh(self, n):
    if self.incremental:
      return policy.init_cached(self.params, self.cfg, SPEC, self.prompt, n, self.keep)
    return jax.vmap(lambda _: policy.empty_context(SPEC, self.cfg, self.keep))(jnp.arange(n))

  def step(self, ctx, obs, keys):
    if self.incremental:
      return self.pol(self.params, ctx, obs, keys)
    return self.pol(self.params, self.prompt, ctx, obs, keys)

  def reset(self, ctx, done, fresh):
    if self.incremental:
      return policy.reset_cached(ctx, fresh, done)
    return policy.reset_contexts(ctx, done, self.cfg, SPEC, self.keep)


def gymnasium_loop(pol, rng, num_envs, iterations):
  """`iterations` steps of `num_envs` gymnasium CartPole-v1 envs driven by the jitted batched policy."""
  envs = [gymnasium.make("CartPole-v1") for _ in range(num_envs)]
  obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(envs)]).astype(np.float32)
  fresh = pol.fresh(num_envs)
  ctx = fresh
  for _ in range(iterations):
    rng, k_act, _ = jax.random.split(rng, 3)
    action, ctx = pol.step(ctx, jnp.asarray(obs), jax.random.split(k_act, num_envs))
    action = np.asarray(action)
    done = np.zeros(num_envs, bool)
    for i, e in enumerate(envs):
      o, _, term, trunc, _ = e.step(int(action[i]))
      if term or trunc:
        o, _ = e.reset()
        done[i] = True
      obs[i] = o
    if done.any():
      ctx = pol.reset(ctx, jnp.asarray(done), fresh)
  jax.block_until_ready(ctx)
  return iterations


def gymnasium_loop_per_env(pol, rng, num_envs, iterations):
  """As `gymnasium_loop`, but the policy is called once per environment step with a batch of one (as JAT's
  evaluator calls its model for one environment at a time)."""
  envs = [gymnasium.make("CartPole-v1") for _ in range(num_envs)]
  obs = [e.reset(seed=i)[0].astype(np.float32)[None] for i, e in enumerate(envs)]
  empty = pol.fresh(1)
  ctx = [empty] * num_envs
  for _ in range(iterations):
    rng, k_act, _ = jax.random.split(rng, 3)
    keys = jax.random.split(k_act, num_envs)
    for i, e in enumerate(envs):
      action, ctx[i] = pol.step(ctx[i], jnp.asarray(obs[i]), keys[i:i + 1])
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
  res = {"eval_num_envs": n}
  rate = {}
  for inc in (False, True):
    sfx = "_incremental" if inc else ""
    first = policy.evaluate(params, prompt, jax.random.PRNGKey(0), max_steps=500, incremental=inc, **kw)  # compile
    iters = int(first.steps)  # the forms' episodes differ (different contexts): each its own iteration count
    res[f"eval_loop_iterations{sfx}"] = iters
    pol = _Policy(params, cfg, prompt, keep, inc)
    ev = lambda r: policy.evaluate(params, prompt, jax.random.PRNGKey(0), max_steps=iters, incremental=inc,  # noqa
                                   **kw)
    ev(0)                                                                                 # compile (static max_steps)
    policy.python_loop(params, prompt, jax.random.PRNGKey(0), max_steps=2, incremental=inc, **kw)   # compile
    gymnasium_loop(pol, jax.random.PRNGKey(0), n, 2)
    jax.block_until_ready(pol.reset(pol.fresh(n), jnp.zeros((n,), bool), pol.fresh(n)))  # compile the reset
    gymnasium_loop_per_env(pol, jax.random.PRNGKey(0), 2, 2)
    paths = {"compiled": lambda r: jax.block_until_ready(ev(r)),
             "gymnasium_loop": lambda r: gymnasium_loop(pol, jax.random.PRNGKey(r), n, iters),
             "gymnax_python_loop": lambda r: jax.block_until_ready(policy.python_loop(
                 params, prompt, jax.random.PRNGKey(0), max_steps=iters, incremental=inc, **kw)),
             "gymnasium_loop_per_env": lambda r: gymnasium_loop_per_env(pol, jax.random.PRNGKey(r), n, iters)}
    t = {k: [] for k in paths}
    for r in range(FLAGS.repeats):
      for name, fn in paths.items():
        t0 = time.perf_counter()
        fn(r)
        t[name].append(time.perf_counter() - t0)
    for name in paths:
      rate[name + sfx] = n * iters / median(t[name])
      res[f"eval_steps_per_s_{name}{sfx}"] = rate[name + sfx]
    for name in ("gymnasium_loop", "gymnax_python_loop", "gymnasium_loop_per_env"):
      res[f"eval_speedup{sfx}_vs_{name}{sfx}"] = rate["compiled" + sfx] / rate[name + sfx]
  res["eval_speedup_vs_gymnasium_incremental"] = rate["compiled_incremental"] / \
      rate["gymnasium_loop_per_env_incremental"]
  res["eval_speedup_incremental_vs_gymnasium_loop_per_env"] = rate["compiled_incremental"] / \
      rate["gymnasium_loop_per_env"]
  res["eval_incremental_over_reprefill_compiled"] = rate["compiled_incremental"] / rate["compiled"]

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
