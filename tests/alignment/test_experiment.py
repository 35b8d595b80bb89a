"""The alignment experiment end to end on its tiny config: every exact point lies under the exact frontier, the
Monte Carlo check covers it, the frontier is concave and increasing, and a resumed run gives the same results."""
import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

from experiments.configs.alignment import get_config
from jaxml import experiment as experiment_lib
from jaxml import report
from jaxml.alignment import experiment

pytestmark = pytest.mark.xdist_group("test_alignment_experiment")  # one worker: the class fixture runs once


def quiet(_):
  pass


def without_seconds(results):
  return {k: v for k, v in results.items() if k != "seconds"}


class ExperimentTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp(prefix="jaxml_alignment_")
    cls.config = get_config("tiny")
    cls.results = experiment.run(cls.config, cls.dir, log=quiet)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_every_point_lies_under_the_exact_frontier(self):
    res = self.results
    self.assertFalse(res["preempted"])
    self.assertEqual(set(res["methods"]), {"dpo_beta0.5"})
    self.assertAlmostEqual(res["sft"]["mass"], 1.0, places=4)     # the enumeration covers the policy's support
    for name, m in res["methods"].items():
      self.assertAlmostEqual(m["mass"], 1.0, places=4, msg=name)
      self.assertGreaterEqual(m["kl"], 0.0, name)
      self.assertGreater(m["kl"], 1e-3, name)                     # training moved the policy
      self.assertGreaterEqual(m["gap"], -1e-6, name)              # exact points: nothing above the frontier
      self.assertAlmostEqual(m["gap"], m["frontier_reward"] - m["true_reward"], places=9)
      # The sampled estimate covers the exact point.
      self.assertLess(abs(m["mc_reward"] - m["true_reward"]), 4 * m["mc_reward_se"], name)
      self.assertLess(abs(m["mc_kl"] - m["kl"]), 4 * m["mc_kl_se"], name)
    dpo = res["methods"]["dpo_beta0.5"]
    self.assertGreater(dpo["true_reward"], res["sft"]["true_reward"])
    # DPO's target pi*_beta is on the (concave) frontier: above its chords, below its tangents (slope beta).
    front = res["frontier"]
    kls, rewards, betas = (np.asarray(front[k]) for k in ("kl", "reward", "beta"))
    chord = np.interp(dpo["target_kl"], kls[::-1], rewards[::-1])
    tangent = np.min(rewards + betas * (dpo["target_kl"] - kls))
    self.assertBetween(dpo["target_reward"], chord - 1e-9, tangent + 1e-9)

  def test_frontier_is_increasing_and_concave_and_the_reward_model_under_bayes(self):
    front = self.results["frontier"]
    order = np.argsort(front["kl"])
    kl, reward = np.asarray(front["kl"])[order], np.asarray(front["reward"])[order]
    self.assertTrue(np.all(np.diff(kl) > 0))
    self.assertTrue(np.all(np.diff(reward) > 0))
    self.assertTrue(np.all(np.diff(np.diff(reward) / np.diff(kl)) < 1e-9))
    self.assertLessEqual(front["reward"][0], front["max_reward"] + 1e-9)
    rm = self.results["reward_model"]
    self.assertLessEqual(rm["expected_accuracy"], rm["bayes_accuracy"] + 1e-12)
    self.assertGreater(rm["bayes_accuracy"], 0.5)
    # Over-optimisation curve: the RM-optimal policies never beat the true frontier.
    over = self.results["overoptimisation"]
    self.assertTrue(np.all(np.asarray(over["true_gain"]) <= np.asarray(over["frontier_gain"]) + 1e-6))

  def test_files_and_resume_give_the_same_results(self):
    d = self.dir
    for f in ("frontier.png", "overoptimisation.png", "results.md", "results.json"):
      self.assertTrue(os.path.exists(os.path.join(d, f)), f)
    on_disk = report.load_json(os.path.join(d, "results.json"))
    self.assertEqual(on_disk, json.loads(json.dumps({k: v for k, v in self.results.items() if k != "preempted"})))
    # Interrupt the DPO run after its first checkpoint (drop the last) and rerun: the same numbers.
    shutil.rmtree(os.path.join(d, "dpo_beta0.5", "checkpoints", str(self.config.offline_steps)))
    again = experiment.run(self.config, d, log=quiet)
    self.assertEqual(without_seconds(again), without_seconds(self.results))

  def test_config_file_lists_every_field_at_the_dataclass_defaults(self):
    fields = dataclasses.asdict(experiment.AlignmentExperimentConfig())
    self.assertEqual(dataclasses.asdict(experiment_lib.from_config(experiment.AlignmentExperimentConfig,
                                                                   get_config())), fields)
    self.assertEqual(set(get_config()), set(fields))
    experiment_lib.from_config(experiment.AlignmentExperimentConfig, get_config("small"))
    with self.assertRaisesRegex(ValueError, "token_rewards needs num_tokens"):
      experiment.AlignmentExperimentConfig(num_tokens=3)
    with self.assertRaisesRegex(ValueError, "sft_steps=25 must be a positive multiple of steps_per_call=50"):
      experiment.AlignmentExperimentConfig(sft_steps=25)


if __name__ == "__main__":
  absltest.main()
