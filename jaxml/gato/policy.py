"""Acting with a Gato policy: one action (`act`), and whole episodes in one compiled loop (`evaluate`).

Deployment (Reed et al. 2022, Sec. 2.3): the context is [prompt] [earlier timesteps] [observation]
[separator]; the action's tokens are sampled one at a time, each restricted to the task's valid
action ids and fed back through the KV cache, then detokenized and sent to the environment.

Two forms of the per-step policy, both over a window of `W = P + (K + 1) * S` positions (prompt
of P tokens, up to K earlier timesteps of S tokens, the current timestep):

  re-prefill (`policy_step`, `evaluate(incremental=False)`): every step builds the window from
    the prompt, the K most recent earlier timesteps (fewer at an episode's start) and the
    current observation, prefills all of it into a fresh KV cache of W slots and decodes the
    action tokens after the separator. Each action is conditioned on
    `prompt + the min(t, K) previous timesteps + observation + separator` (t: its step in the
    episode); once K timesteps are kept, every token's position shifts by S each step.
  incremental (`cached_step`, `evaluate(incremental=True)`): one KV cache of W slots is carried
    across steps. Slot s holds the token at position s (the decoder's default positions,
    `cache_index + arange(T)`; Gato's local positions are part of each token's embedding), so a
    token written at slot s gets exactly the position it would have in a prefill of the window
    `cache[0:s + 1]`. A step writes only the observation and separator tokens, then decodes and
    writes the action tokens. When the cache already holds K timesteps, it is first refilled:
    the most recent R (`refill`, K // 2 by default) timesteps are prefilled again at slots
    `P + [0, R * S)` (the prompt's slots are kept: their keys depend on the prompt alone).
    Each action is therefore conditioned on `prompt + the n previous timesteps + observation +
    separator`, where n counts the timesteps held since the episode's start or the last refill:
    n = t for t <= K, then n cycles R, R + 1, ..., K - 1, K, R, ... (the steps with n = K are
    followed by a refill). The context never shrinks below R earlier timesteps after the first
    K steps, and a refill costs one prefill of R * S tokens every K - R + 1 steps instead of
    W tokens every step.
"""
from __future__ import annotations

import dataclasses
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


class CacheState(NamedTuple):
  """The incremental policy's per-environment state (leading batch axis B in `cached_step`).

  cache: the KV cache of `W = P + (K + 1) * S` slots: the prompt at `[0, P)`, held timestep i at
    `P + i * S + [0, S)`.
  tokens: `[(K + 1) * S]` the tokens of the held timesteps, timestep i at `i * S` (what a refill
    prefills again; later slots are stale).
  held: how many finished timesteps the cache holds after the prompt (int32).
  """
  cache: llama.KVCache
  tokens: sq.Tokens
  held: jax.Array


def _decode_rows(params, cfg, batch, cache, at, images):
  """Writes the `[B, T]` record `batch` at cache slots `[at, at + T)` (positions the same); `(h_BxTxD, cache)`."""
  return llama.decoder(params["decoder"], embed(params, batch, cfg, with_patches=images), cfg.llama(),
                       cache=cache, cache_index=at)


def _decode_chunk(params, cfg, chunk, cache, at, images):
  """`_decode_rows` for one `[T]` record (a cache of batch 1); `(h_TxD, cache)`."""
  h, cache = _decode_rows(params, cfg, sq.Tokens(*(x[None] for x in chunk)), cache, at, images)
  return h[0], cache


def _valid_range(spec: sq.TaskSpec, layout: TokenLayout) -> tuple[int, int]:
  """The task's valid action ids as one range `[lo, hi)` (`sq.valid_action_ids` is contiguous)."""
  ok = np.flatnonzero(sq.valid_action_ids(spec, layout))
  if ok.size == 0 or ok[-1] - ok[0] + 1 != ok.size:
    raise ValueError(f"the valid action ids of task {spec.name!r} are not one contiguous range")
  return int(ok[0]), int(ok[-1]) + 1


