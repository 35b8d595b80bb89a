"""Alignment throughput: a DPO training step against TRL's, and PPO's compiled rollout and update.

    python -m benchmarks.alignment_bench                 # a few minutes on 2 cores
    python -m benchmarks.alignment_bench --quick         # smoke run (2 short rounds)
    python -m benchmarks.alignment_bench --repeats=5 --threads=2
    python -m benchmarks.alignment_bench --parts=ppo      # PPO on the small config only

DPO (and PPO's second model) on one tiny Llama (`bench_config`: vocab 512, dim 128, 2 layers, float32):

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
  * PPO (`alignment.ppo`, a reward model as reward_fn), on two models: `ppo_*` the
    alignment experiment's small config (the issue's: `experiments/configs/alignment.py:small`,
    its Llama of dim 32 over 5 ids, its first PPO run's config (ppo_max, 2 epochs x 4
    minibatches), 64 rows, the EOS prompt, up to 6 new tokens, EOS ends a row; random
    weights), and `ppo_dim128_*` the DPO benchmark's Llama (16 prompts of 8 tokens, 32 new
    tokens each, no EOS; one epoch in 2 minibatches). The compiled rollout (the Llama decode
    loop, reward model, policy, reference and critic passes, advantages: one program) against
    the same jaxml functions stepped from Python (a jitted prefill, one jitted decode call per
    new token on the key chain the compiled loop splits, with an EOS id the host check after
    each token, then the jitted scoring passes; checked to draw the same tokens and
    advantages first); new tokens/s. Target >= 5x. The update (`ppo.make_update`, one
    compiled scan over the minibatches) against its Python-stepped form (one jitted call per
    minibatch; checked to give the same parameters), in tokens/s (rows x prompt+response
    tokens per epoch); and the fraction of a whole PPO iteration (`ppo.make_step`, jitted)
    spent generating (the decode loop alone, timed on the same shapes).
  * Where the rollout's time goes: the decode loop alone, each scoring pass alone on the
    rollout's sequences (reward model, policy, reference, critic), the advantages; the
    rollout with `rollout_logprobs="decode"` (the decode loop's log-probs reused, no policy
    pass) against its own Python-stepped form and against the forward-pass rollout; the
    policy and reference passes as one vmapped pass over stacked parameters against two
    plain passes (checked equal first); and two bounds on the compiled/stepped ratio: if
    the compiled decode loop cost nothing (Python-stepped rollout / the scoring passes,
    which both forms run compiled) and if the scoring cost nothing (Python-stepped rollout /
    compiled decode loop alone).

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
from benchmarks.ppo_forms import check_stepped_forms, ppo_parts, python_stepped_rollout, small_config_setup
from jaxml import alignment, llama
from jaxml import train as jt
from jaxml.alignment import ppo
from jaxml.train import hostmem

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timing rounds (DPO: alternating jaxml/TRL); figures are medians of all calls.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 short rounds.")
flags.DEFINE_integer("threads", None, "CPU threads for both sides (default: CPUs this process may use).")
flags.DEFINE_integer("seed", 0, "Seed for weights and token batches.")
flags.DEFINE_list("parts", ["dpo", "ppo", "ppo_dim128"], "What to measure: dpo, ppo (the alignment experiment's "
                  "small config), ppo_dim128 (the DPO benchmark's Llama).")

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

def dim128_setup(seed):
  """The DPO benchmark's Llama (dim 128, vocab 512): 16 random prompts of 8 tokens, 32 new tokens, no EOS."""
  cfg = bench_config()
  prompts = np.random.default_rng(seed + 2).integers(1, cfg.vocab_size, size=(PPO_PROMPTS, PPO_PROMPT_LEN))
  return dict(label=f"the DPO benchmark's Llama (dim 128, vocab 512: {PPO_PROMPTS} rows, prompt {PPO_PROMPT_LEN}, "
                    f"{PPO_NEW} new tokens, no EOS)",
              cfg=cfg, pcfg=ppo.ppo_preset("ppo_max", num_minibatches=2, policy_lr=1e-4, value_lr=1e-4),
              prompts=prompts.astype(np.int32), new_tokens=PPO_NEW, eos_id=None)


