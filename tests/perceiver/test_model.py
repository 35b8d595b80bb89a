"""Perceiver invariants: Fourier features against their formula, permutation invariance, masks, the
M-independent cost of the latent transformer, decoders and the multitask form, losses and dropout, and
clear errors on bad input, bad configs and bad checkpoints."""
import json
import math
import pathlib
import tempfile
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxml import cpu_kernels
from jaxml import perceiver as pc
from jaxml.perceiver import model as pm

# Tiny models: an array encoder with two query sets (learned and Fourier), a byte masked LM, a pixel classifier.
MULTI = pc.PerceiverConfig(
    task="multitask", inputs="array", d_model=6, num_latents=4, d_latents=8, num_cross_attention_heads=2,
    num_self_attention_heads=2, num_blocks=2, num_self_attends_per_block=2, self_attention_widening_factor=2,
    decoders=(pc.DecoderConfig(name="label", output_channels=3, loss="cross_entropy"),
              pc.DecoderConfig(name="pixels", queries="fourier", index_dims=(3, 2), num_bands=2, num_heads=2,
                               qk_channels=4, v_channels=6, output_channels=1, loss="mse", loss_weight=0.5)))
MLM = pc.PerceiverConfig(num_latents=4, d_latents=16, d_model=8, num_self_attends_per_block=2,
                         num_self_attention_heads=2, num_cross_attention_heads=2, max_position_embeddings=12)
IMG = pc.PerceiverConfig(task="classifier", inputs="pixels", num_bands=4, max_resolution=(4, 5), num_latents=3,
                         d_latents=8, num_cross_attention_heads=1, num_self_attention_heads=2,
                         num_self_attends_per_block=1, num_classes=4)
P_MULTI = pc.init(jax.random.PRNGKey(0), MULTI)
P_MLM = pc.init(jax.random.PRNGKey(1), MLM)
P_IMG = pc.init(jax.random.PRNGKey(2), IMG)
X = jax.random.normal(jax.random.PRNGKey(3), (2, 10, 6))
MASK = jnp.array([[1] * 10, [1] * 7 + [0] * 3], jnp.int32)
IDS = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, pc.BYTE_VOCAB_SIZE)
PIX = jax.random.uniform(jax.random.PRNGKey(5), (2, 4, 5, 3))

# Compiled once per (config, shapes) and shared by the tests; the config is a static (hashable) argument.
apply = jax.jit(pc.apply, static_argnums=2)
encode = jax.jit(pc.encode, static_argnums=2)
loss_fn = jax.jit(pc.loss_fn, static_argnums=3)
decode = jax.jit(pc.decode, static_argnums=(2, 3))


def _flops(f, *args):
  return jax.jit(f).lower(*args).cost_analysis()["flops"]


class FourierFeaturesTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("numpy", np.asarray), ("jax", jnp.asarray))
  def test_published_vector(self, as_array):
    """Position 0.5, 2 bands, max resolution 4: frequencies (1, 2) -> [0.5, sin(pi/2), sin(pi), cos(pi/2), cos(pi)]."""
    got = pc.fourier_features(as_array([[0.5]]), 2, (4,))
    np.testing.assert_allclose(np.asarray(got), [[0.5, 1.0, 0.0, 0.0, -1.0]], atol=1e-6)

  @parameterized.named_parameters(("numpy", np.asarray), ("jax", jnp.asarray))
  def test_formula_3d(self, as_array):
    """Each channel written out: [p_1..p_d, sin(pi p_j nu_jk) (j-major), cos(...)], nu_jk = 1 + k (r_j/2 - 1)/(K-1)."""
    K, res = 4, (8, 16, 5)
    pos = np.random.default_rng(0).uniform(-1, 1, size=(7, 3))
    want = np.zeros((7, 3 + 2 * 3 * K))
    want[:, :3] = pos
    for j, r in enumerate(res):
      for k in range(K):
        nu = 1.0 + k * (r / 2.0 - 1.0) / (K - 1)
        want[:, 3 + j * K + k] = np.sin(np.pi * pos[:, j] * nu)
        want[:, 3 + 3 * K + j * K + k] = np.cos(np.pi * pos[:, j] * nu)
    got = pc.fourier_features(as_array(pos.astype(np.float32)), K, res)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)

  @parameterized.named_parameters(
      ("1d", (9,), 3, True, False, 1 * 3 * 2 + 1), ("2d", (4, 5), 6, True, False, 2 * 6 * 2 + 2),
      ("3d", (2, 3, 4), 5, True, False, 3 * 5 * 2 + 3), ("2d_sine_only", (4, 5), 6, True, True, 2 * 6 + 2),
      ("2d_no_pos", (4, 5), 6, False, False, 2 * 6 * 2), ("imagenet", (224, 224), 64, True, False, 258))
  def test_channel_counts(self, shape, bands, concat_pos, sine_only, channels):
    pos = pc.linear_positions(shape)[:50]  # the first rows suffice for the width (224 x 224 has 50,176)
    feats = pc.fourier_features(pos, bands, shape, concat_pos=concat_pos, sine_only=sine_only)
    self.assertEqual(feats.shape, (min(50, math.prod(shape)), channels))
    self.assertEqual(pc.fourier_channels(len(shape), bands, concat_pos=concat_pos, sine_only=sine_only), channels)

  def test_imagenet_pixel_width(self):
    cfg = pc.PerceiverConfig(task="classifier", inputs="pixels", num_cross_attention_heads=1)
    self.assertEqual(cfg.d_model, 261)  # RGB + 258

  def test_linear_positions_grid(self):
    pos = pc.linear_positions((3, 4))
    self.assertEqual(pos.shape, (12, 2))
    grid = pos.reshape(3, 4, 2)  # row-major over the grid, as x.reshape(B, -1, C) flattens [B, 3, 4, C]
    np.testing.assert_allclose(grid[:, 0, 0], [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(grid[0, :, 1], [-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(grid[:, :, 0], np.repeat(grid[:, :1, 0], 4, axis=1))

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "max_resolution"):
      pc.fourier_features(np.zeros((3, 2)), 4, (8,))
    with self.assertRaisesRegex(ValueError, "num_bands"):
      pc.fourier_features(np.zeros((3, 1)), 0, (8,))
    with self.assertRaisesRegex(ValueError, "shape"):
      pc.linear_positions((3, 0))


class EncoderTest(chex.TestCase, parameterized.TestCase):

  def test_permutation_invariance_without_positions(self):
    """Permuting the inputs (and their mask) leaves the latents unchanged: attention sums over keys."""
    perm = np.random.default_rng(1).permutation(10)
    z = encode(P_MULTI, X, MULTI, input_mask_BxM=MASK)
    z_perm = encode(P_MULTI, X[:, perm], MULTI, input_mask_BxM=MASK[:, perm])
    chex.assert_shape(z, (2, MULTI.num_latents, MULTI.d_latents))
    np.testing.assert_allclose(z_perm, z, atol=1e-5)
    self.assertGreater(float(jnp.abs(z[0] - z[1]).max()), 1e-3)  # the inputs do reach the latents

  def test_masked_inputs_change_nothing(self):
    junk = X.at[1, 7:].set(1e3 * jax.random.normal(jax.random.PRNGKey(9), (3, 6)))
    z = encode(P_MULTI, X, MULTI, input_mask_BxM=MASK)
    np.testing.assert_array_equal(encode(P_MULTI, junk, MULTI, input_mask_BxM=MASK), z)
    unmasked = encode(P_MULTI, junk, MULTI)
    self.assertGreater(float(jnp.abs(unmasked[1] - z[1]).max()), 1e-3)  # those inputs matter when not masked
    # Masked LM: a padded byte does not move any logit at the real positions.
    mask = jnp.array([[1] * 9, [1] * 6 + [0] * 3])
    a = apply(P_MLM, IDS, MLM, input_mask=mask)
    b = apply(P_MLM, IDS.at[1, 6:].set(77), MLM, input_mask=mask)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    np.testing.assert_array_equal(a[0], b[0])

  def test_fully_masked_example_ignores_its_inputs(self):
    none = jnp.zeros((2, 10), jnp.int32)
    z1 = encode(P_MULTI, X, MULTI, input_mask_BxM=none)
    z2 = encode(P_MULTI, 5.0 * X[::-1], MULTI, input_mask_BxM=none)
    chex.assert_tree_all_finite(z1)
    np.testing.assert_allclose(z1, z2, atol=1e-6)

  def test_latent_transformer_flops_do_not_depend_on_m(self):
    """FLOPs(encode) - FLOPs(cross_attend) is the latent transformer's count, the same for every M;
    the cross-attend's count grows linearly in M. Layers unrolled so XLA counts each one."""
    cfg = MULTI.replace(scan_layers=False)
    latent = _flops(lambda p, z: pc.latent_transformer(p, z, cfg), P_MULTI, jnp.zeros((1, 4, 8)))
    one = cfg.replace(num_blocks=1, num_self_attends_per_block=1)
    p_one = {**P_MULTI, "self_attends": jax.tree.map(lambda a: a[:1], P_MULTI["self_attends"])}
    one_layer = _flops(lambda p, z: pc.latent_transformer(p, z, one), p_one, jnp.zeros((1, 4, 8)))
    self.assertEqual(latent, 4 * one_layer)  # num_blocks x num_self_attends_per_block shared layers
    cross = {}
    for m in (256, 512, 1024):
      x = jnp.zeros((1, m, 6))
      cross[m] = _flops(lambda p, x: pc.cross_attend(p, x, cfg), P_MULTI, x)
      total = _flops(lambda p, x: pc.encode(p, x, cfg), P_MULTI, x)
      self.assertEqual(total - cross[m], latent, f"M={m}")
    self.assertAlmostEqual((cross[1024] - cross[512]) / (cross[512] - cross[256]), 2.0, places=6)

  def test_encode_is_cross_attend_then_latent_transformer(self):
    cross = jax.jit(pc.cross_attend, static_argnums=2)(P_MULTI, X, MULTI, input_mask_BxM=MASK)
    z = jax.jit(pc.latent_transformer, static_argnums=2)(P_MULTI, cross, MULTI)
    np.testing.assert_allclose(encode(P_MULTI, X, MULTI, input_mask_BxM=MASK), z, atol=1e-5)

  def test_scan_equals_unrolled(self):
    cfg = MULTI.replace(dropout=0.2)
    key = jax.random.PRNGKey(7)
    a = encode(P_MULTI, X, cfg, rng=key)
    b = encode(P_MULTI, X, cfg.replace(scan_layers=False), rng=key)
    np.testing.assert_allclose(a, b, atol=1e-5)

  def test_repeated_cross_attention(self):
    """The original Perceiver's form: one more (shared) cross-attend layer; with one block nothing changes."""
    rep = MULTI.replace(repeat_cross_attention=True)
    p_rep = pc.init(jax.random.PRNGKey(0), rep)
    cross_size = sum(a.size for a in jax.tree.leaves(P_MULTI["cross_attend"]))
    self.assertEqual(pc.param_count(rep), pc.param_count(MULTI) + cross_size)
    z = encode(p_rep, X, rep, input_mask_BxM=MASK)
    z_masked_junk = encode(p_rep, X.at[1, 7:].set(9.0), rep, input_mask_BxM=MASK)
    np.testing.assert_array_equal(z, z_masked_junk)
    p_once = {k: v for k, v in p_rep.items() if k != "cross_attend_repeat"}
    self.assertGreater(float(jnp.abs(z - encode(p_once, X, MULTI, input_mask_BxM=MASK)).max()), 1e-3)
    one = MULTI.replace(num_blocks=1)
    np.testing.assert_allclose(encode(P_MULTI, X, one.replace(repeat_cross_attention=True)),
                               encode(P_MULTI, X, one), atol=1e-6)

  def test_gelu_forms_differ(self):
    exact = encode(P_MULTI, X, MULTI)
    tanh = encode(P_MULTI, X, MULTI.replace(gelu="tanh"))
    diff = float(jnp.abs(exact - tanh).max())
    self.assertGreater(diff, 1e-7)
    self.assertLess(diff, 1e-2)


class FastFormsTest(chex.TestCase, parameterized.TestCase):
  """The forms the model runs for speed against the plain ones: values and gradients."""

  def test_gelu_erf_is_exact_gelu(self):
    x = jnp.concatenate([jnp.linspace(-9.0, 9.0, 2001), jax.random.normal(jax.random.PRNGKey(9), (1000,)) * 3])
    plain = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731  (the erfc form)
    # For x << 0, 1 + erf(x / sqrt 2) cancels: its float32 rounding (a few units of 2^-24) times |x| / 2
    # (at most 4.5 here) bounds the absolute difference from the erfc form: 4 * 2^-24 * 4.5 = 1.1e-6.
    tail = 4 * 2.0**-24 * 4.5
    np.testing.assert_allclose(pm.gelu_erf(x), plain(x), rtol=2e-6, atol=tail)
    grad = jax.vmap(jax.grad(pm.gelu_erf))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(plain))(x), rtol=2e-6, atol=tail)
    # d/dx [x Phi(x)] = Phi(x) + x phi(x), written out.
    phi = jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(grad, 0.5 * (1 + jax.scipy.special.erf(x / math.sqrt(2))) + x * phi, atol=2e-6)

  @parameterized.named_parameters(("v_narrower", 6, 4, True), ("v_wider", 3, 5, True), ("equal", 4, 4, False),
                                  ("v_narrower_no_mask", 6, 2, False))
  def test_attend_matches_einsums(self, K, V, masked):
    """`_attend` (`attention_core`, value heads of their own width) against softmax attention as two einsums."""
    ks = jax.random.split(jax.random.PRNGKey(10), 4)
    q = jax.random.normal(ks[0], (2, 5, 3, K))
    k = jax.random.normal(ks[1], (2, 7, 3, K))
    v = jax.random.normal(ks[2], (2, 7, 3, V))
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool) if masked else None
    w = jax.random.normal(ks[3], (2, 5, 3, V))

    def plain(q, k, v):
      s = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(K)
      if mask is not None:
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
      return jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(s, axis=-1), v)

    fast = lambda q, k, v: pm._attend(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(fast(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
    g_fast = jax.grad(lambda *a: jnp.sum(fast(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_plain = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_fast, g_plain):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_dense_matches_matmul(self):
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    p = {"w": jax.random.normal(ks[0], (6, 4)), "b": jax.random.normal(ks[1], (4,))}
    x = jax.random.normal(ks[2], (2, 3, 6))
    np.testing.assert_allclose(pm._dense(p, x), x @ p["w"] + p["b"], rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda p, x: jnp.sum(jnp.sin(pm._dense(p, x))), argnums=(0, 1))(p, x)
    g_plain = jax.grad(lambda p, x: jnp.sum(jnp.sin(x @ p["w"] + p["b"])), argnums=(0, 1))(p, x)
    chex.assert_trees_all_close(g, g_plain, rtol=1e-5, atol=1e-6)


  def test_masked_lm_with_the_cpu_kernels_equals_the_reference(self):
    """A masked LM whose attentions the fused CPU kernels take (heads of 16 and 32, values of 16 in the
    decoder): loss and gradients against the same model on `jaxml.nn.attention_core` alone."""
    cfg = pc.PerceiverConfig(task="masked_lm", inputs="bytes", d_model=128, num_latents=16, d_latents=64,
                             num_cross_attention_heads=2, num_self_attention_heads=4, num_self_attends_per_block=2,
                             max_position_embeddings=32)
    params = pm.init(jax.random.PRNGKey(21), cfg)
    ids = jax.random.randint(jax.random.PRNGKey(22), (2, 32), 6, 262)
    batch = {"inputs": ids, "targets": ids, "weights": (jax.random.uniform(jax.random.PRNGKey(23), (2, 32)) < 0.3)}
    value_and_grad = lambda: jax.jit(jax.value_and_grad(lambda p: pm.loss_fn(p, batch, None, cfg)[0]))  # noqa: E731
    text = value_and_grad().lower(params).as_text()
    self.assertEqual("jaxml_attention_forward" in text, cpu_kernels.attention_available())
    got = value_and_grad()(params)
    with mock.patch.object(cpu_kernels, "attention_kernel_takes", lambda *a, **k: False):
      self.assertNotIn("jaxml_attention", value_and_grad().lower(params).as_text())
      want = value_and_grad()(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-5, atol=1e-7)

  def test_shared_queries_match_broadcast_ones(self):
    """A cross-attend fed its (learned, example-independent) queries once, `[1, T, D]`, against the same
    queries broadcast to the batch, `[B, T, D]`: values and gradients (parameters, queries, inputs). With the
    query residual, so the residual's broadcast add is covered too."""
    p = P_MULTI["cross_attend"]
    z = jax.random.normal(jax.random.PRNGKey(12), (4, 8))
    w = jax.random.normal(jax.random.PRNGKey(13), (2, 4, 8))

    def out(p, z, x, shared):
      q = z[None] if shared else jnp.broadcast_to(z[None], (x.shape[0], *z.shape))
      return pm._layer(p, q, x, MULTI, heads=2, query_residual=True, key_mask_BxS=MASK != 0)

    @jax.jit  # one compile for both forms (eager dispatch of the gradients is slow)
    def both(p, z, x):
      return [(out(p, z, x, s), jax.grad(lambda *a: jnp.sum(out(*a, s) * w), argnums=(0, 1, 2))(p, z, x))
              for s in (True, False)]

    (shared, g_shared), (broadcast, g_broadcast) = both(p, z, X)
    np.testing.assert_allclose(shared, broadcast, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(g_shared, g_broadcast, rtol=1e-5, atol=1e-6)

class DecoderTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_lm_shapes(self):
    logits = self.variant(lambda p, t: pc.apply(p, t, MLM))(P_MLM, IDS)
    chex.assert_shape(logits, (2, 9, pc.BYTE_VOCAB_SIZE))  # M = 9 < max_position_embeddings = 12
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_classifier_and_multitask_shapes(self):
    cls = apply(P_IMG, PIX, IMG)
    chex.assert_shape(cls, (2, 4))
    chex.assert_type(cls, jnp.float32)
    outs = apply(P_MULTI, X, MULTI, input_mask=MASK)
    chex.assert_shape([outs["label"], outs["pixels"]], [(2, 1, 3), (2, 6, 1)])
    chex.assert_tree_all_finite([cls, outs])

  def test_multitask_outputs_share_one_encoding(self):
    outs = apply(P_MULTI, X, MULTI, input_mask=MASK)
    z = encode(P_MULTI, X, MULTI, input_mask_BxM=MASK)
    for d in MULTI.decoder_configs:
      np.testing.assert_allclose(outs[d.name], decode(P_MULTI["decoders"][d.name], z, d, MULTI), atol=1e-5)

  def test_query_mask(self):
    """Masked queries output zero; the others are what they were (queries do not see each other)."""
    qmask = jnp.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]])
    full = apply(P_MULTI, X, MULTI)["pixels"]
    masked = apply(P_MULTI, X, MULTI, query_mask={"pixels": qmask})["pixels"]
    keep = np.asarray(qmask, bool)
    np.testing.assert_array_equal(np.asarray(masked)[~keep], 0.0)
    np.testing.assert_allclose(np.asarray(masked)[keep], np.asarray(full)[keep], atol=1e-6)
    self.assertTrue(np.all(np.abs(np.asarray(full)[~keep]) > 0))

  def test_masked_lm_padding_scores_bias_only(self):
    mask = jnp.array([[1] * 9, [1] * 5 + [0] * 4])
    logits = apply(P_MLM, IDS, MLM, input_mask=mask)
    np.testing.assert_array_equal(logits[1, 5:], jnp.broadcast_to(P_MLM["output_bias"], (4, pc.BYTE_VOCAB_SIZE)))

  def test_decode_subset_of_queries(self):
    d = MULTI.decoder_configs[1]
    z = encode(P_MULTI, X, MULTI)
    p = P_MULTI["decoders"][d.name]
    q = pc.decoder_queries(p, d, 2)
    full = decode(p, z, d, MULTI)
    part = decode(p, z, d, MULTI, queries_BxQxC=q[:, 2:5])
    np.testing.assert_allclose(part, full[:, 2:5], atol=1e-6)

  def test_masked_lm_rows_do_not_depend_on_length(self):
    """The decoder's query j reads only the latents, so logits of position j agree for M = 9 and M = 12."""
    ids = jax.random.randint(jax.random.PRNGKey(8), (2, 12), 0, 262)
    mask = jnp.array([[1] * 9 + [0] * 3] * 2)
    long = apply(P_MLM, ids, MLM, input_mask=mask)
    short = apply(P_MLM, ids[:, :9], MLM, input_mask=mask[:, :9])
    np.testing.assert_allclose(long[:, :9], short, atol=1e-5)

  @parameterized.named_parameters(("unmasked", None), ("padded", [[1] * 9, [1] * 5 + [0] * 4]))
  def test_masked_lm_positions_are_the_full_logits_there(self, mask):
    """Decoding only some positions (repeats and padded ones included) gives the full output's rows there."""
    mask = None if mask is None else jnp.array(mask)
    positions = jnp.array([[8, 0, 3, 3], [2, 7, 4, 6]])
    full = apply(P_MLM, IDS, MLM, input_mask=mask)
    part = jax.jit(lambda p, t, m, q: pc.apply(p, t, MLM, input_mask=m, positions=q))(P_MLM, IDS, mask, positions)
    chex.assert_shape(part, (2, 4, pc.BYTE_VOCAB_SIZE))
    np.testing.assert_allclose(part, jnp.take_along_axis(full, positions[..., None], axis=1), rtol=1e-5, atol=1e-5)

  def test_byte_ids(self):
    np.testing.assert_array_equal(pc.text_to_ids("hello"), [4, 110, 107, 114, 114, 117, 5])
    np.testing.assert_array_equal(pc.text_to_ids("é", add_special_tokens=False), [0xC3 + 6, 0xA9 + 6])
    self.assertEqual(pc.ids_to_text([pc.CLS_ID, 110, 107, pc.MASK_ID, 114, pc.SEP_ID, pc.PAD_ID]), "hel")


class LossTest(chex.TestCase, parameterized.TestCase):

  def test_masked_lm_loss(self):
    targets = IDS
    inputs = IDS.at[:, ::3].set(pc.MASK_ID)
    weights = jnp.zeros(IDS.shape).at[:, ::3].set(1.0)
    batch = {"inputs": inputs, "targets": targets, "weights": weights}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda p: pc.loss_fn(p, batch, None, MLM), has_aux=True))(
        P_MLM)
    logits = apply(P_MLM, inputs, MLM, input_mask=jnp.ones(IDS.shape))
    logp = jax.nn.log_softmax(logits)
    want = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0][:, ::3].mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_byte"], want / np.log(2), rtol=1e-5)
    self.assertEqual(float(metrics["tokens"]), 6.0)
    chex.assert_tree_all_finite(grads)
    for name in ("latents", "output_bias"):
      self.assertGreater(float(jnp.abs(grads[name]).max()), 0.0, name)
    self.assertGreater(float(jnp.abs(grads["input"]["embeddings"]).max()), 0.0)

  @parameterized.named_parameters(("weights", False), ("input_mask", True))
  def test_masked_lm_positions_form_is_the_same_loss(self, by_input_mask):
    """`gather_scored`'s batch decodes fewer queries but gives the same loss, metrics and gradients."""
    rng = np.random.default_rng(0)
    targets = np.asarray(IDS)
    hide = rng.random(targets.shape) < 0.4
    hide[0, :2] = True  # rows with different counts: the shorter one is padded
    inputs = np.where(hide, pc.MASK_ID, targets)
    if by_input_mask:  # no weights: every unmasked position is scored
      pad = np.ones(targets.shape, np.int32)
      pad[0, 5:] = pad[1, 6:] = 0
      full = {"inputs": inputs, "targets": targets, "input_mask": pad}
      # Two positions forms: the scored ones with their weights, and all M positions with none (the
      # default then is the input mask at each position, as in the [B, M] form).
      every = np.broadcast_to(np.arange(targets.shape[1]), targets.shape)
      forms = [pc.gather_scored(dict(full, weights=pad.astype(np.float32))),
               {"inputs": inputs, "targets": targets, "input_mask": pad, "positions": every}]
    else:
      full = {"inputs": inputs, "targets": targets, "weights": hide.astype(np.float32)}
      forms = [pc.gather_scored(full, multiple_of=4)]
      self.assertEqual(forms[0]["positions"].shape[1] % 4, 0)
    self.assertLess(forms[0]["positions"].shape[1], targets.shape[1])
    grad = jax.jit(jax.value_and_grad(lambda p, b: pc.loss_fn(p, b, None, MLM), has_aux=True))
    (l_full, m_full), g_full = grad(P_MLM, full)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_full))
    for packed in forms:
      (l_pack, m_pack), g_pack = grad(P_MLM, packed)
      np.testing.assert_allclose(l_pack, l_full, rtol=1e-5)
      chex.assert_trees_all_close(m_pack, m_full, rtol=1e-5)
      chex.assert_trees_all_close(g_pack, g_full, rtol=1e-4, atol=1e-5 * scale)

  def test_gather_scored(self):
    batch = {"inputs": np.zeros((2, 5), np.int32), "targets": np.arange(10).reshape(2, 5),
             "weights": np.array([[0, 1, 0, 1, 1], [0.5, 0, 0, 0, 0]], np.float32)}
    out = pc.gather_scored(batch)
    np.testing.assert_array_equal(out["positions"], [[1, 3, 4], [0, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[1, 3, 4], [5, 0, 0]])
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1], [0.5, 0, 0]])
    self.assertIs(out["inputs"], batch["inputs"])
    self.assertEqual(pc.gather_scored(batch, multiple_of=8)["positions"].shape, (2, 8))
    self.assertEqual(pc.gather_scored(batch, num_positions=4)["positions"].shape, (2, 4))
    with self.assertRaisesRegex(ValueError, "a row scores 3 positions, more than num_positions=2"):
      pc.gather_scored(batch, num_positions=2)
    with self.assertRaisesRegex(ValueError, "needs a batch dict with 'targets' and 'weights'"):
      pc.gather_scored({"inputs": batch["inputs"], "targets": batch["targets"]})
    with self.assertRaisesRegex(ValueError, "must both be"):
      pc.gather_scored(dict(batch, weights=batch["weights"][:, :4]))

  def test_classifier_loss(self):
    labels = jnp.array([1, 3])
    loss, metrics = loss_fn(P_IMG, {"inputs": PIX, "labels": labels}, None, IMG)
    logits = apply(P_IMG, PIX, IMG)
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    self.assertIn(float(metrics["accuracy"]), (0.0, 0.5, 1.0))

  def test_dropout_follows_the_rng(self):
    batch = {"inputs": IDS, "targets": IDS}
    cfg = MLM.replace(dropout=0.3)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    l1, l1b, l2 = (loss_fn(P_MLM, batch, k, cfg)[0] for k in (k1, k1, k2))
    self.assertEqual(float(l1), float(l1b))
    self.assertNotEqual(float(l1), float(l2))
    no_drop = [loss_fn(P_MLM, batch, k, MLM)[0] for k in (k1, k2)]
    np.testing.assert_allclose(no_drop[0], no_drop[1], rtol=1e-6)
    self.assertNotEqual(float(l1), float(no_drop[0]))

  def test_multitask_training_fits_a_batch(self):
    """Both losses fall when one encoder is trained jointly for two query sets (class + per-pixel values)."""
    labels = jnp.array([[0], [2]])
    values = jax.random.normal(jax.random.PRNGKey(6), (2, 6, 1))
    shift = jnp.array([2.0, -2.0, 0.0, 0.0, 0.0, 0.0])  # a per-token direction (LayerNorm keeps it) apart
    inputs = X + jnp.stack([shift, -shift])[:, None, :]
    batch = {"inputs": inputs, "input_mask": MASK, "targets": {"label": labels, "pixels": values}}
    tx = optax.adam(3e-2)
    loss = lambda p, k: loss_fn(p, batch, k, MULTI)  # noqa: E731

    @jax.jit
    def step(p, s, k):
      (_, m), g = jax.value_and_grad(loss, has_aux=True)(p, k)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, m

    p, s = P_MULTI, tx.init(P_MULTI)
    _, first = loss(p, None)
    np.testing.assert_allclose(first["loss"], first["label/loss"] + 0.5 * first["pixels/loss"], rtol=1e-6)
    for i in range(25):
      p, s, _ = step(p, s, jax.random.PRNGKey(i))
    _, last = loss(p, None)
    self.assertLess(float(last["label/loss"]), 0.05 * float(first["label/loss"]))
    self.assertLess(float(last["pixels/loss"]), 0.8 * float(first["pixels/loss"]))
    self.assertEqual(float(last["label/accuracy"]), 1.0)


