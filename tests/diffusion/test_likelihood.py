"""Probability-flow likelihood against the exact log-density of a diffused Gaussian mixture."""
from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxml.diffusion as jd

MIX = jd.GaussianMixture.create([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], [0.4, 0.3, 0.5], [0.2, 0.5, 0.3])
SDES = {"vp": jd.VPSDE(), "subvp": jd.subVPSDE(), "ve": jd.VESDE()}
SCORES = {k: jd.mixture_score_fn(MIX, v) for k, v in SDES.items()}
EPS = 1e-5


class LikelihoodTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters("vp", "subvp", "ve")
  def test_exact_trace_matches_true_log_density(self, name):
    sde = SDES[name]
    x = MIX.sample(jax.random.PRNGKey(0), 16)
    ll = jd.log_likelihood(jax.random.PRNGKey(1), sde, SCORES[name], x, exact_trace=True, num_steps=100, eps=EPS)
    true = jd.mixture_log_prob(MIX, x, jnp.full((16,), EPS), sde)
    np.testing.assert_allclose(np.asarray(ll), np.asarray(true), atol=0.03)

  def test_hutchinson_is_unbiased_for_exact_trace(self):
    sde, score = SDES["vp"], SCORES["vp"]
    x = MIX.sample(jax.random.PRNGKey(2), 8)
    exact = jd.log_likelihood(jax.random.PRNGKey(0), sde, score, x, exact_trace=True, num_steps=60)
    est = np.mean([np.asarray(jd.log_likelihood(jax.random.PRNGKey(k), sde, score, x, exact_trace=False,
                                                num_steps=60)) for k in range(40)], axis=0)
    np.testing.assert_allclose(est, np.asarray(exact), atol=0.25)

  def test_score_is_gradient_of_log_density(self):
    sde = SDES["subvp"]
    x = MIX.sample(jax.random.PRNGKey(3), 5)
    t = jnp.array([0.01, 0.1, 0.3, 0.6, 1.0])
    grad = jax.grad(lambda y: jnp.sum(jd.mixture_log_prob(MIX, y, t, sde)))(x)
    np.testing.assert_allclose(np.asarray(jd.mixture_score(MIX, x, t, sde)), np.asarray(grad), rtol=1e-4, atol=1e-4)

  def test_bits_per_dim_equals_manual_dequantised_likelihood(self):
    # A 2-pixel "image" with 4 grey levels, modelled by the mixture in [-1, 1]^2 space.
    sde, score = SDES["vp"], SCORES["vp"]
    x_int = jnp.array([[0, 3], [1, 2], [2, 2]])
    rng = jax.random.PRNGKey(7)
    bpd = jd.bits_per_dim(rng, sde, score, x_int, num_levels=4, exact_trace=True, num_steps=40)
    dq_rng, ll_rng = jax.random.split(rng)
    z, log_jac = jd.dequantize(dq_rng, x_int, 4)
    ll = jd.log_likelihood(ll_rng, sde, score, z, exact_trace=True, num_steps=40)
    manual = -(ll + 2 * np.log(0.5)) / (2 * np.log(2.0))
    self.assertAlmostEqual(log_jac, np.log(0.5), places=6)
    np.testing.assert_allclose(np.asarray(bpd), np.asarray(manual), rtol=1e-5)

  def test_bad_input(self):
    sde, score = SDES["vp"], SCORES["vp"]
    rng = jax.random.PRNGKey(0)
    with self.assertRaisesRegex(ValueError, "NaN"):
      jd.log_likelihood(rng, sde, score, jnp.array([[0.0, jnp.nan]]))
    with self.assertRaisesRegex(ValueError, "rank"):
      jd.log_likelihood(rng, sde, score, jnp.zeros((3,)))
    with self.assertRaisesRegex(ValueError, "num_steps"):
      jd.log_likelihood(rng, sde, score, jnp.zeros((3, 2)), num_steps=0)
    with self.assertRaisesRegex(ValueError, "x_int must hold integers"):
      jd.bits_per_dim(rng, sde, score, jnp.array([[0, 9]]), num_levels=4)

  def test_score_output_shape_is_checked(self):
    # A [B, 1] score for [B, 2] data used to give a log-likelihood without an error.
    sde, rng = SDES["vp"], jax.random.PRNGKey(0)
    bad = lambda x, t: -x[:, :1]  # noqa: E731
    msg = r"score_fn\(x, t\) must return x's shape \(3, 2\).*got shape \(3, 1\)"
    for exact in (True, False):
      with self.assertRaisesRegex(ValueError, msg):
        jd.log_likelihood(rng, sde, bad, jnp.zeros((3, 2)), exact_trace=exact, num_steps=4)
    with self.assertRaisesRegex(ValueError, msg):
      jd.bits_per_dim(rng, sde, bad, jnp.array([[0, 3], [1, 2], [2, 2]]), num_levels=4, num_steps=4)
    with self.assertRaisesRegex(TypeError, "score_fn must be callable"):
      jd.log_likelihood(rng, sde, None, jnp.zeros((3, 2)))


if __name__ == "__main__":
  absltest.main()