def _action_logits(params: Params, h_BxTxD: jax.Array, cfg: GatoConfig, lo: int, hi: int) -> jax.Array:
  """`[B, T, hi - lo]` logits of the ids `[lo, hi)` only (`llama.head` over those output columns): the same
  values as `head(...)[..., lo:hi]`, and a categorical draw over them is the draw restricted to the range."""
  dec = params["decoder"]
  w = dec["tok_embeddings"].T if cfg.tie_embeddings else dec["output"]
  return llama.head({"output": w[:, lo:hi]}, h_BxTxD, dataclasses.replace(cfg.llama(), vocab_size=hi - lo))


def init_cached(params: Params, cfg: GatoConfig, spec: sq.TaskSpec, prompt: sq.Tokens, num_envs: int,
                keep: int) -> CacheState:
  """`num_envs` fresh states: the prompt prefilled once into a cache of `P + (keep + 1) * S` slots."""
  check_window(cfg, spec, prompt.length, keep)
  s = sq.timestep_len(spec, cfg.patch_size)
  w = prompt.length + (keep + 1) * s
  cache = llama.init_cache(cfg.llama(), 1, w)
  if prompt.length:
    _, cache = _decode_chunk(params, cfg, prompt, cache, 0, _has_images(spec))
  bcast = lambda x: jnp.broadcast_to(x, (num_envs, *x.shape))  # noqa: E731
  return CacheState(jax.tree.map(bcast, cache), jax.tree.map(bcast, sq.empty_tokens((keep + 1) * s, cfg.patch_dim,
                                                                                     jnp)),
                    jnp.zeros((num_envs,), jnp.int32))


def _has_images(spec):
  return any(f.kind == "image" for _, f in spec.fields)