class BadInputTest(parameterized.TestCase):

  def test_input_width(self):
    with self.assertRaisesRegex(ValueError, r"inputs_BxMxC has width C=5.*d_model is 6"):
      pc.encode(P_MULTI, jnp.zeros((2, 10, 5)), MULTI)
    with self.assertRaisesRegex(ValueError, r"inputs has width C=5"):
      pc.apply(P_MULTI, jnp.zeros((2, 10, 5)), MULTI)
    with self.assertRaisesRegex(ValueError, "pixels_BxHxWxC has 1 channels.*image_channels"):
      pc.apply(P_IMG, jnp.zeros((2, 4, 5, 1)), IMG)

  def test_mask_shape(self):
    with self.assertRaisesRegex(ValueError, r"input_mask_BxM must have shape \(2, 10\)"):
      pc.encode(P_MULTI, X, MULTI, input_mask_BxM=MASK[:, :9])
    with self.assertRaisesRegex(ValueError, r"input_mask must have shape \(2, 9\)"):
      pc.apply(P_MLM, IDS, MLM, input_mask=jnp.ones((2, 10)))
    with self.assertRaisesRegex(ValueError, r"query_mask\['pixels'\] must have shape \(2, 6\)"):
      pc.apply(P_MULTI, X, MULTI, query_mask={"pixels": jnp.ones((2, 5))})

  def test_byte_ids(self):
    with self.assertRaisesRegex(ValueError, r"inputs holds ids in \[\d+, 262\], outside \[0, vocab_size=262\)"):
      pc.apply(P_MLM, IDS.at[0, 0].set(262), MLM)
    with self.assertRaisesRegex(ValueError, r"inputs holds ids in \[-1"):
      pc.apply(P_MLM, IDS.at[0, 0].set(-1), MLM)
    with self.assertRaisesRegex(ValueError, "max_position_embeddings"):
      pc.apply(P_MLM, jnp.zeros((1, 13), jnp.int32), MLM)
    with self.assertRaisesRegex(TypeError, "integer ids"):
      pc.apply(P_MLM, jnp.zeros((1, 5)), MLM)
    with self.assertRaisesRegex(ValueError, r"batch\['targets'\] holds ids"):
      pc.loss_fn(P_MLM, {"inputs": IDS, "targets": IDS + 300}, None, MLM)

  def test_positions(self):
    with self.assertRaisesRegex(ValueError, r"positions holds positions in \[0, 9\], outside the inputs' \[0, M=9\)"):
      pc.apply(P_MLM, IDS, MLM, positions=jnp.array([[0, 9], [1, 2]]))
    with self.assertRaisesRegex(ValueError, r"positions holds positions in \[-1"):
      pc.apply(P_MLM, IDS, MLM, positions=jnp.array([[0, -1], [1, 2]]))
    with self.assertRaisesRegex(ValueError, r"positions must be \[B=2, P\]"):
      pc.apply(P_MLM, IDS, MLM, positions=jnp.array([[0, 1]]))
    with self.assertRaisesRegex(TypeError, "integer positions"):
      pc.apply(P_MLM, IDS, MLM, positions=jnp.zeros((2, 3)))
    with self.assertRaisesRegex(ValueError, "positions is for task 'masked_lm'"):
      pc.apply(P_IMG, PIX, IMG, positions=jnp.zeros((2, 1), jnp.int32))
    batch = {"inputs": IDS, "positions": jnp.array([[0, 1, 2], [3, 4, 5]]), "targets": IDS}
    with self.assertRaisesRegex(ValueError, r"batch\['targets'\] \(2, 9\) must have batch\['positions'\]'s shape"):
      pc.loss_fn(P_MLM, batch, None, MLM)
    with self.assertRaisesRegex(ValueError, r"batch\['weights'\] must have shape \(2, 3\)"):
      pc.loss_fn(P_MLM, dict(batch, targets=IDS[:, :3], weights=jnp.ones((2, 9))), None, MLM)
    with self.assertRaisesRegex(ValueError, r"batch\['positions'\] holds positions"):
      pc.loss_fn(P_MLM, dict(batch, targets=IDS[:, :3], positions=batch["positions"] + 5), None, MLM)

  def test_params_not_matching_config(self):
    with self.assertRaisesRegex(ValueError, r"params\['latents'\] has shape \(4, 16\).*\(5, 16\)"):
      pc.apply(P_MLM, IDS, MLM.replace(num_latents=5))
    with self.assertRaisesRegex(ValueError, "missing"):
      pc.apply({k: v for k, v in P_MLM.items() if k != "output_bias"}, IDS, MLM)

  @parameterized.named_parameters(
      ("cross_heads", dict(num_cross_attention_heads=3), "num_cross_attention_heads"),
      ("self_heads", dict(num_self_attention_heads=3), "num_self_attention_heads"),
      ("v_channels", dict(v_channels=9), "num_cross_attention_heads.*value width"),
      ("decoder_heads", dict(decoders=(pc.DecoderConfig(index_dims=(12,), query_channels=8, num_heads=3,
                                                        qk_channels=9, v_channels=8),)), "num_heads"),
      ("pixel_width", dict(inputs="pixels", d_model=100), "inputs"),
      ("gelu", dict(gelu="sigmoid"), "gelu"),
      ("latents", dict(num_latents=0), "num_latents"),
      ("dropout", dict(dropout=1.0), "dropout"))
  def test_bad_config(self, change, field):
    with self.assertRaisesRegex(ValueError, field):
      MLM.replace(**change)

  def test_bad_config_names(self):
    with self.assertRaisesRegex(ValueError, "d_model"):
      IMG.replace(d_model=100)
    with self.assertRaisesRegex(ValueError, "decoders"):
      MULTI.replace(decoders=())
    with self.assertRaisesRegex(ValueError, "distinct"):
      MULTI.replace(decoders=(MULTI.decoders[0], MULTI.decoders[0]))
    with self.assertRaisesRegex(ValueError, "output_channels"):
      IMG.replace(decoders=(pc.DecoderConfig(output_channels=5),))

  def test_config_round_trips_through_dicts(self):
    """to_dict output (decoders as dicts, tuples as lists after JSON) builds the same config."""
    back = pc.PerceiverConfig(**json.loads(json.dumps(MULTI.to_dict())))
    self.assertEqual(back, MULTI)


