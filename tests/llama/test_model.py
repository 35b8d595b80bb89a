"""Llama 2 decoder invariants: causality, KV cache, GQA, the embed/decoder/head parts, sequence log-probs,
presets, bad input."""
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

  @parameterized.named_parameters(("scan", True, 4), ("unrolled", False, 4), ("unrolled_gqa", False, 2))
  def test_joined_projections_give_the_same_logits(self, scan_layers, n_kv_heads):
    """`join_projections` (wq|wk|wv and w1|w3 as one matmul each): same logits with and without a cache."""
    cfg = CFG.replace(scan_layers=scan_layers, n_kv_heads=n_kv_heads)
    params = llama.init(jax.random.PRNGKey(3), cfg)
    form = params if scan_layers else llama.unstack_layers(params)
    joined = llama.join_projections(form)
    self.assertIn("wqkv", jax.tree.leaves(joined["layers"], is_leaf=lambda x: isinstance(x, dict))[0])
    llama.check_params(joined, cfg)
    np.testing.assert_allclose(llama.apply(joined, TOKENS, cfg), llama.apply(params, TOKENS, cfg), atol=1e-5)
    cache = llama.init_cache(cfg, 2, 16)
    got, got_c = llama.apply(joined, TOKENS[:, :7], cfg, cache=cache, cache_index=0)
    want, want_c = llama.apply(params, TOKENS[:, :7], cfg, cache=cache, cache_index=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    chex.assert_trees_all_close(got_c, want_c, atol=1e-5)
    # a joined weight of the wrong width is named as the weights it holds
    bad = dict(joined, layers=jax.tree.map(lambda x: x, joined["layers"]))
    if scan_layers:
      bad["layers"] = dict(bad["layers"], w13=bad["layers"]["w13"][..., 1:])
    else:
      bad["layers"] = (dict(bad["layers"][0], w13=bad["layers"][0]["w13"][..., 1:]),) + tuple(bad["layers"][1:])
    with self.assertRaisesRegex(ValueError, r"\['layers'\]\['w1'\]"):
      llama.check_params(bad, cfg)

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

  def test_unstacked_weights_gradient_is_the_stack_of_slice_gradients_bitwise(self):
    """`unstack_layers` (a custom VJP that stacks the slice gradients) equals autodiff of plain slicing."""
    def plain_unstack(params):
      n = params["layers"]["wq"].shape[0]
      return dict(params, layers=tuple(jax.tree.map(lambda w, i=i: w[i], params["layers"]) for i in range(n)))

    cfg = CFG.replace(scan_layers=False)
    loss = lambda unstack: lambda p: llama.loss_fn(unstack(p), {"tokens": TOKENS}, cfg)[0]  # noqa: E731
    chex.assert_trees_all_equal(jax.jit(jax.grad(loss(llama.unstack_layers)))(PARAMS),
                                jax.jit(jax.grad(loss(plain_unstack)))(PARAMS))

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


class PartsTest(chex.TestCase, parameterized.TestCase):
  """`apply` is `head(decoder(embed(...)))`; the decoder takes any input vectors and an attention mask."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("scan", True), ("unrolled", False))
  def test_parts_compose_to_apply_bitwise(self, scan_layers):
    cfg = CFG.replace(scan_layers=scan_layers)
    parts = self.variant(lambda p, t: llama.head(p, llama.decoder(p, llama.embed(p, t, cfg), cfg), cfg))
    whole = self.variant(lambda p, t: llama.apply(p, t, cfg))
    np.testing.assert_array_equal(parts(PARAMS, TOKENS), whole(PARAMS, TOKENS))
    hidden = self.variant(lambda p, t: llama.apply(p, t, cfg, return_hidden=True))(PARAMS, TOKENS)
    np.testing.assert_array_equal(self.variant(lambda p, t: llama.decoder(p, llama.embed(p, t, cfg), cfg))(
        PARAMS, TOKENS), hidden)

  def test_parts_with_a_cache_equal_apply_with_a_cache(self):
    """Prefill then one decode step through `decoder(cache=...)`: the logits and caches of `apply`."""
    def by_parts(tokens, cache, i):
      h, cache = llama.decoder(PARAMS, llama.embed(PARAMS, tokens, CFG), CFG, cache=cache, cache_index=i)
      return llama.head(PARAMS, h, CFG), cache

    got, want = by_parts(TOKENS[:, :7], llama.init_cache(CFG, 2, 12), 0), \
        llama.apply(PARAMS, TOKENS[:, :7], CFG, cache=llama.init_cache(CFG, 2, 12), cache_index=0)
    chex.assert_trees_all_equal(got, want)
    step = jax.jit(by_parts)
    got = step(TOKENS[:, 7:8], got[1], jnp.int32(7))
    want = jax.jit(lambda t, c, i: llama.apply(PARAMS, t, CFG, cache=c, cache_index=i))(TOKENS[:, 7:8], want[1],
                                                                                       jnp.int32(7))
    chex.assert_trees_all_close(got, want, atol=1e-6)

  def test_decoder_is_causal_in_its_inputs(self):
    """d h[:, i] / d x[:, j] is zero for j > i and nonzero for j <= i, for any input vectors (not embeddings)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 10, CFG.dim))
    i = 4
    g = jax.grad(lambda x: llama.decoder(PARAMS, x, CFG)[0, i].sum())(x)
    row_norm = np.linalg.norm(np.asarray(g[0]), axis=-1)
    np.testing.assert_array_equal(row_norm[i + 1:], 0.0)
    self.assertTrue(np.all(row_norm[:i + 1] > 0))

  def test_attention_mask_hides_padding(self):
    """A left-padded row: its real tokens see no padding (zero gradient) and equal the unpadded row."""
    T, pad = 10, 3
    x = jax.random.normal(jax.random.PRNGKey(3), (1, T, CFG.dim))
    mask = np.arange(T)[None] >= pad
    unpadded = llama.decoder(PARAMS, x[:, pad:], CFG)
    padded = llama.decoder(PARAMS, x, CFG, attention_mask=mask)  # positions from the mask: 0 at the first real token
    np.testing.assert_allclose(padded[:, pad:], unpadded, atol=1e-5)
    g = jax.grad(lambda x: llama.decoder(PARAMS, x, CFG, attention_mask=mask)[0, pad:].sum())(x)
    np.testing.assert_array_equal(np.asarray(g[0, :pad]), 0.0)
    self.assertTrue(np.all(np.linalg.norm(np.asarray(g[0, pad:]), axis=-1) > 0))
    ones = llama.decoder(PARAMS, x, CFG, attention_mask=jnp.ones((1, T), bool))
    np.testing.assert_allclose(ones, llama.decoder(PARAMS, x, CFG), atol=1e-6)

  def test_part_errors_name_the_argument(self):
    with self.assertRaisesRegex(ValueError, r"x_BxTxD must have shape \[batch, length, dim=64\]"):
      llama.decoder(PARAMS, jnp.zeros((1, 3, 32)), CFG)
    with self.assertRaisesRegex(ValueError, "attention_mask must have shape"):
      llama.decoder(PARAMS, jnp.zeros((1, 3, CFG.dim)), CFG, attention_mask=np.ones((1, 4)))
    with self.assertRaisesRegex(ValueError, "attention_mask is supported without a cache"):
      llama.decoder(PARAMS, jnp.zeros((1, 3, CFG.dim)), CFG, attention_mask=np.ones((1, 3)),
                    cache=llama.init_cache(CFG, 1, 8))
    with self.assertRaisesRegex(ValueError, "h_BxTxD must end in dim=64"):
      llama.head(PARAMS, jnp.zeros((1, 3, 32)), CFG)
    with self.assertRaisesRegex(ValueError, r"tokens_BxT has ids outside the vocabulary"):
      llama.embed(PARAMS, jnp.array([[CFG.vocab_size]]), CFG)
    with self.assertRaisesRegex(ValueError, r"(?s)params do not match.*\['tok_embeddings'\]"):
      llama.embed(llama.init(jax.random.PRNGKey(0), CFG.replace(vocab_size=300)), TOKENS, CFG)
    with self.assertRaisesRegex(ValueError, r"(?s)params do not match.*\['output'\]: shape \(64, 300\)"):
      llama.head(llama.init(jax.random.PRNGKey(0), CFG.replace(vocab_size=300)), jnp.zeros((1, 3, 64)), CFG)


