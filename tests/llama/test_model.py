"""Llama 2 decoder invariants: causality, KV cache, GQA, presets, bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import llama
from tests import peer

CFG = llama.preset("tiny")
PARAMS = llama.init(jax.random.PRNGKey(0), CFG)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CFG.vocab_size)


class ForwardTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtype(self):
    logits = self.variant(lambda p, t: llama.apply(p, t, CFG))(PARAMS, TOKENS)
    chex.assert_shape(logits, (2, 12, CFG.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_causality_by_gradients(self):
    """d logits[:, i] / d embedding of the token at j is zero for j > i, nonzero for j <= i."""
    tokens = jnp.arange(10, dtype=jnp.int32)[None]  # distinct ids, so embedding rows map to positions
    i = 4

    def f(emb):
      p = dict(PARAMS, tok_embeddings=emb)
      return llama.apply(p, tokens, CFG)[0, i].sum()

    g = jax.grad(f)(PARAMS["tok_embeddings"])
    row_norm = np.linalg.norm(np.asarray(g[:10]), axis=-1)
    np.testing.assert_array_equal(row_norm[i + 1:], 0.0)
    self.assertTrue(np.all(row_norm[:i + 1] > 0))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("scan", True), ("unrolled", False))
  def test_kv_cache_decode_equals_full_forward(self, scan_layers):
    cfg = CFG.replace(scan_layers=scan_layers)
    full = llama.apply(PARAMS, TOKENS, cfg)
    step = self.variant(lambda p, t, c, i: llama.apply(p, t, cfg, cache=c, cache_index=i))
    cache = llama.init_cache(cfg, 2, 16)
    logits, cache = step(PARAMS, TOKENS[:, :7], cache, 0)
    pieces = [logits]
    for i in range(7, 12):
      logits, cache = step(PARAMS, TOKENS[:, i:i + 1], cache, i)
      pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)

  @parameterized.named_parameters(("scan", True), ("unrolled", False))
  def test_split_cache_decode_equals_one_cache(self, scan_layers):
    """Past (read only) + recent piece: the logits and cache contents of one cache holding both."""
    cfg = CFG.replace(scan_layers=scan_layers)
    P, R = 5, 6
    _, past = llama.apply(PARAMS, TOKENS[:, :P], cfg, cache=llama.init_cache(cfg, 2, P), cache_index=0)
    _, whole = llama.apply(PARAMS, TOKENS[:, :P], cfg, cache=llama.init_cache(cfg, 2, P + R), cache_index=0)
    recent = llama.init_cache(cfg, 2, R)
    split_step = jax.jit(lambda t, r, i: llama.apply_split_cache(PARAMS, t, cfg, past, r, i))
    whole_step = jax.jit(lambda t, c, i: llama.apply(PARAMS, t, cfg, cache=c, cache_index=i))
    chunked = llama.split_output_columns(PARAMS, 100)  # CFG.vocab_size columns in chunks of <= 100
    self.assertGreater(len(chunked["output"]), 1)
    for i in range(P, P + 4):
      got, recent = split_step(TOKENS[:, i:i + 1], recent, i)
      want, whole = whole_step(TOKENS[:, i:i + 1], whole, i)
      np.testing.assert_allclose(got, want, atol=1e-5)
      np.testing.assert_allclose(llama.apply_split_cache(chunked, TOKENS[:, i + 1:i + 2], cfg, past, recent, i + 1)[0],
                                 split_step(TOKENS[:, i + 1:i + 2], recent, i + 1)[0], atol=1e-6)
    for got_r, want_w in zip(jax.tree.leaves(recent.as_stacked()), jax.tree.leaves(whole.as_stacked())):
      axis = -2 if got_r.shape[-1] == cfg.head_dim else -1  # keys [.., S, Dh], values [.., Dh, S]
      np.testing.assert_allclose(got_r, jax.lax.slice_in_dim(want_w, P, P + R, axis=got_r.ndim + axis), atol=1e-6)

  def test_gqa_with_repeated_kv_heads_equals_mha(self):
    """A GQA model equals the MHA model whose k/v heads are the repeat_interleave'd GQA heads."""
    gqa = CFG  # 4 heads, 2 kv heads
    mha = CFG.replace(n_kv_heads=CFG.n_heads)
    n_rep = gqa.n_heads // gqa.kv_heads

    def expand(w):  # [L, D, K*Dh] -> [L, D, H*Dh], each kv head repeated n_rep times in place
      L, D, _ = w.shape
      w = w.reshape(L, D, gqa.kv_heads, 1, gqa.head_dim)
      return jnp.broadcast_to(w, (L, D, gqa.kv_heads, n_rep, gqa.head_dim)).reshape(L, D, -1)

    mha_params = jax.tree.map(lambda x: x, PARAMS)
    mha_params["layers"] = dict(PARAMS["layers"], wk=expand(PARAMS["layers"]["wk"]),
                                wv=expand(PARAMS["layers"]["wv"]))
    np.testing.assert_allclose(llama.apply(mha_params, TOKENS, mha), llama.apply(PARAMS, TOKENS, gqa), atol=1e-5)

  def test_scanned_and_unrolled_layers_agree(self):
    """Both layer loops give the same logits, gradients and cache contents."""
    scanned = CFG.replace(scan_layers=True)
    unrolled = CFG.replace(scan_layers=False)
    np.testing.assert_allclose(llama.apply(PARAMS, TOKENS, scanned), llama.apply(PARAMS, TOKENS, unrolled), atol=1e-5)
    grads = [jax.grad(lambda p: llama.loss_fn(p, {"tokens": TOKENS}, c)[0])(PARAMS) for c in (scanned, unrolled)]
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-6)
    caches = [llama.apply(PARAMS, TOKENS[:, :5], c, cache=llama.init_cache(c, 2, 8))[1].as_stacked()
              for c in (scanned, unrolled)]
    chex.assert_trees_all_close(caches[0], caches[1], atol=1e-6)

  def test_unstacked_weights_and_either_cache_form(self):
    """`apply` takes stacked or per-layer weights and caches, and returns the cache form it was given."""
    ref = llama.apply(PARAMS, TOKENS, CFG)
    unstacked = llama.unstack_layers(PARAMS)
    self.assertIsInstance(unstacked["layers"], tuple)
    np.testing.assert_allclose(llama.apply(unstacked, TOKENS, CFG), ref, atol=1e-6)
    chex.assert_trees_all_equal(llama.stack_layers(unstacked), PARAMS)
    for cfg in (CFG.replace(scan_layers=True), CFG.replace(scan_layers=False)):
      for stacked in (True, False):
        cache = llama.init_cache(cfg, 2, 16)
        cache = cache.as_stacked() if stacked else cache.as_layers()
        logits, new = llama.apply(unstacked, TOKENS[:, :6], cfg, cache=cache, cache_index=0)
        self.assertEqual(new.is_stacked, stacked)
        np.testing.assert_allclose(logits, ref[:, :6], atol=1e-5)

  def test_remat_and_bfloat16(self):
    """Rematerialisation changes memory, not values; bfloat16 compute stays close to float32."""
    ref = llama.apply(PARAMS, TOKENS, CFG)
    np.testing.assert_allclose(llama.apply(PARAMS, TOKENS, CFG.replace(remat=True)), ref, atol=1e-6)
    grads = [jax.grad(lambda p: llama.loss_fn(p, {"tokens": TOKENS}, c)[0])(PARAMS)
             for c in (CFG, CFG.replace(remat=True), CFG.replace(remat=True, scan_layers=True))]
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-6)
    chex.assert_trees_all_close(grads[0], grads[2], atol=1e-6)
    bf = llama.apply(PARAMS, TOKENS, CFG.replace(dtype="bfloat16"))
    self.assertLess(float(jnp.max(jnp.abs(bf - ref))), 0.05)

  def test_loss_is_log_vocab_at_init_and_masked(self):
    tokens = jax.random.randint(jax.random.PRNGKey(5), (4, 33), 0, CFG.vocab_size)
    loss, metrics = llama.loss_fn(PARAMS, {"tokens": tokens}, CFG)
    self.assertAlmostEqual(float(loss), float(np.log(CFG.vocab_size)), delta=0.1)
    mask = jnp.zeros_like(tokens).at[:, -5:].set(1)
    _, m = llama.loss_fn(PARAMS, {"tokens": tokens, "mask": mask}, CFG)
    self.assertEqual(float(m["tokens"]), 4 * 5)
    self.assertEqual(float(metrics["tokens"]), 4 * 32)

  def test_cross_entropy_equals_log_softmax_gather(self):
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 6)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, size=(2, 6)), jnp.float32)
    x = np.asarray(logits, np.float64) - np.asarray(logits, np.float64).max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))  # log_softmax in float64
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], axis=-1)[..., 0]
    loss, n = llama.cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-5)
    self.assertEqual(float(n), float(mask.sum()))


