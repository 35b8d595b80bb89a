"""The CTR experiment on the training core: results on disk, bitwise resume (after fewer steps and
after a real SIGTERM), the NaN guard, config errors, and a compare that resumes."""
import os
import shutil
import signal
import tempfile
import threading

import chex
import jax
import numpy as np
import pytest
from absl.testing import absltest

from experiments.configs import ctr as ctr_config
from jaxml import report
from jaxml import train as jt
from jaxml.recsys import experiment, train

# One worker: TrainModeTest's uninterrupted run (setUpClass) and the compiled steps of the tiny tower are shared.
pytestmark = pytest.mark.xdist_group("test_recsys_experiment")


def tiny(steps=6, **loop):
  """The `small` variant shrunk to seconds: a 1-layer DCN-v2 with D = 4 on 1,024 examples."""
  c = ctr_config.get_config("small")
  c.data.n_train, c.data.n_test = 1024, 512
  c.model.embed_dim, c.model.hidden, c.model.cross_layers = 4, [8], 1
  c.train.steps, c.train.batch_size = steps, 64
  c.loop.checkpoint_every, c.loop.log_every = 2, 2
  for k, v in loop.items():
    c.loop[k] = v
  return c


def sigterm_on(marker):
  """A `log` for `experiment.run` that sends this process SIGTERM at the first line holding `marker`."""
  sent = []

  def log(line):
    if marker in line and not sent:
      sent.append(line)
      os.kill(os.getpid(), signal.SIGTERM)   # the loop's handler records it; the run saves and stops
  return log, sent


def quiet(_):
  pass


def params_of(workdir, config, seed):
  _, sim, _, _ = experiment.simulator_data(config)
  cfg = experiment.tower_config(config, sim.feature_config(config.model.embed_dim))
  tc = train.TrainConfig(**dict(config.train), seed=seed)
  params, step = experiment.restore_params(os.path.join(workdir, f"seed_{seed}"), cfg, tc,
                                           experiment.LoopConfig(mesh=tuple(config.loop.mesh)))
  return jax.device_get(params), step


class BatchesTest(chex.TestCase):

  def test_batch_of_a_step_does_not_depend_on_where_the_run_started(self):
    data = {"label": np.arange(40, dtype=np.float32), "cat": np.arange(80).reshape(40, 2), "prob": np.zeros(40)}
    seq = train.batches(data, 8, seed=3)
    walked = [seq(s)["label"][0] for s in range(12)]           # 5 batches per epoch: 2.4 epochs
    fresh = [train.batches(data, 8, seed=3)(s)["label"][0] for s in reversed(range(12))][::-1]
    self.assertEqual(walked, fresh)
    self.assertEqual(sorted(walked[:5]), [0, 8, 16, 24, 32])   # an epoch visits every batch once
    self.assertNotEqual(walked[:5], walked[5:10])              # each epoch has its own order
    self.assertNotEqual(walked[:5], [train.batches(data, 8, seed=4)(s)["label"][0] for s in range(5)])
    self.assertEqual(sorted(seq(0)), ["cat", "label"])         # only what a step reads


class TrainModeTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.full_dir = tempfile.mkdtemp(prefix="jaxml_ctr_full_")
    cls.full = experiment.run(tiny(), cls.full_dir, log=quiet)   # uninterrupted, 6 steps, both seeds

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.full_dir, ignore_errors=True)
    super().tearDownClass()

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_ctr_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def assert_same_runs(self, workdir):
    for seed in (0, 1):
      got, at = params_of(workdir, tiny(), seed)
      want, want_at = params_of(self.full_dir, tiny(), seed)
      self.assertEqual((at, want_at), (6, 6))
      chex.assert_trees_all_equal(got, want)   # bitwise
      with np.load(os.path.join(workdir, f"seed_{seed}", "predictions.npz")) as a, \
           np.load(os.path.join(self.full_dir, f"seed_{seed}", "predictions.npz")) as b:
        np.testing.assert_array_equal(a["test"], b["test"])

  def test_train_mode_writes_results_metrics_and_figures(self):
    out, d = self.full, self.full_dir
    self.assertFalse(out["preempted"])
    saved = report.load_json(os.path.join(d, "results.json"))
    self.assertEqual(saved["auc"], out["auc"])
    self.assertLen(saved["per_seed"], 2)
    self.assertEqual(saved["tower"]["kind"], "dcnv2")
    self.assertTrue(0.0 < out["auc"] < 1.0 and out["logloss"] > 0.0, out)
    self.assertGreater(out["pd"], 0.0)                        # two seeds, two different models
    self.assertGreater(out["oracle"]["auc"], 0.7)             # the simulator's true probabilities
    self.assertTrue(os.path.exists(os.path.join(d, "calibration.png")))
    run = os.path.join(d, "seed_0")
    records = jt.read_metrics(run)
    self.assertEqual([r["step"] for r in records], [2, 4, 6])
    self.assertTrue({"loss", "logloss", "grad_norm", "lr"} <= set(records[0]))
    for name in ("loss.png", "tb", "result.json", "predictions.npz"):
      self.assertTrue(os.path.exists(os.path.join(run, name)), name)
    ckpt = jt.Checkpointer(os.path.join(run, "checkpoints"), every=2)
    self.assertEqual(ckpt.all_steps(), [4, 6])                # keep = 2
    ckpt.close()
    # A rerun loads the finished runs: nothing is trained, nothing appended.
    lines = []
    again = experiment.run(tiny(), d, log=lines.append)
    self.assertEqual(again["auc"], out["auc"])
    self.assertLen([l for l in lines if "finished earlier" in l], 2)
    self.assertEqual(jt.read_metrics(run, raw=True), records)

  def test_run_extended_from_3_to_6_steps_equals_one_of_6_bitwise(self):
    d = self.tmpdir()
    first = experiment.run(tiny(steps=3), d, log=quiet)
    self.assertEqual(report.load_json(os.path.join(d, "seed_0", "result.json"))["steps"], 3)
    second = experiment.run(tiny(steps=6), d, log=quiet)
    self.assertNotEqual(first["auc"], second["auc"])
    events = [r for r in jt.read_metrics(os.path.join(d, "seed_1"), raw=True) if "event" in r]
    self.assertEqual([(e["event"], e["step"]) for e in events], [("resume", 3)])
    self.assert_same_runs(d)
    self.assertEqual(second["auc"], self.full["auc"])
    with self.assertRaisesRegex(ValueError, "at step 6, past the requested 4 steps"):
      experiment.run(tiny(steps=4), d, log=quiet)

  def test_sigterm_saves_and_the_rerun_ends_bitwise(self):
    if threading.current_thread() is not threading.main_thread():
      self.skipTest("the loop handles SIGTERM only on the main thread")
    d = self.tmpdir()
    log, sent = sigterm_on("seed 0: step 2/6")
    out = experiment.run(tiny(), d, log=log)
    self.assertLen(sent, 1)
    self.assertTrue(out["preempted"])
    ckpt = jt.Checkpointer(os.path.join(d, "seed_0", "checkpoints"), every=2)
    self.assertEqual(ckpt.all_steps(), [2])
    ckpt.close()
    self.assertFalse(os.path.exists(os.path.join(d, "seed_1")))   # the run stopped before seed 1
    again = experiment.run(tiny(), d, log=quiet)
    self.assertFalse(again["preempted"])
    self.assert_same_runs(d)

  def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(self):
    d = self.tmpdir()
    c = tiny(checkpoint_every=1)
    c.train.learning_rate, c.train.optimizer = 1e30, "sgd"
    with self.assertRaises(jt.NonFiniteLossError) as cm:
      experiment.run(c, d, log=quiet)
    bad, good = cm.exception.step, cm.exception.last_good_step
    self.assertGreater(bad, 1)
    ckpt = jt.Checkpointer(os.path.join(d, "seed_0", "checkpoints"), every=1)
    self.assertEqual(ckpt.latest_step(), good)
    ckpt.close()
    self.assertLess(good if good is not None else -1, bad - 1)   # the state that gave the bad loss is gone

  def test_changed_and_unknown_config_fields_raise_naming_them(self):
    c = tiny()
    c.model.hidden = [16]
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"tower\.hidden: recorded \[8\], now \[16\]"):
      experiment.run(c, self.full_dir, log=quiet)
    for section, key in (("model", "widht"), ("train", "lr"), ("loop", "every"), ("simulator", "n_fields")):
      c = tiny()
      c[section][key] = 1
      with self.assertRaisesRegex(ValueError, f"unknown .*'{key}'"):
        experiment.run(c, self.tmpdir(), log=quiet)
    c = tiny()
    c.mode = "eval"
    with self.assertRaisesRegex(ValueError, "config.mode must be one of"):
      experiment.run(c, self.tmpdir(), log=quiet)


