"""PPO-RLHF: the rollout's layout, PPO = the plain policy gradient on a fresh rollout, each switch
doing what it says, GRPO/RLOO groups, resume through the training core, the KL stop, bad input."""
import functools
import os
import shutil
import signal
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from jaxml import alignment, llama, rl
from jaxml import train as jt
from jaxml.alignment import ppo

CFG = llama.LlamaConfig(vocab_size=16, dim=32, n_layers=2, n_heads=2, multiple_of=16, max_seq_len=16)
EOS = 1
B, P, N = 4, 4, 6
POLICY = llama.init(jax.random.PRNGKey(0), CFG)
REWARD_MODEL = alignment.reward_model_init(jax.random.PRNGKey(1), CFG)
LENGTHS = np.array([4, 1, 3, 4], np.int32)   # min 1: the rollout's default min_prompt_len, as generate_arrays'


def left_padded(rng, lengths, width=P):
  out = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    out[i, width - n:] = rng.integers(2, CFG.vocab_size, size=n)
  return out


PROMPTS = left_padded(np.random.default_rng(0), LENGTHS)
BATCH = {"prompts": PROMPTS, "prompt_lengths": LENGTHS}


def last_token_reward(tokens, mask, prompt_len):
  """The id at the last position where the mask is 1 (where a reward model reads its score)."""
  del prompt_len
  idx = jnp.max(mask * jnp.arange(mask.shape[1])[None], axis=1)
  return jnp.take_along_axis(tokens, idx[:, None], axis=1)[:, 0].astype(jnp.float32)


def perturbed(params, scale, seed):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# A policy a little away from the reference, so the KL and the ratios are not trivially 0 / 1.
MOVED = perturbed(POLICY, 0.02, 5)
# The configs whose rollout / step get compiled (a few, shared by the tests). GAE: PPO with the
# token-level KL in the reward and no reward/advantage processing, no clipping (the policy-gradient
# test), gamma = lam = 1 (returns are reward-to-go); max_kl for the stop test.
GAE = ppo.PPOConfig(kl_coef=0.1, reward_scaling=False, reward_norm=False, reward_clip=None, advantage_norm=False,
                    value_clip=None, gamma=1.0, lam=1.0, clip_surrogate=False, vf_coef=0.5, max_kl=1e-3)
RLOO = ppo.ppo_preset("rloo", group_size=3, kl_coef=0.0, clip_surrogate=False)


@functools.lru_cache(maxsize=None)
def jitted_rollout(pcfg):
  return jax.jit(ppo.make_rollout(CFG, pcfg, last_token_reward, max_new_tokens=N, eos_id=EOS))


def rollout(pcfg, params, extras=None, key=jax.random.PRNGKey(6)):
  extras = extras or {"ref": POLICY, "reward_moments": rl.running_moments().init()}
  return jitted_rollout(pcfg)(params, extras, BATCH, key)


@functools.lru_cache(maxsize=None)
def gae_experience():
  return rollout(GAE, {"policy": MOVED, "value": REWARD_MODEL})


