"""PPO's compiled forms and their Python-stepped counterparts, for `benchmarks.alignment_bench` and its test.

The stepped forms call the same jaxml functions the compiled rollout and update call, one jitted
call per new token or per minibatch; `check_stepped_forms` shows that both compute the same thing.
No flags here, so that tests may import it beside other benchmark modules.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import alignment, llama
from jaxml.alignment import ppo


def python_stepped_rollout(cfg, pcfg, rm_params, rm_cfg, P, N, eos_id):
  """The same rollout from the same jaxml functions, the decode loop stepped from Python.

  A jitted prefill (`llama.apply` into a KV cache), then per new token one jitted call
  (`llama.sample_logits` on the key chain the compiled loop splits, the token's
  log-probability, `llama.apply` on the token at the cache index), and with an EOS id the
  host check a Python loop makes after each token (stop once every row has ended), then
  one jitted call of the scoring passes (reward model, policy / reference log-probs,
  critic values, scores and GAE advantages: the functions the compiled rollout uses).
  With `pcfg.rollout_logprobs == "decode"` the decode calls' log-probabilities are used
  (as the compiled loop's) and the scoring skips the policy pass.
  """
  from_decode = pcfg.rollout_logprobs == "decode"

  @jax.jit
  def prefill(params, prompts):
    cache = llama.init_cache(cfg, prompts.shape[0], P + N)
    logits, cache = llama.apply(params, prompts, cfg, cache=cache, cache_index=0)
    return logits[:, -1], cache

  @functools.partial(jax.jit, static_argnames=("temperature", "with_logp"))
  def decode(params, last_logits, cache, index, rng, done, temperature, with_logp):
    rng, step_rng = jax.random.split(rng)
    token = llama.sample_logits(step_rng, last_logits, temperature=temperature, top_p=pcfg.top_p)
    logp = jnp.zeros(token.shape, jnp.float32)   # as the compiled loop: only where the rollout reads them
    if with_logp:
      scaled = last_logits.astype(jnp.float32) / (temperature or 1.0)
      logp = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
      logp = jnp.where(done, 0.0, logp)
    if eos_id is not None:
      done = done | (token == eos_id)
    logits, cache = llama.apply(params, token[:, None], cfg, cache=cache, cache_index=index)
    return token, logp, logits[:, -1], cache, rng, done

  @jax.jit
  def finish(new, logp):   # as the compiled loop: EOS ids and log-probability 0 past each row's first EOS
    if new.shape[1] < N:
      fill = N - new.shape[1]
      new = jnp.concatenate([new, jnp.full((new.shape[0], fill), eos_id, jnp.int32)], axis=1)
      logp = jnp.concatenate([logp, jnp.zeros((new.shape[0], fill), jnp.float32)], axis=1)
    if eos_id is None:
      return new, logp, jnp.full((new.shape[0],), N, jnp.int32)
    is_eos = (new == eos_id).astype(jnp.int32)
    after = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    return jnp.where(after, eos_id, new), jnp.where(after, 0.0, logp), (N - after.sum(axis=1)).astype(jnp.int32)

  def generate(params, prompts, key, greedy=False):
    last, cache = prefill(params, prompts)
    done = jnp.zeros((prompts.shape[0],), bool)
    new, logps = [], []
    for t in range(N):
      token, logp, last, cache, key, done = decode(params, last, cache, jnp.int32(P + t), key, done,
                                                   temperature=0.0 if greedy else float(pcfg.temperature),
                                                   with_logp=from_decode and not greedy)
      new.append(token)
      logps.append(logp)
      if eos_id is not None and bool(jnp.all(done)):
        break
    return finish(jnp.stack(new, axis=1), jnp.stack(logps, axis=1))

  @jax.jit
  def score(params, extras, prompts, new, decode_logp, n_new):
    tokens = jnp.concatenate([prompts, new], axis=1)
    m = (jnp.arange(N)[None, :] < n_new[:, None]).astype(jnp.float32)
    mask = jnp.concatenate([jnp.ones(prompts.shape, jnp.int32), m.astype(jnp.int32)], axis=1)
    raw = alignment.reward_model_apply(rm_params, tokens, mask, rm_cfg)
    if from_decode:
      old_logp = decode_logp * m
    else:
      old_logp, _ = ppo.token_logprobs(params["policy"], tokens, mask, P, cfg, temperature=pcfg.logprob_temperature)
    ref_logp, _ = ppo.token_logprobs(extras["ref"], tokens, mask, P, cfg, temperature=pcfg.logprob_temperature)
    values = ppo.token_values(params["value"], tokens, mask, P, cfg) * m
    s, _ = ppo.process_scores(pcfg, raw, extras["reward_moments"])
    advantages, returns, _ = ppo.compute_advantages(pcfg, s, old_logp, ref_logp, values, m)
    return tokens, advantages, returns

  def rollout(params, extras, prompts, key):
    new, logp, n_new = generate(params["policy"], prompts, key)
    return score(params, extras, prompts, new, logp, n_new)

  return rollout, generate


def python_stepped_update(cfg, pcfg, tx):
  """`ppo.make_update` stepped from Python: the epochs' permutations (jitted, as the compiled
  update draws them), then one jitted call per minibatch (gradient of `ppo.make_loss`, `tx`)."""
  grad_fn = jax.value_and_grad(ppo.make_loss(cfg, pcfg), has_aux=True)
  E, M = int(pcfg.ppo_epochs), int(pcfg.num_minibatches)

  @functools.partial(jax.jit, static_argnums=1)
  def orders(key, R):
    return jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), R) for e in range(E)]).reshape(E * M, R // M)

  @jax.jit
  def one(params, opt_state, experience, idx):
    mb = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), experience)
    (loss, _), grads = grad_fn(params, mb, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def update(params, opt_state, experience, key):
    order = orders(key, experience["tokens"].shape[0])
    for i in range(E * M):
      params, opt_state, _ = one(params, opt_state, experience, order[i])
    return params, opt_state

  return update


def small_config_setup(seed):
  """The alignment experiment's `small` config (the issue's): its Llama, its first PPO run, its rollout."""
  from experiments.configs import alignment as configs
  from jaxml import experiment as jexp
  from jaxml.alignment import experiment as aexp
  ecfg = jexp.from_config(aexp.AlignmentExperimentConfig, configs.get_config("small"))
  name, pcfg = next(iter(aexp.online_configs(ecfg).items()))
  eos = ecfg.num_tokens
  return dict(label=f"the alignment experiment's small config (dim {ecfg.dim}, vocab {eos + 1}, {name}: "
                    f"{ecfg.online_batch} rows, prompt EOS, up to {ecfg.max_len} new tokens, EOS ends a row)",
              cfg=aexp.llama_config(ecfg), pcfg=pcfg, prompts=np.full((ecfg.online_batch, 1), eos, np.int32),
              new_tokens=ecfg.max_len, eos_id=eos)


def ppo_parts(setup, seed) -> dict:
  """What the PPO measurements share: weights, batch, key, the compiled and Python-stepped rollout and update."""
  cfg, pcfg, prompts, N, eos = setup["cfg"], setup["pcfg"], setup["prompts"], setup["new_tokens"], setup["eos_id"]
  B, P = prompts.shape
  batch = {"prompts": jnp.asarray(prompts), "prompt_lengths": jnp.full((B,), P, jnp.int32)}
  policy = llama.init(jax.random.PRNGKey(seed), cfg)
  rm_params = alignment.reward_model_init(jax.random.PRNGKey(seed + 3), cfg)

  def reward_fn(tokens, mask, prompt_len):
    del prompt_len
    return alignment.reward_model_apply(rm_params, tokens, mask, cfg)

  tx = ppo.make_optimizer(pcfg)
  stepped, stepped_generate = python_stepped_rollout(cfg, pcfg, rm_params, cfg, P, N, eos)
  return dict(cfg=cfg, pcfg=pcfg, batch=batch, B=B, P=P, N=N, eos=eos, rm_params=rm_params, reward_fn=reward_fn,
              state=ppo.init_state(jax.random.PRNGKey(seed), policy, policy, rm_params, pcfg, policy_cfg=cfg),
              key=jax.random.PRNGKey(seed + 4), tx=tx,
              rollout=jax.jit(ppo.make_rollout(cfg, pcfg, reward_fn, max_new_tokens=N, eos_id=eos, min_prompt_len=P)),
              stepped=stepped, stepped_generate=stepped_generate,
              update=jax.jit(ppo.make_update(cfg, pcfg, tx)), stepped_update=python_stepped_update(cfg, pcfg, tx))


def check_stepped_forms(parts) -> tuple[dict, dict]:
  """Raises AssertionError unless the Python-stepped rollout and update compute what the compiled ones do.

  The rollout: the same tokens (the same key chain; a near-tie may draw differently where the cache
  layouts round differently, so 99% of the tokens must agree) and, on the rows that agree, the same
  advantages. The update: the same parameters (1e-5). Returns the compiled rollout's experience and
  `{"rows_equal", "token_fraction", "param_gap"}`.
  """
  params, extras, key, batch = parts["state"].params, parts["state"].extras, parts["key"], parts["batch"]
  experience, _, _ = jax.block_until_ready(parts["rollout"](params, extras, batch, key))
  py_tokens, py_adv, _ = parts["stepped"](params, extras, batch["prompts"], key)
  same = np.asarray(py_tokens) == np.asarray(experience["tokens"])
  rows = same.all(axis=1)
  if same.mean() < 0.99 or not np.allclose(np.asarray(py_adv)[rows], np.asarray(experience["advantages"])[rows],
                                          atol=1e-4):
    raise AssertionError(f"the Python-stepped rollout disagrees with the compiled one ({same.mean():.3f} of the "
                         "tokens equal)")
  new_params, _, _ = parts["update"](params, parts["state"].opt_state, experience, None, key)
  py_params, _ = parts["stepped_update"](params, parts["state"].opt_state, experience, key)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(new_params),
                                                           jax.tree_util.tree_leaves(py_params)))
  if gap > 1e-5:
    raise AssertionError(f"the Python-stepped update disagrees with the compiled one (max |param diff| {gap:.2e})")
  return experience, {"rows_equal": int(rows.sum()), "token_fraction": float(same.mean()), "param_gap": gap}
