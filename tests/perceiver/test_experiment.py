"""The Perceiver experiment on tiny models: the permutation study runs end to end through jaxml.train and
writes its files, the trained permuted Perceiver's logits are invariant to the pixel order, a rerun resumes
instead of retraining; the studies' models and data helpers (pixel permutation, byte masking, the stdlib
corpus) do what they say."""
import dataclasses
import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.perceiver import get_config
from jaxml import experiment as experiment_lib
from jaxml import report
from jaxml import train as jt
from jaxml.llama import data as text_data
from jaxml.perceiver import baselines as bl
from jaxml.perceiver import experiment
from jaxml.perceiver import model as pm
from jaxml.perceiver.config import BYTE_OFFSET, MASK_ID

pytestmark = pytest.mark.xdist_group("test_perceiver_experiment")  # one worker: the class fixture runs once

TINY = dict(eval_every=10, checkpoint_every=20, warmup_steps=2, digits_test=100, digits_steps=20, digits_batch=16,
            num_bands=2, num_latents=4, d_latents=16, num_blocks=1, self_attends=1, latent_heads=2, mlp_hidden=(16,),
            vit_width=8, vit_layers=1, conv_channels=(4,), lm_seq_len=16, lm_batch=4, lm_steps=20,
            lm_corpus_bytes=20_000, lm_eval_windows=4, lm_d_model=8, lm_num_latents=4, lm_d_latents=16,
            lm_self_attends=1, lm_heads=2, lm_tf_width=16, lm_tf_layers=1)


def quiet(_):
  pass