def bench_ppo(setup, *, rounds, budget_s, seed, say) -> dict:
  say(f"PPO on {setup['label']}")
  CPU_TIMES.clear()
  parts = ppo_parts(setup, seed)
  cfg, pcfg, batch, B, P, N, eos = (parts[k] for k in ("cfg", "pcfg", "batch", "B", "P", "N", "eos"))
  rm_params, reward_fn, state, key = parts["rm_params"], parts["reward_fn"], parts["state"], parts["key"]
  rollout, stepped, stepped_generate = parts["rollout"], parts["stepped"], parts["stepped_generate"]
  update, stepped_update = parts["update"], parts["stepped_update"]
  step = jax.jit(ppo.make_step(cfg, pcfg, reward_fn, max_new_tokens=N, eos_id=eos, min_prompt_len=P),
                 donate_argnums=0)
  # The rollout that reuses the decode loop's log-probs (no policy forward pass), both forms.
  dcfg = pcfg.replace(rollout_logprobs="decode")
  rollout_dec = jax.jit(ppo.make_rollout(cfg, dcfg, reward_fn, max_new_tokens=N, eos_id=eos, min_prompt_len=P))
  stepped_dec, _ = python_stepped_rollout(cfg, dcfg, rm_params, cfg, P, N, eos)
  buf = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(batch["prompts"])

  def compiled_generate(temperature):
    gen_cfg = dict(cfg=cfg, min_prompt_len=P, max_new_tokens=N, temperature=temperature, top_k=None,
                   top_p=pcfg.top_p, eos_id=eos, with_logprobs=False)
    return jax.jit(lambda params, key: llama.decode_loop(params, buf, batch["prompt_lengths"], key, **gen_cfg)[0])

  generate_only, generate_greedy = compiled_generate(float(pcfg.temperature)), compiled_generate(0.0)
  params, extras = state.params, state.extras

  start = time.perf_counter()
  experience, info = check_stepped_forms(parts)
  say(f"PPO: compiled and stepped rollout and update compiled + ran in {time.perf_counter() - start:.1f}s; the "
      f"stepped rollout equals the compiled one on {info['rows_equal']} of {B} rows "
      f"({100 * info['token_fraction']:.1f}% of the tokens), mean response length "
      f"{float(experience['response_mask'].sum(axis=1).mean()):.2f} of {N}; the stepped update's parameters "
      f"differ by at most {info['param_gap']:.1e}")
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
  check_stepped_forms(dict(parts, rollout=rollout_dec, stepped=stepped_dec))   # the decode-log-prob forms too
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
      "python_update": lambda: stepped_update(params, state.opt_state, experience, key),
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
  say(f"PPO timings over {passes} interleaved passes, median wall ms: "
      + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in w.items())
      + "; median CPU ms: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in cpu.items()))
  new_tokens = float(experience["response_mask"].sum())

  def scoring(t):
    return t["reward_model_pass"] + t["policy_and_reference_passes"] + t["critic_pass"] + t["advantages"]

  for name, t in (("wall", w), ("process CPU", cpu)):
    say(f"rollout breakdown, median {name} ms: generation {t['generation'] * 1e3:.2f}, reward model "
        f"{t['reward_model_pass'] * 1e3:.2f}, policy {t['policy_pass'] * 1e3:.2f}, policy + reference "
        f"{t['policy_and_reference_passes'] * 1e3:.2f} (stacked under vmap "
        f"{t['stacked_policy_and_reference_pass'] * 1e3:.2f}), critic {t['critic_pass'] * 1e3:.2f}, advantages "
        f"{t['advantages'] * 1e3:.2f}; sum {(t['generation'] + scoring(t)) * 1e3:.2f} vs the rollout "
        f"{t['rollout'] * 1e3:.2f}")

  def ratios(t):   # the comparisons, from wall (w) or CPU (cpu) medians
    return {"rollout_speedup": t["python_rollout"] / t["rollout"],
            "update_speedup": t["python_update"] / t["update"],
            "rollout_decode_speedup": t["python_rollout_decode_logprobs"] / t["rollout_decode_logprobs"],
            "rollout_decode_vs_forward": t["rollout"] / t["rollout_decode_logprobs"],
            # Bounds on the compiled/stepped ratio: the compiled rollout can cost no less than its
            # scoring passes (which the stepped form also runs compiled), nor less than its decode loop.
            "rollout_speedup_if_generation_were_free": t["python_rollout"] / scoring(t),
            "rollout_speedup_if_scoring_were_free": t["python_rollout"] / t["generation"],
            "scoring_fraction_of_rollout": scoring(t) / t["rollout"],
            "decode_speedup_sampled": t["python_generation"] / t["generation"],
            "decode_speedup_greedy": t["python_greedy_generation"] / t["greedy_generation"],
            "stacked_vs_two_passes": t["policy_and_reference_passes"] / t["stacked_policy_and_reference_pass"]}

  return {
      **ratios(w), **{f"{k}_cpu_time": v for k, v in ratios(cpu).items()},
      "rollout_tokens_per_s": new_tokens / w["rollout"], "python_rollout_tokens_per_s": new_tokens / w["python_rollout"],
      "update_tokens_per_s": pcfg.ppo_epochs * B * (P + N) / w["update"],
      "python_update_tokens_per_s": pcfg.ppo_epochs * B * (P + N) / w["python_update"],
      "generation_fraction": w["generation"] / w["iteration"], "iteration_ms": w["iteration"] * 1e3,
      "rollout_ms": w["rollout"] * 1e3, "generation_ms": w["generation"] * 1e3, "passes": passes}


