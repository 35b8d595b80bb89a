"""Generation: the compiled cache loop against a plain argmax loop, sampling rules, EOS, errors."""
import importlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import llama

llama_generate = importlib.import_module("jaxml.llama.generate")  # the module (the package exports the function)


CFG = llama.preset("tiny").replace(max_seq_len=32)
PARAMS = llama.init(jax.random.PRNGKey(0), CFG)
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8]]


_full_forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))


def naive_greedy(prompt, n):
  """Recomputes the full forward pass for every new token (no cache).

  The sequence is right-padded to the context length so one compiled forward
  serves every step; causality makes the padding invisible to position len-1.
  """
  toks = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, CFG.max_seq_len), np.int32)
    buf[0, :len(toks)] = toks
    logits = _full_forward(PARAMS, buf)
    toks.append(int(jnp.argmax(logits[0, len(toks) - 1])))
  return toks[len(prompt):]


class GenerateTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.greedy = llama.generate(PARAMS, CFG, PROMPTS, 8)

  def test_greedy_batch_of_different_lengths_equals_full_forward_loop(self):
    for prompt, got in zip(PROMPTS, self.greedy):
      self.assertEqual(got, naive_greedy(prompt, 8))

  def test_scanned_layers_generate_the_same_tokens(self):
    """The scanned model (stacked cache and weights) decodes exactly as the unrolled one."""
    self.assertEqual(llama.generate(PARAMS, CFG.replace(scan_layers=True), PROMPTS, 8), self.greedy)

  def test_segmented_decode_loop_equals_full_forward_loop(self):
    """Several decode segments (each with its own cache prefix), teacher forcing across their borders."""
    ends = llama_generate._segment_ends(2, 24, 4, 5)
    self.assertEqual(ends, [7, 13, 18, 24])
    self.assertEqual(llama_generate._segment_ends(8, 40, 4, 32), [40])
    with mock.patch.object(llama_generate, "_SEGMENT_MIN_LEN", 5):
      for scan_layers in (False, True):
        got = llama.generate(PARAMS, CFG.replace(scan_layers=scan_layers), PROMPTS[1:], 16)
        for prompt, tokens in zip(PROMPTS[1:], got):
          self.assertEqual(tokens, naive_greedy(prompt, 16))

  def test_greedy_token_is_first_argmax(self):
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [3.0, -1.0, 3.0, 3.0], [-5.0, -4.0, -6.0, -4.0]])
    np.testing.assert_array_equal(llama.greedy_token(logits), [1, 0, 1])
    rand = jax.random.normal(jax.random.PRNGKey(3), (16, 1000))
    np.testing.assert_array_equal(llama.greedy_token(rand), jnp.argmax(rand, axis=-1))

  def test_eos_stops_and_is_excluded(self):
    eos = self.greedy[0][3]  # the 4th greedy token of prompt 0 becomes EOS
    out = llama.generate(PARAMS, CFG, PROMPTS[:1], 8, eos_id=eos)
    first = self.greedy[0].index(eos)
    self.assertEqual(out[0], self.greedy[0][:first])

  def test_top_k_one_is_greedy_and_sampling_is_deterministic_per_key(self):
    k1 = llama.generate(PARAMS, CFG, PROMPTS, 8, temperature=1.0, top_k=1, rng=jax.random.PRNGKey(7))
    self.assertEqual(k1, self.greedy)
    a = llama.generate(PARAMS, CFG, PROMPTS, 8, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(1))
    b = llama.generate(PARAMS, CFG, PROMPTS, 8, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(1))
    c = llama.generate(PARAMS, CFG, PROMPTS, 8, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(2))
    self.assertEqual(a, b)
    self.assertNotEqual(a, c)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "longer than the context"):
      llama.generate(PARAMS, CFG, [[1] * 40], 1)
    with self.assertRaisesRegex(ValueError, "exceeds max_seq_len"):
      llama.generate(PARAMS, CFG, [[1] * 30], 5)
    with self.assertRaisesRegex(ValueError, "outside the vocabulary"):
      llama.generate(PARAMS, CFG, [[1, 999]], 2)
    with self.assertRaisesRegex(ValueError, "rng"):
      llama.generate(PARAMS, CFG, [[1]], 2, temperature=0.7)
    with self.assertRaisesRegex(ValueError, "non-empty"):
      llama.generate(PARAMS, CFG, [[]], 2)


class SampleLogitsTest(chex.TestCase):

  def test_top_p_keeps_the_nucleus_and_renormalises(self):
    # probs [0.5, 0.3, 0.15, 0.05], top_p 0.7: cumsum - p = [0, .5, .8, .95] -> keep {0, 1},
    # renormalised to [0.625, 0.375].
    probs = np.array([0.3, 0.05, 0.5, 0.15])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
    draws = np.asarray(llama.sample_logits(jax.random.PRNGKey(0), logits, temperature=1.0, top_p=0.7))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_array_equal(freq[[1, 3]], 0.0)
    np.testing.assert_allclose(freq[[2, 0]], [0.625, 0.375], atol=0.015)

  def test_top_k_and_temperature(self):
    logits = jnp.log(jnp.asarray(np.tile([0.1, 0.2, 0.3, 0.4], (20000, 1)), jnp.float32))
    draws = np.asarray(llama.sample_logits(jax.random.PRNGKey(1), logits, temperature=0.5, top_k=2))
    freq = np.bincount(draws, minlength=4) / draws.size
    # temperature 0.5 squares the probabilities: 0.09 / (0.09 + 0.16), 0.16 / 0.25.
    np.testing.assert_array_equal(freq[:2], 0.0)
    np.testing.assert_allclose(freq[2:], [0.36, 0.64], atol=0.015)
    self.assertEqual(np.asarray(llama.sample_logits(None, logits[:3])).tolist(), [3, 3, 3])


if __name__ == "__main__":
  absltest.main()
