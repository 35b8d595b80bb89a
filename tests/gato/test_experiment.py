"""The Gato study's training: each model checkpoints, a rerun reads it back, a changed config raises."""
import dataclasses
import functools
import os
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import gato
from jaxml import train as jt
from jaxml.gato import experiment, model
from jaxml.gato import sequence as sq

LAYOUT = gato.TokenLayout(text_vocab=256, discrete_vocab=16)
MCFG = model.preset("tiny", vocab_size=LAYOUT.vocab_size)


@functools.lru_cache(maxsize=None)
def batch():
  rng = np.random.default_rng(0)
  rows = [sq.pad_to(sq.text_tokens(rng.integers(0, 256, 30), LAYOUT, MCFG.patch_dim), 32) for _ in range(2)]
  return jax.tree.map(jnp.asarray, sq.stack(rows))


class TrainerTest(absltest.TestCase):

  def test_models_checkpoint_and_a_rerun_reads_them_back(self):
    cfg = experiment.GatoExperimentConfig(tasks=("CartPole-v1",), steps=20, steps_per_call=10, checkpoint_every=10)
    with tempfile.TemporaryDirectory() as d:
      first = experiment._trainer(cfg, MCFG)("m", lambda step: batch(), d, lambda s: None)
      self.assertEqual((first.step, first.preempted), (20, False))
      self.assertTrue(os.path.isdir(os.path.join(d, "m", "checkpoints", "20")))
      # Rerun (also with a changed evaluation field): the trained model comes back, nothing is trained.
      again = experiment._trainer(dataclasses.replace(cfg, eval_episodes=3), MCFG)("m", lambda step: batch(), d,
                                                                                    lambda s: None)
      self.assertEqual(again.step, 20)
      chex.assert_trees_all_equal(again.state.params, first.state.params)
      self.assertNotEmpty(first.history)
      self.assertEqual(again.history, [])   # no step ran: this run logged no metrics
      with self.assertRaisesRegex(jt.ConfigMismatchError, "lr"):
        experiment._trainer(dataclasses.replace(cfg, lr=2e-3), MCFG)("m", lambda step: batch(), d, lambda s: None)

  def test_checkpoint_every_must_be_a_multiple_of_steps_per_call(self):
    with self.assertRaisesRegex(ValueError, "checkpoint_every=15 must be a positive multiple of steps_per_call=10"):
      experiment.GatoExperimentConfig(steps=20, steps_per_call=10, checkpoint_every=15)


if __name__ == "__main__":
  absltest.main()
