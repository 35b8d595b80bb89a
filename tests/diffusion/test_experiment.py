"""The diffusion experiment runs end to end on its small config (2D, and digits), writes its files, and its
training resumes bit for bit on the core."""
import dataclasses
import json
import math
import os
import shutil
import tempfile

from absl.testing import absltest
import chex
import jax
import numpy as np

from experiments.configs.diffusion import get_config
from jaxml import experiment as experiment_lib
from jaxml import report
from jaxml import train as jt
from jaxml.diffusion import experiment


def quiet(_):
  pass


class ExperimentTest(absltest.TestCase):

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_diffusion_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_small_config_2d(self):
    cfg = get_config("small")
    cfg.run_digits = False  # the digits U-Net is covered below; keep this test short
    d = self.tmpdir()
    results = experiment.run(cfg, d, log=quiet)
    self.assertFalse(results.pop("preempted"))
    on_disk = report.load_json(os.path.join(d, "results.json"))
    self.assertTrue(os.path.exists(os.path.join(d, "samples_2d.png")))
    self.assertTrue(os.path.exists(os.path.join(d, "2d", "loss.png")))
    with np.load(os.path.join(d, "samples_2d.npz")) as z:
      self.assertEqual(set(z.files), set(cfg.samplers))
      self.assertEqual(z[cfg.samplers[0]].shape, (cfg.num_samples_2d, 2))
    self.assertEqual(set(on_disk["2d"]["sample_true_logp"]), set(cfg.samplers))
    self.assertEqual(on_disk, json.loads(json.dumps(results)))
    self.assertEqual(jt.read_metrics(os.path.join(d, "2d"))[-1]["step"], cfg.steps_2d)

  def test_small_config_digits(self):
    cfg = get_config("small")
    cfg.samplers = ("euler_maruyama",)
    d = self.tmpdir()
    results = experiment.run(cfg, d, log=quiet)
    png = os.path.join(d, "digits.png")
    self.assertGreater(os.path.getsize(png), 1000)
    with np.load(os.path.join(d, "samples_digits.npz")) as z:
      self.assertEqual(z["euler_maruyama"].shape, (cfg.num_samples_digits, 8, 8, 1))
      self.assertLessEqual(int(z["euler_maruyama"].max()), 16)
    digits = results["digits"]
    self.assertEqual(set(digits["sampler_seconds"]), set(cfg.digits_samplers))
    # Bits/dim bounds -log2 P(image) / 64 of discrete images from above, and P <= 1: finite and positive.
    self.assertTrue(math.isfinite(digits["bits_per_dim"]))
    self.assertGreater(digits["bits_per_dim"], 0.0)
    self.assertAlmostEqual(digits["uniform_bits_per_dim"], 4.087, places=3)  # log2(17)
    self.assertEqual(jt.read_metrics(os.path.join(d, "digits"))[-1]["step"], cfg.steps_digits)

  def test_resumed_training_equals_uninterrupted(self):
    base = experiment_lib.from_config(experiment.DiffusionExperimentConfig, get_config("small"), steps_2d=40,
                                      steps_per_call_2d=10, checkpoint_every_2d=10)
    full, _, _ = experiment.train_2d(base, self.tmpdir(), quiet)
    d = self.tmpdir()
    experiment.train_2d(dataclasses.replace(base, steps_2d=20), d, quiet)   # "interrupted" at step 20
    resumed, _, _ = experiment.train_2d(base, d, quiet)
    self.assertEqual(int(resumed.state.step), 40)
    self.assertFalse(os.path.exists(os.path.join(d, "metrics.jsonl")))  # the training's files live in d/2d
    self.assertEqual([(r["event"], r["step"]) for r in jt.read_metrics(os.path.join(d, "2d"), raw=True)
                      if "event" in r], [("resume", 20)])
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(full.state))
    self.assertIsNotNone(resumed.state.ema_params)
    # A changed model on the same folder raises, naming the field, before anything is restored.
    with self.assertRaisesRegex(jt.ConfigMismatchError, "hidden: recorded 32, now 16"):
      experiment.train_2d(dataclasses.replace(base, hidden=16), d, quiet)

  def test_config_file_lists_every_field_at_the_dataclass_defaults(self):
    fields = dataclasses.asdict(experiment.DiffusionExperimentConfig())
    self.assertEqual(dataclasses.asdict(experiment_lib.from_config(experiment.DiffusionExperimentConfig,
                                                                   get_config())), fields)
    self.assertEqual(set(get_config()), set(fields))
    experiment_lib.from_config(experiment.DiffusionExperimentConfig, get_config("small"))

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, r"unknown DiffusionExperimentConfig field\(s\) \['typo'\]"):
      experiment.run({"typo": 1}, "/nonexistent")
    with self.assertRaisesRegex(ValueError, "steps_2d=50 must be a multiple of steps_per_call_2d=100"):
      experiment.DiffusionExperimentConfig(steps_2d=50)


if __name__ == "__main__":
  absltest.main()
