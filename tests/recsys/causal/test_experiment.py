"""The causal recommendation experiment end to end on a tiny config (every section, one seed)."""
import os
import tempfile

import numpy as np
from absl.testing import absltest

from experiments.configs.causal_recsys import get_config
from jaxml import report
from jaxml.recsys.causal import experiment


def tiny_config(ml100k_path: str):
  """Few steps and few distinct compiled programs (compiling dominates here): the simulated world keeps
  Coat's shape, so the rating models on both share their compiled steps; PD and PDA share a gamma."""
  c = get_config("small")
  c.seeds = (0,)
  c.estimator_draws = 30
  c.ml100k_path = ml100k_path
  c.fit.steps = c.coat_fit.steps = 50
  c.implicit.n_stages = 3
  c.implicit.steps = 50
  c.implicit.batch_size = 128
  c.ml100k.n_stages = 4
  c.ml100k.steps = 50
  c.ml100k.batch_size = 64
  c.ml100k.dim = 4
  c.ml100k.pd_gamma = c.ml100k.pda_gamma
  c.tower.kind = "mlp"
  c.tower.hidden = (8,)
  c.tower.steps = 50
  return c


def write_inter(path, n_users=12, n_items=30, n=300, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for t in range(n):
      f.write(f"{rng.integers(n_users) + 1}\t{rng.integers(n_items) + 1}\t{rng.integers(1, 6)}\t{1000 + t}\n")


class ExperimentTest(absltest.TestCase):

  def test_every_section_runs_and_writes_its_table_and_figure(self):
    with tempfile.TemporaryDirectory() as d:
      inter = os.path.join(d, "tiny.inter")
      write_inter(inter)
      work = os.path.join(d, "work")
      out = experiment.run(tiny_config(inter), work, log=lambda s: None)
      self.assertFalse(out["preempted"])
      for name in ("results.json", "results.md", "summary.png"):
        self.assertTrue(os.path.isfile(os.path.join(work, name)), msg=name)
      saved = report.load_json(os.path.join(work, "results.json"))
    self.assertEqual(set(saved["seconds"]), set(experiment.SECTIONS))
    est = {(r["world"], r["predictor"], r["estimator"]): r for r in out["estimators"]["rows"]}
    # Exposure favours high ratings: the naive estimate of the constant-3 predictor's MSE is far off, IPS is not.
    naive, ips = est[("schnabel", "constant 3", "naive")], est[("schnabel", "constant 3", "IPS")]
    self.assertGreater(abs(naive["bias"]), 3 * abs(ips["bias"]))
    self.assertEqual(ips["truth"], naive["truth"])
    models = [r["model"] for r in out["implicit"]["rows"]]
    for name in ("BPR-MF", "PD", "PDA", "FM (BCE)", "DecRS (mix)"):
      self.assertIn(name, models)
    for section in ("ratings", "coat", "tower", "ml100k"):
      for r in out[section]["rows"]:
        values = [v for k, v in r.items() if k != "model" and not k.endswith("_sd")]
        self.assertTrue(np.all(np.isfinite(values)), msg=f"{section} {r}")
    self.assertEqual(out["coat"]["train_test_overlap"], 366)   # Coat's published split shares 366 cells
    self.assertIn("Schnabel", out["table"])

  def test_ml100k_is_skipped_with_a_reason_when_no_path_is_given(self):
    c = tiny_config("")
    c.sections = ("ml100k",)
    lines = []
    with tempfile.TemporaryDirectory() as d:
      out = experiment.run(c, d, log=lines.append)
    self.assertIn("ml100k_path is empty", out["ml100k"]["skipped"])
    self.assertTrue(any("skipped" in line for line in lines))
    with self.assertRaisesRegex(ValueError, "config.sections has unknown \\['mnist'\\]"):
      c.sections = ("mnist",)
      experiment.run(c, "/tmp/unused", log=lines.append)


if __name__ == "__main__":
  absltest.main()
