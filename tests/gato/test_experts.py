"""Experts: PPO on CartPole reaches a stated return within a bounded budget; scripted experts beat random; filters."""
import dataclasses
import tempfile

import chex
import gymnax
import jax
import numpy as np
from absl.testing import absltest

from jaxml import train as jt
from jaxml.gato import experts as ex


class PPOTest(absltest.TestCase):

  def test_cartpole_ppo_reaches_400_within_80k_steps(self):
    env, env_params = gymnax.make("CartPole-v1")
    cfg = ex.PPOConfig(iterations=10, num_envs=16, horizon=500, steps_per_call=5)   # 10 x 16 x 500 = 80k steps
    with tempfile.TemporaryDirectory() as d:
      params, records = ex.train_ppo(env, env_params, cfg, jax.random.PRNGKey(0), d, log=lambda s: None)
      # A rerun reads the trained expert back from its checkpoint: no training, the same params and history.
      again, records_again = ex.train_ppo(env, env_params, cfg, jax.random.PRNGKey(0), d, log=lambda s: None)
      chex.assert_trees_all_equal(again, params)
      self.assertEqual(records_again, records)   # metrics.jsonl unchanged: no step ran and none was appended
      with self.assertRaisesRegex(jt.ConfigMismatchError, "lr"):
        ex.train_ppo(env, env_params, dataclasses.replace(cfg, lr=cfg.lr * 2), jax.random.PRNGKey(0), d,
                     log=lambda s: None)
    self.assertLess(records[0]["episode_return"], records[-1]["episode_return"])
    space = ex.action_space(env, env_params)
    greedy = ex.collect(ex.PPOPolicy(params, space, greedy=True), env, env_params, jax.random.PRNGKey(1), 16, 500)
    rand = ex.collect(ex.RandomPolicy(space), env, env_params,
                      jax.random.PRNGKey(1), 16, 500)
    self.assertGreaterEqual(greedy.returns.mean(), 400.0)
    self.assertLess(rand.returns.mean(), 50.0)   # a random CartPole policy lasts ~22 steps


class ScriptedTest(absltest.TestCase):

  def test_scripted_experts_beat_random(self):
    env, env_params = gymnax.make("MountainCar-v0")
    car = ex.collect(ex.ScriptedPolicy(ex.mountain_car_expert), env, env_params,
                     jax.random.PRNGKey(0), 8, 200)
    # Reward -1 per step and a 200-step limit: any policy that never reaches the flag scores -200.
    self.assertGreaterEqual(car.returns.mean(), -130.0)
    self.assertLess(car.lengths.max(), 200)
    env, env_params = gymnax.make("Catch-bsuite")
    space = ex.action_space(env, env_params)
    catch = ex.collect(ex.ScriptedPolicy(ex.catch_expert), env, env_params,
                       jax.random.PRNGKey(0), 16, 10)
    rand = ex.collect(ex.RandomPolicy(space), env, env_params, jax.random.PRNGKey(0), 16, 10)
    np.testing.assert_array_equal(catch.returns, 1.0)                     # every ball caught
    np.testing.assert_array_equal(catch.lengths, 9)                       # 10 rows: the ball falls 9 times
    self.assertLess(rand.returns.mean(), 0.5)

  def test_pendulum_and_breakout_experts_beat_random(self):
    env, env_params = gymnax.make("Pendulum-v1")
    space = ex.action_space(env, env_params)
    self.assertEqual(space, ex.Space(0, 1, -2.0, 2.0))
    swing = ex.collect(ex.ScriptedPolicy(ex.pendulum_expert), env, env_params, jax.random.PRNGKey(0), 8, 200)
    rand = ex.collect(ex.RandomPolicy(space), env, env_params, jax.random.PRNGKey(0), 8, 200)
    self.assertGreaterEqual(swing.returns.mean(), -250.0)   # swung up and held (-150 over 64 episodes)
    self.assertLess(rand.returns.mean(), -900.0)            # random torques: about -1200
    self.assertLessEqual(float(np.abs(swing.actions).max()), 2.0)
    env, env_params = gymnax.make("Breakout-MinAtar")
    space = ex.action_space(env, env_params)
    self.assertEqual(space.n, 3)
    follow = ex.collect(ex.ScriptedPolicy(ex.breakout_expert), env, env_params, jax.random.PRNGKey(0), 4, 100)
    np.testing.assert_array_equal(follow.lengths, 100)      # the ball is never missed in 100 steps (random: ~9)
    self.assertGreaterEqual(follow.returns.min(), 5.0)      # bricks hit (random: 0.3 per episode)

  def test_twin_swaps_the_actions(self):
    from jaxml.gato.experiment import SwappedCartPole
    env, env_params = gymnax.make("CartPole-v1")
    twin = SwappedCartPole()
    obs, state = env.reset(jax.random.PRNGKey(0), env_params)
    obs_t, state_t = twin.reset(jax.random.PRNGKey(0), env_params)
    np.testing.assert_array_equal(obs, obs_t)                       # identical observations
    for a in (0, 1):
      want = env.step(jax.random.PRNGKey(1), state, a, env_params)[0]
      got = twin.step(jax.random.PRNGKey(1), state_t, 1 - a, env_params)[0]
      np.testing.assert_array_equal(got, want)
    self.assertFalse(np.array_equal(env.step(jax.random.PRNGKey(1), state, 0, env_params)[0],
                                    twin.step(jax.random.PRNGKey(1), state_t, 0, env_params)[0]))

  def test_keep_good_and_scores(self):
    eps = ex.Episodes(np.zeros((4, 3)), np.zeros((4, 3)), np.array([-500.0, -120.0, -100.0, -300.0]), np.ones(4))
    kept = ex.keep_good(eps, expert_return=-100.0, random_return=-500.0)   # threshold -500 + 0.8 * 400 = -180
    np.testing.assert_array_equal(kept.returns, [-120.0, -100.0])
    pos = ex.Episodes(np.zeros((3, 1)), np.zeros((3, 1)), np.array([390.0, 400.0, 500.0]), np.ones(3))
    np.testing.assert_array_equal(ex.keep_good(pos, 500.0, 20.0).returns, [400.0, 500.0])   # 0.8 x 500
    np.testing.assert_allclose(ex.normalised_score([20.0, 260.0, 500.0], 500.0, 20.0), [0.0, 0.5, 1.0])
    m, lo, hi = ex.bootstrap_interval(np.arange(100.0), np.random.default_rng(0))
    self.assertEqual(m, 49.5)
    self.assertLess(lo, m)
    self.assertLess(m, hi)


if __name__ == "__main__":
  absltest.main()
