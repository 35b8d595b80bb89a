"""Initialisers, dense layers and MLPs against the formulas they promise."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import nn


class InitTest(chex.TestCase, parameterized.TestCase):

  def test_fan_in_normal_is_a_standard_normal_draw_over_sqrt_fan_in(self):
    rng = jax.random.PRNGKey(0)
    got = nn.fan_in_normal(rng, (3, 50, 4), fan_in=50)
    want = jax.random.normal(rng, (3, 50, 4), jnp.float32) / jnp.sqrt(jnp.float32(50))
    np.testing.assert_array_equal(got, want)  # the recsys initialiser, bit for bit
    np.testing.assert_allclose(nn.fan_in_normal(rng, (3, 50, 4), 50, scale=0.5), 0.5 * want, rtol=1e-6)
    big = nn.fan_in_normal(jax.random.PRNGKey(1), (400, 400), fan_in=100)
    self.assertAlmostEqual(float(jnp.std(big)), 0.1, delta=0.002)
    with self.assertRaisesRegex(ValueError, "fan_in"):
      nn.fan_in_normal(rng, (2,), 0)

  def test_init_from_specs_slices_one_draw_in_flattening_order(self):
    specs = {"b": {"bias": nn.ParamSpec((3,)), "scale": nn.ParamSpec((3,), value=1.0)},
             "a": nn.ParamSpec((2, 2), std=0.5), "c": [nn.ParamSpec((4,), std=2.0)]}
    got = nn.init_from_specs(jax.random.PRNGKey(2), specs)
    noise = jax.random.normal(jax.random.PRNGKey(2), (8,))  # 4 + 4 normal entries, keys sorted: a, then c
    np.testing.assert_allclose(got["a"], 0.5 * noise[:4].reshape(2, 2), rtol=1e-6)
    np.testing.assert_allclose(got["c"][0], 2.0 * noise[4:], rtol=1e-6)
    np.testing.assert_array_equal(got["b"]["bias"], np.zeros(3))
    np.testing.assert_array_equal(got["b"]["scale"], np.ones(3))
    with self.assertRaisesRegex(TypeError, "ParamSpec"):
      nn.init_from_specs(jax.random.PRNGKey(0), {"w": jnp.zeros(2)})

  def test_normal_init_scales_and_casts(self):
    got = nn.normal_init(jax.random.PRNGKey(3), (4, 5), 0.02, jnp.bfloat16)
    self.assertEqual(got.dtype, jnp.bfloat16)
    want = 0.02 * jax.random.normal(jax.random.PRNGKey(3), (4, 5), jnp.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)


class DenseAndMlpTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("full", 0, {"w", "b"}), ("bottleneck", 3, {"u", "v", "b"}),
                                  ("rank_not_below_width", 8, {"w", "b"}))
  def test_dense_init_and_spec_factorise_only_below_the_narrower_width(self, rank, keys):
    p = nn.dense_init(jax.random.PRNGKey(4), 10, 8, rank=rank)
    spec = nn.dense_spec(10, 8, rank=rank)
    self.assertEqual(set(p), keys)
    self.assertEqual(set(spec), keys)
    chex.assert_trees_all_equal_shapes(p, nn.init_from_specs(jax.random.PRNGKey(0), spec))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 10)), jnp.float32)
    w = p["w"] if rank in (0, 8) else p["u"] @ p["v"]
    np.testing.assert_allclose(nn.dense(p, x), x @ w + p["b"], rtol=1e-5, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "rank"):
      nn.dense_init(jax.random.PRNGKey(4), 10, 8, rank=-1)

  def test_dense_init_draws_each_factor_from_its_key(self):
    rng = jax.random.PRNGKey(6)
    full = nn.dense_init(rng, 6, 4, scale=0.1)
    np.testing.assert_allclose(full["w"], 0.1 * jax.random.normal(rng, (6, 4)) / math.sqrt(6), rtol=1e-6)
    low = nn.dense_init(rng, 6, 4, rank=2)
    ku, kv = jax.random.split(rng)
    np.testing.assert_array_equal(low["u"], jax.random.normal(ku, (6, 2)) / jnp.sqrt(jnp.float32(6)))
    np.testing.assert_array_equal(low["v"], jax.random.normal(kv, (2, 4)) / jnp.sqrt(jnp.float32(2)))
    np.testing.assert_array_equal(low["b"], np.zeros(4))

  @parameterized.parameters(0, 2)
  def test_mlp_init_per_layer_keys_and_single_draw(self, rank):
    sizes, rng = (5, 7, 3, 2), jax.random.PRNGKey(7)
    per_layer = nn.mlp_init(rng, sizes, rank=rank, out_scale=0.1)
    keys = jax.random.split(rng, 3)
    want = [nn.dense_init(keys[0], 5, 7, rank=rank), nn.dense_init(keys[1], 7, 3, rank=rank),
            nn.dense_init(keys[2], 3, 2, rank=rank, scale=0.1)]
    chex.assert_trees_all_equal(per_layer, want)
    single = nn.mlp_init(rng, sizes, rank=rank, out_scale=0.1, single_draw=True)
    chex.assert_trees_all_equal(single, nn.init_from_specs(rng, nn.mlp_specs(sizes, rank=rank, out_scale=0.1)))
    chex.assert_trees_all_equal_shapes(single, per_layer)
    first, last = nn.mlp_specs(sizes, rank=rank, out_scale=0.1)[::2]
    self.assertEqual(set(first), {"u", "v", "b"} if rank else {"w", "b"})
    self.assertEqual(set(last), {"w", "b"})  # rank 2 is not below min(3, 2): full rank
    self.assertAlmostEqual(last["w"].std, 0.1 / math.sqrt(3))
    self.assertEqual(nn.mlp_init(rng, (5,)), [])
    with self.assertRaisesRegex(ValueError, "sizes"):
      nn.mlp_init(rng, (5, 0, 2))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("no_final_act", False), ("final_act", True))
  def test_mlp_is_dense_layers_with_act_between(self, final_act):
    layers = nn.mlp_init(jax.random.PRNGKey(8), (4, 6, 6, 3), rank=2)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(5, 4)), jnp.float32)
    h = x
    for i, p in enumerate(layers):
      w = p["w"] if "w" in p else p["u"] @ p["v"]
      h = h @ w + p["b"]
      if final_act or i < 2:
        h = jnp.tanh(h)
    got = self.variant(lambda l, x: nn.mlp(l, x, act=jnp.tanh, final_act=final_act))(layers, x)
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nn.mlp([], x), x)


if __name__ == "__main__":
  absltest.main()