class RolloutTest(chex.TestCase):

  def test_layout_matches_generate_arrays_and_the_score_lands_on_the_last_response_token(self):
    exp, _, metrics = gae_experience()
    # The same draw by the public generator on the prompts placed at the start of each row.
    right = np.zeros_like(PROMPTS)
    for i, n in enumerate(LENGTHS):
      right[i, :n] = PROMPTS[i, P - n:]
    new, logp, n_new = llama.generate_arrays(MOVED, CFG, right, LENGTHS, N, temperature=1.0, eos_id=EOS,
                                             rng=jax.random.PRNGKey(6))
    tokens, mask, m = map(np.asarray, (exp["tokens"], exp["mask"], exp["response_mask"]))
    np.testing.assert_array_equal(tokens[:, P:], np.asarray(new))
    np.testing.assert_array_equal(m.sum(1), np.asarray(n_new))
    np.testing.assert_array_equal(mask[:, :P], np.arange(P)[None] >= (P - LENGTHS)[:, None])
    np.testing.assert_array_equal(mask[:, P:], m)
    # Rollout log-probs (training forward, left-padded) equal the sampler's where the mask is 1.
    np.testing.assert_allclose(np.asarray(exp["old_logp"]) * m, np.asarray(logp) * m, atol=2e-5)
    # The score is the token at the last response position (EOS when one was drawn).
    last = tokens[np.arange(B), P + np.asarray(n_new) - 1]
    np.testing.assert_array_equal(np.asarray(exp["scores"]), last.astype(np.float32))
    self.assertTrue(np.any(np.asarray(n_new) < N) and np.any(last == EOS), "the test wants a row ended by EOS")
    # gamma = lam = 1: the return at the first response token is score - kl_coef * sum_t k1_t.
    k1 = (np.asarray(exp["old_logp"]) - np.asarray(exp["ref_logp"])) * m
    np.testing.assert_allclose(np.asarray(exp["returns"])[:, 0], last - 0.1 * k1.sum(1), rtol=1e-5, atol=1e-5)
    self.assertAlmostEqual(float(metrics["kl"]), float(k1.sum(1).mean()), places=5)
    self.assertNotEqual(float(metrics["kl"]), 0.0)

  def test_reward_switches(self):
    exp, _, _ = gae_experience()
    raw = np.asarray(exp["raw_scores"], np.float64)
    moments = rl.running_moments()
    prior = moments.update(moments.init(), jnp.array([0.0, 1.0, 5.0]))
    stream = np.concatenate([[0.0, 1.0, 5.0], raw])
    mean, std = stream.mean(), stream.std(ddof=1)
    for cfg, want in ((GAE, raw),
                      (GAE.replace(reward_scaling=True), raw / std),
                      (GAE.replace(reward_norm=True), (raw - mean) / std),
                      (GAE.replace(reward_norm=True, reward_clip=0.3), np.clip((raw - mean) / std, -0.3, 0.3))):
      score, mom = ppo.process_scores(cfg, exp["raw_scores"], prior)
      np.testing.assert_allclose(np.asarray(score), want, rtol=1e-5, atol=1e-6)
      self.assertEqual(float(mom.count), stream.size)

  def test_advantage_switches(self):
    exp, _, _ = gae_experience()
    args = (exp["scores"], exp["old_logp"], exp["ref_logp"], exp["old_values"], exp["response_mask"])
    configs = (GAE, GAE.replace(advantage_norm=True), GAE.replace(advantage_norm=True, advantage_clip=0.5),
               GAE.replace(kl_coef=0.0), GAE.replace(kl_estimator="k3"))
    results = jax.device_get(jax.jit(lambda *a: [ppo.compute_advantages(c, *a) for c in configs])(*args))
    (plain, ret, _), (normed, _, _), (clipped, _, _), (no_kl, ret0, kl_tok), (_, _, k3) = results
    np.testing.assert_allclose(plain, exp["advantages"], atol=1e-6)      # the rollout's own
    m = np.asarray(exp["response_mask"]) > 0
    a = np.asarray(normed)[m]
    self.assertAlmostEqual(float(a.mean()), 0.0, places=5)
    self.assertAlmostEqual(float(a.std()), 1.0, places=4)
    raw = np.asarray(plain)[m].astype(np.float64)
    np.testing.assert_allclose(a, (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(clipped)[m], np.clip(a, -0.5, 0.5), atol=1e-6)
    self.assertGreater(np.abs(a).max(), 0.5)
    np.testing.assert_array_equal(np.asarray(normed)[~m], 0.0)
    # No KL in the reward (kl_coef 0): the returns change by exactly the KL-to-go.
    to_go = np.cumsum(np.asarray(kl_tok)[:, ::-1], axis=1)[:, ::-1] * m
    np.testing.assert_allclose(np.asarray(ret0) - np.asarray(ret), 0.1 * to_go, atol=1e-5)
    # k3 instead of k1 in the reward: the per-token penalty is the k3 estimate.
    np.testing.assert_allclose(k3, rl.kl_penalty(exp["old_logp"], exp["ref_logp"], "k3") * m, atol=1e-7)

  def test_sampling_settings_reach_the_draw_and_log_probs_stay_the_policys_own(self):
    # MOSS-RLHF's sampling (temperature 0.8, top-p 0.9, repetition penalty 1.1 on the response only)
    # and its untempered log-probabilities: the draw equals the public generator's with the same
    # settings and key, and old_logp is log softmax(logits) of a plain forward pass (no temperature,
    # truncation or penalty).
    moss = ppo.ppo_preset("moss")
    self.assertEqual((moss.temperature, moss.top_p, moss.repetition_penalty, moss.penalize_prompt,
                      moss.logprobs_tempered), (0.8, 0.9, 1.1, False, False))
    pcfg = GAE.replace(temperature=0.8, top_p=0.9, repetition_penalty=1.1, penalize_prompt=False,
                       logprobs_tempered=False)
    exp, _, _ = rollout(pcfg, {"policy": MOVED, "value": REWARD_MODEL})
    right = np.zeros_like(PROMPTS)
    for i, n in enumerate(LENGTHS):
      right[i, :n] = PROMPTS[i, P - n:]
    new, _, n_new = llama.generate_arrays(MOVED, CFG, right, LENGTHS, N, temperature=0.8, top_p=0.9,
                                          repetition_penalty=1.1, penalize_prompt=False, eos_id=EOS,
                                          rng=jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(exp["tokens"])[:, P:], np.asarray(new))
    m = np.asarray(exp["response_mask"])
    np.testing.assert_array_equal(m.sum(1), np.asarray(n_new))
    plain, tempered = jax.jit(lambda t, k: [ppo.token_logprobs(MOVED, t, k, P, CFG, temperature=temp)[0]
                                            for temp in (1.0, 0.8)])(exp["tokens"], exp["mask"])
    np.testing.assert_allclose(np.asarray(exp["old_logp"]) * m, np.asarray(plain) * m, atol=1e-6)
    self.assertGreater(float(np.abs((np.asarray(tempered) - np.asarray(plain)) * m).max()), 1e-3)

  def test_decode_loop_log_probs_equal_the_forward_pass(self):
    # rollout_logprobs="decode" reuses the sampler's log-probs instead of a policy forward pass: same
    # draw, same advantages, log-probs equal to the forward pass's to float32 accumulation error.
    exp, _, metrics = gae_experience()
    dec, _, dmetrics = rollout(GAE.replace(rollout_logprobs="decode"), {"policy": MOVED, "value": REWARD_MODEL})
    m = np.asarray(exp["response_mask"])
    np.testing.assert_array_equal(np.asarray(dec["tokens"]), np.asarray(exp["tokens"]))
    np.testing.assert_allclose(np.asarray(dec["old_logp"]), np.asarray(exp["old_logp"]) * m, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dec["advantages"]), np.asarray(exp["advantages"]), atol=1e-4)
    # Its entropy is the one-sample estimate mean(-log pi(y_t)).
    self.assertAlmostEqual(float(dmetrics["entropy"]), float(-(np.asarray(exp["old_logp"]) * m).sum() / m.sum()),
                           places=4)
    self.assertNotAlmostEqual(float(dmetrics["entropy"]), float(metrics["entropy"]), places=4)

  def test_grpo_and_rloo_groups(self):
    G = RLOO.group_size
    exp, _, _ = rollout(RLOO, {"policy": MOVED, "value": {}})
    tokens, m = np.asarray(exp["tokens"]), np.asarray(exp["response_mask"])
    self.assertEqual(tokens.shape[0], B * G)
    np.testing.assert_array_equal(tokens[:, :P], np.repeat(PROMPTS, G, axis=0))   # rows of a prompt adjacent
    scores = np.asarray(exp["raw_scores"]).reshape(B, G)
    self.assertFalse(np.all(scores == scores[:, :1]), "the test wants some group with different scores")
    np.testing.assert_allclose(exp["advantages"], np.asarray(rl.rloo_advantages(scores)).reshape(-1)[:, None] * m,
                               rtol=1e-5, atol=1e-6)
    grpo = ppo.ppo_preset("grpo", group_size=G, kl_coef=0.0)
    adv, _, _ = ppo.compute_advantages(grpo, exp["raw_scores"], exp["old_logp"], exp["ref_logp"], exp["old_values"],
                                       exp["response_mask"])
    np.testing.assert_allclose(adv, np.asarray(rl.grpo_advantages(scores)).reshape(-1)[:, None] * m, rtol=1e-5,
                               atol=1e-6)
    # RLOO with the KL in the reward: each sequence score is first lowered by kl_coef * sum_t k1.
    kl_seq = ((np.asarray(exp["old_logp"]) - np.asarray(exp["ref_logp"])) * m).sum(1)
    adv, _, _ = ppo.compute_advantages(RLOO.replace(kl_coef=0.5), exp["raw_scores"], exp["old_logp"],
                                       exp["ref_logp"], exp["old_values"], exp["response_mask"])
    want = rl.rloo_advantages((np.asarray(exp["raw_scores"]) - 0.5 * kl_seq).reshape(B, G))
    np.testing.assert_allclose(adv, np.asarray(want).reshape(-1)[:, None] * m, rtol=1e-5, atol=1e-5)


