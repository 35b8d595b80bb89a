"""DSM is minimised by the true score; DDPM L_simple by the true noise predictor; training on the core lowers them."""
import functools
import tempfile

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import train as jt
import jaxml.diffusion as jd

MIX = jd.GaussianMixture.create([[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.2], [0.4, 0.6])


class DSMTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(name=("vp", "ve"), likelihood_weighting=(False, True))
  def test_true_score_minimises_dsm(self, name, likelihood_weighting):
    sde = jd.get_sde(name)
    true = jd.mixture_score_fn(MIX, sde)
    x0 = MIX.sample(jax.random.PRNGKey(0), 20000)
    rng = jax.random.PRNGKey(1)

    def loss(scale, shift):
      def score(x, t):
        return scale * true(x, t) + shift * jnp.tanh(x) / sde.marginal_std(t)[:, None]
      return jd.dsm_loss(rng, sde, score, x0, likelihood_weighting=likelihood_weighting)

    loss = self.variant(loss)
    at_true = float(loss(1.0, 0.0))
    for scale, shift in ((0.9, 0.0), (1.1, 0.0), (1.0, 0.1), (1.0, -0.1)):
      self.assertLess(at_true, float(loss(scale, shift)), msg=f"perturbation scale={scale} shift={shift}")

  def test_ddpm_eps_loss_minimised_by_posterior_noise(self):
    # Data N(0, I) stays N(0, I) along the chain, so E[eps | x_t] = sqrt(1 - abar_t) x_t.
    ddpm = jd.DDPMSchedule()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (20000, 2))
    rng = jax.random.PRNGKey(1)
    optimal = lambda x, t: jnp.sqrt(1.0 - ddpm.alpha_bars[t - 1])[:, None] * x  # noqa: E731
    zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    scaled = lambda x, t: 0.8 * optimal(x, t)  # noqa: E731
    l_opt = float(jd.ddpm_eps_loss(rng, ddpm, optimal, x0))
    self.assertLess(l_opt, float(jd.ddpm_eps_loss(rng, ddpm, zero, x0)))
    self.assertLess(l_opt, float(jd.ddpm_eps_loss(rng, ddpm, scaled, x0)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_score_output_shape_is_checked(self):
    # A [B, 1] output for [B, 2] data used to broadcast into a finite loss without an error.
    sde, x0 = jd.VPSDE(), MIX.sample(jax.random.PRNGKey(0), 16)
    bad = lambda x, t: -x[:, :1]  # noqa: E731
    dsm = self.variant(lambda x: jd.dsm_loss(jax.random.PRNGKey(1), sde, bad, x))
    with self.assertRaisesRegex(ValueError, r"score_fn\(x, t\) must return x's shape \(16, 2\).*\(16, 1\)"):
      dsm(x0)
    ddpm = self.variant(lambda x: jd.ddpm_eps_loss(jax.random.PRNGKey(1), jd.DDPMSchedule(), bad, x))
    with self.assertRaisesRegex(ValueError, r"eps_fn\(x, t\) must return x's shape \(16, 2\).*\(16, 1\)"):
      ddpm(x0)
    with self.assertRaisesRegex(TypeError, r"score_fn\(x, t\) must return a floating array"):
      jd.dsm_loss(jax.random.PRNGKey(1), sde, lambda x, t: jnp.zeros(x.shape, jnp.int32), x0)

class TrainingTest(chex.TestCase):

  def test_mlp_dsm_training_lowers_loss(self):
    # The experiment's recipe on the core: data drawn inside the step from its key, 100 steps per call.
    sde = jd.VPSDE()
    cfg = jd.ScoreMLPConfig(data_dim=2, hidden=32, depth=2)
    apply = lambda p, x, t: jd.mlp_apply(p, x, t, cfg)  # noqa: E731

    def loss_fn(params, batch, rng):
      b_rng, l_rng = jax.random.split(rng)
      return jd.dsm_loss(l_rng, sde, functools.partial(jd.precondition, sde, apply, params), MIX.sample(b_rng, 128)), {}

    tx = optax.adam(3e-3)
    step = jax.jit(jt.make_train_step(loss_fn, tx, ema_decay=0.999, ema_warmup=True, steps_per_call=100))
    state = jt.create_train_state(jd.mlp_init(jax.random.PRNGKey(0), cfg), tx, jax.random.PRNGKey(1), ema=True)
    losses = []
    for _ in range(3):
      state, metrics = step(state, None)
      losses.append(np.asarray(metrics["loss"]))
    losses = np.concatenate(losses)
    self.assertEqual(losses.shape, (300,))
    self.assertLess(losses[-100:].mean(), 0.9 * losses[:20].mean())
    self.assertEqual(int(state.step), 300)

  def test_ema_keeps_the_old_trainers_warm_up(self):
    # ema_t = d_t ema_{t-1} + (1 - d_t) params_t with d_t = min(0.999, (1 + t) / (10 + t)), t = updates before.
    tx = optax.sgd(0.1)
    loss_fn = lambda p, b, r: (jnp.sum((p["w"] - 3.0) ** 2), {})  # noqa: E731
    step = jax.jit(jt.make_train_step(loss_fn, tx, ema_decay=0.999, ema_warmup=True))
    state = jt.create_train_state({"w": jnp.zeros(2)}, tx, jax.random.PRNGKey(0), ema=True)
    ema = np.zeros(2)
    for t in range(4):
      state, _ = step(state, None)
      d = min(0.999, (1.0 + t) / (10.0 + t))
      ema = d * ema + (1.0 - d) * np.asarray(state.params["w"])
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-6)

  def test_unet_on_digits_lowers_loss(self):
    images, labels = jd.load_digits()
    self.assertEqual(images.shape, (1797, 8, 8))
    self.assertEqual(int(images.max()), 16)
    self.assertEqual(labels.shape, (1797,))
    from jaxml.diffusion.digits import from_model_space, to_model_space
    data = jnp.asarray(to_model_space(images[:256]))
    np.testing.assert_array_equal(from_model_space(np.asarray(data))[..., 0], images[:256])
    sde = jd.VPSDE()
    cfg = jd.UNetConfig(base=8, embed_dim=16)
    apply = lambda p, x, t: jd.unet_apply(p, x, t, cfg)  # noqa: E731

    def loss_fn(params, rng, batch):
      return jd.dsm_loss(rng, sde, functools.partial(jd.precondition, sde, apply, params), batch)

    def batch_fn(rng):
      return data[jax.random.randint(rng, (32,), 0, data.shape[0])]

    # Plain jitted Adam steps (the scanned `fit` loop costs more to compile for a conv net).
    params = jd.unet_init(jax.random.PRNGKey(0), cfg)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
      b_rng, l_rng = jax.random.split(rng)
      loss, grads = jax.value_and_grad(loss_fn)(params, l_rng, batch_fn(b_rng))
      updates, opt = tx.update(grads, opt)
      return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(60):
      params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
      losses.append(float(loss))
    self.assertLess(np.mean(losses[-15:]), 0.8 * np.mean(losses[:10]))

  def test_nan_loss_raises(self):
    tx = optax.adam(1e-3)
    step = jax.jit(jt.make_train_step(lambda p, b, r: (jnp.sum(p["w"]) * jnp.nan, {}), tx, steps_per_call=2))
    state = jt.create_train_state({"w": jnp.ones(2)}, tx, jax.random.PRNGKey(0))
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(jt.NonFiniteLossError, "loss is nan.* at step 1 "):
        jt.train(step, state, None, num_steps=4, workdir=d, steps_per_call=2, tensorboard=False, plot=False,
                 print_fn=lambda s: None)

  def test_net_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "x must be"):
      jd.mlp_apply(jd.mlp_init(jax.random.PRNGKey(0), jd.ScoreMLPConfig(data_dim=2)), jnp.zeros((4, 3)),
                   jnp.ones(4), jd.ScoreMLPConfig(data_dim=2))
    with self.assertRaisesRegex(ValueError, "image_size"):
      jd.UNetConfig(image_size=7)


if __name__ == "__main__":
  absltest.main()
