"""The diffusion experiment runs end to end on its small config (2D, and digits) and writes its files."""
import json
import math
import os
import tempfile

from absl.testing import absltest
import numpy as np

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
      with np.load(os.path.join(d, "samples_2d.npz")) as z:
        self.assertEqual(set(z.files), set(cfg.samplers))
        self.assertEqual(z[cfg.samplers[0]].shape, (cfg.num_samples_2d, 2))
    self.assertEqual(set(on_disk["2d"]["sample_true_logp"]), set(cfg.samplers))
    self.assertEqual(on_disk, json.loads(json.dumps(results)))

  def test_small_config_digits(self):
    from experiments.configs.diffusion import get_config
    cfg = get_config("small")
    cfg.samplers = ("euler_maruyama",)
    with tempfile.TemporaryDirectory() as d:
      results = run_from_config(cfg, d, log=lambda s: None)
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

  def test_unknown_key(self):
    with self.assertRaisesRegex(ValueError, "unknown diffusion config keys"):
      run_from_config({"typo": 1}, "/nonexistent")


if __name__ == "__main__":
  absltest.main()
