"""Towers from config: shapes, counts, features, quality on the simulator, sharded == single-device step."""
import dataclasses
import functools
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from jax.sharding import PartitionSpec as P

from jaxml import train as jt
from jaxml.recsys import config, experiment, features, simulator, towers, train

FC = config.FeatureConfig(n_dense=3, vocab_sizes=(11, 7, 5, 9), multi_hot_vocab_sizes=(13,), embed_dim=8,
                          dense_hidden=(8,), row_multiple=16)


def _batch(n=6, seed=0):
  rng = np.random.default_rng(seed)
  multi = rng.integers(-1, 40, (n, 1, 3)).astype(np.int32)
  multi[0] = -1
  return {"dense": rng.standard_normal((n, 3)).astype(np.float32), "cat": rng.integers(-1, 50, (n, 4)).astype(np.int32),
          "multi": multi, "label": (rng.random(n) < 0.5).astype(np.float32), "group": np.repeat(np.arange(n // 2), 2)}


class TowerShapesTest(chex.TestCase):

  @parameterized.named_parameters(
      ("mlp_bottleneck_smelu", dict(kind="mlp", bottleneck=4, activation="smelu")),
      ("dcnv2_parallel_low_rank", dict(kind="dcnv2", cross_structure="parallel", cross_rank=4)),
      ("dcnv2_mixture", dict(kind="dcnv2", cross_rank=4, cross_experts=3)),
      ("dlrm", dict(kind="dlrm")),
      ("dhen_concat", dict(kind="dhen", dhen_modules=("attention", "linear", "dot"), dhen_rows=(None, 3, 2),
                           dhen_layers=2)),
      ("dhen_sum", dict(kind="dhen", dhen_modules=("attention", "dcn", "mlp"), dhen_ensemble="sum", dhen_layers=1)),
  )
  def test_logits_shape_and_counts(self, kw):
    cfg = config.TowerConfig(features=FC, hidden=(16, 8), **kw)
    params = towers.init(jax.random.PRNGKey(0), cfg)
    logits = jax.jit(towers.apply, static_argnums=2)(params, train.model_inputs(_batch()), cfg)
    chex.assert_shape(logits, (6,))
    chex.assert_tree_all_finite(logits)
    leaves = jax.tree_util.tree_leaves(params)
    self.assertEqual(towers.param_count(params), sum(x.size for x in leaves))
    self.assertGreater(towers.flops_per_example(cfg), towers.dense_flops_per_example(cfg))  # + dense-feature MLP


class ApplyChecksBatchTest(chex.TestCase):
  """`towers.apply` checks the keys it reads at trace time; before, bad batches gave logits without an error."""

  CFG = config.TowerConfig(features=FC, hidden=(8,))

  def setUp(self):
    super().setUp()
    self.params = towers.init(jax.random.PRNGKey(0), self.CFG)
    self.inputs = train.model_inputs(_batch())

  def apply(self, variant, **over):
    batch = {**self.inputs, **over}
    return variant(lambda p, b: towers.apply(p, b, self.CFG))(self.params, batch)

  @chex.variants(with_jit=True, without_jit=True)
  def test_wrong_column_count_names_key_and_shapes(self):
    with self.assertRaisesRegex(ValueError, r"batch\['cat'\] has shape \(6, 1\), expected \[B, 4\] int32"):
      self.apply(self.variant, cat=self.inputs["cat"][:, :1])
    with self.assertRaisesRegex(ValueError, r"batch\['dense'\] has shape \(6, 2\), expected \[B, 3\] float32"):
      self.apply(self.variant, dense=self.inputs["dense"][:, :2])
    with self.assertRaisesRegex(ValueError, r"batch\['multi'\] has shape \(6, 3\), expected \[B, 1, L\] int32"):
      self.apply(self.variant, multi=self.inputs["multi"][:, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_float_ids_name_key_and_dtype(self):
    with self.assertRaisesRegex(TypeError, r"batch\['cat'\] must hold integer ids \(\[B, 4\] int32\), got dtype float32"):
      self.apply(self.variant, cat=self.inputs["cat"].astype(jnp.float32))
    with self.assertRaisesRegex(TypeError, r"batch\['multi'\] must hold integer ids.*got dtype bool"):
      self.apply(self.variant, multi=self.inputs["multi"] > 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_missing_key_and_mismatched_rows(self):
    batch = dict(self.inputs)
    del batch["multi"]
    with self.assertRaisesRegex(ValueError, r"batch is missing 'multi'"):
      self.variant(lambda p, b: towers.apply(p, b, self.CFG))(self.params, batch)
    with self.assertRaisesRegex(ValueError, r"batch\['cat'\] has 5 rows, batch\['dense'\] has 6"):
      self.apply(self.variant, cat=self.inputs["cat"][:5])

  @chex.variants(with_jit=True, without_jit=True)
  def test_keys_the_tower_does_not_read_are_ignored(self):
    # The trainer passes label / weight / group / teacher next to the features.
    extras = {"weight": jnp.ones(6), "teacher": jnp.full(6, 0.5), "anything": jnp.zeros((2, 7, 1), jnp.float32)}
    features_only = {k: v for k, v in self.inputs.items() if k in train.MODEL_KEYS}
    with_extras = self.variant(lambda p, b: towers.apply(p, b, self.CFG))(self.params, {**self.inputs, **extras})
    plain = towers.apply(self.params, features_only, self.CFG)
    np.testing.assert_allclose(np.asarray(with_extras), np.asarray(plain), rtol=1e-6)

  def test_host_check_batch_agrees(self):
    bad = dict(_batch(), cat=_batch()["cat"].astype(np.float64))
    with self.assertRaisesRegex(TypeError, r"batch\['cat'\] must hold integer ids"):
      features.check_batch(bad, FC)
    features.check_batch(_batch(), FC)  # the same batch with int32 ids passes


class DhenChunksTest(chex.TestCase):
  """`dhen_batch_chunks` changes the schedule, not the function."""

  CFG = config.TowerConfig(features=FC, kind="dhen", hidden=(16,), dhen_modules=("attention", "linear", "dot"),
                           dhen_rows=(None, 3, 2), dhen_layers=2)

  def test_chunked_equals_whole_batch_values_and_grads(self):
    whole = dataclasses.replace(self.CFG, dhen_batch_chunks=1)
    chunked = dataclasses.replace(self.CFG, dhen_batch_chunks=4)
    params = towers.init(jax.random.PRNGKey(0), whole)
    inputs = train.model_inputs(_batch(16, seed=3))
    labels = jnp.asarray(_batch(16, seed=3)["label"])

    def loss(p, cfg):
      return jnp.mean(optax.sigmoid_binary_cross_entropy(towers.apply(p, inputs, cfg), labels))

    for cfg in (whole, chunked):  # the chunked program is really a different program
      self.assertEqual(towers.dhen_chunks(cfg, 16), cfg.dhen_batch_chunks)
    lw, gw = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, whole)
    lc, gc = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunked)
    np.testing.assert_allclose(lc, lw, rtol=1e-6)
    # Same per-example math; only the order of the batch sums in the weight gradients differs.
    chex.assert_trees_all_close(gc, gw, rtol=1e-5, atol=1e-7)
    apply = jax.jit(towers.apply, static_argnums=2)
    np.testing.assert_allclose(apply(params, inputs, chunked), apply(params, inputs, whole), rtol=1e-6, atol=1e-6)

  def test_automatic_rule_and_bad_chunks(self):
    auto = self.CFG  # layers read 6 and 11 rows
    on_cpu = jax.default_backend() == "cpu"
    self.assertEqual(towers.dhen_chunks(auto, 4096), 8 if on_cpu else 1)
    self.assertEqual(towers.dhen_chunks(auto, 1000), 1)  # below 1,024 examples: one program
    self.assertEqual(towers.dhen_chunks(auto, 1028), 1)  # 8 does not divide
    wide = dataclasses.replace(auto, dhen_rows=(None, 30, 2), dhen_layers=3)  # layers read 6, 38, 70 rows
    self.assertEqual(towers.dhen_chunks(dataclasses.replace(wide, dhen_layers=2), 4096), 8 if on_cpu else 1)
    self.assertEqual(towers.dhen_chunks(wide, 4096), 1)
    self.assertEqual(towers.dhen_chunks(dataclasses.replace(wide, dhen_batch_chunks=2), 16), 2)  # explicit wins
    with self.assertRaisesRegex(ValueError, "must divide the batch size 16"):
      towers.dhen_chunks(dataclasses.replace(auto, dhen_batch_chunks=3), 16)
    with self.assertRaisesRegex(ValueError, "dhen_batch_chunks"):
      config.TowerConfig(kind="dhen", dhen_batch_chunks=-1)


class FeaturesTest(chex.TestCase):

  def test_hash_ids_range_and_missing_bucket(self):
    raw = jnp.arange(-3, 1000)
    h = features.hash_ids(raw, 2, 17)
    np.testing.assert_array_equal(h[:3], 0)
    self.assertTrue(bool(jnp.all((h[3:] >= 1) & (h[3:] < 17))))
    self.assertGreater(len(np.unique(np.asarray(h[3:]))), 14)  # spreads over the buckets
    self.assertFalse(np.array_equal(h, features.hash_ids(raw, 3, 17)))  # fields hash differently

  def test_multi_hot_mean_pooling_and_empty_field(self):
    params = features.init(jax.random.PRNGKey(1), FC)
    b = _batch()
    out = features.embed_multi(params["table"], jnp.asarray(b["multi"]), FC)
    offset = features.field_offsets(FC)[4]
    for i in range(6):
      ids = b["multi"][i, 0]
      ids = ids[ids >= 0]
      rows = np.asarray(features.hash_ids(jnp.asarray(ids), 4, 13)) + offset
      want = params["table"][rows].mean(0) if len(ids) else params["table"][offset]
      np.testing.assert_allclose(out[i, 0], want, rtol=1e-5, atol=1e-6)

  def test_row_padding_for_sharding(self):
    self.assertEqual(FC.table_rows % FC.row_multiple, 0)
    self.assertGreaterEqual(FC.table_rows, sum(FC.vocab_sizes) + sum(FC.multi_hot_vocab_sizes))

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "kind"):
      config.TowerConfig(kind="transformer")
    with self.assertRaisesRegex(ValueError, "cross_rank"):
      config.TowerConfig(kind="dcnv2", cross_experts=4)


class TrainingTest(chex.TestCase):
  """Training through `jaxml.train` (`experiment.train_tower`, or the core's step with RECSYS_RULES)."""

  LOOP = experiment.LoopConfig(mesh=(1, 1, 1), checkpoint_every=1000, log_every=500, tensorboard=False)

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_towers_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_tower_gets_close_to_the_oracle_auc(self):
    sim = simulator.CTRSimulator(simulator.SimulatorConfig(n_dense=2, vocab_sizes=(20, 10, 10, 5), base_rate=0.2,
                                                           third_order=0.3, seed=3))
    tr, te = sim.sample(60000, 0), sim.sample(20000, 1)
    cfg = config.TowerConfig(features=sim.feature_config(8), kind="dcnv2", hidden=(32, 16), cross_layers=3)
    tc = train.TrainConfig(steps=1000, batch_size=256, learning_rate=3e-3)
    result = experiment.train_tower(cfg, tc, train.batches(tr, 256, seed=0), self.tmpdir(), self.LOOP,
                                    print_fn=lambda s: None)
    ours = train.evaluate(te["label"], train.predict(result.state.params, te, cfg))
    oracle = train.evaluate(te["label"], te["prob"])
    self.assertGreater(ours["auc"], oracle["auc"] - 0.02, (ours, oracle))
    self.assertLess(ours["logloss"], oracle["logloss"] + 0.015, (ours, oracle))
    self.assertGreater(ours["auc"], 0.5 + 0.8 * (oracle["auc"] - 0.5), (ours, oracle))
    self.assertEqual((result.step, int(result.state.step)), (1000, 1000))

  def test_optimizers_match_optax(self):
    # The core's factory with TrainConfig's settings gives optax.adam / adagrad / sgd's updates, bit for bit.
    cfg = config.TowerConfig(features=FC, hidden=(8,))
    batch = train.model_inputs(_batch(8, seed=1))
    params = towers.init(jax.random.PRNGKey(0), cfg)
    loss = functools.partial(train.loss_fn, cfg=cfg, tc=train.TrainConfig())
    grad = jax.jit(jax.grad(lambda p: loss(p, batch)[0]))

    def three_steps(tx):
      p, opt_state = params, tx.init(params)
      for _ in range(3):
        updates, opt_state = tx.update(grad(p), opt_state, p)
        p = optax.apply_updates(p, updates)
      return p

    for kind, reference in (("adam", optax.adam), ("adagrad", optax.adagrad), ("sgd", optax.sgd)):
      tx, _ = train.optimizer(train.TrainConfig(optimizer=kind, learning_rate=0.01))
      chex.assert_trees_all_equal(three_steps(tx), three_steps(reference(0.01)), custom_message=kind)

  @parameterized.named_parameters(
      ("dcnv2", dict(kind="dcnv2", cross_rank=4)),
      # interleaved batch slices keep each device's rows local (16 rows, 4 data shards, 2 slices)
      ("dhen_chunked", dict(kind="dhen", dhen_batch_chunks=2)),
  )
  def test_sharded_step_equals_single_device_step(self, kw):
    self.assertGreaterEqual(jax.device_count(), 8, "needs the 8 virtual CPU devices of tests/conftest.py")
    cfg = config.TowerConfig(features=FC, hidden=(16,), **kw)
    tc = train.TrainConfig(optimizer="sgd", learning_rate=0.5, loss="logloss+rank")
    tx, _ = train.optimizer(tc)
    step = jt.make_train_step(functools.partial(train.loss_fn, cfg=cfg, tc=tc), tx)
    init_fn = lambda r: towers.init(r, cfg)  # noqa: E731
    batch = _batch(16, seed=7)
    state, _ = jt.init_train_state(init_fn, tx, jax.random.PRNGKey(2))
    single = jax.jit(step)
    s1, m1 = single(state, train.model_inputs(batch))
    s1, m1b = single(s1, train.model_inputs(batch))

    mesh = jt.make_mesh(4, 1, 2)   # batch over data * fsdp = 4, table rows over all 8 devices
    s_state, shardings = jt.init_train_state(init_fn, tx, jax.random.PRNGKey(2), mesh, train.RECSYS_RULES)
    chex.assert_trees_all_equal(jax.device_get(s_state.params), jax.device_get(state.params))
    table = s_state.params["features"]["table"]
    self.assertEqual(table.sharding.spec, P(("data", "fsdp", "tensor"), None))
    self.assertEqual(table.addressable_shards[0].data.shape[0], FC.table_rows // 8)  # rows split 8 ways
    self.assertEqual(shardings.params["top"][0]["w"].spec, P())                      # dense layers replicated
    sharded = jt.jit_train_step(step, shardings, jt.batch_sharding(mesh))
    sb = jt.global_batch({k: v for k, v in batch.items() if k in ("dense", "cat", "multi", "label", "group")},
                         jt.batch_sharding(mesh))
    s2, m2 = sharded(s_state, sb)
    s2, m2b = sharded(s2, sb)
    self.assertEqual(s2.params["features"]["table"].sharding.spec, P(("data", "fsdp", "tensor"), None))
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2b["loss"], m1b["loss"], rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(s2.params), jax.device_get(s1.params), rtol=1e-4, atol=1e-6)

  def test_nan_loss_raises(self):
    cfg = config.TowerConfig(features=FC, hidden=(8,))
    tc = train.TrainConfig(steps=2, batch_size=8, learning_rate=1e30, optimizer="sgd")
    b = _batch(8)
    b["dense"] = b["dense"] * 1e30
    with self.assertRaises(jt.NonFiniteLossError) as cm:
      experiment.train_tower(cfg, tc, lambda step: b, self.tmpdir(), self.LOOP, print_fn=lambda s: None)
    self.assertEqual(cm.exception.step, 1)   # the first loss already overflows


if __name__ == "__main__":
  absltest.main()
