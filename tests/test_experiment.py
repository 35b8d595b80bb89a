"""The experiment contract shared by every family: config conversion, entrypoints, reports."""
import dataclasses
import glob
import importlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from jaxml import experiment, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Toy:
  width: int = 8
  mults: tuple[int, ...] = (1, 2)
  name: str = "toy"


class ExperimentTest(absltest.TestCase):

  def test_from_config_defaults_tuples_and_unknown_keys(self):
    self.assertEqual(experiment.from_config(Toy, {"mults": [1, 2, 4]}), Toy(mults=(1, 2, 4)))
    self.assertEqual(experiment.from_config(Toy, None, width=3), Toy(width=3))
    import ml_collections
    self.assertEqual(experiment.from_config(Toy, ml_collections.ConfigDict({"name": "x"})), Toy(name="x"))
    with self.assertRaisesRegex(ValueError, r"unknown Toy field\(s\) \['widht'\]"):
      experiment.from_config(Toy, {"widht": 3})

  def test_every_config_has_a_small_variant_and_no_local(self):
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))):
      name = os.path.basename(path)[:-3]
      if name == "__init__":
        continue
      module = importlib.import_module(f"experiments.configs.{name}")
      self.assertIsNotNone(module.get_config(experiment.SMALL), name)
      with self.assertRaises(ValueError, msg=name):
        module.get_config("local")

  def test_every_entrypoint_is_a_launch_call(self):
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
      if path.endswith("__init__.py"):
        continue
      with open(path) as f:
        text = f.read()
      self.assertIn("experiment.launch(", text, path)
      self.assertNotIn("DEFINE_", text, path)   # flags are defined once, in jaxml.experiment.launch

  def test_help_lists_the_config_fields_with_their_comments(self):
    env = dict(os.environ, JAXML_HUGE_PAGES="0")
    proc = subprocess.run([sys.executable, "-m", "experiments.llama_lm", "--helpfull"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    self.assertIn("--config.lr=3e-3", out)
    self.assertIn("peak learning rate", out)
    self.assertIn("small", out)

  def test_generate_from_a_converted_checkpoint_needs_no_workdir(self):
    env = dict(os.environ, JAXML_HUGE_PAGES="0")
    proc = subprocess.run([sys.executable, "-m", "experiments.llama_lm", "--mode=generate",
                           "--config.checkpoint_format=hf", "--config.checkpoint_path=/nonexistent/folder"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    self.assertNotIn("--workdir is required", proc.stderr)
    self.assertIn("/nonexistent/folder", proc.stderr)   # it went on to read the checkpoint
    proc = subprocess.run([sys.executable, "-m", "experiments.llama_lm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--workdir is required", proc.stderr)


class ReportTest(absltest.TestCase):

  def test_json_table_and_figure(self):
    d = tempfile.mkdtemp()
    path = report.save_json({"a": np.float32(1.5), "b": np.arange(3), "c": (1, 2)}, os.path.join(d, "r.json"))
    self.assertEqual(report.load_json(path), {"a": 1.5, "b": [0, 1, 2], "c": [1, 2]})
    table = report.markdown_table(["model", "AUC"], [["MLP", 0.84491], ["DCN", None]], digits=3)
    self.assertEqual(table, "| model | AUC |\n|---|---|\n| MLP | 0.845 |\n| DCN |  |\n")
    with self.assertRaisesRegex(ValueError, "row 0 has 1 cells"):
      report.markdown_table(["a", "b"], [["x"]])
    with report.figure(os.path.join(d, "f.png")) as fig:
      fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    with open(os.path.join(d, "f.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
  absltest.main()
