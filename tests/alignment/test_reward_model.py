"""The reward model: scored at the last masked token whatever the padding, trained through jaxml.train."""
import os
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import alignment, llama
from jaxml import train as jt

CFG = llama.LlamaConfig(vocab_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16)
EOS = 2


class RewardModelTest(chex.TestCase):

  def setUp(self):
    self.params = alignment.reward_model_init(jax.random.PRNGKey(0), CFG)

  def test_score_ignores_padding_even_when_pad_equals_eos(self):
    seq = np.asarray([[1, 5, 7, 9, EOS]], np.int32)                 # a response that ends with EOS
    alone = alignment.reward_model_apply(self.params, seq, np.ones_like(seq), CFG)
    # Right padding with pad id == EOS: "the last non-pad token" would be 9, the mask says EOS.
    right = np.asarray([[1, 5, 7, 9, EOS, EOS, EOS]], np.int32)
    right_mask = np.asarray([[1, 1, 1, 1, 1, 0, 0]], np.int32)
    left = np.asarray([[EOS, EOS, 1, 5, 7, 9, EOS]], np.int32)
    left_mask = np.asarray([[0, 0, 1, 1, 1, 1, 1]], np.int32)
    r_right = alignment.reward_model_apply(self.params, right, right_mask, CFG)
    r_left = alignment.reward_model_apply(self.params, left, left_mask, CFG)
    np.testing.assert_allclose(r_right, alone, atol=2e-6)
    np.testing.assert_allclose(r_left, alone, atol=2e-6)
    # Reading at the last non-EOS token instead gives a different number.
    wrong = alignment.reward_model_apply(self.params, seq[:, :4], np.ones((1, 4), np.int32), CFG)
    self.assertGreater(float(jnp.abs(wrong - alone)[0]), 1e-4)

  def test_jit_equals_eager_and_batch_rows_are_independent(self):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (3, 6)).astype(np.int32)
    mask = np.asarray([[1] * 6, [1] * 4 + [0] * 2, [0, 1, 1, 1, 1, 1]], np.int32)
    eager = alignment.reward_model_apply(self.params, tokens, mask, CFG)
    jitted = jax.jit(alignment.reward_model_apply, static_argnums=3)(self.params, tokens, mask, CFG)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    one = alignment.reward_model_apply(self.params, tokens[1:2, :4], mask[1:2, :4], CFG)
    np.testing.assert_allclose(eager[1], one[0], atol=2e-6)

  def test_bad_input_names_the_argument(self):
    tokens = np.ones((2, 4), np.int32)
    with self.assertRaisesRegex(ValueError, r"mask_BxT has no real token in row\(s\) \[1\]"):
      alignment.reward_model_apply(self.params, tokens, np.asarray([[1, 1, 0, 0], [0, 0, 0, 0]]), CFG)
    with self.assertRaisesRegex(ValueError, "tokens_BxT and mask_BxT"):
      alignment.reward_model_apply(self.params, tokens, np.ones((2, 5)), CFG)
    with self.assertRaisesRegex(ValueError, r"params\['score'\]"):
      alignment.reward_model_apply({k: v for k, v in self.params.items() if k != "score"}, tokens,
                                   np.ones((2, 4)), CFG)

  def test_trains_through_the_core_to_prefer_the_rewarded_token(self):
    # True preference: responses holding more 7s win. A few hundred steps learn it.
    rng = np.random.default_rng(1)

    def batch_fn(step):
      r = np.random.default_rng([3, step])
      a = r.integers(3, CFG.vocab_size, (16, 6)).astype(np.int32)
      b = r.integers(3, CFG.vocab_size, (16, 6)).astype(np.int32)
      a[:, 2] = 7
      keep_a = (a == 7).sum(1) >= (b == 7).sum(1)
      chosen, rejected = np.where(keep_a[:, None], a, b), np.where(keep_a[:, None], b, a)
      ones = np.ones_like(chosen)
      return {"chosen": chosen, "chosen_mask": ones, "rejected": rejected, "rejected_mask": ones}

    del rng
    tx, _ = jt.make_optimizer(3e-3, total_steps=60, kind="adam", schedule="constant", clip_norm=1.0)
    loss = lambda p, b, r: alignment.reward_model_loss(p, b, r, cfg=CFG)  # noqa: E731
    step = jax.jit(jt.make_train_step(loss, tx), donate_argnums=0)
    state = jt.create_train_state(alignment.reward_model_init(jax.random.PRNGKey(0), CFG), tx, jax.random.PRNGKey(1))
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    result = jt.train(step, state, batch_fn, num_steps=60, workdir=workdir, log_every=20, tensorboard=False,
                      plot=False, print_fn=lambda s: None)
    first, last = result.history[0], result.history[-1]
    self.assertLess(last["loss"], first["loss"])
    self.assertGreater(last["accuracy"], 0.8)
    self.assertTrue(os.path.exists(os.path.join(workdir, "metrics.jsonl")))


if __name__ == "__main__":
  absltest.main()