# Plain SGD at lr 1 (a parameter's change is minus its gradient), except lr 0 at the optimizer's
# second update (the KL-stop test holds the policy there for one step).
SGD = optax.sgd(lambda count: jnp.where(count == 1, 0.0, 1.0))


@functools.lru_cache(maxsize=None)
def sgd_step(pcfg):
  return jax.jit(ppo.make_step(CFG, pcfg, last_token_reward, max_new_tokens=N, eos_id=EOS, tx=SGD))


def fresh_state(pcfg, policy=MOVED, ref=POLICY, tx=None):
  return ppo.init_state(jax.random.PRNGKey(2), policy, ref, REWARD_MODEL, pcfg, policy_cfg=CFG, tx=tx)


class PolicyGradientTest(chex.TestCase):

  def test_one_epoch_unclipped_fresh_rollout_step_is_the_policy_gradient(self):
    # The whole step (GAE, KL in the reward, one epoch, one minibatch, no clipping) under SGD at lr 1.
    state = fresh_state(GAE, tx=SGD)
    exp, _, _ = rollout(GAE, state.params, state.extras, key=jax.random.fold_in(jt.step_rng(state), 0))
    before = jax.device_get(state.params["policy"])
    new_state, metrics = sgd_step(GAE)(state, BATCH)
    moved = jax.tree_util.tree_map(lambda a, b: a - b, before, jax.device_get(new_state.params["policy"]))
    tokens, mask, m, adv = exp["tokens"], exp["mask"], exp["response_mask"], exp["advantages"]

    # -(1/n) sum_t A_t log pi(y_t | y_<t, x): the full log-softmax at the positions before each response token.
    def pg(p):
      h = llama.decoder(p, llama.embed(p, tokens, CFG), CFG, attention_mask=mask)
      logp = jax.nn.log_softmax(llama.head(p, h, CFG), axis=-1)[:, P - 1:-1]
      picked = jnp.take_along_axis(logp, tokens[:, P:, None], axis=-1)[..., 0]
      return -jnp.sum(adv * picked * m) / jnp.sum(m)
    grads = jax.device_get(jax.jit(jax.grad(pg))(MOVED))
    chex.assert_trees_all_close(moved, grads, rtol=2e-4, atol=2e-6)
    self.assertGreater(float(optax.tree.norm(grads)), 1e-3)
    self.assertEqual(float(metrics["clip_fraction"]), 0.0)
    self.assertAlmostEqual(float(metrics["ratio"]), 1.0, places=5)   # a fresh rollout

  def test_rloo_loss_and_no_importance_sampling_are_the_policy_gradient(self):
    # One advantage per sequence, no KL: -(1/n) sum_b A_b log pi(y_b | x_b), with llama.sequence_logprobs;
    # and without importance sampling (-A log pi) the same gradient on a fresh rollout.
    exp, _, _ = rollout(RLOO, {"policy": MOVED, "value": {}})
    tokens, mask, m, adv = exp["tokens"], exp["mask"], exp["response_mask"], exp["advantages"]
    loss_mask = jnp.concatenate([jnp.zeros((tokens.shape[0], P)), m], axis=1)

    def pg(p):
      logps = llama.sequence_logprobs(p, tokens, loss_mask, CFG, attention_mask_BxT=mask)
      return -jnp.sum(adv[:, 0] * logps) / jnp.sum(m)

    @jax.jit
    def grads(p):
      with_is = jax.grad(lambda q: ppo.make_loss(CFG, RLOO)({"policy": q, "value": {}}, exp)[0])(p)
      without = jax.grad(lambda q: ppo.make_loss(CFG, RLOO.replace(importance_sampling=False))(
          {"policy": q, "value": {}}, exp)[0])(p)
      return with_is, without, jax.grad(pg)(p)
    with_is, without, want = jax.device_get(grads(MOVED))
    chex.assert_trees_all_close(with_is, want, rtol=2e-4, atol=2e-6)
    chex.assert_trees_all_close(without, want, rtol=2e-4, atol=2e-6)
    self.assertGreater(float(optax.tree.norm(want)), 1e-3)


