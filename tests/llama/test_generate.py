"""Generation: the compiled cache loop against a plain argmax loop, log-probabilities against a full forward pass,
sampling rules, EOS, array prompts, non-finite logits, errors."""
import importlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

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


def naive_penalised_greedy(prompt, n, penalty, penalize_prompt):
  """`naive_greedy` with the CTRL repetition penalty written out on the full forward's logits."""
  toks = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, CFG.max_seq_len), np.int32)
    buf[0, :len(toks)] = toks
    logits = np.asarray(_full_forward(PARAMS, buf)[0, len(toks) - 1], np.float64)
    for t in set(toks if penalize_prompt else toks[len(prompt):]):
      logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    toks.append(int(np.argmax(logits)))
  return toks[len(prompt):]


class GenerateTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.greedy = llama.generate(PARAMS, CFG, PROMPTS, 8)

  def test_greedy_batch_of_different_lengths_equals_full_forward_loop(self):
    for prompt, got in zip(PROMPTS, self.greedy):
      self.assertEqual(got, naive_greedy(prompt, 8))

  def test_repetition_penalty_on_prompt_and_new_tokens_or_new_tokens_only(self):
    """Both forms against the penalty applied by hand in a full-forward loop (prompts of different
    lengths: the longer ones are teacher-forced through the decode loop)."""
    plain = llama.generate(PARAMS, CFG, PROMPTS, 16)
    forms = {}
    for penalize_prompt in (True, False):
      got = llama.generate(PARAMS, CFG, PROMPTS, 16, repetition_penalty=4.0, penalize_prompt=penalize_prompt)
      self.assertEqual(got, [naive_penalised_greedy(p, 16, 4.0, penalize_prompt) for p in PROMPTS])
      self.assertNotEqual(got, plain)  # 16 tokens: unpenalised, this random model repeats some
      forms[penalize_prompt] = got
    self.assertNotEqual(forms[True], forms[False])

  def test_scanned_layers_generate_the_same_tokens(self):
    """The scanned model (stacked cache and weights) decodes exactly as the unrolled one."""
    self.assertEqual(llama.generate(PARAMS, CFG.replace(scan_layers=True), PROMPTS, 8), self.greedy)

  def test_joined_projections_decode_the_same_tokens_and_logprobs(self):
    """`decode_loop(join=True)` (chosen on one CPU thread) against the separate projections."""
    buf = np.zeros((3, 7 + 12), np.int32)
    for i, p in enumerate(PROMPTS):
      buf[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    run = lambda join: llama.decode_loop(PARAMS, jnp.asarray(buf), lengths, jax.random.PRNGKey(0), cfg=CFG,  # noqa: E731
                                         min_prompt_len=2, max_new_tokens=12, join=join)
    (tok_j, logp_j, n_j, bad_j), (tok, logp, n, bad) = run(True), run(False)
    np.testing.assert_array_equal(tok_j, tok)
    np.testing.assert_allclose(logp_j, logp, atol=1e-5)
    np.testing.assert_array_equal(n_j, n)
    np.testing.assert_array_equal(bad_j, bad)
    with mock.patch.object(llama_generate.os, "sched_getaffinity", lambda pid: {0}):
      self.assertTrue(llama_generate._one_cpu_thread())
    with mock.patch.object(llama_generate.os, "sched_getaffinity", lambda pid: {0, 1}):
      self.assertFalse(llama_generate._one_cpu_thread())

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


def _as_array(prompts, fill=0):
  """`[B, max length]` int32 prompts padded with `fill`, and their lengths."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  arr = np.full((len(prompts), lengths.max()), fill, np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  return arr, lengths


def full_forward_logprobs(prompt, new_tokens, temperature):
  """log_softmax(logits / temperature) (plain when 0) of one forward pass over prompt + new, at each new token."""
  seq = np.asarray(list(prompt) + list(new_tokens), np.int32)[None]
  logits = np.asarray(llama.apply(PARAMS, seq, CFG), np.float64)[0, len(prompt) - 1:-1]
  if temperature:
    logits = logits / temperature
  x = logits - logits.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  return logp[np.arange(len(new_tokens)), new_tokens]


class GenerateArraysTest(chex.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.greedy = llama.generate(PARAMS, CFG, PROMPTS, 8)
    cls.prompts, cls.lengths = _as_array(PROMPTS, fill=999)  # padding past the lengths is never read

  def test_greedy_equals_generate(self):
    tokens, logprobs, lengths = llama.generate_arrays(PARAMS, CFG, self.prompts, self.lengths, 8)
    chex.assert_shape((tokens, logprobs, lengths), ((3, 8), (3, 8), (3,)))
    chex.assert_type((tokens, logprobs, lengths), (jnp.int32, jnp.float32, jnp.int32))
    self.assertEqual(np.asarray(tokens).tolist(), self.greedy)
    np.testing.assert_array_equal(lengths, 8)

  @parameterized.named_parameters(("greedy", 0.0, None), ("temperature_0.7", 0.7, None),
                                  ("temperature_0.7_top_k_20", 0.7, 20))
  def test_logprobs_equal_a_full_forward_pass(self, temperature, top_k):
    """Several decode segments; the log-softmax of logits / temperature, untruncated by top_k."""
    with mock.patch.object(llama_generate, "_SEGMENT_MIN_LEN", 5):
      tokens, logprobs, lengths = llama.generate_arrays(PARAMS, CFG, self.prompts, self.lengths, 16,
                                                        temperature=temperature, top_k=top_k,
                                                        rng=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(lengths, 16)
    for i, prompt in enumerate(PROMPTS):
      want = full_forward_logprobs(prompt, np.asarray(tokens[i]), temperature)
      np.testing.assert_allclose(logprobs[i], want, atol=1e-5, err_msg=f"row {i}")
    if temperature:  # really sampled: not the greedy continuation
      self.assertNotEqual(np.asarray(tokens[:, :8]).tolist(), self.greedy)

  def test_eos_stops_a_row_and_zeroes_what_follows(self):
    eos = self.greedy[0][3]  # the 4th greedy token of prompt 0
    tokens, logprobs, lengths = llama.generate_arrays(PARAMS, CFG, self.prompts, self.lengths, 8, eos_id=eos)
    tokens, logprobs, lengths = map(np.asarray, (tokens, logprobs, lengths))
    want_len = [g.index(eos) + 1 if eos in g else 8 for g in self.greedy]
    np.testing.assert_array_equal(lengths, want_len)
    self.assertEqual(want_len[0], 4)
    for i, n in enumerate(want_len):
      self.assertEqual(tokens[i, :n].tolist(), self.greedy[i][:n])  # EOS included
      np.testing.assert_array_equal(tokens[i, n:], eos)
      np.testing.assert_array_equal(logprobs[i, n:], 0.0)
      np.testing.assert_allclose(logprobs[i, :n], full_forward_logprobs(PROMPTS[i], tokens[i, :n], 0.0), atol=1e-5)
      self.assertTrue(np.all(logprobs[i, :n] < 0))
    self.assertEqual(llama.generate(PARAMS, CFG, PROMPTS, 8, eos_id=eos),
                     [tokens[i, :n - (tokens[i, n - 1] == eos)].tolist() for i, n in enumerate(want_len)])

  def test_generate_takes_array_prompts(self):
    """A `[B, P]` NumPy or JAX array (it used to fail on `not prompts`), with or without lengths."""
    full = np.asarray(PROMPTS[0], np.int32)[None].repeat(2, axis=0)
    self.assertEqual(llama.generate(PARAMS, CFG, full, 8), [self.greedy[0]] * 2)
    self.assertEqual(llama.generate(PARAMS, CFG, jnp.asarray(full), 8), [self.greedy[0]] * 2)
    self.assertEqual(llama.generate(PARAMS, CFG, self.prompts, 8, prompt_lengths=self.lengths), self.greedy)
    self.assertEqual(llama.generate(PARAMS, CFG, jnp.asarray(self.prompts), 8,
                                    prompt_lengths=jnp.asarray(self.lengths)), self.greedy)

  def test_non_finite_logits_raise(self):
    """NaN parameters: `generate` used to return the out-of-vocabulary id `vocab_size`."""
    nan = dict(PARAMS, norm=PARAMS["norm"].at[0].set(jnp.nan))
    with self.assertRaisesRegex(FloatingPointError, r"non-finite logits at step 0 of row 0.*params"):
      llama.generate(nan, CFG, PROMPTS, 4)
    self.assertTrue(issubclass(llama.NonFiniteLogitsError, FloatingPointError))
    with self.assertRaises(llama.NonFiniteLogitsError):
      llama.generate(nan, CFG, PROMPTS[1:], 2)
    with self.assertRaisesRegex(FloatingPointError, r"non-finite logits at step 0 of row 0 \(3 of 3 rows"):
      llama.generate_arrays(nan, CFG, self.prompts, self.lengths, 4, temperature=0.7, rng=jax.random.PRNGKey(0))

  def test_argument_errors_name_the_argument(self):
    with self.assertRaisesRegex(ValueError, r"prompt_lengths must be in \[1, 7\]"):
      llama.generate_arrays(PARAMS, CFG, self.prompts, np.array([4, 0, 7]), 2)
    with self.assertRaisesRegex(ValueError, r"prompt_lengths must be \[batch=3\] integers"):
      llama.generate_arrays(PARAMS, CFG, self.prompts, np.array([4, 2]), 2)
    with self.assertRaisesRegex(TypeError, "prompt_tokens_BxP must be an integer array"):
      llama.generate_arrays(PARAMS, CFG, self.prompts.astype(np.float32), self.lengths, 2)
    with self.assertRaisesRegex(ValueError, "prompt_tokens_BxP has ids outside the vocabulary"):
      llama.generate_arrays(PARAMS, CFG, np.array([[1, 999]]), None, 2)
    with self.assertRaisesRegex(ValueError, "eos_id must be an int in"):
      llama.generate_arrays(PARAMS, CFG, self.prompts, self.lengths, 2, eos_id=CFG.vocab_size)
    with self.assertRaisesRegex(ValueError, "max_new_tokens must be a positive int"):
      llama.generate_arrays(PARAMS, CFG, self.prompts, self.lengths, 0)
    with self.assertRaisesRegex(ValueError, "prompt_lengths goes with a"):
      llama.generate(PARAMS, CFG, PROMPTS, 2, prompt_lengths=self.lengths)
    with self.assertRaisesRegex(ValueError, r"prompts must have shape \[batch, prompt_length\]"):
      llama.generate(PARAMS, CFG, np.array([1, 2, 3]), 2)
    for bad in (0.0, -1.0, float("nan")):
      with self.assertRaisesRegex(ValueError, "repetition_penalty must be a finite number > 0"):
        llama.generate_arrays(PARAMS, CFG, self.prompts, self.lengths, 2, repetition_penalty=bad)


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

  def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits(self):
    logits = jnp.array([[2.0, -1.0, 0.5, -3.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(np.asarray(llama.penalize_repeats(logits, seen, 2.0)), [[1.0, -2.0, 0.5, -3.0]])
    np.testing.assert_array_equal(np.asarray(llama.penalize_repeats(logits, seen, 1.0)), np.asarray(logits))

  def test_draw_follows_the_softmax_over_a_wide_vocabulary(self):
    # One uniform per row inverts the running sum: frequencies match softmax(logits) over 4,096 ids,
    # most of them -inf (never drawn, wherever they sit, including the last id).
    V = 4096
    probs = np.zeros(V)
    probs[[0, 7, 1000, 4094]] = [0.1, 0.2, 0.3, 0.4]
    with np.errstate(divide="ignore"):
      log_probs = np.log(probs)  # -inf off the four ids
    logits = jnp.asarray(np.tile(log_probs, (20000, 1)), jnp.float32)
    draws = np.asarray(llama.sample_logits(jax.random.PRNGKey(2), logits, temperature=1.0))
    freq = np.bincount(draws, minlength=V) / draws.size
    self.assertEqual(set(np.flatnonzero(freq)), {0, 7, 1000, 4094})
    np.testing.assert_allclose(freq[[0, 7, 1000, 4094]], [0.1, 0.2, 0.3, 0.4], atol=0.015)


if __name__ == "__main__":
  absltest.main()
