"""Alignment throughput: a DPO training step against TRL's, and PPO's compiled rollout and update.

    python -m benchmarks.alignment_bench                 # a few minutes on 2 cores
    python -m benchmarks.alignment_bench --quick         # smoke run (2 short rounds)
    python -m benchmarks.alignment_bench --repeats=5 --threads=2

Measured on one tiny Llama (`bench_config`: vocab 512, dim 128, 2 layers, float32):

  * DPO: one training step on 8 preference pairs (prompt 32 + completion 32 tokens,
    right-padded, completions of different lengths), reference log-probs precomputed
    (from a second set of weights) on both sides. jaxml: `llama.sequence_logprobs` of the
    [chosen; rejected] batch + `alignment.dpo_loss` (sigmoid, beta 0.1) through
    `jaxml.train.make_train_step`, AdamW, jit with a donated state. TRL 1.16.0 in the peer
    environment (`benchmarks/peer_trl_dpo.py`): `DPOTrainer._compute_loss` on a stand-in
    trainer (the concatenated forward through TRL's fused LM head, as the trainer patches
    it), backward, `torch.optim.AdamW`. Both start from the same weights (exported with
    `jaxml.llama.to_hf`) and the first step's losses must agree. Tokens/s counts every
    token of the 16 rows (2 x 8 x 64). Target >= 2x.
  * PPO (`alignment.ppo`, the ppo_max preset, a reward model as reward_fn, 16 prompts of
    8 tokens, 32 new tokens each, no EOS): the compiled rollout (the Llama decode loop,
    reward model, policy, reference and critic passes, advantages: one program) against
    the same jaxml functions stepped from Python (a jitted prefill, one jitted decode step
    per new token, then the jitted scoring passes); new tokens/s. Target >= 5x. The
    update (`ppo.make_update`: one epoch in 2 minibatches, policy + critic forward and
    backward, Adam) in tokens/s (rows x prompt+response tokens per epoch), and the
    fraction of a whole PPO iteration (`ppo.make_step`, jitted) spent generating (the
    decode loop alone, timed on the same shapes).
  * Where the rollout's time goes: the decode loop alone, each scoring pass alone on the
    rollout's sequences (reward model, policy, reference, critic), the advantages; the
    rollout with `rollout_logprobs="decode"` (the decode loop's log-probs reused, no policy
    pass) against its own Python-stepped form and against the forward-pass rollout; the
    policy and reference passes as one vmapped pass over stacked parameters against two
    plain passes (checked equal first); and the bound on the compiled/stepped ratio if the
    scoring cost nothing (Python-stepped rollout / compiled decode loop alone).

Both sides use the same thread count (XLA sizes its pool from the CPU affinity, torch gets
`torch.set_num_threads`); the DPO sides run in alternating rounds, the PPO variants call by
call in turn; figures are medians over all timed calls (PPO also reports process CPU time,
less sensitive to other jobs on a shared machine). Ends with `name: value` lines.
"""
from __future__ import annotations

import os
import pathlib
import platform
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import PeerWorker, median, pin_threads, print_results
from jaxml import alignment, llama
from jaxml import train as jt
from jaxml.alignment import ppo
from jaxml.train import hostmem

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timing rounds (DPO: alternating jaxml/TRL); figures are medians of all calls.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 short rounds.")
flags.DEFINE_integer("threads", None, "CPU threads for both sides (default: CPUs this process may use).")
flags.DEFINE_integer("seed", 0, "Seed for weights and token batches.")

PAIRS, PROMPT, COMPLETION = 8, 32, 32          # DPO batch: 8 pairs of 32 + 32 tokens
PPO_PROMPTS, PPO_PROMPT_LEN, PPO_NEW = 16, 8, 32
DPO_TARGET, ROLLOUT_TARGET = 2.0, 5.0          # from the issue
BETA, LR = 0.1, 1e-4


def bench_config() -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                           max_seq_len=PROMPT + COMPLETION, scan_layers=False)