class LossSwitchTest(chex.TestCase):

  def test_each_term_adds_what_it_should(self):
    exp, _, _ = gae_experience()
    critic = perturbed(REWARD_MODEL, 0.05, 9)
    params = {"policy": MOVED, "value": critic}
    ptx = {"tokens": jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, size=(2, 9)), jnp.int32)}
    values = ppo.token_values(critic, exp["tokens"], exp["mask"], P, CFG)
    m = exp["response_mask"]
    c = 0.5 * float(np.median(np.abs(np.asarray(values - exp["old_values"]))[np.asarray(m) > 0]))
    configs = {"base": GAE, "entropy": GAE.replace(entropy_coef=0.1), "ptx": GAE.replace(ptx_coef=0.5),
               "as_loss": GAE.replace(kl_mode="as_loss", kl_estimator="k3"), "value_clip": GAE.replace(value_clip=c),
               "surrogate": GAE.replace(clip_surrogate=True)}

    @jax.jit
    def losses(params):
      out = {name: ppo.make_loss(CFG, cfg)(params, exp, ptx) for name, cfg in configs.items()}
      logp, ent = ppo.token_logprobs(params["policy"], exp["tokens"], exp["mask"], P, CFG)
      return out, logp, ent, llama.loss_fn(params["policy"], ptx, CFG)[0]
    out, logp, ent, ptx_loss = jax.device_get(losses(params))
    base, bm = out["base"]
    np.testing.assert_allclose(logp * m, exp["old_logp"] * m, atol=1e-6)
    self.assertAlmostEqual(float(out["entropy"][0] - base), -0.1 * float(rl.masked_mean(ent, m)), places=5)
    self.assertAlmostEqual(float(out["ptx"][0] - base), 0.5 * float(ptx_loss), places=5)
    k3 = rl.masked_mean(rl.kl_penalty(logp, exp["ref_logp"], "k3"), m)
    self.assertAlmostEqual(float(out["as_loss"][0] - base), 0.1 * float(k3), places=5)
    # The critic moved away from the rollout's values: with a tight clip some tokens clip, none without.
    want, _ = rl.ppo_value_loss(values, exp["old_values"], exp["returns"], m, clip_eps=c)
    cm = out["value_clip"][1]
    self.assertGreater(float(cm["value_clip_fraction"]), 0.0)
    self.assertEqual(float(bm["value_clip_fraction"]), 0.0)
    self.assertAlmostEqual(float(cm["value_loss"]), float(want), places=5)
    # Clipped surrogate on: ratios are 1 on this fresh rollout, so the loss is the same.
    self.assertAlmostEqual(float(out["surrogate"][0]), float(base), places=6)

  def test_inits_and_optimizer(self):
    s = ppo.init_state(jax.random.PRNGKey(0), POLICY, POLICY, REWARD_MODEL, GAE, policy_cfg=CFG)
    chex.assert_trees_all_equal(s.params["value"], REWARD_MODEL)
    chex.assert_trees_all_equal(s.params["policy"], POLICY)
    s = ppo.init_state(jax.random.PRNGKey(0), MOVED, POLICY, None, GAE.replace(critic_init="policy",
                                                                             policy_init="random"), policy_cfg=CFG)
    chex.assert_trees_all_equal(s.params["value"]["layers"], MOVED["layers"])   # the SFT decoder, a fresh head
    self.assertGreater(float(jnp.abs(s.params["policy"]["output"] - MOVED["output"]).max()), 1e-3)
    chex.assert_trees_all_equal(s.extras["ref"], POLICY)
    s = ppo.init_state(jax.random.PRNGKey(0), POLICY, POLICY, None, RLOO, policy_cfg=CFG)
    self.assertEqual(s.params["value"], {})   # no critic for GRPO / RLOO
    # Global clipping over policy and critic together, then one Adam per model at its own rate.
    g = jax.tree_util.tree_map(lambda x: 1e3 * jnp.ones_like(x), {"policy": POLICY, "value": REWARD_MODEL})
    norm = float(optax.tree.norm(g))
    for clip in (1.0, None):
      tx = ppo.make_optimizer(GAE.replace(max_grad_norm=clip, policy_lr=1.0, value_lr=2.0))
      updates, opt_state = jax.jit(lambda g: tx.update(g, tx.init(g)))(g)  # noqa: B023
      # Adam's first step is -lr * g / (|g| + eps) per entry, g the (clipped) gradient.
      gc = 1e3 * (clip / norm if clip else 1.0)
      step = gc / (gc + GAE.adam_eps)
      np.testing.assert_allclose(updates["policy"]["norm"], -1.0 * step, rtol=1e-5)
      np.testing.assert_allclose(updates["value"]["norm"], -2.0 * step, rtol=1e-5)
      # Adam's first moment holds (1 - b1) times the (clipped) gradient of both models together.
      mu = [v for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "mu")]
      self.assertLen(mu, 2)
      want = (1 - GAE.adam_b1) * (1.0 if clip else float(optax.tree.norm(g)))
      self.assertAlmostEqual(float(optax.tree.norm(mu)) / want, 1.0, places=4)


