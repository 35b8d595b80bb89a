"""Gato sequences: field order, separator/loss mask, local positions, episodes, prompts, bad input."""
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import gato
from jaxml.gato import sequence as sq

LAYOUT = gato.TokenLayout(text_vocab=256, discrete_vocab=16)
NESTED = sq.TaskSpec.create(
    "nested", {"b": sq.Field("continuous", (2,)), "a": {"y": sq.Field("discrete", (2,), num_values=5),
                                                        "x": sq.Field("continuous", (), mu_law=False)}},
    sq.Field("continuous", (2,), low=-2.0, high=2.0))
CART = sq.TaskSpec.create("cart", sq.Field("continuous", (4,)), sq.Field("discrete", (), num_values=2))
PATCH = dict(patch_size=5, channels=1)


def nested_obs(t=None):
  lead = () if t is None else (t,)
  return {"b": np.full(lead + (2,), 3.0, np.float32) * np.array([1, -1], np.float32),
          "a": {"y": np.full(lead + (2,), 4, np.int32), "x": np.full(lead, 0.5, np.float32)}}


def cart_episode(n, offset=0.0):
  obs = (np.arange(n * 4, dtype=np.float32).reshape(n, 4) * 0.01 + offset)
  return sq.episode_tokens(CART, LAYOUT, obs, np.arange(n) % 2, **PATCH)


class TimestepTest(absltest.TestCase):

  def test_nested_fields_in_sorted_key_order_then_separator_then_action(self):
    step = sq.timestep_tokens(NESTED, LAYOUT, nested_obs(), np.array([-2.0, 2.0], np.float32), **PATCH)
    obs = nested_obs()
    want = np.concatenate([
        gato.tokenize_continuous(np.array([0.5]), LAYOUT, mu_law=False),    # a/x
        gato.tokenize_discrete(obs["a"]["y"], LAYOUT),                      # a/y
        gato.tokenize_continuous(obs["b"], LAYOUT),                          # b
        [LAYOUT.separator],
        gato.tokenize_continuous(np.array([-1.0, 1.0]), LAYOUT, mu_law=False)])  # action normalised to [-1, 1]
    np.testing.assert_array_equal(np.asarray(step.ids), want)
    self.assertEqual(sq.timestep_len(NESTED, 5), len(want))

  def test_loss_mask_and_local_positions(self):
    step = sq.timestep_tokens(NESTED, LAYOUT, nested_obs(), np.zeros(2, np.float32), **PATCH)
    n_obs = sq.observation_len(NESTED, 5)
    kinds = np.array(["obs"] * n_obs + ["sep"] + ["act"] * 2)
    np.testing.assert_array_equal(np.asarray(step.loss_mask), kinds == "act")
    np.testing.assert_array_equal(np.asarray(step.local_pos), np.where(kinds == "obs", np.arange(len(kinds)), -1))
    self.assertEqual(int(np.asarray(step.ids)[kinds == "sep"][0]), LAYOUT.separator)

  def test_action_round_trip_and_valid_ids(self):
    a = np.array([-1.3, 0.7], np.float32)
    back = sq.action_from_ids(NESTED, LAYOUT, sq.action_ids(NESTED, LAYOUT, a))
    np.testing.assert_allclose(back, a, atol=0.5 * 4.0 / 1024)       # half a bin of [-2, 2]
    valid = sq.valid_action_ids(CART, LAYOUT)
    np.testing.assert_array_equal(np.flatnonzero(valid), LAYOUT.discrete_start + np.arange(2))

  def test_image_patches_raster_order_with_position_intervals(self):
    spec = sq.TaskSpec.create("img", {"board": sq.Field("image", (10, 5), max_value=1.0)},
                              sq.Field("discrete", (), num_values=3))
    board = np.zeros((10, 5), np.int32)
    board[7, 2] = 1                                        # in the second (lower) patch
    step = sq.timestep_tokens(spec, LAYOUT, {"board": board}, np.int32(1), **PATCH)
    np.testing.assert_array_equal(np.asarray(step.is_patch), [True, True, False, False])
    np.testing.assert_array_equal(np.asarray(step.rows[:2]), [[0, 64], [64, 128]])
    np.testing.assert_array_equal(np.asarray(step.cols[:2]), [[0, 128], [0, 128]])
    want = np.full((2, 25), -1.0 / np.sqrt(5))
    want[1, 2 * 5 + 2] = 1.0 / np.sqrt(5)                  # row 7 - 5 = 2, column 2 of the patch
    np.testing.assert_allclose(np.asarray(step.patches[:2]), want, rtol=1e-6)