PPO_KEYS = ("rollout_tokens_per_s", "python_rollout_tokens_per_s", "rollout_speedup", "rollout_speedup_cpu_time",
            "update_tokens_per_s", "python_update_tokens_per_s", "update_speedup", "update_speedup_cpu_time",
            "iteration_ms", "rollout_ms", "generation_ms", "generation_fraction",
            "rollout_speedup_if_generation_were_free", "rollout_speedup_if_generation_were_free_cpu_time",
            "rollout_speedup_if_scoring_were_free", "rollout_speedup_if_scoring_were_free_cpu_time",
            "scoring_fraction_of_rollout", "scoring_fraction_of_rollout_cpu_time",
            "decode_speedup_sampled", "decode_speedup_greedy", "rollout_decode_speedup", "rollout_decode_vs_forward",
            "stacked_vs_two_passes")


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

  unknown = set(FLAGS.parts) - {"dpo", "ppo", "ppo_dim128"}
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; expected dpo, ppo, ppo_dim128")
  say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}); threads {threads}; "
      f"{rounds} rounds; load average {load_start:.1f}")
  if load_start > cpus:
    say(f"note: load average {load_start:.1f} > {cpus} CPUs: the machine is shared, timings are noisy")
  results = {"threads": threads, "load_average_start": round(load_start, 2)}
  if "dpo" in FLAGS.parts:
    cfg = bench_config()
    script = pathlib.Path(__file__).with_name("peer_trl_dpo.py")
    with PeerWorker(script, threads=threads) as worker:
      hello = worker.request("hello", threads=threads)
      say(f"peer: torch {hello['torch']}, transformers {hello['transformers']}, trl {hello['trl']}; threads "
          f"{hello['threads']}")
      dpo = bench_dpo(cfg, worker, rounds=rounds, budget_s=budget, seed=FLAGS.seed, say=say)
    say(f"DPO step: jaxml {dpo['jax_tokens_per_s']:.0f} tokens/s, TRL {dpo['trl_tokens_per_s']:.0f} tokens/s "
        f"({dpo['speedup']:.2f}x; target >= {DPO_TARGET}x); compile {dpo['compile_s']:.1f}s")
    results.update({"dpo_jax_tokens_per_s": dpo["jax_tokens_per_s"], "dpo_trl_tokens_per_s": dpo["trl_tokens_per_s"],
                    "dpo_first_loss_jax": dpo["first_loss_jax"], "dpo_first_loss_trl": dpo["first_loss_trl"],
                    "dpo_speedup_vs_trl": dpo["speedup"]})
  ppo_runs = {}
  for prefix, setup in (("ppo", small_config_setup), ("ppo_dim128", dim128_setup)):
    if prefix not in FLAGS.parts:
      continue
    r = ppo_runs[prefix] = bench_ppo(setup(FLAGS.seed), rounds=rounds, budget_s=budget, seed=FLAGS.seed, say=say)
    say(f"PPO rollout: compiled {r['rollout_tokens_per_s']:.0f} new tokens/s, Python-stepped "
        f"{r['python_rollout_tokens_per_s']:.0f} ({r['rollout_speedup']:.2f}x, CPU time "
        f"{r['rollout_speedup_cpu_time']:.2f}x; target >= {ROLLOUT_TARGET}x; at most "
        f"{r['rollout_speedup_if_generation_were_free']:.2f}x if the compiled decode loop cost nothing); update "
        f"{r['update_tokens_per_s']:.0f} tokens/s ({r['update_speedup']:.2f}x the Python-stepped update); "
        f"iteration {r['iteration_ms']:.1f} ms, {100 * r['generation_fraction']:.0f}% generating; decode loop "
        f"alone vs Python-stepped: sampled {r['decode_speedup_sampled']:.2f}x, greedy {r['decode_speedup_greedy']:.2f}x")
  results.update({f"{prefix}_{k}": r[k] for prefix, r in ppo_runs.items() for k in PPO_KEYS})
  results["load_average_end"] = round(os.getloadavg()[0], 2)
  print_results(results)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