# --- through the training core: resume, the KL stop ---

# With the adaptive KL controller (its coefficient is state: extras["kl_coef"]); gain B / horizon = 0.5.
KL_TARGET, KL_HORIZON = 0.05, 8.0
RESUME_CFG = ppo.ppo_preset("ppo_max", policy_lr=3e-3, value_lr=3e-3, num_minibatches=2, ppo_epochs=2,
                            kl_target=KL_TARGET, kl_horizon=KL_HORIZON)


@functools.lru_cache(maxsize=None)
def resume_step():
  return jax.jit(ppo.make_step(CFG, RESUME_CFG, last_token_reward, max_new_tokens=N, eos_id=EOS), donate_argnums=0)


def batch_fn(step, sigterm_at=None):
  if sigterm_at is not None and step == sigterm_at:
    os.kill(os.getpid(), signal.SIGTERM)
  rng = np.random.default_rng([7, step])
  lengths = rng.integers(1, P + 1, size=B).astype(np.int32)
  return {"prompts": left_padded(rng, lengths), "prompt_lengths": lengths}


def train(workdir, num_steps, step, init, *, sigterm_at=None, every=1):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                    jax.eval_shape(init))
  ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=every, keep=10, async_save=False)
  try:
    state, start = jt.restore_or_init(ckpt, abstract, init)
    result = jt.train(step, state, functools.partial(batch_fn, sigterm_at=sigterm_at), num_steps=num_steps,
                      workdir=workdir, start_step=start, checkpointer=ckpt, tensorboard=False, plot=False,
                      finite_keys=ppo.FINITE_KEYS, log_every=1, print_fn=lambda s: None)
  finally:
    ckpt.close()
  return start, result


