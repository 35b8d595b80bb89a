"""The diffusion experiment runs end to end on its small config (2D part) and writes results.json."""
import json
import os
import tempfile

from absl.testing import absltest

from jaxml.diffusion.experiment import run_from_config


class ExperimentTest(absltest.TestCase):

  def test_small_config_2d(self):
    from experiments.configs.diffusion import get_config
    cfg = get_config("small")
    cfg.run_digits = False  # the digits U-Net is covered in test_losses; keep this test short
    with tempfile.TemporaryDirectory() as d:
      results = run_from_config(cfg, d, log=lambda s: None)
      with open(os.path.join(d, "results.json")) as f:
        on_disk = json.load(f)
      self.assertTrue(os.path.exists(os.path.join(d, "samples_2d.png")))
    self.assertEqual(set(on_disk["2d"]["sample_true_logp"]), set(cfg.samplers))
    self.assertEqual(on_disk, json.loads(json.dumps(results)))

  def test_unknown_key(self):
    with self.assertRaisesRegex(ValueError, "unknown diffusion config keys"):
      run_from_config({"typo": 1}, "/nonexistent")


if __name__ == "__main__":
  absltest.main()
