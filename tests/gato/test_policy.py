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


if __name__ == "__main__":
  absltest.main()
