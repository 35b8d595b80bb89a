"""Acting: `act` is the argmax over the decoder's restricted logits; the compiled evaluation equals a Python loop."""
import functools

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import gato
from jaxml.gato import model, policy
from jaxml.gato import sequence as sq

LAYOUT = gato.TokenLayout(text_vocab=256, discrete_vocab=16)
CFG = model.preset("tiny", vocab_size=LAYOUT.vocab_size, n_layers=1)
TWO_D = sq.TaskSpec.create("two_d", {"pos": sq.Field("continuous", (3,)),
                                     "flag": sq.Field("discrete", (), num_values=4)},
                           sq.Field("continuous", (2,), low=-2.0, high=2.0))
CART = sq.TaskSpec.create("cart", sq.Field("continuous", (4,)), sq.Field("discrete", (), num_values=2))
# Pendulum-v1 as the study declares it: a continuous torque in [-2, 2] (normalised to [-1, 1], no mu-law).
PENDULUM = sq.TaskSpec.create("Pendulum-v1", sq.Field("continuous", (3,)),
                              sq.Field("continuous", (1,), low=-2.0, high=2.0))


@functools.lru_cache(maxsize=None)
def params():
  return model.init(jax.random.PRNGKey(0), CFG)


class ActTest(absltest.TestCase):

  def test_act_is_the_restricted_argmax_at_the_action_positions(self):
    rng = np.random.default_rng(0)
    prompt = sq.episode_tokens(TWO_D, LAYOUT, {"pos": rng.normal(size=(3, 3)).astype(np.float32),
                                               "flag": rng.integers(0, 4, 3)},
                               rng.uniform(-2, 2, (3, 2)).astype(np.float32), patch_size=5, channels=1)
    obs = {"pos": np.array([0.3, -1.0, 2.0], np.float32), "flag": np.int32(2)}
    action = policy.act(params(), CFG, LAYOUT, prompt, obs, jax.random.PRNGKey(5), spec=TWO_D, temperature=0.0)
    ids = sq.action_ids(TWO_D, LAYOUT, action)
    # The full (uncached) forward over prompt, observation, separator and the chosen action tokens.
    full = sq.concat([prompt, sq.Tokens(*(np.asarray(x) for x in sq.timestep_tokens(
        TWO_D, LAYOUT, obs, action, patch_size=5, channels=1)))])
    logits = np.asarray(model.apply(params(), jax.tree.map(lambda x: jnp.asarray(x)[None], full), CFG))[0]
    valid = sq.valid_action_ids(TWO_D, LAYOUT)
    first = full.length - 2
    for i in range(2):
      want = np.flatnonzero(valid)[np.argmax(logits[first - 1 + i][valid])]
      self.assertEqual(int(ids[i]), want)
    self.assertEqual(action.shape, (2,))

  def test_sampling_only_valid_ids(self):
    obs = np.zeros(4, np.float32)
    acts = {int(policy.act(params(), CFG, LAYOUT, None, obs, jax.random.PRNGKey(i), spec=CART, temperature=5.0))
            for i in range(12)}
    self.assertEqual(acts, {0, 1})

  def test_pendulum_action_tokens_round_trip_within_half_a_bin(self):
    a = np.array([[-2.0], [-1.3], [0.0], [0.001], [1.999], [2.0]], np.float32)
    ids = np.stack([np.asarray(sq.action_ids(PENDULUM, LAYOUT, x)) for x in a])
    # Bins of [-1, 1] over floor((a / 2 + 1) / 2 * 1024): -2 -> 0, 0 -> 512, 2 -> 1023 (clipped, not 1024).
    np.testing.assert_array_equal(ids[[0, 2, 5], 0] - LAYOUT.continuous_start, [0, 512, 1023])
    back = np.stack([np.asarray(sq.action_from_ids(PENDULUM, LAYOUT, i)) for i in ids])
    np.testing.assert_allclose(back, a, atol=0.5 * 4.0 / 1024 + 1e-6)          # half a bin of [-2, 2]

  def test_pendulum_act_samples_only_continuous_ids(self):
    obs = np.array([1.0, 0.0, 0.5], np.float32)
    acts = np.array([policy.act(params(), CFG, LAYOUT, None, obs, jax.random.PRNGKey(i), spec=PENDULUM,
                                temperature=5.0) for i in range(8)])
    self.assertEqual(acts.shape, (8, 1))
    ids = np.stack([np.asarray(sq.action_ids(PENDULUM, LAYOUT, x)) for x in acts])
    self.assertTrue(np.all((ids >= LAYOUT.continuous_start) & (ids < LAYOUT.discrete_start)))
    # Each action is a bin centre (detokenized ids), not a raw draw: re-tokenizing gives it back exactly.
    again = np.stack([np.asarray(sq.action_from_ids(PENDULUM, LAYOUT, i)) for i in ids])
    np.testing.assert_allclose(again, acts, atol=1e-6)
    self.assertGreater(len(set(ids[:, 0].tolist())), 4)                     # hot sampling spreads over bins

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "observation has keys"):
      policy.act(params(), CFG, LAYOUT, None, {"pos": np.zeros(3, np.float32)}, jax.random.PRNGKey(0), spec=TWO_D)
    with self.assertRaisesRegex(ValueError, r"observation\[''\] has non-finite"):
      policy.act(params(), CFG, LAYOUT, None, np.array([0, np.inf, 0, 0], np.float32), jax.random.PRNGKey(0),
                 spec=CART)
    with self.assertRaisesRegex(ValueError, "layout.vocab_size"):
      policy.act(params(), CFG, gato.TokenLayout(text_vocab=10), None, np.zeros(4, np.float32), jax.random.PRNGKey(0),
                 spec=CART)
    long = sq.empty_tokens(CFG.max_seq_len, CFG.patch_dim)
    with self.assertRaisesRegex(ValueError, "prompt_tokens"):
      policy.act(params(), CFG, LAYOUT, long, np.zeros(4, np.float32), jax.random.PRNGKey(0), spec=CART)


