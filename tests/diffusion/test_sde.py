"""SDE marginals against simulation, DDPM closed form against the iterated chain, bad input."""
from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxml.diffusion as jd

SDES = {"vp": jd.VPSDE(), "subvp": jd.subVPSDE(), "ve": jd.VESDE()}


def simulate_forward(sde, x0, t_end, num_steps, rng):
  """Euler-Maruyama on the forward SDE from t = 0 to t_end."""
  dt = t_end / num_steps

  def step(x, inp):
    i, key = inp
    t = jnp.full((x.shape[0],), i * dt)
    f, g = sde.sde(x, t)
    return x + f * dt + g[:, None] * jnp.sqrt(dt) * jax.random.normal(key, x.shape), None

  keys = jax.random.split(rng, num_steps)
  x, _ = jax.lax.scan(step, x0, (jnp.arange(num_steps), keys))
  return x


class SDETest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("vp", "subvp", "ve")
  def test_marginal_prob_matches_monte_carlo(self, name):
    sde = SDES[name]
    n, x0_val, t_end = 4000, 1.5, 0.4
    x0 = jnp.full((n, 1), x0_val)
    xt = simulate_forward(sde, x0, t_end, 400, jax.random.PRNGKey(0))
    mean, std = self.variant(sde.marginal_prob)(x0[:1], jnp.array([t_end]))
    emp_mean, emp_std = float(xt.mean()), float(xt.std())
    self.assertAlmostEqual(emp_mean, float(mean[0, 0]), delta=4 * float(std[0]) / np.sqrt(n) + 1e-3)
    self.assertAlmostEqual(emp_std / float(std[0]), 1.0, delta=0.05)

  def test_subvp_variance_below_vp(self):
    t = jnp.linspace(0.01, 1.0, 50)
    self.assertTrue(bool(jnp.all(SDES["subvp"].marginal_std(t) <= SDES["vp"].marginal_std(t) + 1e-7)))

  def test_defaults_are_the_papers(self):
    vp, ve = jd.VPSDE(), jd.VESDE()
    self.assertEqual((vp.beta_min, vp.beta_max, vp.N), (0.1, 20.0, 1000))
    self.assertEqual((ve.sigma_min, ve.sigma_max, ve.N), (0.01, 50.0, 1000))

  def test_vp_discretisation_is_ddpm(self):
    sde = jd.VPSDE(N=1000)
    ddpm = jd.DDPMSchedule(1000, sde.beta_min / 1000, sde.beta_max / 1000)
    t = jnp.linspace(0.0, 1.0, 1000)
    _, g_d = sde.discretize(jnp.zeros((1000, 1)), t, 1.0 / 1000)
    np.testing.assert_allclose(g_d**2, ddpm.betas, rtol=1e-4)

  def test_ve_discretisation_telescopes_to_marginal_variance(self):
    sde = jd.VESDE()
    n = 200
    t = jnp.linspace(1.0 / n, 1.0, n)
    _, g_d = sde.discretize(jnp.zeros((n, 1)), t, 1.0 / n)
    np.testing.assert_allclose(jnp.sum(g_d**2), sde.marginal_std(jnp.ones((1,)))[0] ** 2, rtol=1e-4)

  def test_prior_logp_matches_sample_statistics(self):
    for sde in SDES.values():
      z = sde.prior_sample(jax.random.PRNGKey(1), (20000, 2))
      _, std1 = sde.marginal_prob(jnp.zeros((1, 2)), jnp.ones((1,)))
      self.assertAlmostEqual(float(z.std()) / float(std1[0]), 1.0, delta=0.03)
      # log N(0; 0, s^2 I) in 2D is -log(2 pi s^2).
      self.assertAlmostEqual(float(sde.prior_logp(jnp.zeros((1, 2)))[0]),
                             -np.log(2 * np.pi * float(z.var())), delta=0.05)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "unknown SDE name"):
      jd.get_sde("nope")
    with self.assertRaisesRegex(ValueError, "sigma_min"):
      jd.VESDE(sigma_min=-1.0)
    with self.assertRaisesRegex(ValueError, "N must be"):
      jd.VPSDE(N=0)
    for bad in (0.0, 1.5, -0.1, float("nan")):
      with self.assertRaisesRegex(ValueError, "t must lie in"):
        jd.check_time(np.array([0.5, bad]))
      with self.assertRaisesRegex(ValueError, "t must lie in"):
        jd.VPSDE().marginal_prob(jnp.zeros((2, 1)), jnp.array([0.5, bad]))


