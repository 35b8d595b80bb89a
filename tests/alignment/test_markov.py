"""The Markov task's exact maths: soft value iteration equals brute-force enumeration; the frontier is concave and
increasing; Bradley-Terry labels and the Bayes accuracy match their formulas by Monte Carlo."""
import jax
import numpy as np
from absl.testing import absltest, parameterized

from jaxml.alignment import markov

K, L = 3, 4                                   # vocab 3 + EOS, responses of at most 4 tokens
LANG = markov.make_language(3, K, L, eos_prob=0.3, concentration=0.7, start_eos_prob=0.1)
F = np.asarray([1.0, -0.5, 0.25, 0.1])        # f(token), EOS last
TOKENS, LENGTHS = markov.enumerate_sequences(K, L)
LOGP = markov.sequence_logprobs(LANG, TOKENS, LENGTHS)
R = markov.token_rewards(F, TOKENS, LENGTHS)


def policy_sequence_logprobs(log_pi_LxSxA, tokens, lengths):
  """log pi(y) = sum_t log pi*_t(y_t | y_{t-1}) under a position-dependent chain."""
  prev = np.concatenate([np.full((tokens.shape[0], 1), K), tokens[:, :-1]], axis=1)
  t = np.broadcast_to(np.arange(L), tokens.shape)
  lp = log_pi_LxSxA[t, prev, tokens]
  return np.where(np.arange(L)[None, :] < lengths[:, None], lp, 0.0).sum(1)


class EnumerationTest(absltest.TestCase):

  def test_the_support_is_every_response_once_and_has_mass_one(self):
    self.assertEqual(len(TOKENS), 1 + 3 + 9 + 27 + 81)
    self.assertEqual(markov.num_sequences(K, L), len(TOKENS))
    keys = {tuple(r[:n]) for r, n in zip(TOKENS, LENGTHS)}
    self.assertLen(keys, len(TOKENS))
    np.testing.assert_allclose(np.exp(LOGP).sum(), 1.0, atol=1e-12)
    # Rewards by hand for two responses: [0, EOS] and [2, 1, 0, 0] (truncated, no EOS).
    i = [j for j, (r, n) in enumerate(zip(TOKENS, LENGTHS)) if tuple(r[:n]) == (0, K)][0]
    j = [j for j, (r, n) in enumerate(zip(TOKENS, LENGTHS)) if tuple(r[:n]) == (2, 1, 0, 0)][0]
    self.assertAlmostEqual(R[i], 1.0 + 0.1)
    self.assertAlmostEqual(R[j], 0.25 - 0.5 + 1.0 + 1.0)

  def test_sampling_frequencies_match_the_exact_probabilities(self):
    n = 40000
    toks, lens = markov.sample(LANG, jax.random.PRNGKey(0), n)
    toks, lens = np.asarray(toks), np.asarray(lens)
    index = {tuple(r[:m]): i for i, (r, m) in enumerate(zip(TOKENS, LENGTHS))}
    counts = np.bincount([index[tuple(r[:m])] for r, m in zip(toks, lens)], minlength=len(TOKENS))
    p = np.exp(LOGP)
    se = np.sqrt(p * (1 - p) / n)
    self.assertLess(np.max(np.abs(counts / n - p) / np.maximum(se, 1e-4)), 4.5)
    # After EOS the tokens are EOS; lengths count the EOS.
    self.assertTrue(np.all(toks[np.arange(L)[None, :] >= lens[:, None]] == K))