def _count(budget_s: float, one_s: float, most: int) -> int:
  return max(1, min(most, int(budget_s / max(one_s, 1e-6))))


CPU_TIMES: dict[str, list[float]] = {}   # process CPU seconds per call, by label (less sensitive to other jobs)


def _timed(fn, n, label=None):
  times, out = [], None
  for _ in range(n):
    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    if label:
      CPU_TIMES.setdefault(label, []).append(time.process_time() - cpu)
  return times, out


# --- DPO ---

def dpo_batch(cfg, rng):
  """[chosen; rejected] rows, right-padded: prompt then completion; completion mask 1 on the completion."""
  T = PROMPT + COMPLETION
  tokens = rng.integers(1, cfg.vocab_size, size=(2 * PAIRS, T)).astype(np.int32)
  tokens[PAIRS:, :PROMPT] = tokens[:PAIRS, :PROMPT]                      # a pair shares its prompt
  lengths = rng.integers(COMPLETION // 2, COMPLETION + 1, size=2 * PAIRS)
  cols = np.arange(T)[None, :]
  attention = (cols < PROMPT + lengths[:, None]).astype(np.int32)
  completion = (attention * (cols >= PROMPT)).astype(np.int32)
  tokens = np.where(attention > 0, tokens, 0).astype(np.int32)
  return tokens, attention, completion


def dpo_loss_fn(cfg):
  def loss(params, batch, rng):
    del rng
    logps = llama.sequence_logprobs(params, batch["tokens"], batch["completion_mask"], cfg,
                                    attention_mask_BxT=batch["attention_mask"])
    chosen, rejected = logps[:PAIRS], logps[PAIRS:]
    return alignment.dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=BETA)
  return loss


def bench_dpo(cfg, worker, *, rounds, budget_s, seed, say) -> dict:
  rng = np.random.default_rng(seed)
  tokens, attention, completion = dpo_batch(cfg, rng)
  params = llama.init(jax.random.PRNGKey(seed), cfg)
  ref_params = llama.init(jax.random.PRNGKey(seed + 1), cfg)
  ref = np.asarray(jax.jit(lambda p: llama.sequence_logprobs(p, tokens, completion, cfg, attention_mask_BxT=attention))(
      ref_params))   # precomputed once, given to both sides
  batch = {"tokens": tokens, "attention_mask": attention, "completion_mask": completion,
           "ref_chosen": ref[:PAIRS], "ref_rejected": ref[PAIRS:]}
  batch = jax.device_put(batch)
  # torch.optim.AdamW with betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping on both sides.
  tx, _ = jt.make_optimizer(LR, total_steps=1, kind="adamw", schedule="constant", b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=0.0, clip_norm=None)
  state = jt.create_train_state(params, tx, jax.random.PRNGKey(seed))
  step = jax.jit(jt.make_train_step(dpo_loss_fn(cfg), tx), donate_argnums=0)
  with tempfile.TemporaryDirectory() as hf_dir:
    llama.to_hf(cfg, params, hf_dir)
    worker.request("build", hf_dir=hf_dir, lr=LR, beta=BETA)
  peer_batch = {"input_ids": tokens.tolist(), "attention_mask": attention.tolist(),
                "completion_mask": completion.tolist(), "ref_chosen_logps": ref[:PAIRS].tolist(),
                "ref_rejected_logps": ref[PAIRS:].tolist()}

  def run_jax(n):
    nonlocal state
    times, loss = [], None
    for _ in range(n):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      loss = float(metrics["loss"])
      times.append(time.perf_counter() - start)
    return times, loss

  start = time.perf_counter()
  _, jax_first_loss = run_jax(1)
  compile_s = time.perf_counter() - start
  trl_first = worker.request("step", steps=1, **peer_batch)
  trl_first_loss = trl_first["losses"][0]
  say(f"DPO first-step loss: jaxml {jax_first_loss:.6f}, TRL {trl_first_loss:.6f}")
  if not abs(jax_first_loss - trl_first_loss) <= 1e-4 * max(1.0, abs(trl_first_loss)):
    raise AssertionError(f"the first DPO step's losses disagree: jaxml {jax_first_loss}, TRL {trl_first_loss}")
  jax_one = run_jax(1)[0][0]
  jax_n, trl_n = _count(budget_s, jax_one, 50), _count(budget_s, trl_first["times"][0], 50)
  jax_times, trl_times = [], []
  for _ in range(rounds):
    jax_times += run_jax(jax_n)[0]
    trl_times += worker.request("step", steps=trl_n, **peer_batch)["times"]
  tokens_per_step = 2 * PAIRS * (PROMPT + COMPLETION)
  jax_s, trl_s = median(jax_times), median(trl_times)
  return {"jax_tokens_per_s": tokens_per_step / jax_s, "trl_tokens_per_s": tokens_per_step / trl_s,
          "speedup": trl_s / jax_s, "compile_s": compile_s, "first_loss_jax": jax_first_loss,
          "first_loss_trl": trl_first_loss, "jax_samples": len(jax_times), "trl_samples": len(trl_times)}