class PresetTest(chex.TestCase):

  def test_param_count_matches_tree_and_transformers(self):
    """Golden: transformers' LlamaForCausalLM at the released shapes, counted live in the peer env."""
    hf = peer.run("llama_param_counts")
    for name in ("7b", "13b", "70b"):
      cfg = llama.preset(name)
      from_tree = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(llama.param_shapes(cfg)))
      self.assertEqual(llama.param_count(cfg), from_tree, name)
      self.assertEqual(llama.param_count(cfg), hf[name], name)

  def test_hidden_dims(self):
    self.assertEqual([llama.preset(n).hidden_dim for n in ("7b", "13b", "70b")], [11008, 13824, 28672])


class BadInputTest(chex.TestCase):

  def test_token_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "outside the vocabulary"):
      llama.apply(PARAMS, jnp.array([[1, CFG.vocab_size]]), CFG)
    with self.assertRaisesRegex(ValueError, "outside the vocabulary"):
      llama.apply(PARAMS, jnp.array([[-1, 2]]), CFG)
    with self.assertRaisesRegex(TypeError, "integer"):
      llama.apply(PARAMS, jnp.ones((1, 3), jnp.float32), CFG)
    with self.assertRaisesRegex(ValueError, r"\[batch, length\]"):
      llama.apply(PARAMS, jnp.array([1, 2, 3]), CFG)
    with self.assertRaisesRegex(ValueError, "exceeds the context"):
      llama.apply(PARAMS, jnp.zeros((1, CFG.max_seq_len + 1), jnp.int32), CFG)

  def test_config_errors(self):
    with self.assertRaisesRegex(ValueError, "must divide dim"):
      llama.LlamaConfig(dim=100, n_heads=3)
    with self.assertRaisesRegex(ValueError, "n_kv_heads"):
      llama.LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with self.assertRaisesRegex(ValueError, "unknown Llama preset"):
      llama.preset("8b")

  def test_param_mismatch_lists_keys_and_shapes(self):
    bad = jax.tree.map(lambda x: x, PARAMS)
    bad["layers"] = dict(bad["layers"], wq=jnp.zeros((2, 64, 32)))
    del bad["norm"]
    with self.assertRaisesRegex(ValueError, r"(?s)wq.*shape \(2, 64, 32\).*missing \['norm'\]"):
      llama.check_params(bad, CFG)


if __name__ == "__main__":
  absltest.main()