def _reference_logprobs(tokens, loss_mask):
  """Sum over t >= 1 of loss_mask[t] * log_softmax(apply(tokens))[t - 1, tokens[t]], in float64 from the logits."""
  logits = np.asarray(llama.apply(PARAMS, jnp.asarray(tokens), CFG), np.float64)
  x = logits - logits.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  return (picked * np.asarray(loss_mask)[:, 1:]).sum(-1)


class SequenceLogprobsTest(chex.TestCase):

  def test_unpadded_rows_equal_the_log_softmax_of_apply(self):
    loss_mask = np.zeros((2, 12), np.int32)
    loss_mask[0, 1:] = 1
    loss_mask[1, 5:9] = 1
    got = llama.sequence_logprobs(PARAMS, TOKENS, loss_mask, CFG)
    chex.assert_shape(got, (2,))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, _reference_logprobs(TOKENS, loss_mask), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_right_and_left_padded_rows_score_as_unpadded(self):
    """Rows of lengths 12, 7, 5 (prompt 3, 1, 2 tokens), padded either side: each equals the row alone."""
    T, lengths, prompts = 16, [12, 7, 5], [3, 1, 2]
    rows = [np.asarray(TOKENS[i % 2, :n]) for i, n in enumerate(lengths)]
    want = []
    for r, p in zip(rows, prompts):
      lm = np.zeros((1, len(r)), np.int32)
      lm[0, p:] = 1
      want.append(_reference_logprobs(r[None], lm)[0])
    fn = self.variant(lambda t, lm, am: llama.sequence_logprobs(PARAMS, t, lm, CFG, attention_mask_BxT=am))
    for side in ("right", "left"):
      tokens, attn, loss = (np.zeros((3, T), np.int32) for _ in range(3))
      for i, (r, p) in enumerate(zip(rows, prompts)):
        s = 0 if side == "right" else T - len(r)
        tokens[i, s:s + len(r)], attn[i, s:s + len(r)], loss[i, s + p:s + len(r)] = r, 1, 1
      np.testing.assert_allclose(fn(tokens, loss, attn), want, atol=2e-5, err_msg=side)

  def test_unscorable_entries_raise_and_bad_shapes_name_the_argument(self):
    ones = np.ones((2, 12), np.int32)
    with self.assertRaisesRegex(ValueError, r"loss_mask_BxT is 1 at \(row 0, column 0\)"):
      llama.sequence_logprobs(PARAMS, TOKENS, ones, CFG)
    attn = ones.copy()
    attn[1, :4] = 0  # left padding: the first real token, column 4, has no prediction
    loss = ones.copy()
    loss[:, 0] = 0
    loss[1, :4] = 0
    with self.assertRaisesRegex(ValueError, r"loss_mask_BxT is 1 at \(row 1, column 4\)"):
      llama.sequence_logprobs(PARAMS, TOKENS, loss, CFG, attention_mask_BxT=attn)
    with self.assertRaisesRegex(ValueError, "attention_mask_BxT must have the shape of tokens_BxT"):
      llama.sequence_logprobs(PARAMS, TOKENS, loss, CFG, attention_mask_BxT=attn[:, :5])
    with self.assertRaisesRegex(ValueError, "loss_mask_BxT must have the shape of tokens_BxT"):
      llama.sequence_logprobs(PARAMS, TOKENS, loss[:1], CFG)
    with self.assertRaisesRegex(ValueError, "tokens_BxT has ids outside"):
      llama.sequence_logprobs(PARAMS, TOKENS.at[0, 3].set(CFG.vocab_size), loss, CFG)

  def test_under_jit_unscorable_entries_count_zero(self):
    """Traced masks cannot be checked: the entries without a prediction are dropped, as documented."""
    ones = jnp.ones((2, 12), jnp.int32)
    got = jax.jit(lambda lm: llama.sequence_logprobs(PARAMS, TOKENS, lm, CFG))(ones)
    np.testing.assert_allclose(got, llama.sequence_logprobs(PARAMS, TOKENS, ones.at[:, 0].set(0), CFG), atol=1e-6)


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


  def test_apply_and_loss_fn_check_params_against_the_config(self):
    """Params of another shape raise, naming the entries: before, an unrolled 3-layer tree silently ran 3 layers."""
    deeper = llama.init(jax.random.PRNGKey(0), CFG.replace(n_layers=3))
    for fn in (lambda p: llama.apply(p, TOKENS, CFG), lambda p: llama.loss_fn(p, {"tokens": TOKENS}, CFG),
               jax.jit(lambda p: llama.apply(p, TOKENS, CFG))):
      with self.assertRaisesRegex(ValueError, r"(?s)params do not match the config \(n_layers=2.*\['layers'\]"
                                              r"\['wq'\]: shape \(3, 64, 64\), config expects \(2, 64, 64\)"):
        fn(deeper)
    wider_vocab = llama.init(jax.random.PRNGKey(0), CFG.replace(vocab_size=300))
    with self.assertRaisesRegex(ValueError, r"(?s)params do not match.*\['output'\]: shape \(64, 300\).*"
                                            r"\['tok_embeddings'\]: shape \(300, 64\)"):
      llama.apply(wider_vocab, TOKENS, CFG)
    with self.assertRaisesRegex(ValueError, r"(?s)params do not match.*\['norm'\]: shape \(96,\)"):
      llama.loss_fn(llama.init(jax.random.PRNGKey(0), CFG.replace(dim=96)), {"tokens": TOKENS}, CFG)
    # the forms `generate` feeds `apply` pass the same check
    llama.check_params(llama.unstack_layers(llama.split_output_columns(PARAMS, 100)), CFG)
    short = dict(llama.unstack_layers(PARAMS))
    short["layers"] = short["layers"][:1]
    with self.assertRaisesRegex(ValueError, r"\['layers'\]\['w1'\]: shape \(1, 64, 192\)"):
      llama.apply(short, TOKENS, CFG)

  def test_loss_fn_checks_targets_and_mask(self):
    """An out-of-vocabulary id in the last column is a target only: it used to score as a zero one-hot."""
    tokens = np.asarray(TOKENS).copy()
    tokens[1, -1] = CFG.vocab_size
    with self.assertRaisesRegex(ValueError, r"batch\['tokens'\] has ids outside the vocabulary \[0, 256\)"):
      llama.loss_fn(PARAMS, {"tokens": tokens}, CFG)
    with self.assertRaisesRegex(ValueError, r"batch\['mask'\] must have the shape of batch\['tokens'\]"):
      llama.loss_fn(PARAMS, {"tokens": TOKENS, "mask": jnp.ones((2, 11))}, CFG)
    long = jnp.zeros((1, CFG.max_seq_len + 1), jnp.int32)  # T + 1 = max_seq_len + 1 fits: the inputs are T long
    self.assertTrue(np.isfinite(float(llama.loss_fn(PARAMS, {"tokens": long}, CFG)[0])))
    with self.assertRaisesRegex(ValueError, r"batch\['tokens'\] length 130 exceeds the context"):
      llama.loss_fn(PARAMS, {"tokens": jnp.zeros((1, CFG.max_seq_len + 2), jnp.int32)}, CFG)


if __name__ == "__main__":
  absltest.main()
