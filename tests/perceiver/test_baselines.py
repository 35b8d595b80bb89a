"""The Perceiver's baselines against written-out formulas: the conv net's neighbourhood matmul is a SAME 3x3
convolution, the transformer layer is pre-LN softmax attention + GELU MLP, masked keys change nothing, a
transformer without positions is permutation-equivariant (not invariant), parameter counts, bad input."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml.perceiver import baselines as bl

ARRAY = bl.TransformerConfig(inputs="array", width=8, num_layers=2, num_heads=2, widening_factor=2, input_dim=5)
VIT = bl.TransformerConfig(inputs="patches", width=8, num_layers=1, num_heads=2, widening_factor=2, patch_size=2,
                           image_size=(4, 6), image_channels=1, num_classes=3)
BYTES = bl.TransformerConfig(inputs="bytes", width=8, num_layers=1, num_heads=2, widening_factor=2, max_len=10)
P_ARRAY = bl.transformer_init(jax.random.PRNGKey(0), ARRAY)
X = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 5))
apply = jax.jit(bl.transformer_apply, static_argnums=2)


def _np_layer_norm(x, scale, bias, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _np_encoder(params, x, cfg):
  """The module docstring's encoder in float64 NumPy, one head at a time."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = x @ p["embed"]["w"] + p["embed"]["b"]
  H, W = cfg.num_heads, cfg.width
  d = W // H
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    z = _np_layer_norm(h, lp["norm_attn"]["scale"], lp["norm_attn"]["bias"])
    qkv = z @ lp["qkv"]["w"] + lp["qkv"]["b"]
    q, k, v = qkv[..., :W], qkv[..., W:2 * W], qkv[..., 2 * W:]
    heads = []
    for j in range(H):
      s = q[..., j * d:(j + 1) * d] @ np.swapaxes(k[..., j * d:(j + 1) * d], -1, -2) / math.sqrt(d)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ v[..., j * d:(j + 1) * d])
    h = h + np.concatenate(heads, -1) @ lp["out"]["w"] + lp["out"]["b"]
    z = _np_layer_norm(h, lp["norm_mlp"]["scale"], lp["norm_mlp"]["bias"])
    m = _np_gelu(z @ lp["mlp"][0]["w"] + lp["mlp"][0]["b"])
    h = h + m @ lp["mlp"][1]["w"] + lp["mlp"][1]["b"]
  return _np_layer_norm(h, p["final_norm"]["scale"], p["final_norm"]["bias"])


class TransformerTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("scan", True), ("unrolled", False))
  def test_matches_written_out_encoder(self, scan):
    cfg = dataclasses.replace(ARRAY, scan_layers=scan)
    got = apply(P_ARRAY, X, cfg)
    np.testing.assert_allclose(got, _np_encoder(P_ARRAY, np.asarray(X, np.float64), ARRAY), atol=2e-5)

  def test_masked_tokens_change_nothing(self):
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    junk = X.at[1, 4:].set(100.0)
    a = apply(P_ARRAY, X, ARRAY, mask_BxT=mask)
    b = apply(P_ARRAY, junk, ARRAY, mask_BxT=mask)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    np.testing.assert_array_equal(a[0], b[0])
    # The last 4 tokens alone, without the masked ones: the same outputs (attention sees only real keys).
    np.testing.assert_allclose(a[1, :4], apply(P_ARRAY, X[1:, :4], ARRAY)[0], atol=1e-5)

  def test_permutation_equivariant_without_positions(self):
    """Permuting the tokens permutes the outputs: every token keeps its own output (the Perceiver's latents
    are invariant instead)."""
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    a = apply(P_ARRAY, X, ARRAY)
    np.testing.assert_allclose(apply(P_ARRAY, X[:, perm], ARRAY), a[:, perm], atol=1e-5)
    self.assertGreater(float(jnp.abs(a[:, perm] - a).max()), 1e-2)

  def test_vit_and_byte_shapes(self):
    p = bl.transformer_init(jax.random.PRNGKey(2), VIT)
    logits = apply(p, jnp.ones((3, 4, 6, 1)), VIT)
    chex.assert_shape(logits, (3, 3))
    pb = bl.transformer_init(jax.random.PRNGKey(3), BYTES)
    out = apply(pb, jnp.zeros((2, 9), jnp.int32), BYTES)
    chex.assert_shape(out, (2, 9, 262))
    chex.assert_tree_all_finite([logits, out])

  def test_patchify_raster_order(self):
    img = np.arange(24, dtype=np.float32).reshape(1, 4, 6, 1)
    patches = np.asarray(bl.patchify(img, 2))
    self.assertEqual(patches.shape, (1, 6, 4))
    np.testing.assert_array_equal(patches[0, 0], [0, 1, 6, 7])   # top-left 2x2, row-major inside
    np.testing.assert_array_equal(patches[0, 1], [2, 3, 8, 9])   # its right neighbour
    np.testing.assert_array_equal(patches[0, 3], [12, 13, 18, 19])  # first patch of the second row

  def test_param_counts(self):
    """Per layer: 2 norms (4 W), qkv (3 W^2 + 3 W), out (W^2 + W), MLP (2 f W^2 + f W + W); final norm 2 W."""
    W, f = 8, 2
    layer = 4 * W + 3 * W * W + 3 * W + W * W + W + 2 * f * W * W + f * W + W
    self.assertEqual(bl.param_count(P_ARRAY), 2 * layer + 2 * W + 5 * W + W)
    vit = bl.transformer_init(jax.random.PRNGKey(2), VIT)
    self.assertEqual(bl.param_count(vit), layer + 2 * W + (4 * W + W) + 7 * W + W + (W * 3 + 3))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "input_dim=5"):
      bl.transformer_apply(P_ARRAY, jnp.zeros((2, 7, 4)), ARRAY)
    with self.assertRaisesRegex(ValueError, r"mask_BxT must have shape \(2, 7\)"):
      bl.transformer_apply(P_ARRAY, X, ARRAY, mask_BxT=jnp.ones((2, 6)))
    with self.assertRaisesRegex(ValueError, "num_heads"):
      bl.TransformerConfig(width=10, num_heads=4)
    with self.assertRaisesRegex(ValueError, "patch_size"):
      bl.TransformerConfig(inputs="patches", image_size=(8, 8), patch_size=3)
    with self.assertRaisesRegex(ValueError, "max_len"):
      bl.transformer_apply(bl.transformer_init(jax.random.PRNGKey(3), BYTES), jnp.zeros((1, 11), jnp.int32), BYTES)


class ConvAndMLPTest(parameterized.TestCase):

  def test_neighbourhood_matmul_is_a_same_convolution(self):
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 6, 3))
    p = bl.nn.init_from_specs(jax.random.PRNGKey(5), bl.conv_specs(bl.ConvConfig(image_channels=3, channels=(4,))))
    layer = p["convs"][0]
    kernel_HWIO = layer["w"].reshape(3, 3, 3, 4)  # rows of the dense weight ordered (dy, dx, channel)
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    got = jax.jit(lambda p, x: bl.nn.dense(p, bl.neighbourhoods(x)))(layer, x)
    np.testing.assert_allclose(got, conv(x, kernel_HWIO) + layer["b"], atol=1e-5)

  def test_conv_net_and_mlp(self):
    cfg = bl.ConvConfig(image_channels=1, channels=(4, 6), num_classes=3)
    p = bl.conv_init(jax.random.PRNGKey(6), cfg)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 1))
    layer = jax.jit(lambda q, x: jax.nn.relu(bl.nn.dense(q, bl.neighbourhoods(x))))
    feats = np.asarray(layer(p["convs"][1], layer(p["convs"][0], x)), np.float64)
    want = feats.mean((1, 2)) @ np.asarray(p["head"]["w"]) + np.asarray(p["head"]["b"])
    np.testing.assert_allclose(jax.jit(bl.conv_apply, static_argnums=2)(p, x, cfg), want, atol=1e-5)
    mcfg = bl.MLPConfig(in_dim=64, hidden=(5,), num_classes=3)
    m = bl.mlp_init(jax.random.PRNGKey(8), mcfg)
    flat = np.asarray(x).reshape(2, 64)
    want = np.maximum(flat @ np.asarray(m[0]["w"]) + np.asarray(m[0]["b"]), 0) @ np.asarray(m[1]["w"]) + m[1]["b"]
    np.testing.assert_allclose(jax.jit(bl.mlp_apply, static_argnums=2)(m, x, mcfg), want, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "in_dim is 64"):
      bl.mlp_apply(m, jnp.zeros((2, 63)), mcfg)
    with self.assertRaisesRegex(ValueError, "images_BxHxWxC"):
      bl.conv_apply(p, jnp.zeros((2, 8, 8, 3)), cfg)


if __name__ == "__main__":
  absltest.main()