def cached_step(params: Params, cfg: GatoConfig, layout: TokenLayout, spec: sq.TaskSpec, state: CacheState,
                observations: Any, rngs: jax.Array, *, refill: int, temperature: float,
                same_held: bool = False) -> tuple[jax.Array, CacheState]:
  """One incremental step for a batch of environments (jit-able; module docstring, "incremental").

  Environments whose cache holds K + 1 timesteps are first refilled with their last `refill` (R)
  timesteps (one `lax.cond` for the batch: when none needs it, no refill is computed). Then each
  environment writes its observation and separator at slot `P + held * S`, samples the action
  tokens one at a time (restricted to the valid ids, each written back), and holds one more timestep.
  When every environment holds the same count the cache writes run as one batch; otherwise (after
  some were reset) per environment (`jax.vmap`, its own slot each).

  Args:
    params, cfg, layout, spec: the policy and the task.
    state: `CacheState` with a leading axis B (`init_cached`).
    observations: the task's observation structure with a leading axis B.
    rngs: `[B]` keys (one per action token is split from each, as `act_window` does).
    refill: R, in [0, K].
    temperature: 0 is greedy.
    same_held: the caller guarantees that every environment holds the same count (no environment was
      reset on its own, as in `evaluate`): the batched form without the per-environment branch.

  Returns:
    `(actions_B, state)`.
  """
  s = sq.timestep_len(spec, cfg.patch_size)
  n_in = s - spec.action_len  # observation and separator
  k = state.tokens.length // s - 1
  p = state.cache.max_len - (k + 1) * s
  if not 0 <= refill <= k:
    raise ValueError(f"refill must lie in [0, keep={k}], got {refill}")
  images = _has_images(spec)
  lo, hi = _valid_range(spec, layout)
  need = state.held > k

  def refill_rows(cache, toks):
    """A batch of rows' caches refilled with their last R timesteps (`toks` `[B, (K + 1) * S]`)."""
    toks = sq.Tokens(*(jnp.roll(x, -(k + 1 - refill) * s, axis=1) for x in toks))
    if refill:
      _, cache = _decode_rows(params, cfg, sq.Tokens(*(x[:, :refill * s] for x in toks)), cache, p, images)
    return cache, toks

  def refill_some(st: CacheState) -> CacheState:
    def one(c, t):
      c, t = refill_rows(c, jax.tree.map(lambda x: x[None], t))
      return c, jax.tree.map(lambda x: x[0], t)
    cache, toks = jax.vmap(one)(st.cache, st.tokens)
    pick = lambda a, b: jnp.where(need.reshape(need.shape + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
    return jax.tree.map(pick, CacheState(cache, toks, jnp.full_like(st.held, refill)), st)

  def refill_all(st: CacheState) -> CacheState:
    cache, toks = refill_rows(_squeeze(st.cache), st.tokens)
    return CacheState(_unsqueeze(cache), toks, jnp.full_like(st.held, refill))

  if same_held:
    state = jax.lax.cond(need[0], refill_all, lambda st: st, state)
  else:
    state = jax.lax.cond(need.any(), refill_some, lambda st: st, state)

  def rows(cache, toks, held, obs, rngs):
    """The step for a batch of rows that all hold `held` timesteps (one cache of that batch)."""
    at = p + held * s
    cur = jax.vmap(lambda o: _current_timestep(spec, layout, cfg, o))(obs)
    h, cache = _decode_rows(params, cfg, sq.Tokens(*(x[:, :n_in] for x in cur)), cache, at, images)
    h_last = h[:, -1:]
    keys = jax.vmap(lambda r: jax.random.split(r, spec.action_len))(rngs)
    ids = []
    for i in range(spec.action_len):
      logits = _action_logits(params, h_last, cfg, lo, hi)[:, 0]
      tok = lo + jax.vmap(lambda k, l: sample_logits(k, l[None], temperature=temperature)[0])(keys[:, i], logits)
      ids.append(tok)
      one_tok = sq.Tokens(*(x[None] for x in sq.empty_tokens(1, cfg.patch_dim, jnp)))
      one_tok = sq.Tokens(*(jnp.broadcast_to(x, (tok.shape[0], *x.shape[1:])) for x in one_tok))
      h_last, cache = _decode_rows(params, cfg, one_tok._replace(ids=tok[:, None]), cache, at + n_in + i, False)
    ids = jnp.stack(ids, -1)
    done = cur._replace(ids=cur.ids.at[:, n_in:].set(ids))
    toks = sq.Tokens(*(jax.lax.dynamic_update_slice_in_dim(t, d, held * s, axis=1) for t, d in zip(toks, done)))
    return jax.vmap(lambda i: sq.action_from_ids(spec, layout, i))(ids), cache, toks

  def shared(st: CacheState):
    # Every row holds the same count: one batched cache write per decoder call.
    act, cache, toks = rows(_squeeze(st.cache), st.tokens, st.held[0], observations, rngs)
    return act, CacheState(_unsqueeze(cache), toks, st.held + 1)

  def per_row(st: CacheState):
    def one(c, t, n, o, r):
      act, c, t = rows(c, jax.tree.map(lambda x: x[None], t), n, jax.tree.map(lambda x: x[None], o), r[None])
      return act[0], c, jax.tree.map(lambda x: x[0], t)
    act, cache, toks = jax.vmap(one)(st.cache, st.tokens, st.held, observations, rngs)
    return act, CacheState(cache, toks, st.held + 1)

  if same_held:
    return shared(state)
  return jax.lax.cond((state.held == state.held[0]).all(), shared, per_row, state)


def _squeeze(cache):
  """Per-environment caches `[B, 1, ...]` as one cache of batch B."""
  return jax.tree.map(lambda a: a[:, 0], cache)


def _unsqueeze(cache):
  return jax.tree.map(lambda a: a[:, None], cache)


@functools.lru_cache(maxsize=16)
def cached_policy_batch(cfg: GatoConfig, layout: TokenLayout, spec: sq.TaskSpec, refill: int, temperature: float,
                        same_held: bool = False):
  """The jitted `cached_step`: `(params, state, observations_B, keys_B) -> (actions_B, state)` (what a Python
  loop over a batch of environments calls once per step)."""
  return jax.jit(lambda p, st, o, k: cached_step(p, cfg, layout, spec, st, o, k, refill=refill,
                                                 temperature=temperature, same_held=same_held))


@jax.jit
def reset_cached(state: CacheState, fresh: CacheState, done: jax.Array) -> CacheState:
  """The batched states with those of finished episodes (`done_B`) replaced by `fresh` (`init_cached`)."""
  pick = lambda a, b: jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
  return jax.tree.map(pick, fresh, state)


def default_refill(keep: int, refill: int | None) -> int:
  """R: `keep // 2` unless given (the most recent half of the history, whole timesteps)."""
  r = keep // 2 if refill is None else refill
  if not 0 <= r <= keep:
    raise ValueError(f"refill must lie in [0, keep={keep}], got {r}")
  return r


class EvalResult(NamedTuple):
  returns: jax.Array  # [B] undiscounted return of each environment's first episode
  lengths: jax.Array  # [B] its length in steps
  steps: jax.Array  # loop iterations run (every environment steps each iteration)


def _split(rng, n):
  rng, k_act, k_env = jax.random.split(rng, 3)
  return rng, jax.random.split(k_act, n), jax.random.split(k_env, n)


def evaluate(params: Params, prompt: sq.Tokens, rng: jax.Array, *, cfg: GatoConfig, layout: TokenLayout,
             spec: sq.TaskSpec, env: Any, env_params: Any, num_envs: int, keep: int, max_steps: int,
             temperature: float = 1.0, incremental: bool = False, refill: int | None = None) -> EvalResult:
  """Runs `num_envs` environments for one whole episode each inside one `jax.lax.while_loop`.

  Args:
    params, cfg, layout: the policy.
    prompt: `[P]` tokens every environment's context starts with (a demonstration; length 0 for none).
    rng: the key; each iteration splits (act keys, env keys) as `python_loop` does.
    spec: the task; `env`, `env_params`: its gymnax environment.
    num_envs: B; keep: timesteps of history kept (K); max_steps: the loop's bound.
    temperature: 0 is greedy.
    incremental: carry a KV cache across steps (`cached_step`) instead of prefilling the whole
      window every step (`policy_step`); the module docstring states each form's context. In the
      incremental form a finished environment's cache is not reset (its later actions are never
      counted), so all environments refill at the same steps and one refill serves the batch.
    refill: R, the timesteps an incremental refill keeps (`keep // 2` by default).

  Returns:
    `EvalResult`; the loop stops when every environment finished its first episode.

  Raises:
    ValueError: naming `refill` or the context length (prompt plus keep + 1 timesteps), before compute.
  """
  if incremental:
    refill = default_refill(keep, refill)
    check_window(cfg, spec, prompt.length, keep)
    return _evaluate_cached(params, prompt, rng, cfg=cfg, layout=layout, spec=spec, env=env, env_params=env_params,
                            num_envs=num_envs, keep=keep, max_steps=max_steps, temperature=temperature, refill=refill)
  return _evaluate(params, prompt, rng, cfg=cfg, layout=layout, spec=spec, env=env, env_params=env_params,
                   num_envs=num_envs, keep=keep, max_steps=max_steps, temperature=temperature)


def check_window(cfg: GatoConfig, spec: sq.TaskSpec, prompt_len: int, keep: int) -> None:
  s = sq.timestep_len(spec, cfg.patch_size)
  if keep < 0 or prompt_len + (keep + 1) * s > cfg.max_seq_len:
    raise ValueError(f"the prompt ({prompt_len} tokens) plus keep + 1 = {keep + 1} timesteps of {s} tokens must fit "
                     f"in max_seq_len={cfg.max_seq_len}")


_STATIC = ("cfg", "layout", "spec", "env", "num_envs", "keep", "max_steps", "temperature")


def _episodes(rng, env, env_params, num_envs: int, max_steps: int, pol, act, on_done=None) -> EvalResult:
  """Runs `num_envs` environments for whole episodes in one `lax.while_loop`.

  `act(pol, obs, keys) -> (actions, pol)` is the policy's step over the batch (its state `pol` carried);
  `on_done(pol, done) -> pol` resets the state of environments whose episode just ended (None: kept).
  """
  rng, k_reset = jax.random.split(rng)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), env_params)
  zeros = jnp.zeros((num_envs,), jnp.float32)

  def cond(carry):
    t, *_, alive = carry
    return (t < max_steps) & alive.any()

  def body(carry):
    t, rng, obs, state, pol, ret, length, alive = carry
    rng, k_act, k_env = _split(rng, num_envs)
    action, pol = act(pol, obs, k_act)
    obs, state, reward, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(k_env, state, action, env_params)
    ret = ret + jnp.where(alive, reward, 0.0)
    length = length + alive.astype(jnp.int32)
    done = term | trunc
    if on_done is not None:
      pol = on_done(pol, done)
    return t + 1, rng, obs, state, pol, ret, length, alive & ~done

  init = (jnp.int32(0), rng, obs, state, pol, zeros, jnp.zeros((num_envs,), jnp.int32), jnp.ones((num_envs,), bool))
  t, _, _, _, _, ret, length, _ = jax.lax.while_loop(cond, body, init)
  return EvalResult(ret, length, t)