class CompareModeTest(chex.TestCase):

  def test_interrupted_compare_resumes_and_loads_finished_runs(self):
    if threading.current_thread() is not threading.main_thread():
      self.skipTest("the loop handles SIGTERM only on the main thread")
    d = tempfile.mkdtemp(prefix="jaxml_ctr_compare_")
    self.addCleanup(shutil.rmtree, d, ignore_errors=True)
    c = tiny(steps=4, mesh=[1, 1, 1], tensorboard=False)
    c.mode = "compare"
    c.model.dhen_layers, c.model.dhen_rows = 1, [None, 2]
    c.bottleneck.hidden, c.bottleneck.ranks = [16, 16], [4]
    c.distill.teacher_hidden, c.distill.teacher_steps, c.distill.student_hidden = [8], 4, [4]
    log, sent = sigterm_on("student MLP (4,) seed 0: step 1")
    self.assertTrue(experiment.run(c, d, log=log)["preempted"])
    self.assertLen(sent, 1)
    self.assertFalse(os.path.exists(os.path.join(d, "results.json")))
    runs = os.path.join(d, "runs")
    finished = sorted(r for r in os.listdir(runs) if os.path.exists(os.path.join(runs, r, "seed_0", "result.json")))
    self.assertLen(finished, 7)   # 3 architectures, 1 bottleneck, SmeLU, rank loss, teacher
    before = {r: report.load_json(os.path.join(runs, r, "seed_0", "result.json")) for r in finished}

    lines = []
    out = experiment.run(c, d, log=lines.append)
    self.assertFalse(out["preempted"])
    self.assertLen([l for l in lines if "finished earlier" in l], 13)   # 6 rows x 2 seeds + the teacher
    student = os.path.join(runs, "distillation_student_MLP_4", "seed_0")
    events = [r for r in jt.read_metrics(student, raw=True) if "event" in r]
    self.assertEqual([e["event"] for e in events], ["resume"])
    for r in finished:   # loaded, not retrained
      self.assertEqual(report.load_json(os.path.join(runs, r, "seed_0", "result.json")), before[r])
    names = [r["name"] for r in out["rows"]]
    self.assertEqual(len(names), 10)
    self.assertIn("student + distill l=1.0", names)
    table = open(os.path.join(d, "comparison.md")).read()
    self.assertEqual(table, out["table"])
    self.assertIn("| ensemble | 2 x MLP", table)
    self.assertEqual(len(report.load_json(os.path.join(d, "results.json"))["rows"]), 10)
    self.assertTrue(os.path.exists(os.path.join(d, "comparison.png")))
    c.train.learning_rate = 1e-3
    with self.assertRaisesRegex(jt.ConfigMismatchError, "train.learning_rate"):
      experiment.run(c, d, log=quiet)


if __name__ == "__main__":
  absltest.main()
