"""Acting with a Gato policy: one action (`act`), and whole episodes in one compiled loop (`evaluate`).

Deployment (Reed et al. 2022, Sec. 2.3): the context is [prompt] [earlier timesteps] [observation]
[separator]; the action's tokens are sampled one at a time, each restricted to the task's valid
action ids and fed back through the KV cache, then detokenized and sent to the environment.

The context is a fixed-length window of `W = P + K * S` positions (prompt of P tokens, K
timesteps of S tokens): the current timestep sits right after the `n < K` earlier timesteps of
the episode that are kept (the most recent ones), later slots are padding that causal
attention never reads. The whole window is prefilled into a KV cache of W slots and the
action tokens are written at the slots after the separator, so each environment of a batch
has its own context length (the per-environment function is vmapped).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.gato import sequence as sq
from jaxml.gato.model import GatoConfig, Params, embed, head
from jaxml.gato.tokens import TokenLayout
from jaxml.llama.generate import sample_logits
from jaxml.llama import model as llama


def _sample(rng, logits_V, valid_V, temperature):
  """One id among the valid ones: `jaxml.llama.generate.sample_logits` over the logits with the others masked."""
  logits = jnp.where(valid_V, logits_V.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  return sample_logits(rng, logits[None], temperature=temperature)[0]


def act_window(params: Params, cfg: GatoConfig, layout: TokenLayout, spec: sq.TaskSpec, window: sq.Tokens,
               length: jax.Array, rng: jax.Array, temperature: float = 1.0) -> jax.Array:
  """The action ids `[A]` after the first `length` positions of a `[W]` window (no batch axis; jit-able).

  The window is prefilled into a cache of `W` slots; the logits at `length - 1` give the first
  action token, written back at slot `length`, and so on. `length + A <= W` is the caller's duty.
  """
  lcfg = cfg.llama()
  valid = jnp.asarray(sq.valid_action_ids(spec, layout))
  w = window.length
  cache = llama.init_cache(lcfg, 1, w)
  batch = sq.Tokens(*(x[None] for x in window))
  images = any(f.kind == "image" for _, f in spec.fields)
  h, cache = llama.decoder(params["decoder"], embed(params, batch, cfg, with_patches=images), lcfg, cache=cache,
                           cache_index=0)
  h_last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)
  keys = jax.random.split(rng, spec.action_len)
  ids = []
  for i in range(spec.action_len):
    tok = _sample(keys[i], head(params, h_last, cfg)[0, 0], valid, temperature)
    ids.append(tok)
    if i + 1 < spec.action_len:
      one = sq.Tokens(*(x[None] for x in sq.empty_tokens(1, cfg.patch_dim, jnp)))._replace(ids=tok.reshape(1, 1))
      h_last, cache = llama.decoder(params["decoder"], embed(params, one, cfg, with_patches=False), lcfg, cache=cache,
                                    cache_index=length + i)
  return jnp.stack(ids)


def _current_timestep(spec, layout, cfg, observation):
  pd = cfg.patch_dim
  obs = sq.observation_tokens(spec, layout, observation, patch_size=cfg.patch_size, channels=cfg.image_channels)
  pad = sq.empty_tokens(spec.action_len, pd, jnp)._replace(loss_mask=jnp.ones((spec.action_len,), bool))
  return sq.concat([obs, sq.separator_tokens(layout, pd), pad], jnp)


def act(params: Params, cfg: GatoConfig, layout: TokenLayout, prompt_tokens: sq.Tokens | None, observation: Any,
        rng: jax.Array, *, spec: sq.TaskSpec, temperature: float = 1.0) -> jax.Array:
  """One action for `observation` after the context `prompt_tokens` (a demonstration and/or earlier timesteps).

  Args:
    params: the policy (`jaxml.gato.model.init`).
    cfg: its config.
    layout: the token layout the policy was trained with.
    prompt_tokens: a `[P]` `Tokens` record (no batch axis), or None for no context.
    observation: the task's observation structure.
    rng: the sampling key (one per action token is split from it).
    spec: the task.
    temperature: 0 takes the argmax over the valid ids.

  Returns:
    the action, shaped `spec.action.shape` (int32 for discrete actions, float32 in [low, high] otherwise).

  Raises:
    ValueError/TypeError: naming `observation`, `layout` or `prompt_tokens`, before compute.
  """
  sq.check_layout(layout, spec)
  if layout.vocab_size != cfg.vocab_size:
    raise ValueError(f"layout.vocab_size={layout.vocab_size} differs from cfg.vocab_size={cfg.vocab_size}")
  sq.check_observation(spec, observation)
  if prompt_tokens is None:
    prompt_tokens = sq.empty_tokens(0, cfg.patch_dim)
  if not isinstance(prompt_tokens, sq.Tokens) or np.ndim(prompt_tokens.ids) != 1:
    raise ValueError("prompt_tokens must be a Tokens record without a batch axis (or None)")
  cur = _current_timestep(spec, layout, cfg, observation)
  window = sq.concat([sq.Tokens(*(jnp.asarray(x) for x in prompt_tokens)), cur], jnp)
  if window.length > cfg.max_seq_len:
    raise ValueError(f"prompt_tokens ({prompt_tokens.length}) plus one timestep ({cur.length}) exceed "
                     f"max_seq_len={cfg.max_seq_len}")
  length = prompt_tokens.length + cur.length - spec.action_len
  ids = _act_jit(params, cfg, layout, spec, window, jnp.int32(length), rng, float(temperature))
  return sq.action_from_ids(spec, layout, ids)


_act_jit = jax.jit(act_window, static_argnums=(1, 2, 3, 7))


class Context(NamedTuple):
  """The per-environment context of `evaluate`: the kept timesteps `[K * S]` and how many are real."""
  history: sq.Tokens
  count: jax.Array


def window_of(prompt: sq.Tokens, ctx: Context, current: sq.Tokens, step_len: int) -> tuple[sq.Tokens, jax.Array]:
  """`[P + (K + 1) * S]` window: prompt, history, then `current` written after the `count` real timesteps;
  and the context length up to the current separator."""
  base = sq.concat([prompt, ctx.history, sq.empty_tokens(step_len, prompt.patches.shape[-1], jnp)], jnp)
  at = prompt.length + ctx.count * step_len
  window = sq.Tokens(*(jax.lax.dynamic_update_slice_in_dim(b, c, at, axis=0) for b, c in zip(base, current)))
  return window, at


def push(ctx: Context, step: sq.Tokens, step_len: int) -> Context:
  """Appends a finished timestep, dropping the oldest when all K slots are used."""
  k = ctx.history.length // step_len
  full = ctx.count >= k
  rolled = sq.Tokens(*(jnp.where(full, jnp.roll(h, -step_len, axis=0), h) for h in ctx.history))
  at = jnp.minimum(ctx.count, k - 1) * step_len
  hist = sq.Tokens(*(jax.lax.dynamic_update_slice_in_dim(h, s, at, axis=0) for h, s in zip(rolled, step)))
  return Context(hist, jnp.minimum(ctx.count + 1, k))


def empty_context(spec: sq.TaskSpec, cfg: GatoConfig, keep: int) -> Context:
  s = sq.timestep_len(spec, cfg.patch_size)
  return Context(sq.empty_tokens(keep * s, cfg.patch_dim, jnp), jnp.int32(0))


def policy_step(params: Params, cfg: GatoConfig, layout: TokenLayout, spec: sq.TaskSpec, prompt: sq.Tokens,
                ctx: Context, observation: Any, rng: jax.Array, temperature: float) -> tuple[jax.Array, Context]:
  """One environment's action and its context with this timestep appended (jit-able, vmappable)."""
  s = sq.timestep_len(spec, cfg.patch_size)
  cur = _current_timestep(spec, layout, cfg, observation)
  window, at = window_of(prompt, ctx, cur, s)
  length = at + s - spec.action_len
  ids = act_window(params, cfg, layout, spec, window, length, rng, temperature)
  done_step = cur._replace(ids=cur.ids.at[s - spec.action_len:].set(ids))
  return sq.action_from_ids(spec, layout, ids), push(ctx, done_step, s)