class OptimumTest(parameterized.TestCase):

  @parameterized.parameters(0.2, 1.0, 4.0)
  def test_backward_recursion_equals_brute_force(self, beta):
    values, log_pi = markov.soft_value_iteration(LANG, F, beta)
    brute = markov.tilt(LOGP, R, beta)                               # pi_ref exp(r / beta) / Z over all sequences
    np.testing.assert_allclose(policy_sequence_logprobs(log_pi, TOKENS, LENGTHS), brute, atol=1e-10)
    opt = markov.markov_optimum(LANG, F, beta)
    reward, kl = markov.reward_and_kl(brute, LOGP, R)
    self.assertAlmostEqual(opt["reward"], reward, places=10)
    self.assertAlmostEqual(opt["kl"], kl, places=10)
    # V_0(start) = beta log Z = E[r] - beta KL.
    log_z = np.log(np.sum(np.exp(LOGP + R / beta)))
    self.assertAlmostEqual(opt["value"], beta * log_z, places=10)
    self.assertAlmostEqual(opt["value"], reward - beta * kl, places=10)

  def test_the_optimum_beats_every_other_policy_at_its_own_objective(self):
    beta = 0.7
    star = markov.tilt(LOGP, R, beta)
    r_star, kl_star = markov.reward_and_kl(star, LOGP, R)
    rng = np.random.default_rng(0)
    for _ in range(20):
      other = star + rng.normal(0, 0.5, star.shape)
      r_o, kl_o = markov.reward_and_kl(other, LOGP, R)
      self.assertLess(r_o - beta * kl_o, r_star - beta * kl_star)

  def test_frontier_is_increasing_and_concave_in_kl(self):
    betas = np.geomspace(0.05, 50.0, 40)[::-1]                    # KL grows along this order
    rewards, kls = markov.markov_frontier(LANG, F, betas)
    self.assertTrue(np.all(np.diff(kls) > 0))
    self.assertTrue(np.all(np.diff(rewards) > 0))
    slopes = np.diff(rewards) / np.diff(kls)
    self.assertTrue(np.all(np.diff(slopes) < 0))
    # The slope dR/dKL is beta: each chord's slope lies between its two end points' betas.
    self.assertTrue(np.all((slopes <= betas[:-1] + 1e-9) & (slopes >= betas[1:] - 1e-9)))
    # The enumerated frontier for the same reference is the same curve.
    r2, k2 = markov.frontier(LOGP, R, betas)
    np.testing.assert_allclose(r2, rewards, atol=1e-10)
    np.testing.assert_allclose(k2, kls, atol=1e-10)

  def test_frontier_reward_at_a_kl_inverts_the_curve(self):
    stats = lambda b: markov.reward_and_kl(markov.tilt(LOGP, R, b), LOGP, R)  # noqa: E731
    for beta in (0.3, 2.0):
      reward, kl = stats(beta)
      self.assertAlmostEqual(markov.frontier_reward_at(kl, stats), reward, places=6)
    reward0, _ = markov.reward_and_kl(LOGP, LOGP, R)
    self.assertAlmostEqual(markov.frontier_reward_at(0.0, stats), reward0, places=4)
    self.assertAlmostEqual(markov.frontier_reward_at(1e3, stats), R.max(), places=4)

  def test_monte_carlo_estimates_cover_the_exact_values(self):
    beta = 0.5
    star = markov.tilt(LOGP, R, beta)
    reward, kl = markov.reward_and_kl(star, LOGP, R)
    idx = np.random.default_rng(1).choice(len(R), size=20000, p=np.exp(star))
    mc = markov.monte_carlo_reward_kl(R[idx], star[idx], LOGP[idx])
    self.assertLess(abs(mc["reward"] - reward), 4 * mc["reward_se"])
    self.assertLess(abs(mc["kl"] - kl), 4 * mc["kl_se"])
    self.assertGreater(mc["kl_se"], 0.0)

  def test_bad_input(self):
    for beta in (0.0, -1.0, float("nan")):
      with self.assertRaisesRegex(ValueError, "beta"):
        markov.soft_value_iteration(LANG, F, beta)
      with self.assertRaisesRegex(ValueError, "beta"):
        markov.tilt(LOGP, R, beta)
    with self.assertRaisesRegex(ValueError, "token_rewards_V"):
      markov.markov_optimum(LANG, F[:3], 1.0)
    with self.assertRaisesRegex(ValueError, "trans"):
      markov.MarkovLanguage(np.ones((3, 3)), 2)
    with self.assertRaisesRegex(ValueError, "logp_S"):
      markov.reward_and_kl(LOGP[:3], LOGP, R)


class PreferenceTest(absltest.TestCase):

  def test_bradley_terry_frequencies_are_the_sigmoid_of_reward_differences(self):
    n = 40000
    for gap, scale in ((0.0, 1.0), (1.0, 1.0), (-2.0, 1.0), (1.0, 0.5)):
      first = markov.bradley_terry_labels(np.random.default_rng(7), np.full(n, gap), np.zeros(n), scale=scale)
      p = 1.0 / (1.0 + np.exp(-gap / scale))
      self.assertLess(abs(first.mean() - p), 4.5 * np.sqrt(p * (1 - p) / n))
    with self.assertRaisesRegex(ValueError, "scale"):
      markov.bradley_terry_labels(np.random.default_rng(0), np.zeros(2), np.zeros(2), scale=0.0)
    with self.assertRaisesRegex(ValueError, "r2_N"):
      markov.bradley_terry_labels(np.random.default_rng(0), np.zeros(2), np.zeros(3))

  def test_bayes_accuracy_formula_matches_monte_carlo(self):
    p = np.exp(LOGP)
    exact = markov.bayes_accuracy(p, R)
    rng = np.random.default_rng(3)
    n = 40000
    i, j = rng.choice(len(R), size=n, p=p), rng.choice(len(R), size=n, p=p)
    first = markov.bradley_terry_labels(rng, R[i], R[j])
    guess = np.where(R[i] == R[j], rng.random(n) < 0.5, R[i] > R[j])      # the Bayes classifier
    acc = np.mean(guess == first)
    self.assertLess(abs(acc - exact), 4.5 * np.sqrt(exact * (1 - exact) / n))
    # The exact expected accuracy of a scorer: the true reward as the scorer is the Bayes classifier.
    self.assertAlmostEqual(markov.expected_accuracy(p, R, R), exact, places=10)
    # Any other scorer does worse: a noisy reward.
    noisy = R + np.random.default_rng(4).normal(0, 1.0, R.shape)
    self.assertLess(markov.expected_accuracy(p, R, noisy), exact)
    # A constant scorer is a coin.
    self.assertAlmostEqual(markov.expected_accuracy(p, R, np.zeros_like(R)), 0.5, places=10)


if __name__ == "__main__":
  absltest.main()