class EpisodeTest(absltest.TestCase):

  def test_episode_is_its_timesteps_in_time_order(self):
    ep = sq.episode_tokens(NESTED, LAYOUT, nested_obs(3) | {"b": np.arange(6, dtype=np.float32).reshape(3, 2)},
                           np.zeros((3, 2), np.float32), **PATCH)
    s = sq.timestep_len(NESTED, 5)
    for t in range(3):
      obs = nested_obs() | {"b": np.arange(6, dtype=np.float32).reshape(3, 2)[t]}
      one = sq.timestep_tokens(NESTED, LAYOUT, obs, np.zeros(2, np.float32), **PATCH)
      np.testing.assert_array_equal(ep.ids[t * s:(t + 1) * s], np.asarray(one.ids))

  def test_prompt_from_end_and_uniform_window(self):
    s = sq.timestep_len(CART, 5)
    main, other = cart_episode(10), cart_episode(8, offset=5.0)
    rng = np.random.default_rng(0)
    seq = sq.training_sequence(rng, main, step_len=s, context=40, prompt=other, prompt_timesteps=3,
                               prompt_from_end=True)
    np.testing.assert_array_equal(seq.ids[:3 * s], other.ids[5 * s:8 * s])   # the prompt episode's last 3 steps
    rest = seq.ids[3 * s:6 * s]                                              # 40 // 6 - 3 = 3 timesteps of main
    starts = [i for i in range(8) if np.array_equal(main.ids[i * s:(i + 3) * s], rest)]
    self.assertLen(starts, 1)
    self.assertFalse(seq.loss_mask[6 * s:].any())                            # padding
    for _ in range(5):
      u = sq.training_sequence(rng, main, step_len=s, context=40, prompt=other, prompt_timesteps=3,
                               prompt_from_end=False)
      self.assertTrue(any(np.array_equal(u.ids[:3 * s], other.ids[i * s:(i + 3) * s]) for i in range(6)))

  def test_prompt_fraction_and_other_episode(self):
    s = sq.timestep_len(CART, 5)
    eps = [cart_episode(6, offset=10.0 * i) for i in range(3)]
    batch = sq.sample_control_batch(np.random.default_rng(1), eps, step_len=s, context=36, batch=400,
                                    prompt_prob=0.25, prompt_timesteps=2)
    # A row is prompted when its first 2 timesteps and the timesteps after them come from different episodes.
    owner = lambda ids: [i for i, e in enumerate(eps) if any(np.array_equal(ids, e.ids[j * s:j * s + len(ids)])
                                                              for j in range(6))]
    prompted = [owner(r[:2 * s]) != owner(r[2 * s:3 * s]) for r in batch.ids]
    self.assertBetween(np.mean(prompted), 0.25 - 3 * np.sqrt(0.25 * 0.75 / 400), 0.25 + 3 * np.sqrt(0.25 * 0.75 / 400))


class BadInputTest(absltest.TestCase):

  def test_errors_name_the_argument(self):
    obs = nested_obs(2)
    acts = np.zeros((2, 2), np.float32)
    with self.assertRaisesRegex(ValueError, "observations has keys"):
      sq.episode_tokens(NESTED, LAYOUT, {"b": obs["b"]}, acts, **PATCH)
    with self.assertRaisesRegex(ValueError, r"observations\['b'\] has shape"):
      sq.episode_tokens(NESTED, LAYOUT, obs | {"b": np.zeros((2, 3), np.float32)}, acts, **PATCH)
    with self.assertRaisesRegex(ValueError, r"observations\['b'\] has non-finite"):
      sq.episode_tokens(NESTED, LAYOUT, obs | {"b": np.array([[0, np.nan], [0, 0]], np.float32)}, acts, **PATCH)
    with self.assertRaisesRegex(ValueError, "actions must be finite and within"):
      sq.episode_tokens(NESTED, LAYOUT, obs, acts + 3.0, **PATCH)
    with self.assertRaisesRegex(ValueError, "actions must be integers in"):
      sq.episode_tokens(CART, LAYOUT, np.zeros((2, 4), np.float32), np.array([0, 2]), **PATCH)

    class Overlapping(gato.TokenLayout):
      def ranges(self):
        return dict(super().ranges(), discrete=(self.discrete_start - 1, self.separator))
    with self.assertRaisesRegex(ValueError, "layout ranges overlap"):
      sq.episode_tokens(CART, Overlapping(text_vocab=4), np.zeros((2, 4), np.float32), np.array([0, 1]), **PATCH)
    s = sq.timestep_len(CART, 5)
    with self.assertRaisesRegex(ValueError, "context=17 is too short"):
      sq.training_sequence(np.random.default_rng(0), cart_episode(4), step_len=s, context=17,
                           prompt=cart_episode(4), prompt_timesteps=2)


if __name__ == "__main__":
  absltest.main()
