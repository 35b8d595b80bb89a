"""Llama data pipeline and the experiment (`small` config) end to end through `run(config, workdir)`."""
import contextlib
import io
import json
import math
import os
import shutil
import tempfile

import chex
import jax
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import train as jt
from jaxml.llama import data
from jaxml.llama import train as llama_train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DataTest(chex.TestCase, parameterized.TestCase):

  def test_stdlib_corpus_is_bounded_and_deterministic(self):
    a = data.corpus_files(max_bytes=100_000)
    b = data.corpus_files(max_bytes=100_000)
    self.assertEqual(a, b)
    sizes = [os.path.getsize(f) for f in a]
    self.assertGreaterEqual(sum(sizes), 100_000)
    self.assertLess(sum(sizes) - sizes[-1], 100_000)
    self.assertTrue(all(f.endswith(".py") and f.startswith(data.stdlib_dir()) for f in a))

  def test_folder_and_file_corpus(self):
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root)
    for name, text in (("b.txt", "beta"), ("a/c.md", "gamma"), ("x.bin", "skip")):
      os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
      with open(os.path.join(root, name), "w") as f:
        f.write(text)
    files = data.corpus_files(root)
    self.assertEqual([os.path.relpath(f, root) for f in files], ["a/c.md", "b.txt"])
    self.assertEqual(data.corpus_files(files[1]), [files[1]])
    with self.assertRaisesRegex(ValueError, "neither a file nor a folder"):
      data.corpus_files(os.path.join(root, "missing"))

  @parameterized.parameters(0, 3, 1000)
  def test_batches_are_a_function_of_seed_and_step(self, step):
    tokens = np.arange(500, dtype=np.int32) * 3
    a = data.TokenBatcher(tokens, 4, 16, seed=1)(step)["tokens"]
    b = data.TokenBatcher(tokens.copy(), 4, 16, seed=1)(step)["tokens"]
    np.testing.assert_array_equal(a, b)
    self.assertEqual((a.shape, a.dtype), ((4, 17), np.int32))
    # Each row is a window of consecutive stream tokens.
    np.testing.assert_array_equal(np.diff(a, axis=1), np.full((4, 16), 3))
    self.assertFalse(np.array_equal(a, data.TokenBatcher(tokens, 4, 16, seed=1)(step + 1)["tokens"]))
    self.assertFalse(np.array_equal(a, data.TokenBatcher(tokens, 4, 16, seed=2)(step)["tokens"]))

  def test_byte_tokenizer_round_trip(self):
    tok = data.ByteTokenizer()
    text = "def f(x):\n    return 'é'\n"
    ids = tok.encode(text, bos=True, eos=True)
    self.assertEqual((ids[0], ids[-1]), (tok.bos_id, tok.eos_id))
    self.assertEqual(tok.decode(ids), text)
    self.assertLess(max(ids), tok.vocab_size)


def small_config(**overrides):
  from experiments.configs import llama_lm as llama_lm_config  # noqa: PLC0415
  config = llama_lm_config.get_config("small")
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _listing(path):
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, path)] = os.path.getsize(p)
  return out


class ExperimentTest(chex.TestCase):

  def tmpdir(self):
    workdir = tempfile.mkdtemp(prefix="jaxml_llama_lm_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    return workdir

  def test_small_config_trains_and_generates(self):
    workdir = self.tmpdir()
    cfg = small_config()
    train_out = io.StringIO()
    with contextlib.redirect_stdout(train_out):
      summary = llama_train.run(cfg, workdir)
    self.assertFalse(summary["preempted"])
    for name in ("metrics.jsonl", "loss.png", "model_config.json", "tokens.npy"):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual(records[-1]["step"], cfg.steps)
    self.assertLess(records[-1]["loss"], records[0]["loss"] - 0.5)
    self.assertLess(records[0]["loss"], math.log(cfg.vocab_size) + 1.0)
    sample = train_out.getvalue().split("sample: " + "-" * 60 + "\n", 1)[1].split("\ndone:")[0]

    # Generate mode restores the checkpoint and reproduces the greedy sample printed after training.
    gen_out = io.StringIO()
    with contextlib.redirect_stdout(gen_out):
      out = llama_train.run(small_config(mode="generate", prompt=cfg.sample_prompts[0]), workdir)
    self.assertIn(f"loaded step {cfg.steps}", gen_out.getvalue())
    self.assertTrue(sample.startswith(cfg.sample_prompts[0]))
    self.assertIn(sample, gen_out.getvalue())
    self.assertEqual(out["samples"][0], sample)

    # A changed model on the same workdir raises naming the field, and touches nothing.
    before = _listing(workdir)
    changed = small_config()
    changed.model_overrides.dim = 48
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"dim: recorded 32, now 48"):
      llama_train.run(changed, workdir)
    self.assertEqual(_listing(workdir), before)

  def test_huge_learning_rate_leaves_a_checkpoint_that_trains(self):
    # lr 1e30: the parameters after one update are finite (~1e29), every later loss is NaN.
    workdir = self.tmpdir()
    with contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaises(jt.NonFiniteLossError) as cm:
        llama_train.run(small_config(lr=1e30, checkpoint_every=1, sample_prompts=()), workdir)
    last = cm.exception.last_good_step
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=1)
    self.assertEqual(ckpt.latest_step(), last)
    ckpt.close()
    with contextlib.redirect_stdout(io.StringIO()):
      summary = llama_train.run(small_config(checkpoint_every=1, sample_prompts=()), workdir)
    self.assertEqual(summary["step"], small_config().steps)
    self.assertTrue(all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(summary["params"])))
    self.assertTrue(math.isfinite(summary["last_loss"]))


if __name__ == "__main__":
  absltest.main()
