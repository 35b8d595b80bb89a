"""The mode-collapse study: writes its files, resumes an interrupted pair mid-training bit for bit, refuses a
changed configuration, and every config variant is a valid study."""
import dataclasses
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from experiments.configs.mode_collapse import get_config
from jaxml import experiment, report
from jaxml import train as jt
from jaxml.generative import study


def quiet(_):
  pass


class StudyTest(absltest.TestCase):

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_study_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_small_study_writes_results_and_an_interrupted_pair_resumes_mid_training(self):
    cfg = get_config("small")
    d = self.tmpdir()
    first = study.run(cfg, d, log=quiet)
    self.assertFalse(first.pop("preempted"))
    self.assertEqual(report.load_json(os.path.join(d, "results.json")), report.to_jsonable(first))
    for name in ("samples.png", "table.md", "config.json"):
      self.assertTrue(os.path.exists(os.path.join(d, name)), name)
    self.assertEqual(set(first), set(cfg.datasets))
    for dname in cfg.datasets:
      self.assertEqual(set(first[dname]), set(study.MODELS))
      for metrics in first[dname].values():
        self.assertEqual(set(metrics), set(study.METRICS))
        self.assertLen(metrics["modes_captured"], cfg.num_seeds)
    # An interruption while the diffusion pair trained (after its checkpoint at step 30), with the VAE
    # trained but not yet scored: the final files and the later pairs' results never got written.
    pairs = os.path.join(d, "pairs")
    for name in ("results.json", "table.md", "samples.png", "pairs/mix1d_sep4_vae/result.json",
                 "pairs/mix1d_sep4_diffusion/result.json", "pairs/mix1d_sep4_diffusion/samples.npy"):
      os.remove(os.path.join(d, name))
    shutil.rmtree(os.path.join(pairs, "mix1d_sep4_diffusion", "checkpoints", "60"))
    gan_samples = np.load(os.path.join(pairs, "mix1d_sep4_gan", study.SAMPLES_FILE))
    lines = []
    second = study.run(cfg, d, log=lines.append)
    second.pop("preempted")
    self.assertEqual(second, first)   # keys follow (pair, step): resuming mid-training changes nothing
    self.assertEqual(report.load_json(os.path.join(d, "results.json")), report.to_jsonable(second))
    loaded = [l for l in lines if "earlier run" in l]
    self.assertLen(loaded, 1)
    self.assertIn("gan", loaded[0])
    np.testing.assert_array_equal(np.load(os.path.join(pairs, "mix1d_sep4_gan", study.SAMPLES_FILE)), gan_samples)
    events = [r for r in jt.read_metrics(os.path.join(pairs, "mix1d_sep4_diffusion"), raw=True) if "event" in r]
    self.assertEqual([(e["event"], e["step"]) for e in events], [("resume", 30)])

  def test_changed_config_raises_for_finished_and_unfinished_pairs(self):
    cfg = get_config("small")
    cfg.models = ("gan",)
    cfg.num_steps = 30
    d = self.tmpdir()
    study.run(cfg, d, log=quiet)
    # Adding a model, or checkpointing more often, is fine: no pair depends on either.
    study._check_pairs(experiment.from_config(study.StudyConfig, cfg, models=("gan", "vae"), checkpoint_every=60), d)
    cfg.num_steps = 60
    cfg.hidden = 16
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"hidden: recorded 32, now 16.*num_steps: recorded 30, now 60"):
      study.run(cfg, d, log=quiet)
    # A pair that never finished (checkpoints, no result) holds its configuration too.
    os.remove(os.path.join(d, "pairs", "mix1d_sep4_gan", study.RESULT_FILE))
    before = sorted(os.listdir(os.path.join(d, "pairs", "mix1d_sep4_gan")))
    with self.assertRaisesRegex(jt.ConfigMismatchError, "num_steps"):
      study.run(cfg, d, log=quiet)
    self.assertEqual(sorted(os.listdir(os.path.join(d, "pairs", "mix1d_sep4_gan"))), before)

  def test_every_config_variant_is_a_valid_study(self):
    base, small, long = (dataclasses.asdict(experiment.from_config(study.StudyConfig, get_config(v)))
                         for v in ("", "small", "gan_long"))
    # The config file lists every field (each can be overridden); its default variant is the dataclass's defaults.
    self.assertEqual(base, dataclasses.asdict(study.StudyConfig()))
    self.assertEqual(set(get_config("")), set(base))
    # The long-budget GAN is the study's GAN with only its budget and rate changed (same networks, batch, eval).
    self.assertEqual({k for k in base if base[k] != long[k]},
                     {"datasets", "models", "gan_learning_rate", "num_steps", "steps_per_call"})
    self.assertEqual(long["models"], ("gan",))
    self.assertGreater(long["num_steps"], 8 * base["num_steps"])
    self.assertEqual(small["num_steps"] % small["checkpoint_every"], 0)
    with self.assertRaisesRegex(ValueError, "unknown config variant"):
      get_config("huge")

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, r"unknown StudyConfig field\(s\) \['nope'\]"):
      study.run({"nope": 1}, "/nonexistent")
    with self.assertRaisesRegex(ValueError, "unknown model"):
      study.run({"models": ("flow",)}, "/nonexistent")
    with self.assertRaisesRegex(ValueError, "must be a multiple of steps_per_call"):
      study.StudyConfig(num_steps=100, steps_per_call=30)


if __name__ == "__main__":
  absltest.main()