class DDPMTest(chex.TestCase):

  def test_closed_form_equals_iterated_coefficients(self):
    ddpm = jd.DDPMSchedule()
    m, v = 1.0, 0.0
    for beta in np.asarray(ddpm.betas, np.float64):
      m, v = np.sqrt(1 - beta) * m, (1 - beta) * v + beta
    abar_T = float(ddpm.alpha_bars[-1])
    self.assertAlmostEqual(m, np.sqrt(abar_T), delta=1e-5)
    self.assertAlmostEqual(v, 1 - abar_T, delta=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_closed_form_matches_chain_samples(self):
    ddpm = jd.DDPMSchedule(num_timesteps=200, beta_start=1e-4, beta_end=0.05)
    n, t_stop = 4000, 120
    x0 = jnp.full((n, 1), 2.0)

    def chain(x0, rng):
      def step(x, inp):
        t, key = inp
        return ddpm.q_step(x, jnp.full((n,), t), jax.random.normal(key, x.shape)), None
      keys = jax.random.split(rng, t_stop)
      return jax.lax.scan(step, x0, (jnp.arange(1, t_stop + 1), keys))[0]

    x_chain = self.variant(chain)(x0, jax.random.PRNGKey(0))
    x_closed = ddpm.q_sample(x0, jnp.full((n,), t_stop), jax.random.normal(jax.random.PRNGKey(1), x0.shape))
    self.assertAlmostEqual(float(x_chain.mean()), float(x_closed.mean()), delta=0.06)
    self.assertAlmostEqual(float(x_chain.std()) / float(x_closed.std()), 1.0, delta=0.05)

  def test_posterior_matches_bayes_rule(self):
    ddpm = jd.DDPMSchedule()
    t = jnp.array([1, 10, 500, 1000])
    x0 = jnp.array([[0.3], [-1.0], [2.0], [0.5]])
    xt = jnp.array([[0.1], [0.4], [-0.7], [1.2]])
    mean, var = ddpm.posterior_mean_variance(x0, xt, t)
    betas = np.asarray(ddpm.betas, np.float64)
    abar = np.cumprod(1 - betas)
    for i, ti in enumerate(np.asarray(t)):
      ab_prev = 1.0 if ti == 1 else abar[ti - 2]
      b = betas[ti - 1]
      if ti == 1:  # q(x_0 | x_0) is a point mass: mean x0, variance 0
        exp_mean, exp_var = float(x0[i, 0]), 0.0
      else:
        prec = 1 / (1 - ab_prev) + (1 - b) / b
        exp_var = 1 / prec
        exp_mean = exp_var * (np.sqrt(ab_prev) * float(x0[i, 0]) / (1 - ab_prev) + np.sqrt(1 - b) * float(xt[i, 0]) / b)
      self.assertAlmostEqual(float(mean[i, 0]), exp_mean, delta=1e-4)
      self.assertAlmostEqual(float(var[i]), exp_var, delta=1e-6)

  def test_predict_x0_inverts_q_sample(self):
    ddpm = jd.DDPMSchedule()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    eps = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    t = jnp.arange(1, 9) * 100
    np.testing.assert_allclose(ddpm.predict_x0(ddpm.q_sample(x0, t, eps), t, eps), x0, atol=2e-3)

  def test_bad_schedule(self):
    with self.assertRaisesRegex(ValueError, "num_timesteps"):
      jd.DDPMSchedule(num_timesteps=0)
    with self.assertRaisesRegex(ValueError, "beta_start"):
      jd.DDPMSchedule(beta_start=0.5, beta_end=0.1)


if __name__ == "__main__":
  absltest.main()