# --- PPO ---

def python_stepped_rollout(cfg, pcfg, rm_params, rm_cfg):
  """The same rollout from the same jaxml functions, the decode loop stepped from Python.

  A jitted prefill (`llama.apply` into a KV cache), then per new token one jitted call
  (`llama.apply` on one token at the cache index + `llama.sample_logits`), then one jitted
  call of the scoring passes (reward model, policy / reference log-probs, critic values,
  scores and GAE advantages: the functions the compiled rollout uses). With
  `pcfg.rollout_logprobs == "decode"` each decode call also returns the drawn token's
  log-probability (as the compiled loop does) and the scoring skips the policy pass.
  """
  from_decode = pcfg.rollout_logprobs == "decode"
  P, N = PPO_PROMPT_LEN, PPO_NEW

  @jax.jit
  def prefill(params, prompts):
    cache = llama.init_cache(cfg, prompts.shape[0], P + N)
    logits, cache = llama.apply(params, prompts, cfg, cache=cache, cache_index=0)
    return logits[:, -1], cache

  @jax.jit
  def decode(params, last_logits, cache, index, key):
    token = llama.sample_logits(key, last_logits, temperature=pcfg.temperature)
    scaled = last_logits.astype(jnp.float32) / pcfg.temperature
    logp = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
    logits, cache = llama.apply(params, token[:, None], cfg, cache=cache, cache_index=index)
    return (token, logp) if from_decode else (token, None), logits[:, -1], cache

  @jax.jit
  def decode_greedy(params, last_logits, cache, index):
    token = llama.greedy_token(last_logits)
    logits, cache = llama.apply(params, token[:, None], cfg, cache=cache, cache_index=index)
    return token, logits[:, -1], cache

  def generate(params, prompts, key, greedy=False, logprobs=False):
    last, cache = prefill(params, prompts)
    new, logps = [], []
    for t in range(N):
      if greedy:
        token, last, cache = decode_greedy(params, last, cache, jnp.int32(P + t))
      else:
        (token, logp), last, cache = decode(params, last, cache, jnp.int32(P + t), jax.random.fold_in(key, t))
        logps.append(logp)
      new.append(token)
    return (jnp.stack(new, axis=1), jnp.stack(logps, axis=1)) if logprobs else jnp.stack(new, axis=1)

  @jax.jit
  def score(params, extras, tokens, decode_logp):
    mask = jnp.ones(tokens.shape, jnp.int32)
    m = jnp.ones((tokens.shape[0], N), jnp.float32)
    raw = alignment.reward_model_apply(rm_params, tokens, mask, rm_cfg)
    if from_decode:
      old_logp = decode_logp
    else:
      old_logp, _ = ppo.token_logprobs(params["policy"], tokens, mask, P, cfg, temperature=pcfg.temperature)
    ref_logp, _ = ppo.token_logprobs(extras["ref"], tokens, mask, P, cfg, temperature=pcfg.temperature)
    values = ppo.token_values(params["value"], tokens, mask, P, cfg)
    s, _ = ppo.process_scores(pcfg, raw, extras["reward_moments"])
    return ppo.compute_advantages(pcfg, s, old_logp, ref_logp, values, m)

  def rollout(params, extras, prompts, key):
    if from_decode:
      new, logp = generate(params["policy"], prompts, key, logprobs=True)
    else:
      new, logp = generate(params["policy"], prompts, key), None
    return score(params, extras, jnp.concatenate([prompts, new], axis=1), logp)

  return rollout, generate