class CoreTest(chex.TestCase):

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_ppo_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_sigterm_and_resume_equal_an_uninterrupted_run_bitwise(self):
    init = lambda: ppo.init_state(jax.random.PRNGKey(4), POLICY, POLICY, REWARD_MODEL, RESUME_CFG,  # noqa: E731
                                  policy_cfg=CFG)
    # Checkpoints only at the end (every=4): the SIGTERM save is the one the rerun resumes from.
    _, whole = train(self.tmpdir(), 4, resume_step(), init, every=4)
    workdir = self.tmpdir()
    _, first = train(workdir, 4, resume_step(), init, sigterm_at=2, every=4)
    self.assertTrue(first.preempted)
    self.assertEqual(first.step, 3)
    start, second = train(workdir, 4, resume_step(), init, every=4)
    self.assertEqual((start, second.step), (3, 4))
    chex.assert_trees_all_equal(jax.device_get(second.state), jax.device_get(whole.state))
    self.assertEqual(second.history[-1]["reward"], whole.history[-1]["reward"])   # the same rollout drawn
    self.assertEqual(float(whole.state.extras["reward_moments"].count), 4 * B)
    self.assertGreater(len({r["reward"] for r in whole.history}), 1)   # fresh rollouts every step
    # The adaptive KL coefficient, step by step: each rollout uses the current value, then
    # kl_coef <- kl_coef * (1 + clip(kl / target - 1, -0.2, 0.2) * rows / horizon) (Ziegler et al. 2019).
    # Tolerance: a few float32 roundings per step, over 4 steps.
    coef = RESUME_CFG.kl_coef
    for record in whole.history:
      np.testing.assert_allclose(record["kl_coef"], coef, rtol=2e-6)
      coef *= 1.0 + np.clip(record["kl"] / KL_TARGET - 1.0, -0.2, 0.2) * B / KL_HORIZON
    np.testing.assert_allclose(float(whole.state.extras["kl_coef"]), coef, rtol=2e-6)
    self.assertNotAlmostEqual(coef, RESUME_CFG.kl_coef, places=3)

  def test_kl_over_max_kl_or_nan_stops_and_keeps_the_last_good_checkpoint(self):
    # GAE's step (max_kl 1e-3) from policy == reference, the optimizer one update in: update 1 has
    # lr 0 (KL stays 0 at rollouts 1 and 2), update 2 lr 1 (rollout 3 beyond max_kl).
    def init():
      state = fresh_state(GAE, policy=POLICY, tx=SGD)
      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      return state._replace(opt_state=SGD.update(zeros, state.opt_state)[1])
    state, kls = init(), []
    for s in range(3):
      state, metrics = sgd_step(GAE)(state, batch_fn(s))
      kls.append(float(metrics["kl"]))
    self.assertEqual(kls[:2], [0.0, 0.0])
    self.assertGreater(kls[2], GAE.max_kl, "the test wants the third rollout beyond max_kl")
    workdir = self.tmpdir()
    with self.assertRaises(jt.NonFiniteLossError) as cm:
      train(workdir, 5, sgd_step(GAE), init)
    # Rollout 3 measured the state after update 2: that state is discarded, state 1 is the last good one.
    self.assertEqual((cm.exception.step, cm.exception.last_good_step), (3, 1))
    self.assertIn("kl_guard is nan at step 3", str(cm.exception))
    ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=1)
    self.assertEqual(ckpt.all_steps(), [1])
    ckpt.close()
    # A NaN reference makes the KL NaN at the first rollout: nothing good is kept.
    nan_ref = jax.tree_util.tree_map(lambda x: x * jnp.nan, POLICY)
    init = lambda: fresh_state(GAE, policy=POLICY, ref=nan_ref, tx=SGD)  # noqa: E731
    with self.assertRaisesRegex(jt.NonFiniteLossError, "kl_guard is nan at step 1.*no good checkpoint remains"):
      train(self.tmpdir(), 2, sgd_step(GAE), init)