@functools.partial(jax.jit, static_argnames=_STATIC + ("refill",))
def _evaluate_cached(params, prompt, rng, *, cfg, layout, spec, env, env_params, num_envs, keep, max_steps,
                     temperature, refill) -> EvalResult:
  act = lambda pol, obs, keys: cached_step(params, cfg, layout, spec, pol, obs, keys, refill=refill,  # noqa: E731
                                           temperature=temperature, same_held=True)
  return _episodes(rng, env, env_params, num_envs, max_steps, init_cached(params, cfg, spec, prompt, num_envs, keep),
                   act)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _evaluate(params, prompt, rng, *, cfg, layout, spec, env, env_params, num_envs, keep, max_steps,
              temperature) -> EvalResult:
  ctx = jax.vmap(lambda _: empty_context(spec, cfg, keep))(jnp.arange(num_envs))
  act = jax.vmap(lambda c, o, k: policy_step(params, cfg, layout, spec, prompt, c, o, k, temperature))

  def on_done(ctx, done):
    return jax.vmap(lambda c, d: jax.tree.map(lambda a, b: jnp.where(d, a, b), empty_context(spec, cfg, keep), c))(
        ctx, done)

  return _episodes(rng, env, env_params, num_envs, max_steps, ctx, act, on_done)


def python_loop(params: Params, prompt: sq.Tokens, rng: jax.Array, *, cfg: GatoConfig, layout: TokenLayout,
                spec: sq.TaskSpec, env: Any, env_params: Any, num_envs: int, keep: int, max_steps: int,
                temperature: float = 1.0, incremental: bool = False, refill: int | None = None) -> EvalResult:
  """`evaluate` stepped from Python: one jitted policy call and one jitted environment step per iteration,
  the same keys (and, with `incremental`, the same carried caches, not reset at an episode's end). The
  reference `evaluate` is tested against, and the benchmark's slow path."""
  rng, k_reset = jax.random.split(rng)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), env_params)
  if incremental:
    refill = default_refill(keep, refill)
    ctx = init_cached(params, cfg, spec, prompt, num_envs, keep)
    cached = cached_policy_batch(cfg, layout, spec, refill, float(temperature), same_held=True)
    pol = lambda ctx, obs, keys: cached(params, ctx, obs, keys)  # noqa: E731
    reset = lambda ctx, done: ctx  # noqa: E731  (as `evaluate`: the caches are carried on)
  else:
    ctx = jax.vmap(lambda _: empty_context(spec, cfg, keep))(jnp.arange(num_envs))
    batch = policy_batch(cfg, layout, spec, float(temperature))
    pol = lambda ctx, obs, keys: batch(params, prompt, ctx, obs, keys)  # noqa: E731
    reset = lambda ctx, done: reset_contexts(ctx, done, cfg, spec, keep)  # noqa: E731
  env_step = _env_step(env)
  ret = np.zeros(num_envs, np.float32)
  length = np.zeros(num_envs, np.int32)
  alive = np.ones(num_envs, bool)
  t = 0
  while t < max_steps and alive.any():
    rng, k_act, k_env = _split(rng, num_envs)
    action, ctx = pol(ctx, obs, k_act)
    obs, state, reward, done = env_step(k_env, state, action, env_params)
    ret += np.where(alive, np.asarray(reward), 0.0)
    length += alive
    ctx = reset(ctx, done)
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