def bench_ppo(cfg, *, rounds, budget_s, seed, say) -> dict:
  rng = np.random.default_rng(seed + 2)
  B, P, N = PPO_PROMPTS, PPO_PROMPT_LEN, PPO_NEW
  prompts = rng.integers(1, cfg.vocab_size, size=(B, P)).astype(np.int32)
  batch = {"prompts": jnp.asarray(prompts), "prompt_lengths": jnp.full((B,), P, jnp.int32)}
  policy = llama.init(jax.random.PRNGKey(seed), cfg)
  rm_params = alignment.reward_model_init(jax.random.PRNGKey(seed + 3), cfg)
  pcfg = ppo.ppo_preset("ppo_max", num_minibatches=2, policy_lr=1e-4, value_lr=1e-4)

  def reward_fn(tokens, mask, prompt_len):
    del prompt_len
    return alignment.reward_model_apply(rm_params, tokens, mask, cfg)

  state = ppo.init_state(jax.random.PRNGKey(seed), policy, policy, rm_params, pcfg, policy_cfg=cfg)
  rollout = jax.jit(ppo.make_rollout(cfg, pcfg, reward_fn, max_new_tokens=N, eos_id=None, min_prompt_len=P))
  update = jax.jit(ppo.make_update(cfg, pcfg, ppo.make_optimizer(pcfg)))
  step = jax.jit(ppo.make_step(cfg, pcfg, reward_fn, max_new_tokens=N, eos_id=None, min_prompt_len=P),
                 donate_argnums=0)
  stepped, stepped_generate = python_stepped_rollout(cfg, pcfg, rm_params, cfg)
  # The rollout that reuses the decode loop's log-probs (no policy forward pass), both forms.
  dcfg = pcfg.replace(rollout_logprobs="decode")
  rollout_dec = jax.jit(ppo.make_rollout(cfg, dcfg, reward_fn, max_new_tokens=N, eos_id=None, min_prompt_len=P))
  stepped_dec, _ = python_stepped_rollout(cfg, dcfg, rm_params, cfg)
  buf = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(prompts)

  def compiled_generate(temperature):
    gen_cfg = dict(cfg=cfg, min_prompt_len=P, max_new_tokens=N, temperature=temperature, top_k=None, top_p=None,
                   eos_id=None, with_logprobs=False)
    return jax.jit(lambda params, key: llama.decode_loop(params, buf, batch["prompt_lengths"], key, **gen_cfg)[0])

  generate_only, generate_greedy = compiled_generate(float(pcfg.temperature)), compiled_generate(0.0)
  key = jax.random.PRNGKey(seed + 4)
  params, extras = state.params, state.extras

  start = time.perf_counter()
  experience, _, _ = jax.block_until_ready(rollout(params, extras, batch, key))
  say(f"PPO: compiled rollout compiled + ran in {time.perf_counter() - start:.1f}s")
  # Where the rollout's time goes: each scoring pass alone on the rollout's sequences (compiled), the
  # advantages, and the policy + reference passes run as one vmapped pass over stacked parameters.
  tokens, mask = experience["tokens"], experience["mask"]
  m = experience["response_mask"]
  t_ = pcfg.temperature
  rm_pass = jax.jit(lambda t, k: alignment.reward_model_apply(rm_params, t, k, cfg))
  lp_pass = jax.jit(lambda p, t, k: ppo.token_logprobs(p, t, k, P, cfg, temperature=t_))
  value_pass = jax.jit(lambda p, t, k: ppo.token_values(p, t, k, P, cfg))
  two_pass = jax.jit(lambda a, b, t, k: (lp_pass(a, t, k), lp_pass(b, t, k)))
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params["policy"], extras["ref"])
  stacked_pass = jax.jit(lambda s_, t, k: jax.vmap(lambda p: ppo.token_logprobs(p, t, k, P, cfg, temperature=t_))(s_))
  adv_pass = jax.jit(lambda e: ppo.compute_advantages(pcfg, e["scores"], e["old_logp"], e["ref_logp"],
                                                      e["old_values"], e["response_mask"]))
  # The stacked form computes the same log-probs as the two plain passes.
  (lp_a, _), (lp_b, _) = two_pass(params["policy"], extras["ref"], tokens, mask)
  (lp_s, _) = stacked_pass(stacked, tokens, mask)
  if not (np.allclose(lp_s[0], lp_a, atol=1e-5) and np.allclose(lp_s[1], lp_b, atol=1e-5)):
    raise AssertionError("the stacked (vmapped) policy + reference pass disagrees with the plain passes")
  exp_dec, _, _ = rollout_dec(params, extras, batch, key)
  if not np.allclose(np.asarray(exp_dec["old_logp"]), np.asarray(experience["old_logp"]) * np.asarray(m), atol=5e-5):
    raise AssertionError("the decode loop's log-probs disagree with the policy forward pass")
  jax.block_until_ready(stepped(params, extras, batch["prompts"], key))
  jax.block_until_ready(stepped_dec(params, extras, batch["prompts"], key))
  jax.block_until_ready(update(params, state.opt_state, experience, None, key))
  jax.block_until_ready(generate_only(params["policy"], key))
  jax.block_until_ready(generate_greedy(params["policy"], key))
  jax.block_until_ready(stepped_generate(params["policy"], batch["prompts"], key, greedy=True))
  step_state = jax.tree_util.tree_map(jnp.copy, state)
  step_state, _ = jax.block_until_ready(step(step_state, batch))

  def one_step():
    nonlocal step_state
    step_state, metrics = step(step_state, batch)
    return metrics["loss"]

  # Call by call in turn (one call of each variant per pass), so that every variant sees the same
  # machine load; wall and process CPU time are both kept.
  variants = {
      "rollout": lambda: rollout(params, extras, batch, key),
      "python_rollout": lambda: stepped(params, extras, batch["prompts"], key),
      "update": lambda: update(params, state.opt_state, experience, None, key),
      "generation": lambda: generate_only(params["policy"], key),
      "iteration": one_step,
      "greedy_generation": lambda: generate_greedy(params["policy"], key),
      "python_greedy_generation": lambda: stepped_generate(params["policy"], batch["prompts"], key, greedy=True),
      "python_generation": lambda: stepped_generate(params["policy"], batch["prompts"], key),
      "rollout_decode_logprobs": lambda: rollout_dec(params, extras, batch, key),
      "python_rollout_decode_logprobs": lambda: stepped_dec(params, extras, batch["prompts"], key),
      "reward_model_pass": lambda: rm_pass(tokens, mask),
      "policy_pass": lambda: lp_pass(params["policy"], tokens, mask),
      "critic_pass": lambda: value_pass(params["value"], tokens, mask),
      "policy_and_reference_passes": lambda: two_pass(params["policy"], extras["ref"], tokens, mask),
      "stacked_policy_and_reference_pass": lambda: stacked_pass(stacked, tokens, mask),
      "advantages": lambda: adv_pass(experience),
  }
  one = sum(_timed(fn, 1)[0][0] for fn in variants.values())
  passes = max(rounds, _count(rounds * budget_s * 4, one, 60))
  wall = {name: [] for name in variants}
  for _ in range(passes):
    for name, fn in variants.items():
      wall[name] += _timed(fn, 1, name)[0]
  w = {name: median(t) for name, t in wall.items()}
  cpu = {name: median(CPU_TIMES[name]) for name in variants}
  roll, py, upd, gen, whole = w["rollout"], w["python_rollout"], w["update"], w["generation"], w["iteration"]
  greedy, py_greedy, py_gen = w["greedy_generation"], w["python_greedy_generation"], w["python_generation"]
  say(f"PPO timings over {passes} interleaved passes, median wall ms: "
      + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in w.items())
      + "; median CPU ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in cpu.items()))
  new_tokens = B * N
  scoring = w["reward_model_pass"] + w["policy_and_reference_passes"] + w["critic_pass"] + w["advantages"]
  say("rollout breakdown, median wall ms: generation " + f"{gen * 1e3:.1f}, reward model {w['reward_model_pass'] * 1e3:.1f}"
      f", policy {w['policy_pass'] * 1e3:.1f}, policy + reference {w['policy_and_reference_passes'] * 1e3:.1f} "
      f"(stacked under vmap {w['stacked_policy_and_reference_pass'] * 1e3:.1f}), critic {w['critic_pass'] * 1e3:.1f}, "
      f"advantages {w['advantages'] * 1e3:.1f}; sum {(gen + scoring) * 1e3:.1f} vs the rollout {roll * 1e3:.1f}")
  c = cpu
  say("the same in median process CPU ms: generation " + f"{c['generation'] * 1e3:.1f}, reward model "
      f"{c['reward_model_pass'] * 1e3:.1f}, policy {c['policy_pass'] * 1e3:.1f}, policy + reference "
      f"{c['policy_and_reference_passes'] * 1e3:.1f} (stacked {c['stacked_policy_and_reference_pass'] * 1e3:.1f}), "
      f"critic {c['critic_pass'] * 1e3:.1f}, advantages {c['advantages'] * 1e3:.1f}; rollout {c['rollout'] * 1e3:.1f}")
  scoring_cpu = (c["reward_model_pass"] + c["policy_and_reference_passes"] + c["critic_pass"] + c["advantages"])

  def ratios(t):   # the comparisons, from wall (w) or CPU (cpu) medians
    return {"rollout_decode_speedup": t["python_rollout_decode_logprobs"] / t["rollout_decode_logprobs"],
            "rollout_decode_vs_forward": t["rollout"] / t["rollout_decode_logprobs"],
            "rollout_speedup_if_scoring_were_free": t["python_rollout"] / t["generation"],
            "stacked_vs_two_passes": t["policy_and_reference_passes"] / t["stacked_policy_and_reference_pass"]}

  return {
      **ratios(w), **{f"{k}_cpu_time": v for k, v in ratios(cpu).items()},
      "scoring_fraction_of_rollout": scoring / roll, "scoring_fraction_of_rollout_cpu_time": scoring_cpu / c["rollout"],"rollout_tokens_per_s": new_tokens / roll, "python_rollout_tokens_per_s": new_tokens / py,
          "rollout_speedup": py / roll, "update_tokens_per_s": pcfg.ppo_epochs * B * (P + N) / upd,
          "generation_fraction": gen / whole, "iteration_s": whole, "rollout_s": roll, "update_s": upd,
          "generation_s": gen, "decode_speedup_sampled": py_gen / gen, "decode_speedup_greedy": py_greedy / greedy,
          "greedy_generation_s": greedy,
          "rollout_speedup_cpu_time": cpu["python_rollout"] / cpu["rollout"], "passes": passes}