class AdaptiveKLTest(chex.TestCase):

  def test_controller_against_the_formula(self):
    # e = clip(kl / target - 1, -0.2, 0.2); coef' = coef (1 + e rows / horizon): inside the clip, at
    # and beyond both ends (the clip holds a KL twice the target to +0.2, a zero KL to -0.2).
    target, horizon, rows = 6.0, 10000.0, 256                      # trl <= 0.11's target and horizon
    kls = jnp.array([6.6, 5.7, 12.0, 0.0, 6.0, 7.2, 4.8], jnp.float32)
    got = np.asarray(jax.vmap(lambda kl: ppo.adaptive_kl_coef(jnp.float32(0.2), kl, target=target, horizon=horizon,
                                                              rows=rows))(kls))
    e = np.array([0.1, -0.05, 0.2, -0.2, 0.0, 0.2, -0.2])
    np.testing.assert_allclose(got, 0.2 * (1 + e * rows / horizon), rtol=1e-6)
    # Off by default in every preset (their sources fix the coefficient); the state holds the start value.
    for name in ppo.PRESETS:
      self.assertIsNone(ppo.ppo_preset(name).kl_target, name)
    s = fresh_state(GAE)
    self.assertEqual(float(s.extras["kl_coef"]), np.float32(GAE.kl_coef))
    with self.assertRaisesRegex(ValueError, "kl_target must be > 0"):
      ppo.PPOConfig(kl_target=0.0)
    with self.assertRaisesRegex(ValueError, "kl_coef must be > 0 with kl_target"):
      ppo.PPOConfig(kl_target=1.0, kl_coef=0.0)
    with self.assertRaisesRegex(ValueError, "rollout_logprobs='decode'"):
      ppo.PPOConfig(rollout_logprobs="decode", temperature=0.8, logprobs_tempered=False)
    with self.assertRaisesRegex(ValueError, "top_p must lie"):
      ppo.PPOConfig(top_p=1.5)