class PermutationStudyTest(absltest.TestCase):
  """The permutation study end to end (the other studies share `train_model`; their configs are checked below and
  their models' losses in test_model.py / test_baselines.py: one study keeps this file's compile time small)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp(prefix="jaxml_perceiver_")
    cls.results = experiment.run(dict(TINY, mode="permutation"), cls.dir, log=quiet)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_files_and_curves(self):
    r = dict(self.results)
    self.assertFalse(r.pop("preempted"))
    self.assertEqual(report.load_json(os.path.join(self.dir, "results.json")), report.to_jsonable(r))
    self.assertGreater(os.path.getsize(os.path.join(self.dir, "permutation.png")), 1000)
    self.assertIn("Fixed pixel permutation", open(os.path.join(self.dir, "results.md")).read())
    for name in ("perceiver_permuted", "conv", "conv_permuted", "mlp_permuted"):
      records = jt.read_metrics(os.path.join(self.dir, name))
      self.assertEqual([rec["step"] for rec in records], [10, 20], name)  # one record per eval_every steps
      self.assertEqual(r["permutation"][name]["accuracy"], records[-1]["test_accuracy"], name)
      self.assertBetween(r["permutation"][name]["accuracy"], 0.0, 1.0)
      self.assertGreater(r["permutation"][name]["params"], 0)
    self.assertEqual(sorted(r["permutation"]["permutation"]), list(range(64)))

  def test_trained_perceiver_ignores_the_input_order(self):
    """Its logits on the permuted inputs and on the same inputs in raster order differ only by rounding."""
    perm = self.results["permutation"]["perceiver_permuted"]
    self.assertGreater(perm["logit_scale"], 0.0)
    self.assertLess(perm["max_logit_change_unpermuted"], 1e-5 * max(perm["logit_scale"], 1.0))

  def test_rerun_resumes_instead_of_training(self):
    """A second run on the same folder restores each finished model (no new metrics records), reports the
    same figures, and a changed model on that folder raises naming the field."""
    before = jt.read_metrics(os.path.join(self.dir, "conv"))
    again = experiment.run(dict(TINY, mode="permutation"), self.dir, log=quiet)
    self.assertEqual(again["permutation"]["conv"], self.results["permutation"]["conv"])
    self.assertEqual(jt.read_metrics(os.path.join(self.dir, "conv")), before)
    with self.assertRaisesRegex(jt.ConfigMismatchError, "batch"):
      experiment.run(dict(TINY, mode="permutation", digits_batch=8), self.dir, log=quiet)


class ConfigAndDataTest(absltest.TestCase):

  def test_config_file_lists_every_field_with_the_defaults(self):
    fields = {f.name: f.default for f in dataclasses.fields(experiment.PerceiverExperimentConfig)}
    self.assertEqual(set(get_config()), set(fields))
    self.assertEqual(experiment_lib.from_config(experiment.PerceiverExperimentConfig, get_config()),
                     experiment.PerceiverExperimentConfig())
    small = experiment_lib.from_config(experiment.PerceiverExperimentConfig, get_config("small"))
    self.assertLess(small.digits_steps, fields["digits_steps"])
    with self.assertRaisesRegex(ValueError, "mode"):
      experiment.PerceiverExperimentConfig(mode="pixels")
    with self.assertRaisesRegex(ValueError, "eval_every"):
      experiment.PerceiverExperimentConfig(digits_steps=75)

  def test_study_models(self):
    """The byte LMs are of similar size (within 25%), as are the digits Perceiver, MLP and ViT; the multitask
    Perceiver is the classifier's encoder with a second query set."""
    cfg = experiment.PerceiverExperimentConfig()
    lm = pm.param_count(experiment.lm_perceiver_config(cfg))
    tcfg = experiment.lm_transformer_config(cfg)
    tf = bl.param_count(jax.eval_shape(lambda r: bl.transformer_init(r, tcfg), jax.random.PRNGKey(0)))
    self.assertLess(abs(lm - tf) / lm, 0.25)
    pcfg = experiment.digits_perceiver_config(cfg)
    mcfg = bl.MLPConfig(hidden=cfg.mlp_hidden)
    mlp = bl.param_count(jax.eval_shape(lambda r: bl.mlp_init(r, mcfg), jax.random.PRNGKey(0)))
    self.assertLess(abs(pm.param_count(pcfg) - mlp) / mlp, 0.1)
    mt = experiment.digits_perceiver_config(cfg, multitask=True)
    self.assertEqual([d.name for d in mt.decoder_configs], ["label", "pixels"])
    self.assertEqual(mt.decoder_configs[1].num_queries, 64)
    arr = experiment.digits_perceiver_config(cfg, inputs="array")
    self.assertEqual(pm.param_shapes(arr), pm.param_shapes(pcfg))  # the same model, other input path

  def test_byte_lm_init(self):
    """`lm_perceiver_init` is `pm.init` but for the position / query tables (0.02 sinusoids, written out) and the
    cross-attention query weights (times the gain); "normal" with gain 1 is `pm.init` itself."""
    cfg = experiment.PerceiverExperimentConfig(**TINY)
    pcfg = experiment.lm_perceiver_config(cfg)
    rng = jax.random.PRNGKey(3)
    plain = pm.init(rng, pcfg)
    same = experiment.lm_perceiver_init(rng, dataclasses.replace(cfg, lm_position_init="normal", lm_query_gain=1.0),
                                        pcfg)
    jax.tree.map(np.testing.assert_array_equal, same, plain)
    ours = experiment.lm_perceiver_init(rng, dataclasses.replace(cfg, lm_query_gain=3.0), pcfg)
    M, C = cfg.lm_seq_len, cfg.lm_d_model
    angle = np.pi * np.arange(M)[:, None] * 256.0 ** (-np.arange(C // 2)[None] / (C // 2))
    table = 0.02 * np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    np.testing.assert_allclose(ours["input"]["positions"], table, atol=1e-6)
    np.testing.assert_allclose(ours["decoders"]["masked_lm"]["queries"], table, atol=1e-6)
    for path in (("cross_attend",), ("decoders", "masked_lm", "cross_attend")):
      a, b = ours, plain
      for key in path:
        a, b = a[key], b[key]
      np.testing.assert_allclose(a["query"]["w"], 3.0 * b["query"]["w"], rtol=1e-6)
      np.testing.assert_array_equal(a["key"]["w"], b["key"]["w"])
    np.testing.assert_array_equal(ours["input"]["embeddings"], plain["input"]["embeddings"])
    with self.assertRaisesRegex(ValueError, "lm_position_init"):
      experiment.PerceiverExperimentConfig(lm_position_init="fourier")

  def test_permute_pixels(self):
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8, 1)
    perm = experiment.pixel_permutation(experiment.PerceiverExperimentConfig())
    out = experiment.permute_pixels(x, perm)
    for i in (0, 17, 63):
      self.assertEqual(out[1].reshape(64)[i], x[1].reshape(64)[perm[i]])

  def test_mask_bytes(self):
    tokens = jnp.full((64, 128), 40, jnp.int32)
    inputs, weights = experiment.mask_bytes(jax.random.PRNGKey(0), tokens, 0.15)
    hidden = np.asarray(weights) > 0
    np.testing.assert_array_equal(np.asarray(inputs)[hidden], MASK_ID)
    np.testing.assert_array_equal(np.asarray(inputs)[~hidden], 40)
    self.assertAlmostEqual(hidden.mean(), 0.15, delta=0.01)  # 8192 Bernoulli(0.15) draws: std 0.004

  def test_corpus_bytes_are_the_stdlib_files(self):
    ids = experiment.corpus_byte_ids(5_000)
    first = text_data.corpus_files(None, max_bytes=5_000)[0]
    head = open(first, "rb").read()[:200]
    np.testing.assert_array_equal(ids[:len(head)], np.frombuffer(head, np.uint8).astype(np.int32) + BYTE_OFFSET)


if __name__ == "__main__":
  absltest.main()