def main(argv):
  del argv
  cpus = len(os.sched_getaffinity(0))
  threads = pin_threads(FLAGS.threads)  # before JAX's CPU backend starts
  rounds = 2 if FLAGS.quick else FLAGS.repeats
  budget = 0.3 if FLAGS.quick else 1.5   # seconds per side per round
  load_start = os.getloadavg()[0]
  wall_start = time.perf_counter()

  def say(msg):
    print(f"[{time.perf_counter() - wall_start:6.1f}s] {msg}", flush=True)

  cfg = bench_config()
  script = pathlib.Path(__file__).with_name("peer_trl_dpo.py")
  with PeerWorker(script, threads=threads) as worker:
    hello = worker.request("hello", threads=threads)
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}), torch {hello['torch']}, "
        f"transformers {hello['transformers']}, trl {hello['trl']}; threads {threads} (torch {hello['threads']}); "
        f"{rounds} rounds; load average {load_start:.1f}")
    if load_start > cpus:
      say(f"note: load average {load_start:.1f} > {cpus} CPUs: the machine is shared, timings are noisy")
    dpo = bench_dpo(cfg, worker, rounds=rounds, budget_s=budget, seed=FLAGS.seed, say=say)
  say(f"DPO step: jaxml {dpo['jax_tokens_per_s']:.0f} tokens/s, TRL {dpo['trl_tokens_per_s']:.0f} tokens/s "
      f"({dpo['speedup']:.2f}x; target >= {DPO_TARGET}x); compile {dpo['compile_s']:.1f}s")
  ppo_res = bench_ppo(cfg, rounds=rounds, budget_s=budget, seed=FLAGS.seed, say=say)
  say(f"PPO rollout: compiled {ppo_res['rollout_tokens_per_s']:.0f} new tokens/s, Python-stepped "
      f"{ppo_res['python_rollout_tokens_per_s']:.0f} ({ppo_res['rollout_speedup']:.1f}x; target >= "
      f"{ROLLOUT_TARGET}x); update {ppo_res['update_tokens_per_s']:.0f} tokens/s; iteration "
      f"{ppo_res['iteration_s'] * 1e3:.1f} ms, {100 * ppo_res['generation_fraction']:.0f}% generating")
  say(f"decode loop alone vs Python-stepped: sampled {ppo_res['decode_speedup_sampled']:.1f}x "
      f"({ppo_res['generation_s'] * 1e3:.1f} ms compiled), greedy {ppo_res['decode_speedup_greedy']:.1f}x "
      f"({ppo_res['greedy_generation_s'] * 1e3:.1f} ms compiled)")
  print_results({
      "threads": threads,
      "load_average_start": round(load_start, 2),
      "load_average_end": round(os.getloadavg()[0], 2),
      "dpo_jax_tokens_per_s": dpo["jax_tokens_per_s"],
      "dpo_trl_tokens_per_s": dpo["trl_tokens_per_s"],
      "dpo_first_loss_jax": dpo["first_loss_jax"],
      "dpo_first_loss_trl": dpo["first_loss_trl"],
      "dpo_speedup_vs_trl": dpo["speedup"],
      "ppo_rollout_tokens_per_s": ppo_res["rollout_tokens_per_s"],
      "ppo_python_rollout_tokens_per_s": ppo_res["python_rollout_tokens_per_s"],
      "ppo_rollout_speedup_vs_python": ppo_res["rollout_speedup"],
      "ppo_update_tokens_per_s": ppo_res["update_tokens_per_s"],
      "ppo_iteration_ms": ppo_res["iteration_s"] * 1e3,
      "ppo_generation_fraction": ppo_res["generation_fraction"],
      "ppo_rollout_speedup_vs_python_cpu_time": ppo_res["rollout_speedup_cpu_time"],
      "ppo_decode_speedup_vs_python_sampled": ppo_res["decode_speedup_sampled"],
      "ppo_decode_speedup_vs_python_greedy": ppo_res["decode_speedup_greedy"],
      **{f"ppo_{k}{sfx}": ppo_res[f"{k}{sfx}"] for sfx in ("", "_cpu_time") for k in (
          "rollout_decode_speedup", "rollout_decode_vs_forward", "rollout_speedup_if_scoring_were_free",
          "scoring_fraction_of_rollout", "stacked_vs_two_passes")},
  })


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