class EvalResult(NamedTuple):
  returns: jax.Array  # [B] undiscounted return of each environment's first episode
  lengths: jax.Array  # [B] its length in steps
  steps: jax.Array  # loop iterations run (every environment steps each iteration)


def _split(rng, n):
  rng, k_act, k_env = jax.random.split(rng, 3)
  return rng, jax.random.split(k_act, n), jax.random.split(k_env, n)


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "spec", "env", "num_envs", "keep", "max_steps",
                                             "temperature"))
def evaluate(params: Params, prompt: sq.Tokens, rng: jax.Array, *, cfg: GatoConfig, layout: TokenLayout,
             spec: sq.TaskSpec, env: Any, env_params: Any, num_envs: int, keep: int, max_steps: int,
             temperature: float = 1.0) -> EvalResult:
  """Runs `num_envs` environments for one whole episode each inside one `jax.lax.while_loop`.

  Args:
    params, cfg, layout: the policy.
    prompt: `[P]` tokens every environment's context starts with (a demonstration; length 0 for none).
    rng: the key; each iteration splits (act keys, env keys) as `python_loop` does.
    spec: the task; `env`, `env_params`: its gymnax environment.
    num_envs: B; keep: timesteps of history kept (K); max_steps: the loop's bound.
    temperature: 0 is greedy.

  Returns:
    `EvalResult`; the loop stops when every environment finished its first episode.
  """
  rng, k_reset = jax.random.split(rng)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), env_params)
  ctx = jax.vmap(lambda _: empty_context(spec, cfg, keep))(jnp.arange(num_envs))
  step_fn = jax.vmap(lambda c, o, k: policy_step(params, cfg, layout, spec, prompt, c, o, k, temperature))
  zeros = jnp.zeros((num_envs,), jnp.float32)

  def cond(carry):
    t, *_, alive = carry
    return (t < max_steps) & alive.any()

  def body(carry):
    t, rng, obs, state, ctx, ret, length, alive = carry
    rng, k_act, k_env = _split(rng, num_envs)
    action, new_ctx = step_fn(ctx, obs, k_act)
    obs, state, reward, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(k_env, state, action, env_params)
    ret = ret + jnp.where(alive, reward, 0.0)
    length = length + alive.astype(jnp.int32)
    done = term | trunc
    new_ctx = jax.vmap(lambda c, d: jax.tree.map(lambda a, b: jnp.where(d, a, b), empty_context(spec, cfg, keep), c))(
        new_ctx, done)
    return t + 1, rng, obs, state, new_ctx, ret, length, alive & ~done

  init = (jnp.int32(0), rng, obs, state, ctx, zeros, jnp.zeros((num_envs,), jnp.int32), jnp.ones((num_envs,), bool))
  t, _, _, _, _, ret, length, _ = jax.lax.while_loop(cond, body, init)
  return EvalResult(ret, length, t)


