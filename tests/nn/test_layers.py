"""Invariants of the shared layers against straightforward reference code."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml.nn import layers as nn


def reference_attention(q, k, v, mask):
  """Multi-head attention written the textbook way: repeat kv heads, loop over heads."""
  B, T, H, Dh = q.shape
  n_rep = H // k.shape[2]
  k = np.repeat(np.asarray(k), n_rep, axis=2)  # torch.repeat_interleave on the head axis
  v = np.repeat(np.asarray(v), n_rep, axis=2)
  out = np.zeros((B, T, H, Dh), np.float64)
  for b in range(B):
    for h in range(H):
      s = np.asarray(q[b, :, h], np.float64) @ k[b, :, h].T.astype(np.float64) / np.sqrt(Dh)
      s = np.where(np.asarray(mask[b, 0]), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, :, h] = p @ v[b, :, h]
  return out


class AttentionTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("mha", 4, 4), ("gqa", 4, 2), ("mqa", 4, 1))
  def test_grouped_attention_matches_repeated_heads(self, n_heads, n_kv):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, n_heads, 8)).astype(np.float32)
    k = rng.normal(size=(2, 5, n_kv, 8)).astype(np.float32)
    v = rng.normal(size=(2, 5, n_kv, 8)).astype(np.float32)
    pos = np.broadcast_to(np.arange(5), (2, 5))
    mask = nn.causal_mask(jnp.asarray(pos), jnp.asarray(pos))
    got = self.variant(nn.dot_product_attention)(q, k, v, mask)
    np.testing.assert_allclose(got, reference_attention(q, k, v, np.asarray(mask)), atol=1e-5)

  @parameterized.named_parameters(("gqa_decode", 2, 1), ("mqa_prefill", 1, 3))
  def test_cache_layouts_and_writes(self, n_kv, new):
    """Writing into a cache and attending over it equals attention over the plain key/value arrays."""
    rng = np.random.default_rng(1)
    S, Dh = 6, 8
    k_all = rng.normal(size=(2, S, n_kv, Dh)).astype(np.float32)
    v_all = rng.normal(size=(2, S, n_kv, Dh)).astype(np.float32)
    q = rng.normal(size=(2, new, 4, Dh)).astype(np.float32)
    start = 2
    cache = nn.KVCache.zeros(1, 2, S, n_kv, Dh, stacked=False)
    ck, cv = nn.write_cache(cache.k[0], cache.v[0], k_all[:, :start], v_all[:, :start], 0)
    ck, cv = nn.write_cache(ck, cv, k_all[:, start:start + new], v_all[:, start:start + new], start)
    np.testing.assert_array_equal(ck, nn.keys_layout(jnp.asarray(k_all)).at[:, :, start + new:].set(0))
    np.testing.assert_array_equal(cv, nn.values_layout(jnp.asarray(v_all)).at[:, :, :, start + new:].set(0))
    q_pos = jnp.broadcast_to(jnp.arange(start, start + new), (2, new))
    mask = nn.causal_mask(q_pos, jnp.broadcast_to(jnp.arange(S), (2, S)))
    np.testing.assert_allclose(nn.cached_attention(q, ck, cv, mask),
                               reference_attention(q, k_all, v_all, np.asarray(mask)), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("mha", 4, 4), ("gqa", 4, 2), ("mqa", 4, 1))
  def test_attention_gradients_equal_autodiff_of_textbook_form(self, n_heads, n_kv):
    """The hand-written backward of `cached_attention` against autodiff of plain attention."""
    rng = np.random.default_rng(7)
    B, T, Dh = 2, 6, 8
    q, k, v, ct = (jnp.asarray(rng.normal(size=(B, T, h, Dh)), jnp.float32) for h in (n_heads, n_kv, n_kv, n_heads))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = nn.causal_mask(pos, pos) & (jnp.arange(T) >= jnp.asarray([[0], [2]]))[:, None, None, :]  # row 1: 2 pad slots

    def textbook(q, k, v):
      kr, vr = jnp.repeat(k, n_heads // n_kv, axis=2), jnp.repeat(v, n_heads // n_kv, axis=2)
      s = jnp.einsum("bthd,bshd->bhts", q, kr) / jnp.sqrt(Dh)
      p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
      return jnp.sum(jnp.einsum("bhts,bshd->bthd", p, vr) * ct)

    def ours(q, k, v):
      return jnp.sum(nn.cached_attention(q, nn.keys_layout(k), nn.values_layout(v), mask) * ct)

    got = self.variant(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(textbook, argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)

  def test_attention_without_mask_equals_all_visible_mask(self):
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, h, 4)), jnp.float32) for h in (4, 2, 2))
    full = jnp.ones((2, 1, 5, 5), bool)
    f = lambda mask: lambda q, k, v: jnp.sum(jnp.sin(nn.dot_product_attention(q, k, v, mask)))
    got = jax.value_and_grad(f(None), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(f(full), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)

  # T = 1 with as many kv heads as query heads is the one-query-row (matrix-vector) form.
  @parameterized.parameters((4, 4, 3), (4, 2, 3), (4, 1, 3), (4, 4, 1), (4, 2, 1))
  def test_split_cached_attention_equals_attention_over_the_joined_parts(self, n_heads, n_kv, T):
    rng = np.random.default_rng(9)
    q = jnp.asarray(rng.normal(size=(2, T, n_heads, 4)), jnp.float32)
    ks = [jnp.asarray(rng.normal(size=(2, n_kv, s, 4)), jnp.float32) for s in (5, 3)]
    vs = [jnp.asarray(rng.normal(size=(2, n_kv, 4, s)), jnp.float32) for s in (5, 3)]
    masks = [None, jnp.asarray(rng.random((2, 1, T, 3)) < 0.6)]
    joined_mask = jnp.concatenate([jnp.ones((2, 1, T, 5), bool), masks[1]], axis=-1)
    want = nn.cached_attention(q, jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=3), joined_mask)
    got = nn.split_cached_attention(q, list(zip(ks, vs, masks)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_split_cached_attention_with_every_key_masked_attends_uniformly(self):
    """A row that sees no key of any piece gets the mean of all values (finite), as `cached_attention`."""
    rng = np.random.default_rng(10)
    q = jnp.asarray(rng.normal(size=(1, 1, 2, 4)), jnp.float32)
    ks = [jnp.asarray(rng.normal(size=(1, 2, s, 4)), jnp.float32) for s in (5, 3)]
    vs = [jnp.asarray(rng.normal(size=(1, 2, 4, s)), jnp.float32) for s in (5, 3)]
    masks = [jnp.zeros((1, 1, 1, 5), bool), jnp.zeros((1, 1, 1, 3), bool)]
    got = nn.split_cached_attention(q, list(zip(ks, vs, masks)))
    want = jnp.concatenate(vs, axis=3).mean(axis=3)[:, None]  # [1, 1, K=H, Dh]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("no_mask", False, 4), ("mask", True, 4), ("narrower_values", True, 2),
                                  ("wider_values", False, 6))
  def test_attention_core_value_and_gradients_equal_autodiff_of_plain_softmax_attention(self, masked, Dv):
    """`attention_core` (values `[Dv, S]`, hand-written backward) against autodiff of the textbook form."""
    rng = np.random.default_rng(11)
    B, N, T, S, Dh = 2, 3, 5, 7, 4
    q = jnp.asarray(rng.normal(size=(B, N, T, Dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, N, S, Dh)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, N, S, Dv)), jnp.float32)  # the plain [S, Dv] layout
    ct = jnp.asarray(rng.normal(size=(B, N, T, Dv)), jnp.float32)
    mask = None
    if masked:  # shared over heads; row (0, 0) sees no key at all
      mask = jnp.asarray(rng.random((B, 1, T, S)) < 0.6).at[0, 0, 0].set(False)

    def plain(q, k, v):
      s = jnp.einsum("bntd,bnsd->bnts", q, k)
      if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
      return jnp.sum(jnp.einsum("bnts,bnsd->bntd", jax.nn.softmax(s, axis=-1), v) * ct)

    def core(q, k, v):
      return jnp.sum(nn.attention_core(q, k, jnp.swapaxes(v, 2, 3), mask) * ct)

    got = self.variant(jax.value_and_grad(core, argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    if masked:  # the row without visible keys: uniform weights, finite, no gradient into q
      out = nn.attention_core(q, k, jnp.swapaxes(v, 2, 3), mask)
      np.testing.assert_allclose(out[0, :, 0], jnp.broadcast_to(v[0].mean(axis=1), (N, Dv)), rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(got[1][0][0, :, 0], 0.0)

  def test_attention_core_rejects_mismatched_layouts(self):
    q, k = jnp.zeros((2, 3, 5, 4)), jnp.zeros((2, 3, 7, 4))
    with self.assertRaisesRegex(ValueError, r"v_BxNxDhxS must be \[2, 3, Dv, 7\]"):
      nn.attention_core(q, k, jnp.zeros((2, 3, 7, 4)))  # values not transposed
    with self.assertRaisesRegex(ValueError, "k_BxNxSxDh"):
      nn.attention_core(q, jnp.zeros((2, 3, 7, 8)), jnp.zeros((2, 3, 8, 7)))
    with self.assertRaisesRegex(ValueError, "mask_BxNxTxS"):
      nn.attention_core(q, k, jnp.zeros((2, 3, 4, 7)), jnp.ones((2, 1, 5, 6), bool))

  def test_cache_forms_round_trip(self):
    cache = nn.KVCache.zeros(3, 2, 5, 2, 4)
    cache = nn.KVCache(k=cache.k + jnp.arange(3.0)[:, None, None, None, None], v=cache.v - 1.0)
    layers = cache.as_layers()
    self.assertFalse(layers.is_stacked)
    self.assertLen(layers.k, 3)
    self.assertEqual((layers.max_len, cache.max_len), (5, 5))
    chex.assert_trees_all_equal(layers.as_stacked(), cache)
    longer = cache.append(nn.KVCache.zeros(3, 2, 4, 2, 4))
    self.assertEqual(longer.max_len, 9)
    chex.assert_trees_all_equal(longer.k[:, :, :, :5], cache.k)
    chex.assert_trees_all_equal(longer.v[..., :5], cache.v)
    # the appended piece's slots (zeros) follow; cache.v is -1 and cache.k is the layer index
    np.testing.assert_array_equal(longer.k[:, :, :, 5:], 0.0)
    np.testing.assert_array_equal(longer.v[..., 5:], 0.0)
    np.testing.assert_array_equal(longer.k[1:, :, :, :5], cache.k[1:])  # non-zero rows kept in place
    chex.assert_trees_all_equal(layers.append(layers).as_stacked(), cache.append(cache))

  def test_causal_mask_over_cache(self):
    # 2 new tokens at positions 3, 4 against a 6-slot cache: Meta's (seqlen, start_pos + seqlen) mask.
    q_pos = jnp.array([[3, 4]])
    k_pos = jnp.arange(6)[None]
    mask = np.asarray(nn.causal_mask(q_pos, k_pos))[0, 0]
    expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


class RopeTest(chex.TestCase):

  def test_matches_complex_multiplication(self):
    """Meta's form: consecutive pairs as complex numbers times exp(i t freq)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
    pos = np.arange(6)[None]
    got = np.asarray(nn.apply_rope(jnp.asarray(x), jnp.asarray(pos)))
    freqs = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = z * np.exp(1j * pos[0][:, None] * freqs)[None, :, None, :]
    expected = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)

  def test_pair_swap_form_equals_slice_and_stack_bitwise(self):
    """`apply_rope_tables` (pairs times cos plus swapped pairs times (-sin, sin)) equals the direct
    `(re cos - im sin, re sin + im cos)` of the two halves, values and gradients, for constant and
    traced tables."""
    def direct(x, cos, sin):
      pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
      re, im = pairs[..., 0], pairs[..., 1]
      return jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(x.shape)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 8))
    g = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    pos = np.tile(np.arange(5, dtype=np.int32)[None] + 3, (2, 1))
    for cos, sin in (nn.rope_tables(pos, 8), nn.rope_tables(jnp.asarray(pos), 8)):
      for fn in (nn.apply_rope_tables, direct):
        self.assertEqual(fn(x, cos, sin).shape, x.shape)
      np.testing.assert_array_equal(nn.apply_rope_tables(x, cos, sin), direct(x, cos, sin))
      grad = lambda fn: jax.jit(jax.grad(lambda x: jnp.sum(fn(x, cos, sin) * g)))(x)  # noqa: E731
      np.testing.assert_array_equal(grad(nn.apply_rope_tables), grad(direct))

  def test_constant_tables_from_numpy_positions_equal_traced_tables(self):
    """Positions known when tracing give NumPy (constant) tables equal to the traced ones."""
    pos = np.arange(300, dtype=np.int32)[None] + 5
    got = nn.rope_tables(pos, 64, 10000.0)
    want = jax.jit(lambda p: nn.rope_tables(p, 64, 10000.0))(jnp.asarray(pos))
    self.assertIsInstance(got[0], np.ndarray)
    # Both take cos/sin of the same float32 angles; the implementations differ by rounding. At
    # angles near 300 rad one float32 ulp of the angle is 3e-5, so 1e-5 is below the angle's own
    # resolution (positions < 20 keep the two within 1e-6).
    for g, w in zip(got, want):
      self.assertEqual(g.dtype, np.float32)
      np.testing.assert_allclose(g, w, atol=1e-5)
      np.testing.assert_allclose(g[:, :20], w[:, :20], atol=1e-6)
    gathered = jax.jit(lambda p: nn.rope_tables(p, 64, 10000.0, max_position=400))(jnp.asarray(pos))
    for g, w in zip(got, gathered):
      np.testing.assert_array_equal(g, w)  # rows of the same constant tables

  def test_scores_depend_only_on_relative_position(self):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m, n):
      qm = nn.apply_rope(q, jnp.array([[m]]))
      kn = nn.apply_rope(k, jnp.array([[n]]))
      return float(jnp.sum(qm * kn))

    base = score(7, 3)
    for shift in (1, 10, 100):
      self.assertAlmostEqual(score(7 + shift, 3 + shift), base, places=3)
    self.assertNotAlmostEqual(score(7, 3), score(7, 5), places=3)


class SinusoidalEmbeddingTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters(8, 9)
  def test_columns_are_sines_then_cosines_of_geometric_frequencies(self, dim):
    x = jnp.asarray([0.0, 1.0, 37.5, 1000.0])
    got = np.asarray(nn.sinusoidal_embedding(x, dim, max_period=500.0), np.float64)
    half = dim // 2
    freqs = 500.0 ** (-np.arange(half) / half)
    args = np.asarray(x, np.float64)[:, None] * freqs
    np.testing.assert_allclose(got[:, :half], np.sin(args), atol=2e-4)  # float32 arguments up to 1000
    np.testing.assert_allclose(got[:, half:2 * half], np.cos(args), atol=2e-4)
    self.assertEqual(got.shape, (4, dim))
    if dim % 2:
      np.testing.assert_array_equal(got[:, -1], 0.0)

  def test_any_leading_shape(self):
    x = jnp.arange(6.0).reshape(2, 3)
    flat = nn.sinusoidal_embedding(x.reshape(6), 4)
    np.testing.assert_array_equal(nn.sinusoidal_embedding(x, 4), flat.reshape(2, 3, 4))
    with self.assertRaisesRegex(ValueError, "dim"):
      nn.sinusoidal_embedding(x, 0)


class UnstackTest(chex.TestCase):

  def test_slices_and_their_gradient(self):
    """Each layer's tree is the slices; the gradient equals autodiff of plain slicing, bit for bit."""
    tree = {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5)), "b": jnp.arange(6.0).reshape(3, 2)}
    layers = nn.unstack(tree)
    self.assertLen(layers, 3)
    for i, layer in enumerate(layers):
      chex.assert_trees_all_equal(layer, jax.tree.map(lambda a, i=i: a[i], tree))

    def loss(slicer):
      def f(t):
        x = jnp.ones((2, 4))
        for i, p in enumerate(slicer(t)):
          x = jnp.tanh(x @ p["w"] @ p["w"].T) * (i + 1) + p["b"].sum()
        return jnp.sum(x ** 2)
      return f

    plain = lambda t: [jax.tree.map(lambda a, i=i: a[i], t) for i in range(3)]  # noqa: E731
    chex.assert_trees_all_equal(jax.jit(jax.grad(loss(nn.unstack)))(tree), jax.jit(jax.grad(loss(plain)))(tree))

  def test_leaves_must_share_the_layer_axis(self):
    with self.assertRaisesRegex(ValueError, "share one leading"):
      nn.unstack({"w": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))})
    with self.assertRaisesRegex(ValueError, "no leaves"):
      nn.unstack({})


class NormAndMlpTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rms_norm(self):
    x = np.random.default_rng(3).normal(size=(2, 3, 8)).astype(np.float32)
    w = np.linspace(0.5, 2.0, 8).astype(np.float32)
    got = self.variant(lambda x, w: nn.rms_norm(x, w, 1e-5))(x, w)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 6)
  def test_group_norm(self, groups):
    # Each of the `groups` channel groups standardised over (H, W, its channels), written out in NumPy;
    # groups=1 is LayerNorm over [H, W, C], groups=C (6) InstanceNorm.
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, size=(2, 4, 5, 6)).astype(np.float32)
    scale, bias = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    got = self.variant(lambda x: nn.group_norm(x, scale, bias, groups))(x)
    expected = np.empty_like(x, dtype=np.float64)
    size = 6 // groups
    for n in range(2):
      for g in range(groups):
        block = x[n, :, :, g * size:(g + 1) * size].astype(np.float64)
        expected[n, :, :, g * size:(g + 1) * size] = (block - block.mean()) / np.sqrt(block.var() + 1e-5)
    np.testing.assert_allclose(got, expected * scale + bias, rtol=1e-5, atol=1e-5)

  def test_group_norm_rejects_groups_that_do_not_divide_the_channels(self):
    with self.assertRaisesRegex(ValueError, "groups must be a positive divisor of the channel count 6, got 4"):
      nn.group_norm(jnp.ones((1, 2, 2, 6)), jnp.ones(6), jnp.zeros(6), 4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_value_and_gradients_equal_matmul(self):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    ct = rng.normal(size=(2, 5, 6)).astype(np.float32)  # a cotangent that weights every output
    loss = lambda mm: (lambda x, w: jnp.sum(mm(x, w) * ct))
    got, got_grads = self.variant(jax.value_and_grad(loss(nn.linear), argnums=(0, 1)))(x, w)
    want, want_grads = jax.value_and_grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, e in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)

  def test_linear_dtypes(self):
    x = jnp.ones((3, 4), jnp.bfloat16)
    w = jnp.ones((4, 2), jnp.bfloat16)
    self.assertEqual(nn.linear(x, w).dtype, jnp.bfloat16)
    self.assertEqual(nn.linear(x, w, out_dtype=jnp.float32).dtype, jnp.float32)
    gx, gw = jax.grad(lambda x, w: nn.linear(x, w, out_dtype=jnp.float32).sum(), argnums=(0, 1))(x, w)
    self.assertEqual((gx.dtype, gw.dtype), (jnp.bfloat16, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(gw, np.float32), np.full((4, 2), 3.0))

  def test_first_argmax_equals_argmax_and_takes_first_tie(self):
    x = jnp.asarray([[0.0, 2.0, 2.0], [5.0, 1.0, 5.0]])
    np.testing.assert_array_equal(nn.first_argmax(x), [1, 0])
    r = jax.random.normal(jax.random.PRNGKey(0), (4, 7, 33))
    np.testing.assert_array_equal(nn.first_argmax(r), jnp.argmax(r, axis=-1))
    ints = jnp.asarray([[3, 9, 9, 1], [-4, -4, -5, -6]], jnp.int32)
    np.testing.assert_array_equal(nn.first_argmax(ints), [1, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_argmax_of_rows_with_nan_is_the_first_nan_and_in_range(self):
    nan, inf = np.nan, np.inf
    x = jnp.asarray([[nan, nan, nan, nan],  # all NaN: 0 (it used to be 4, out of range)
                     [1.0, nan, 7.0, nan],  # partly NaN: the first NaN, as jnp.argmax
                     [2.0, 7.0, 7.0, -inf],  # tie: the first maximum
                     [-inf, -inf, -inf, -inf],
                     [inf, 1.0, inf, nan]])
    got = np.asarray(self.variant(nn.first_argmax)(x))
    np.testing.assert_array_equal(got, [0, 1, 1, 0, 3])
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
    self.assertEqual(got.dtype, np.int32)

  @parameterized.named_parameters(("no_mask", False), ("mask", True))
  def test_cross_entropy_equals_log_softmax_gather(self, masked):
    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 6)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, size=(2, 6)), jnp.float32) if masked else None
    logp = jax.nn.log_softmax(logits, axis=-1)  # the plain form: -log_softmax gathered at the targets
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = jnp.ones_like(nll) if mask is None else mask
    loss, n = nn.cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss, jnp.sum(nll * weights) / jnp.sum(weights), rtol=1e-6)
    self.assertEqual(float(n), float(jnp.sum(weights)))
    # the gradient: (softmax - onehot) * mask / n, the dense form of the scatter autodiff gives the gather
    grad = jax.grad(lambda l: nn.cross_entropy(l, targets, mask)[0])(logits)
    want = jax.grad(lambda l: jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(l), targets[..., None], axis=-1)[..., 0]
                                      * weights) / jnp.sum(weights))(logits)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)

  def test_cross_entropy_of_bfloat16_logits_and_an_empty_mask(self):
    logits = jnp.asarray(np.random.default_rng(13).normal(size=(1, 3, 5)), jnp.bfloat16)
    targets = jnp.asarray([[0, 4, 2]])
    loss, n = nn.cross_entropy(logits, targets)
    self.assertEqual((loss.dtype, float(n)), (jnp.float32, 3.0))
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), targets[..., None], axis=-1).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    loss, n = nn.cross_entropy(logits, targets, jnp.zeros((1, 3)))
    self.assertEqual((float(loss), float(n)), (0.0, 1.0))  # nothing counted: 0, with the count clamped to 1
    with self.assertRaisesRegex(ValueError, "targets_BxT"):
      nn.cross_entropy(logits, targets[:, :2])

  def test_swiglu_hidden_dims_of_published_models(self):
    # Llama 2 paper / params.json: 7B 11008, 13B 13824, 70B 28672.
    self.assertEqual(nn.swiglu_hidden_dim(4096, 256), 11008)
    self.assertEqual(nn.swiglu_hidden_dim(5120, 256), 13824)
    self.assertEqual(nn.swiglu_hidden_dim(8192, 4096, 1.3), 28672)


if __name__ == "__main__":
  absltest.main()
