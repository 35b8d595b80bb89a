"""The pure train step: it learns, and jit, pmap and a (data, fsdp, tensor) mesh agree."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxml import train as jt
from jaxml.llama.config import LLAMA_RULES
from tests.train import common

TOL = dict(rtol=2e-5, atol=2e-6)


def assert_trees_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


def linear_loss(params, batch, rng=None):
  err = batch["x"] @ params["w"] - batch["y"]
  loss = jnp.mean(err ** 2)
  return loss, {"mse": loss}


class StepTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_step_is_one_optax_update(self):
    # The step equals a hand-written optax update on the same gradient.
    tx, schedule = jt.make_optimizer(0.1, total_steps=10, warmup_steps=1)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    state = jt.create_train_state(params, tx, jax.random.PRNGKey(0))
    step = self.variant(jt.make_train_step(linear_loss, tx, schedule=schedule))
    for _ in range(3):
      grads = jax.grad(lambda p: linear_loss(p, batch)[0])(params)
      updates, opt = tx.update(grads, state.opt_state if _ == 0 else opt, params)
      params = optax.apply_updates(params, updates)
      state, metrics = step(state, batch)
    np.testing.assert_allclose(state.params["w"], params["w"], rtol=1e-6)
    self.assertEqual(int(state.step), 3)
    np.testing.assert_allclose(float(metrics["lr"]), float(schedule(2)), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["mse"]))

  def test_global_norm_joined_and_per_leaf_forms(self):
    """Both branches equal the float64 norm written out, and carry inf/NaN to the NaN guard."""
    rng = np.random.default_rng(0)
    small = {"a": rng.normal(size=(30, 7)), "b": rng.normal(size=(5,)), "c": rng.normal(size=(2, 3, 4))}
    large = {"a": rng.normal(size=(jt.SMALL_TREE_NORM // 2 + 1,)), "b": rng.normal(size=(jt.SMALL_TREE_NORM // 2,))}
    for tree in (small, large):
      want = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))
      got = jax.jit(jt.global_norm)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_allclose(float(got), want, rtol=1e-6)
      for bad, expect in ((np.inf, np.isposinf), (np.nan, np.isnan)):
        poisoned = dict(tree, b=np.concatenate([[bad], tree["b"][1:]]))
        self.assertTrue(expect(float(jt.global_norm(jax.tree.map(jnp.asarray, poisoned)))))
    self.assertEqual(float(jt.global_norm({})), 0.0)

  def test_llama_steps_reduce_loss(self):
    _, _, _, step = common.setup((1, 1, 1))
    state = common.fresh_state()
    batch = common.batch_fn(0)
    losses = []
    for _ in range(6):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))  # loss before each update
    self.assertLess(losses[-1], losses[0] - 0.2, f"losses on a repeated batch: {losses}")
    self.assertTrue(np.isfinite(float(metrics["grad_norm"])))

  def test_pmap_equals_jit(self):
    tx, schedule = common.optimizer()
    n = jax.device_count()
    self.assertEqual(common.BATCH % n, 0, "the batch must split over the devices")
    batches = [common.batch_fn(i) for i in range(2)]

    pstep = jax.pmap(jt.make_train_step(common.loss_fn, tx, axis_name="batch", schedule=schedule),
                     axis_name="batch")
    pstate = jax.tree_util.tree_map(lambda x: jnp.stack([np.asarray(x)] * n), jax.device_get(common.fresh_state()))
    for b in batches:
      pstate, pmetrics = pstep(pstate, {"tokens": b["tokens"].reshape(n, -1, b["tokens"].shape[-1])})

    _, _, _, jstep = common.setup((1, 1, 1))
    state = common.fresh_state()
    for b in batches:
      state, jmetrics = jstep(state, b)

    np.testing.assert_allclose(np.asarray(pmetrics["loss"]), float(jmetrics["loss"]), **TOL)
    assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], pstate.params), state.params, **TOL)
    chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda x: x[0], pstate.params),
                                jax.tree_util.tree_map(lambda x: x[-1], pstate.params))

  @parameterized.parameters((2, 2, 2))
  def test_sharded_step_equals_single_device(self, data, fsdp, tensor):
    mesh, _, shardings, sstep = common.setup((data, fsdp, tensor))
    tx, _ = common.optimizer()
    # Shape-first sharded init gives the same values as the single-device init.
    sharded, _ = jt.init_train_state(common.init_fn, tx, jax.random.PRNGKey(0), mesh, LLAMA_RULES)
    single = common.fresh_state((1, 1, 1))
    chex.assert_trees_all_equal(jax.device_get(sharded.params), jax.device_get(single.params))
    wq = sharded.params["layers"]["wq"]
    self.assertEqual(wq.sharding.spec, shardings.params["layers"]["wq"].spec)
    self.assertEqual(wq.addressable_shards[0].data.size * fsdp * tensor, wq.size, "wq is split fsdp x tensor")
    _, _, _, step1 = common.setup((1, 1, 1))
    for i in range(2):
      sharded, smetrics = sstep(sharded, common.batch_fn(i))
      single, metrics = step1(single, common.batch_fn(i))
    np.testing.assert_allclose(float(smetrics["loss"]), float(metrics["loss"]), **TOL)
    assert_trees_close(jax.device_get(sharded.params), jax.device_get(single.params), **TOL)
    assert_trees_close(jax.device_get(sharded.opt_state), jax.device_get(single.opt_state), **TOL)

  def test_mesh_and_rules(self):
    mesh = jt.make_mesh(2, -1, 2)
    self.assertEqual(dict(mesh.shape), {"data": 2, "fsdp": 2, "tensor": 2})
    with self.assertRaisesRegex(ValueError, "needs 12 devices"):
      jt.make_mesh(2, 3, 2)
    # A mesh axis that does not divide a dimension leaves that dimension replicated.
    spec = jt.spec_for("params/layers/wq", (2, 5, 8), mesh, LLAMA_RULES)
    self.assertEqual(tuple(spec), (None, None, "tensor"))
    self.assertEqual(tuple(jt.spec_for("opt_state/1/0/mu/output", (8, 5), mesh, LLAMA_RULES)), ("fsdp", None))
    self.assertEqual(tuple(jt.spec_for("step", (), mesh, LLAMA_RULES)), ())


if __name__ == "__main__":
  absltest.main()
