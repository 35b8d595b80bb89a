"""Criteo TSV reader: missing fields, malformed lines reported with file and line, batching."""
import gzip
import os
import shutil
import tempfile

import chex
import numpy as np
from absl.testing import absltest

from jaxml import train as jt
from jaxml.recsys import config, criteo, features


def _line(label="1", ints=None, cats=None):
  ints = [str(i) for i in range(13)] if ints is None else ints
  cats = [f"{i:08x}" for i in range(26)] if cats is None else cats
  return "\t".join([label] + ints + cats) + "\n"


class CriteoTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def _write(self, lines, name="part.tsv"):
    path = os.path.join(self.dir, name)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt") as fh:
      fh.writelines(lines)
    return path

  def test_missing_fields_become_zero_dense_and_minus_one_ids(self):
    ints = [""] * 13
    ints[2] = "-3"
    cats = ["" if i % 2 else "1a2b3c4d" for i in range(26)]
    path = self._write([_line("0", ints, cats), _line()])
    batches = list(criteo.read(path, batch_size=8))
    self.assertLen(batches, 1)
    b = batches[0]
    chex.assert_shape((b["dense"], b["cat"], b["label"]), ((2, 13), (2, 26), (2,)))
    self.assertEqual(b["dense"][0, 0], 0.0)
    self.assertTrue(b["dense_missing"][0, 0] and not b["dense_missing"][0, 2])
    self.assertAlmostEqual(float(b["dense"][0, 2]), -np.log(4.0), places=6)
    self.assertEqual(b["cat"][0, 1], -1)
    self.assertEqual(b["cat"][0, 0], 0x1A2B3C4D)
    np.testing.assert_allclose(b["dense"][1], np.log1p(np.arange(13)), rtol=1e-6)
    np.testing.assert_array_equal(b["label"], [0.0, 1.0])
    fc = config.FeatureConfig(**criteo.feature_config_kwargs(1000), embed_dim=4)
    features.check_batch(b, fc)  # reader output is valid model input

  def test_malformed_lines_are_reported_with_file_and_line_and_counted(self):
    bad_int = [str(i) for i in range(13)]
    bad_int[4] = "x7"
    lines = [_line(), _line("2"), "1\t2\t3\n", _line("1", bad_int), _line(cats=["zz"] * 26), _line("0")]
    path = self._write(lines, "day.tsv.gz")
    reader = criteo.read(path, batch_size=4)
    with self.assertLogs(criteo.log, "WARNING") as logs:
      batches = list(reader)
    self.assertEqual([len(b["label"]) for b in batches], [2])
    self.assertEqual(reader.n_malformed, 4)
    self.assertEqual([e[1] for e in reader.errors], [2, 3, 4, 5])
    self.assertTrue(all(e[0] == path for e in reader.errors))
    reasons = " ".join(e[2] for e in reader.errors)
    for part in ("label must be 0 or 1", "expected 40", "I5 is not an integer", "C1 is not hexadecimal"):
      self.assertIn(part, reasons)
    self.assertIn(f"{path}:3:", logs.output[1])

  def test_raise_mode_stops_at_first_bad_line(self):
    path = self._write([_line(), _line("7")])
    with self.assertRaisesRegex(criteo.MalformedLineError, r"part.tsv:2: .*label"):
      list(criteo.read(path, on_error="raise"))

  def test_batches_stream_across_files(self):
    a = self._write([_line()] * 5, "a.tsv")
    b = self._write([_line("0")] * 4, "b.tsv")
    sizes = [len(x["label"]) for x in criteo.read([a, b], batch_size=4)]
    self.assertEqual(sizes, [4, 4, 1])
    self.assertEqual([len(x["label"]) for x in criteo.read([a, b], batch_size=4, drop_remainder=True)], [4, 4])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(FileNotFoundError, "path"):
      criteo.read(os.path.join(self.dir, "nope.tsv"))
    with self.assertRaisesRegex(ValueError, "batch_size"):
      criteo.read(self._write([_line()]), batch_size=0)

  def test_nan_dense_features_are_an_error(self):
    fc = config.FeatureConfig(n_dense=2, vocab_sizes=(10,), embed_dim=4)
    batch = {"dense": np.array([[0.0, np.nan]], np.float32), "cat": np.zeros((1, 1), np.int32)}
    with self.assertRaisesRegex(ValueError, r"dense.*NaN.*row 0, column 1"):
      features.check_batch(batch, fc)
    with self.assertRaisesRegex(TypeError, "cat"):
      features.check_batch({"dense": np.zeros((1, 2), np.float32), "cat": np.zeros((1, 1), np.float32)}, fc)


if __name__ == "__main__":
  absltest.main()


class CriteoExperimentTest(chex.TestCase):

  def test_train_mode_reads_a_criteo_file(self):
    from experiments.configs import ctr as ctr_config  # pylint: disable=g-import-not-at-top
    from jaxml.recsys import experiment  # pylint: disable=g-import-not-at-top
    d = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, d, ignore_errors=True)
    rng = np.random.default_rng(0)
    lines = [_line(str(int(rng.random() < 0.3)), cats=[f"{rng.integers(0, 5):08x}" for _ in range(26)])
             for _ in range(40)] + ["0\tbroken\n"]
    path = os.path.join(d, "train.tsv")
    with open(path, "w") as fh:
      fh.writelines(lines)
    c = ctr_config.get_config("small")
    c.seeds = [0, 1]
    c.data.criteo_train, c.data.criteo_buckets, c.data.n_test = path, 64, 40
    c.model.kind, c.model.hidden = "mlp", [8]
    c.train.steps, c.train.batch_size = 3, 16   # 40 good lines = 2 batches: step 3 starts a second pass
    c.loop.mesh, c.loop.tensorboard = [1, 1, 1], False
    out = experiment.run(c, d, log=lambda *_: None)
    self.assertFalse(out["preempted"])
    self.assertTrue(os.path.exists(os.path.join(d, "results.json")))
    self.assertEqual([r["step"] for r in jt.read_metrics(os.path.join(d, "seed_0"))], [3])
    self.assertTrue(0.0 <= out["auc"] <= 1.0 and out["logloss"] > 0.0, out)
    self.assertGreater(out["pd"], 0.0)  # two seeds, two different models
