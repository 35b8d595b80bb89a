"""Interaction modules: shapes and the algebraic properties each one promises."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import nn
from jaxml.nn.layers import layer_norm
from jaxml.recsys import config, modules, towers

B, F, D = 4, 5, 6
N = F * D


def _x(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


class CrossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_weight_cross_is_identity_plus_x0_times_b(self):
    x0, xl, b = _x(0, (B, N)), _x(1, (B, N)), _x(2, (N,))
    p = {"w": jnp.zeros((N, N)), "b": b}
    out = self.variant(modules.cross)(p, x0, xl)
    np.testing.assert_allclose(out, xl + x0 * b, rtol=1e-6, atol=1e-6)

  @parameterized.parameters(0, 3)
  def test_cross_matches_formula(self, rank):
    p = modules.cross_init(jax.random.PRNGKey(3), N, rank)
    p["b"] = _x(4, (N,))
    x0, xl = _x(5, (B, N)), _x(6, (B, N))
    w = p["w"] if rank == 0 else p["v"] @ p["u"]
    want = np.asarray(x0) * (np.asarray(xl) @ np.asarray(w) + np.asarray(p["b"])) + np.asarray(xl)
    np.testing.assert_allclose(modules.cross(p, x0, xl), want, rtol=1e-4, atol=1e-4)

  def test_low_rank_with_full_rank_factors_equals_full_rank(self):
    v, u, b = _x(7, (N, N)), _x(8, (N, N)) / N, _x(9, (N,))
    x0, xl = _x(10, (B, N)), _x(11, (B, N))
    low = modules.cross({"v": v, "u": u, "b": b}, x0, xl)
    full = modules.cross({"w": v @ u, "b": b}, x0, xl)
    np.testing.assert_allclose(low, full, rtol=1e-4, atol=1e-4)

  def test_mixture_of_identical_experts_equals_one_expert(self):
    p1 = modules.cross_init(jax.random.PRNGKey(12), N, rank=3)
    p1["b"] = _x(13, (N,))
    pm = modules.cross_init(jax.random.PRNGKey(14), N, rank=3, experts=4)
    pm = dict(pm, v=jnp.stack([p1["v"]] * 4), u=jnp.stack([p1["u"]] * 4), b=jnp.stack([p1["b"]] * 4))
    x0, xl = _x(15, (B, N)), _x(16, (B, N))
    np.testing.assert_allclose(modules.cross(pm, x0, xl), modules.cross(p1, x0, xl), rtol=1e-4, atol=1e-4)

  def test_stacked_cross_net_equals_loop_of_layers(self):
    p = modules.cross_net_init(jax.random.PRNGKey(17), N, 3, rank=2)
    x0 = _x(18, (B, N))
    x = x0
    for i in range(3):
      x = modules.cross(jax.tree_util.tree_map(lambda a: a[i], p), x0, x)
    np.testing.assert_allclose(modules.cross_net(p, x0), x, rtol=1e-5, atol=1e-5)


class LceDotAttentionTest(chex.TestCase):

  def test_decomposed_lce_equals_plain_lce(self):
    n_users, ku, kc, m = 3, 2, 4, 5
    e_user, e_cand = _x(20, (n_users, ku, D)), _x(21, (B, kc, D))
    user_index = jnp.array([0, 2, 2, 1])
    w_user, w_cand = _x(22, (m, ku)), _x(23, (m, kc))
    plain = modules.lce({"w": jnp.concatenate([w_user, w_cand], 1)},
                        jnp.concatenate([e_user[user_index], e_cand], axis=1))
    dec = modules.lce_decomposed(w_user, w_cand, e_user, e_cand, user_index)
    chex.assert_shape(dec, (B, m, D))
    np.testing.assert_allclose(dec, plain, rtol=1e-5, atol=1e-5)

  def test_dot_interaction_lists_each_pair_once(self):
    x = _x(24, (B, F, D))
    want = np.stack([np.einsum("bd,bd->b", x[:, i], x[:, j]) for i in range(F) for j in range(i + 1, F)], axis=1)
    np.testing.assert_allclose(modules.dot_interaction(x), want, rtol=1e-5, atol=1e-5)

  def test_feature_attention_is_permutation_equivariant(self):
    p = modules.attention_init(jax.random.PRNGKey(25), D)
    x = _x(26, (B, F, D))
    perm = np.array([3, 0, 4, 1, 2])
    out = modules.feature_attention(p, x, n_heads=2)
    chex.assert_shape(out, (B, F, D))
    np.testing.assert_allclose(modules.feature_attention(p, x[:, perm], n_heads=2), out[:, perm], rtol=1e-5, atol=1e-5)

  def test_inception_concatenates_its_branches(self):
    p = modules.inception_init(jax.random.PRNGKey(27), N, (7, 3), rank=2)
    x = _x(28, (B, N))
    out = modules.inception(p, x)
    chex.assert_shape(out, (B, 7 + 3 + N))
    np.testing.assert_allclose(out[:, 7:10], jax.nn.relu(modules.linear(p["dense"][1], x)), rtol=1e-6)
    np.testing.assert_allclose(out[:, 10:], modules.cross(p["cross"], x, x), rtol=1e-6)

  def test_pyramid_widths_shrink_and_mlp_follows_them(self):
    widths = config.pyramid_widths(256, 32, 4)
    self.assertEqual((widths[0], widths[-1]), (256, 32))
    self.assertTrue(all(a > b for a, b in zip(widths, widths[1:])), widths)
    layers = modules.mlp_init(jax.random.PRNGKey(29), N, widths)
    chex.assert_shape(modules.mlp(layers, _x(30, (B, N))), (B, 32))


class DhenTest(chex.TestCase):

  @parameterized.named_parameters(("same_rows_identity_shortcut", F), ("projected_shortcut", 3))
  def test_k1_linear_dhen_layer_is_lce_plus_shortcut_plus_layer_norm(self, rows_out):
    p = modules.dhen_layer_init(jax.random.PRNGKey(31), ("linear",), (rows_out,), F, rows_out, D)
    p["ln_scale"], p["ln_bias"] = _x(32, (D,)), _x(33, (D,))
    x = _x(34, (B, F, D))
    out = modules.dhen_layer(p, x, ("linear",), (rows_out,), "concat")
    shortcut = x if rows_out == F else modules.lce(p["shortcut"], x)
    self.assertEqual("shortcut" in p, rows_out != F)
    want = layer_norm(modules.lce(p["modules"][0], x) + shortcut, p["ln_scale"], p["ln_bias"])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

  @parameterized.parameters("concat", "sum")
  def test_two_module_layer_shapes(self, ensemble):
    cfg = config.TowerConfig(features=config.FeatureConfig(n_dense=2, vocab_sizes=(9,) * 4, embed_dim=D),
                             kind="dhen", dhen_modules=("attention", "linear"), dhen_ensemble=ensemble,
                             attention_heads=2, dhen_layers=1)
    module_rows, rows_out = config.dhen_layer_rows(cfg, F)
    self.assertEqual(rows_out, 2 * F if ensemble == "concat" else F)
    p = modules.dhen_layer_init(jax.random.PRNGKey(35), cfg.dhen_modules, module_rows, F, rows_out, D)
    out = modules.dhen_layer(p, _x(36, (B, F, D)), cfg.dhen_modules, module_rows, ensemble, n_heads=2)
    chex.assert_shape(out, (B, rows_out, D))

  def test_sum_ensemble_of_mismatched_shapes_fails_at_build_time(self):
    fc = config.FeatureConfig(n_dense=2, vocab_sizes=(9,) * 4, embed_dim=D)
    with self.assertRaisesRegex(ValueError, r"dhen_ensemble='sum'.*attention->\[5, 6\].*linear->\[3, 6\]"):
      config.TowerConfig(features=fc, kind="dhen", dhen_modules=("attention", "linear"), dhen_rows=(None, 3),
                         dhen_ensemble="sum", attention_heads=2)


def _unfused_attention(p, x, n_heads):
  """Textbook multi-head attention: separate q/k/v projections, scores scaled by 1/sqrt(Dh)."""
  b, f, d = x.shape
  dh = d // n_heads
  q, k, v = ((x @ p[n]).reshape(b, f, n_heads, dh) for n in ("wq", "wk", "wv"))
  s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(dh))
  out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v).reshape(b, f, d)
  return out @ p["wo"]


def _unfused_dhen_layer(p, x, mods, module_rows, ensemble, n_heads):
  """DHEN layer with every module and the shortcut computed on its own (no stacked LCE)."""
  outs = [modules.dhen_module(m, q, x, r, n_heads) for m, q, r in zip(mods, p["modules"], module_rows)]
  y = jnp.concatenate(outs, axis=1) if ensemble == "concat" else sum(outs[1:], outs[0])
  shortcut = modules.lce(p["shortcut"], x) if "shortcut" in p else x
  return layer_norm(y + shortcut, p["ln_scale"], p["ln_bias"])


class FusedAttentionAndLceTest(chex.TestCase):
  """The fused layouts (q/k/v in one matmul, custom attention backward, stacked LCEs)
  compute the same function, gradients and matmul FLOPs as the unfused forms."""

  @parameterized.parameters(1, 2, 3)
  def test_feature_attention_equals_unfused_attention_values_and_grads(self, n_heads):
    p = modules.attention_init(jax.random.PRNGKey(40), D)
    x = _x(41, (B, 7, D))
    np.testing.assert_allclose(modules.feature_attention(p, x, n_heads), _unfused_attention(p, x, n_heads),
                               rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x, n_heads)))
    got = jax.grad(loss(modules.feature_attention), argnums=(0, 1))(p, x)
    want = jax.grad(loss(_unfused_attention), argnums=(0, 1))(p, x)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)

  def test_feature_attention_counts_the_same_matmul_flops_as_unfused(self):
    p = modules.attention_init(jax.random.PRNGKey(42), D)
    x = _x(43, (B, 7, D))
    fused = lambda p, x: modules.feature_attention(p, x, 2)
    unfused = lambda p, x: _unfused_attention(p, x, 2)
    self.assertEqual(towers.matmul_flops(fused, p, x), towers.matmul_flops(unfused, p, x))
    grad = lambda f: jax.grad(lambda p, x: jnp.sum(f(p, x)), argnums=(0, 1))
    self.assertEqual(towers.matmul_flops(grad(fused), p, x), towers.matmul_flops(grad(unfused), p, x))

  @parameterized.parameters(1, 2, 3)
  def test_feature_attention_through_nn_core_equals_plain_autodiff_to_1e5(self, n_heads):
    """DHEN's attention through `nn.attention_core` (hand-written backward) against the plain
    fused-projection form, softmax attention left to autodiff: the values and gradients the
    recsys core with its own backward gave before the two cores became one."""

    def plain(p, x):
      b, f, d = x.shape
      dh = d // n_heads
      w = jnp.concatenate([p["wq"] / jnp.sqrt(jnp.float32(dh)), p["wk"], p["wv"]], axis=1)
      q, k, v = jnp.transpose((x @ w).reshape(b, f, 3, n_heads, dh), (2, 0, 3, 1, 4))
      probs = jax.nn.softmax(jnp.einsum("bhtd,bhsd->bhts", q, k), axis=-1)
      return jnp.transpose(jnp.einsum("bhts,bhsd->bhtd", probs, v), (0, 2, 1, 3)).reshape(b, f, d) @ p["wo"]

    p = modules.attention_init(jax.random.PRNGKey(44), D)
    x = _x(45, (B, 7, D))
    ct = _x(46, (B, 7, D))
    np.testing.assert_allclose(modules.feature_attention(p, x, n_heads), plain(p, x), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p, x: jnp.sum(f(p, x) * ct)
    got = jax.jit(jax.value_and_grad(loss(lambda p, x: modules.feature_attention(p, x, n_heads)), argnums=(0, 1)))(p, x)
    want = jax.value_and_grad(loss(plain), argnums=(0, 1))(p, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
      ("attention_linear_projected_shortcut", ("attention", "linear"), (None, 3), "concat"),
      ("two_linear_projected_shortcut", ("linear", "attention", "linear"), (2, None, 4), "concat"),
      ("attention_linear_identity_shortcut_sum", ("attention", "linear"), (None, None), "sum"),
      ("single_linear_projected_shortcut", ("linear",), (3,), "concat"),
  )
  def test_stacked_lce_layer_equals_unfused_layer(self, mods, rows, ensemble):
    cfg = config.TowerConfig(features=config.FeatureConfig(n_dense=2, vocab_sizes=(9,) * 4, embed_dim=D),
                             kind="dhen", dhen_modules=mods, dhen_rows=rows, dhen_ensemble=ensemble,
                             attention_heads=2, dhen_layers=1)
    module_rows, rows_out = config.dhen_layer_rows(cfg, F)
    p = modules.dhen_layer_init(jax.random.PRNGKey(48), mods, module_rows, F, rows_out, D)
    p["ln_scale"], p["ln_bias"] = _x(49, (D,)), _x(50, (D,))
    x = _x(51, (B, F, D))
    fused = lambda p, x: modules.dhen_layer(p, x, mods, module_rows, ensemble, n_heads=2)
    unfused = lambda p, x: _unfused_dhen_layer(p, x, mods, module_rows, ensemble, 2)
    np.testing.assert_allclose(fused(p, x), unfused(p, x), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
    chex.assert_trees_all_close(jax.grad(loss(fused), argnums=(0, 1))(p, x),
                                jax.grad(loss(unfused), argnums=(0, 1))(p, x), rtol=1e-4, atol=1e-5)
    self.assertEqual(towers.matmul_flops(fused, p, x), towers.matmul_flops(unfused, p, x))


class ActivationAndBottleneckTest(chex.TestCase):

  @parameterized.parameters(0.5, 1.0, 2.0)
  def test_smelu_is_relu_outside_and_smooth_at_the_joins(self, beta):
    x = jnp.concatenate([jnp.linspace(-5.0, -beta, 20), jnp.linspace(beta, 5.0, 20)])
    np.testing.assert_allclose(modules.smelu(x, beta), jax.nn.relu(x), atol=1e-6)
    grad = jax.vmap(jax.grad(lambda t: modules.smelu(t, beta)))
    eps = 1e-3
    for join, slope in ((-beta, 0.0), (beta, 1.0)):
      left, right = jnp.array([join - eps]), jnp.array([join + eps])
      np.testing.assert_allclose(modules.smelu(left, beta), modules.smelu(right, beta), atol=2 * eps)
      np.testing.assert_allclose(grad(left), grad(right), atol=eps / beta + 1e-6)
      np.testing.assert_allclose(grad(jnp.array([join + eps if join < 0 else join - eps])), slope, atol=eps / beta + 1e-6)
    self.assertAlmostEqual(float(modules.smelu(jnp.float32(0.0), beta)), beta / 4, places=6)

  @parameterized.parameters((64, 32, 8), (256, 128, 16), (100, 100, 10))
  def test_bottleneck_cuts_matmul_flops_by_k_n_plus_m_over_nm(self, n, m, k):
    x = jnp.zeros((2, n))
    full = towers.matmul_flops(nn.dense, nn.dense_init(jax.random.PRNGKey(0), n, m), x)
    low = towers.matmul_flops(nn.dense, nn.dense_init(jax.random.PRNGKey(0), n, m, rank=k), x)
    self.assertAlmostEqual(low / full, k * (n + m) / (n * m), places=9)

  def test_bottleneck_tower_counts_fewer_flops_and_params(self):
    fc = config.FeatureConfig(n_dense=3, vocab_sizes=(50,) * 6, embed_dim=8)
    plain = config.TowerConfig(features=fc, hidden=(256, 256))
    slim = config.TowerConfig(features=fc, hidden=(256, 256), bottleneck=16)
    n_in = fc.n_slots * 8
    saved = (n_in * 256 - 16 * (n_in + 256)) + (256 * 256 - 16 * 512)
    self.assertEqual(towers.flops_per_example(plain) - towers.flops_per_example(slim), 2 * saved)
    pp, ps = (towers.param_count(towers.init(jax.random.PRNGKey(0), c)) for c in (plain, slim))
    self.assertEqual(pp - ps, saved)


if __name__ == "__main__":
  absltest.main()