class EvaluateTest(absltest.TestCase):

  def test_compiled_evaluation_equals_python_loop(self):
    env, env_params = gymnax.make("CartPole-v1")
    rng = np.random.default_rng(1)
    prompt = jax.tree.map(jnp.asarray, sq.episode_tokens(CART, LAYOUT, rng.normal(size=(2, 4)).astype(np.float32),
                                                         np.array([0, 1]), patch_size=5, channels=1))
    kw = dict(cfg=CFG, layout=LAYOUT, spec=CART, env=env, env_params=env_params, num_envs=3, keep=4, max_steps=40)
    compiled = policy.evaluate(params(), prompt, jax.random.PRNGKey(7), **kw)
    stepped = policy.python_loop(params(), prompt, jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(np.asarray(compiled.returns), np.asarray(stepped.returns))
    np.testing.assert_array_equal(np.asarray(compiled.lengths), np.asarray(stepped.lengths))
    self.assertEqual(int(compiled.steps), int(stepped.steps))
    self.assertGreater(int(np.asarray(compiled.lengths).max()), 4)      # the history window rolled over


  def test_pendulum_compiled_evaluation_equals_python_loop(self):
    env, env_params = gymnax.make("Pendulum-v1")
    rng = np.random.default_rng(2)
    prompt = jax.tree.map(jnp.asarray, sq.episode_tokens(
        PENDULUM, LAYOUT, rng.normal(size=(2, 3)).astype(np.float32), rng.uniform(-2, 2, (2, 1)).astype(np.float32),
        patch_size=5, channels=1))
    kw = dict(cfg=CFG, layout=LAYOUT, spec=PENDULUM, env=env, env_params=env_params, num_envs=2, keep=2,
              max_steps=5)
    compiled = policy.evaluate(params(), prompt, jax.random.PRNGKey(3), **kw)
    stepped = policy.python_loop(params(), prompt, jax.random.PRNGKey(3), **kw)
    # Pendulum never terminates: 5 steps of rewards -(theta^2 + 0.1 theta'^2 + 0.001 u^2), each one < 0.
    np.testing.assert_allclose(np.asarray(compiled.returns), np.asarray(stepped.returns), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(compiled.lengths), [5, 5])
    np.testing.assert_array_equal(np.asarray(stepped.lengths), [5, 5])
    self.assertTrue(np.all(np.asarray(compiled.returns) < 0))


@functools.lru_cache(maxsize=None)
def _forward():
  return jax.jit(lambda t: model.apply(params(), t, CFG))


class IncrementalTest(absltest.TestCase):

  def test_greedy_actions_equal_the_full_forward_on_the_held_context(self):
    # Two environments, K = 3 kept timesteps, refills keep R = 1; environment 1 restarts at step 3, so the two
    # hold different counts and refill at different steps (the per-environment branch).
    refills = self._check_against_full_forward(same_held=False, reset_at=3)
    self.assertGreaterEqual(refills, 3)  # environment 0 refills at steps 4 and 7, environment 1 at 7 after its reset

  def test_greedy_actions_equal_the_full_forward_with_same_held(self):
    # The batched form `evaluate` uses (no resets): refills at steps 4 and 7 for both environments.
    refills = self._check_against_full_forward(same_held=True, reset_at=None)
    self.assertGreaterEqual(refills, 4)  # both environments at steps 4 and 7

  def test_no_history_acts_on_the_prompt_and_observation_alone(self):
    # K = 0 (the study's "no history" evaluation): every step refills to R = 0 held timesteps, so each action
    # is the restricted argmax of a forward over the prompt, the observation and the separator only.
    refills = self._check_against_full_forward(same_held=True, reset_at=None, keep=0, refill=0, steps=3)
    self.assertEqual(refills, 2 * (3 - 1))  # both environments refill at every step after the first

  def _check_against_full_forward(self, *, same_held, reset_at, keep=3, refill=1, steps=10):
    # The reference recomputes, from its own record of the timesteps, the context the module docstring
    # states (prompt, the n held timesteps, the observation and separator) and takes the restricted argmax
    # of one uncached forward over it.
    b = 2
    rng = np.random.default_rng(3)
    prompt = jax.tree.map(jnp.asarray, sq.episode_tokens(
        TWO_D, LAYOUT, {"pos": rng.normal(size=(2, 3)).astype(np.float32), "flag": rng.integers(0, 4, 2)},
        rng.uniform(-2, 2, (2, 2)).astype(np.float32), patch_size=5, channels=1))
    s = sq.timestep_len(TWO_D, 5)
    width = prompt.length + (keep + 1) * s
    fresh = policy.init_cached(params(), CFG, TWO_D, prompt, b, keep)
    state = fresh
    step = policy.cached_policy_batch(CFG, LAYOUT, TWO_D, refill, 0.0, same_held=same_held)
    forward = _forward()
    valid = np.flatnonzero(sq.valid_action_ids(TWO_D, LAYOUT))
    held = [[] for _ in range(b)]  # the reference's timesteps held after the prompt, per environment
    refills = 0
    for t in range(steps):
      if t == reset_at:
        state = policy.reset_cached(state, fresh, jnp.array([False, True]))
        held[1] = []
      obs = {"pos": rng.normal(size=(b, 3)).astype(np.float32), "flag": rng.integers(0, 4, b).astype(np.int32)}
      actions, state = step(params(), state, jax.tree.map(jnp.asarray, obs), jax.random.split(jax.random.PRNGKey(t), b))
      for e in range(b):
        if len(held[e]) == keep + 1:
          held[e] = held[e][len(held[e]) - refill:]  # (not [-refill:]: R may be 0)
          refills += 1
        o = {k: v[e] for k, v in obs.items()}
        ids = np.asarray(sq.action_ids(TWO_D, LAYOUT, actions[e]))
        cur = sq.timestep_tokens(TWO_D, LAYOUT, o, actions[e], patch_size=5, channels=1)
        window = sq.concat([prompt] + held[e] + [cur], jnp)
        n = window.length - TWO_D.action_len  # the context length before the first action token
        logits = np.asarray(forward(jax.tree.map(lambda x: x[None], sq.pad_to(jax.tree.map(np.asarray, window),
                                                                              width))))[0]
        for i in range(TWO_D.action_len):
          self.assertEqual(int(ids[i]), valid[np.argmax(logits[n - 1 + i][valid])], (t, e, i))
        held[e].append(cur)
        self.assertEqual(int(state.held[e]), len(held[e]))
    return refills

  def test_compiled_incremental_evaluation_equals_python_loop(self):
    env, env_params = gymnax.make("CartPole-v1")
    rng = np.random.default_rng(1)
    prompt = jax.tree.map(jnp.asarray, sq.episode_tokens(CART, LAYOUT, rng.normal(size=(2, 4)).astype(np.float32),
                                                         np.array([0, 1]), patch_size=5, channels=1))
    kw = dict(cfg=CFG, layout=LAYOUT, spec=CART, env=env, env_params=env_params, num_envs=3, keep=4, max_steps=40,
              incremental=True, refill=2)
    compiled = policy.evaluate(params(), prompt, jax.random.PRNGKey(7), **kw)
    stepped = policy.python_loop(params(), prompt, jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(np.asarray(compiled.returns), np.asarray(stepped.returns))
    np.testing.assert_array_equal(np.asarray(compiled.lengths), np.asarray(stepped.lengths))
    self.assertEqual(int(compiled.steps), int(stepped.steps))
    self.assertGreater(int(np.asarray(compiled.lengths).max()), 5 + 3)  # at least one refill (after 5 steps)

  def test_bad_input(self):
    env, env_params = gymnax.make("CartPole-v1")
    prompt = sq.Tokens(*(jnp.asarray(x) for x in sq.empty_tokens(0, CFG.patch_dim)))
    kw = dict(cfg=CFG, layout=LAYOUT, spec=CART, env=env, env_params=env_params, num_envs=2, max_steps=3,
              incremental=True)
    with self.assertRaisesRegex(ValueError, "refill"):
      policy.evaluate(params(), prompt, jax.random.PRNGKey(0), keep=2, refill=3, **kw)
    with self.assertRaisesRegex(ValueError, "max_seq_len"):
      policy.evaluate(params(), prompt, jax.random.PRNGKey(0), keep=CFG.max_seq_len, **kw)


if __name__ == "__main__":
  absltest.main()
