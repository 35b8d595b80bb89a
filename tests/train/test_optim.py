"""Optimizer factory: schedule values against the closed form, decay mask, clipping."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxml import train as jt


def schedule_formula(t, lr, warmup, total, ratio):
  """lr * t / w during warmup, then cosine from lr to ratio*lr over (total - warmup) steps."""
  if t < warmup:
    return lr * t / warmup
  frac = min(t - warmup, total - warmup) / (total - warmup)
  end = lr * ratio
  return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


class ScheduleTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters((1e-3, 10, 100, 0.1), (3e-4, 0, 50, 0.0), (1.0, 5, 6, 0.5))
  def test_matches_formula(self, lr, warmup, total, ratio):
    sched = jt.warmup_cosine_schedule(lr, warmup, total, ratio)
    for t in sorted({0, 1, warmup // 2, warmup, warmup + 1, (warmup + total) // 2, total - 1, total, total + 7}):
      np.testing.assert_allclose(float(sched(t)), schedule_formula(t, lr, warmup, total, ratio), rtol=1e-5,
                                 atol=1e-9, err_msg=f"step {t}")

  @parameterized.parameters(dict(warmup=10, total=10), dict(warmup=-1, total=10), dict(warmup=0, total=0))
  def test_bad_arguments_raise(self, warmup, total):
    with self.assertRaisesRegex(ValueError, "warmup_steps|total_steps"):
      jt.warmup_cosine_schedule(1e-3, warmup, total)


class OptimizerTest(chex.TestCase):

  def test_decay_mask_excludes_norms_and_vectors(self):
    params = {"layers": {"attention_norm": jnp.ones((2, 4)), "wq": jnp.ones((2, 4, 4))}, "norm": jnp.ones(4),
              "output": jnp.ones((4, 8)), "bias": jnp.ones(8)}
    mask = jt.decay_mask(params)
    expected = {"layers": {"attention_norm": False, "wq": True}, "norm": False, "output": True, "bias": False}
    self.assertEqual(mask, expected)

  def test_weight_decay_only_on_masked_leaves(self):
    # Zero gradients: Adam's update is 0, so any change is the decoupled decay lr * wd * theta.
    params = {"layers": {"ffn_norm": jnp.full((2, 4), 2.0), "w1": jnp.full((2, 4, 4), 2.0)}}
    tx, sched = jt.make_optimizer(0.1, total_steps=10, warmup_steps=0, weight_decay=0.5, clip_norm=None)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["layers"]["ffn_norm"], params["layers"]["ffn_norm"])
    np.testing.assert_allclose(new["layers"]["w1"], 2.0 * (1 - float(sched(0)) * 0.5), rtol=1e-6)

  def test_clipping_bounds_the_update_input(self):
    # With clipping, a huge gradient and the same gradient scaled to the clip norm give the same Adam update.
    params = {"w": jnp.ones((3, 3))}
    tx, _ = jt.make_optimizer(0.1, total_steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    g = {"w": jnp.arange(9.0).reshape(3, 3) * 1e3}
    g_unit = jax.tree_util.tree_map(lambda x: x / optax.tree.norm(g), g)
    u_big, _ = tx.update(g, tx.init(params), params)
    u_unit, _ = tx.update(g_unit, tx.init(params), params)
    np.testing.assert_allclose(u_big["w"], u_unit["w"], rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