class BadInputTest(chex.TestCase):

  def test_clear_errors_before_compute(self):
    step = ppo.make_step(CFG, GAE, last_token_reward, max_new_tokens=N, eos_id=EOS)
    state = fresh_state(GAE)
    wide = {"prompts": np.ones((B, 11), np.int32), "prompt_lengths": np.full((B,), 11, np.int32)}
    with self.assertRaisesRegex(ValueError, r"batch\['prompts'\] width P=11 \+ max_new_tokens=6"):
      step(state, wide)
    with self.assertRaisesRegex(TypeError, r"batch\['prompts'\] must be an integer"):
      step(state, {**BATCH, "prompts": PROMPTS.astype(np.float32)})
    with self.assertRaisesRegex(ValueError, r"batch\['prompt_lengths'\] must be \[B=4\]"):
      step(state, {**BATCH, "prompt_lengths": LENGTHS[:3]})
    with self.assertRaisesRegex(ValueError, r"batch\['prompt_lengths'\] must lie in"):
      step(state, {**BATCH, "prompt_lengths": np.array([4, 0, 3, 4], np.int32)})
    with self.assertRaisesRegex(ValueError, "ptx_coef > 0 needs"):
      ppo.make_step(CFG, GAE.replace(ptx_coef=1.0), last_token_reward, max_new_tokens=N, eos_id=EOS)(state, BATCH)
    other = llama.init(jax.random.PRNGKey(0), CFG.replace(n_layers=3))
    with self.assertRaisesRegex(ValueError, "ref_params"):
      ppo.init_state(jax.random.PRNGKey(0), POLICY, other, REWARD_MODEL, GAE, policy_cfg=CFG)
    with self.assertRaisesRegex(ValueError, "value_params is None"):
      ppo.init_state(jax.random.PRNGKey(0), POLICY, POLICY, None, GAE, policy_cfg=CFG)
    with self.assertRaisesRegex(ValueError, "value_params must be a reward-model tree"):
      ppo.init_state(jax.random.PRNGKey(0), POLICY, POLICY, POLICY, GAE, policy_cfg=CFG)
    with self.assertRaisesRegex(ValueError, r"state.extras\['ref'\]"):
      step(state._replace(extras={**state.extras, "ref": other}), BATCH)
    with self.assertRaisesRegex(ValueError, "group_size must be >= 2"):
      ppo.ppo_preset("grpo", group_size=1)
    with self.assertRaisesRegex(ValueError, "unknown PPO preset"):
      ppo.ppo_preset("ppo-max")
    with self.assertRaisesRegex(ValueError, "num_minibatches"):
      ppo.make_step(CFG, GAE.replace(num_minibatches=3), last_token_reward, max_new_tokens=N, eos_id=EOS)(state, BATCH)


if __name__ == "__main__":
  absltest.main()