class CheckpointTest(parameterized.TestCase):

  def _tmp(self):
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return tmp.name

  def _export(self, cfg, params):
    root = self._tmp()
    pc.to_hf(cfg, params, root)
    return root

  def _assert_round_trip(self, cfg, params):
    cfg2, params2 = pc.from_hf(self._export(cfg, params))
    self.assertEqual(cfg2, cfg)
    chex.assert_trees_all_equal(params2, params)

  def test_round_trip_masked_lm(self):
    self._assert_round_trip(MLM, P_MLM)

  def test_round_trip_fourier_classifier(self):
    """transformers' Fourier classifier: 3 channels and 64 bands up to 224 x 224, on any image size."""
    cfg = pc.PerceiverConfig(task="classifier", inputs="pixels", num_latents=3, d_latents=8,
                             num_cross_attention_heads=1, num_self_attention_heads=2, num_self_attends_per_block=2,
                             num_classes=4)
    self._assert_round_trip(cfg, pc.init(jax.random.PRNGKey(3), cfg))

  def test_bad_checkpoints_name_the_key(self):
    from safetensors.numpy import load_file, save_file
    root = self._export(MLM, P_MLM)
    tensors = load_file(f"{root}/model.safetensors")
    key = "perceiver.encoder.self_attends.1.attention.self.query.weight"

    def write(t):
      save_file(t, f"{root}/model.safetensors", metadata={"format": "pt"})

    write({k: v for k, v in tensors.items() if k != key})
    with self.assertRaisesRegex(ValueError, f"missing: \\['{key}'\\]"):
      pc.from_hf(root)
    write({**tensors, "perceiver.encoder.self_attends.2.layernorm.bias": np.zeros(16, np.float32)})
    with self.assertRaisesRegex(ValueError, r"unexpected: \['perceiver.encoder.self_attends.2.layernorm.bias'\]"):
      pc.from_hf(root)
    write({**tensors, key: tensors[key][:8]})
    with self.assertRaisesRegex(ValueError, f"{key} has shape \\(8, 16\\), config.json implies \\(16, 16\\)"):
      pc.from_hf(root)
    write(tensors)
    config = pathlib.Path(root, "config.json")
    config.write_text(json.dumps(dict(json.loads(config.read_text()), architectures=["PerceiverForOpticalFlow"])))
    with self.assertRaisesRegex(ValueError, "PerceiverForOpticalFlow"):
      pc.from_hf(root)

  def test_to_hf_refuses_what_transformers_cannot_hold(self):
    with self.assertRaisesRegex(ValueError, "task"):
      pc.to_hf(MULTI, P_MULTI, self._tmp())
    with self.assertRaisesRegex(ValueError, "inputs"):  # not transformers' 64-band, 224 x 224 Fourier features
      pc.to_hf(IMG, P_IMG, self._tmp())


if __name__ == "__main__":
  absltest.main()