def python_loop(params: Params, prompt: sq.Tokens, rng: jax.Array, *, cfg: GatoConfig, layout: TokenLayout,
                spec: sq.TaskSpec, env: Any, env_params: Any, num_envs: int, keep: int, max_steps: int,
                temperature: float = 1.0) -> EvalResult:
  """`evaluate` stepped from Python: one jitted policy call and one jitted environment step per iteration,
  the same keys. The reference `evaluate` is tested against, and the benchmark's slow path."""
  rng, k_reset = jax.random.split(rng)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), env_params)
  ctx = jax.vmap(lambda _: empty_context(spec, cfg, keep))(jnp.arange(num_envs))
  pol = policy_batch(cfg, layout, spec, float(temperature))
  env_step = _env_step(env)
  ret = np.zeros(num_envs, np.float32)
  length = np.zeros(num_envs, np.int32)
  alive = np.ones(num_envs, bool)
  t = 0
  while t < max_steps and alive.any():
    rng, k_act, k_env = _split(rng, num_envs)
    action, ctx = pol(params, prompt, ctx, obs, k_act)
    obs, state, reward, done = env_step(k_env, state, action, env_params)
    ret += np.where(alive, np.asarray(reward), 0.0)
    length += alive
    ctx = reset_contexts(ctx, done, cfg, spec, keep)
    alive &= ~np.asarray(done)
    t += 1
  return EvalResult(jnp.asarray(ret), jnp.asarray(length), jnp.int32(t))


@functools.lru_cache(maxsize=16)
def policy_batch(cfg: GatoConfig, layout: TokenLayout, spec: sq.TaskSpec, temperature: float):
  """The jitted batched `policy_step`: `(params, prompt, contexts, observations_B, keys_B) -> (actions_B, contexts)`
  (what a Python loop over any batch of environments calls once per step)."""
  return jax.jit(jax.vmap(lambda p, pr, c, o, k: policy_step(p, cfg, layout, spec, pr, c, o, k, temperature),
                          in_axes=(None, None, 0, 0, 0)))


@functools.lru_cache(maxsize=16)
def _env_step(env):
  def f(k, s, a, p):
    obs, s, r, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(k, s, a, p)
    return obs, s, r, term | trunc
  return jax.jit(f)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "keep"))
def reset_contexts(ctx: Context, done: jax.Array, cfg: GatoConfig, spec: sq.TaskSpec, keep: int) -> Context:
  """The batched contexts with those of finished episodes (`done_B`) emptied."""
  return jax.vmap(lambda c, d: jax.tree.map(lambda a, b: jnp.where(d, a, b), empty_context(spec, cfg, keep), c))(
      ctx, done)
