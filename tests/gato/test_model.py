"""Gato policy: parameter counts, patch embedding, position bins, causality, the masked loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import gato
from jaxml.gato import model
from jaxml.gato import sequence as sq
from jaxml.llama import model as llama

LAYOUT = gato.TokenLayout(text_vocab=256, discrete_vocab=16)
CFG = model.preset("tiny", vocab_size=LAYOUT.vocab_size)
CATCH = sq.TaskSpec.create("catch", {"board": sq.Field("image", (10, 5))}, sq.Field("discrete", (), num_values=3))
CART = sq.TaskSpec.create("cart", sq.Field("continuous", (4,)), sq.Field("discrete", (), num_values=2))


@functools.lru_cache(maxsize=None)
def params():
  return model.init(jax.random.PRNGKey(0), CFG)


@functools.lru_cache(maxsize=None)
def batch():
  """Two rows: a Catch episode (patches) and a CartPole episode then text, padded to 40."""
  rng = np.random.default_rng(0)
  catch = sq.episode_tokens(CATCH, LAYOUT, {"board": rng.integers(0, 2, (5, 10, 5))}, rng.integers(0, 3, 5),
                            patch_size=5, channels=1)
  cart = sq.episode_tokens(CART, LAYOUT, rng.normal(size=(4, 4)).astype(np.float32), rng.integers(0, 2, 4),
                           patch_size=5, channels=1)
  text = sq.text_tokens(rng.integers(0, 256, 10), LAYOUT, CFG.patch_dim)
  rows = [sq.pad_to(catch, 40), sq.pad_to(sq.concat([cart, text]), 40)]
  return jax.tree.map(jnp.asarray, sq.stack(rows))


class ShapesTest(absltest.TestCase):

  def test_param_count_equals_the_arrays(self):
    self.assertEqual(model.param_count(CFG), sum(x.size for x in jax.tree.leaves(params())))
    untied = CFG.replace(tie_embeddings=False)
    shapes = jax.eval_shape(functools.partial(model.init, cfg=untied), jax.random.PRNGKey(0))
    self.assertEqual(model.param_count(untied), sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)))

  def test_paper_sizes(self):
    # The paper's table (Reed et al. 2022, Table C.1) does not follow from its own shapes exactly
    # (24 x 12 x 2048^2 = 1.21B matrix weights alone for "1.18B"), and gives no vocabulary or patch
    # embedding breakdown: the presets (paper shapes, TokenLayout()'s 34,049 ids, tied table, the
    # 16x16x3 patch ResNet block) are within 15% of each published total, and ordered as they are.
    counts = {}
    for name, published in model.PAPER_PARAMS.items():
      cfg = model.PRESETS[name]
      self.assertEqual(cfg.vocab_size, gato.TokenLayout().vocab_size)
      shapes = jax.eval_shape(functools.partial(model.init, cfg=cfg), jax.random.PRNGKey(0))
      counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
      self.assertEqual(counts[name], model.param_count(cfg))
      self.assertLess(abs(counts[name] / published - 1), 0.15, name)
    self.assertLess(counts["79m"], counts["364m"])
    self.assertLess(counts["364m"], counts["1.18b"])

  def test_patch_embedding_shapes(self):
    p = params()
    out = model.patch_embedding(p, jnp.ones((7, CFG.patch_dim)), CFG)
    self.assertEqual(out.shape, (7, CFG.dim))
    with self.assertRaisesRegex(ValueError, "patches_NxP must be"):
      model.patch_embedding(p, jnp.ones((7, CFG.patch_dim + 1)), CFG)

  def test_position_bins(self):
    iv = jnp.array([[0, 64], [64, 128], [10, 11], [3, 7]])
    np.testing.assert_array_equal(model.position_bins(iv, None), np.round((np.array([0, 64, 10, 3])
                                                                            + np.array([64, 128, 11, 7]) - 1) / 2))
    draws = np.stack([model.position_bins(iv, jax.random.PRNGKey(i)) for i in range(200)])
    np.testing.assert_array_equal(draws.min(0), [0, 64, 10, 3])
    np.testing.assert_array_equal(draws.max(0), [63, 127, 10, 6])


class BreakoutPatchTest(absltest.TestCase):

  def test_minatar_board_goes_through_the_patch_embedding(self):
    # Breakout-MinAtar as the study declares it: a 10 x 10 x 4 board, 5 x 5 patches of 4 channels -> 4 patch
    # tokens, then the separator and the action: 6 tokens per timestep.
    import gymnax
    from jaxml.gato import experiment as gx
    env, env_params = gymnax.make("Breakout-MinAtar")
    spec = gx._spec("Breakout-MinAtar", env, env_params)
    self.assertEqual(sq.observation_len(spec, 5), 4)
    self.assertEqual(sq.timestep_len(spec, 5), 6)
    cfg = CFG.replace(image_channels=gx._image_channels([spec, CATCH]), n_layers=1)
    self.assertEqual(cfg.patch_dim, 5 * 5 * 4)
    obs, _ = env.reset(jax.random.PRNGKey(0), env_params)
    boards = np.stack([np.asarray(obs)] * 3)
    ep = sq.episode_tokens(spec, LAYOUT, boards, np.array([0, 1, 2]), patch_size=5, channels=cfg.image_channels)
    self.assertEqual(ep.length, 3 * 6)
    np.testing.assert_array_equal(ep.is_patch, np.tile([True] * 4 + [False] * 2, 3))
    p = model.init(jax.random.PRNGKey(1), cfg)
    x = np.asarray(model.embed(p, jax.tree.map(lambda a: jnp.asarray(a)[None], ep), cfg))[0]
    # A patch position's input: the ResNet block of its pixels plus its row and column bins (evaluation:
    # the interval's rounded mean) plus its local position; patches row-major (rows [0, 64) then [64, 128)).
    pe = np.asarray(model.patch_embedding(p, jnp.asarray(ep.patches[:4]), cfg))
    mid = lambda lo, hi: int(np.round((lo + hi - 1) / 2))   # noqa: E731
    rows, cols, loc = (np.asarray(p[k]) for k in ("row_pos", "col_pos", "local_pos"))
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
      want = pe[i] + rows[mid(64 * r, 64 * r + 64)] + cols[mid(64 * c, 64 * c + 64)] + loc[i]
      np.testing.assert_allclose(x[i], want, rtol=1e-5, atol=1e-6)
    # The paddle (channel 0, bottom row, column 4) lies in the lower-left patch, pixel (4, 4).
    lower_left = ep.patches[2].reshape(5, 5, 4)
    self.assertGreater(lower_left[4, 4, 0], 0)
    self.assertFalse((ep.patches[:2].reshape(2, 5, 5, 4)[..., 0] > 0).any())


class ForwardTest(absltest.TestCase):

  def test_causal(self):
    b = batch()
    logits = model.apply(params(), b, CFG)
    j = 17
    changed = b._replace(ids=b.ids.at[:, j].set(3), patches=b.patches.at[:, j].add(1.0))
    logits2 = model.apply(params(), changed, CFG)
    np.testing.assert_array_equal(np.asarray(logits[:, :j]), np.asarray(logits2[:, :j]))
    self.assertGreater(float(jnp.abs(logits[:, j:] - logits2[:, j:]).max()), 1e-4)

  def test_tied_head_and_decoder_reuse(self):
    p, b = params(), batch()
    h = llama.decoder(p["decoder"], model.embed(p, b, CFG), CFG.llama())
    want = np.einsum("btd,vd->btv", np.asarray(h), np.asarray(p["decoder"]["tok_embeddings"]))
    np.testing.assert_allclose(np.asarray(model.apply(p, b, CFG)), want, rtol=1e-4, atol=1e-5)

  def test_masked_loss_is_the_mean_over_text_and_action_targets(self):
    p, b = params(), batch()
    loss, metrics = model.loss_fn(p, b, CFG)
    logp = jax.nn.log_softmax(np.asarray(model.apply(p, b, CFG), np.float64), -1)[:, :-1]
    targets, mask = np.asarray(b.ids)[:, 1:], np.asarray(b.loss_mask)[:, 1:]
    nll = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
    self.assertEqual(int(metrics["tokens"]), 5 + 4 + 10)    # 5 + 4 actions, 10 text tokens
    np.testing.assert_allclose(float(loss), nll[mask].mean(), rtol=1e-5)

  def test_training_bins_sampled_evaluation_bins_fixed(self):
    p, b = params(), batch()
    a = model.apply(p, b, CFG, rng=jax.random.PRNGKey(1))
    c = model.apply(p, b, CFG, rng=jax.random.PRNGKey(2))
    e1, e2 = model.apply(p, b, CFG), model.apply(p, b, CFG)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    self.assertGreater(float(jnp.abs(a[0] - c[0]).max()), 1e-5)    # row 0 has patches
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(c[1]), atol=0)   # row 1 has none

  def test_bad_tokens(self):
    b = batch()
    with self.assertRaisesRegex(ValueError, "tokens.patches has shape"):
      model.apply(params(), b._replace(patches=b.patches[..., :3]), CFG)
    with self.assertRaisesRegex(ValueError, "tokens.local_pos reaches"):
      model.apply(params(), b._replace(local_pos=b.local_pos.at[0, 0].set(CFG.max_local)), CFG)


if __name__ == "__main__":
  absltest.main()
