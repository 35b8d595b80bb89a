"""GAN and VAE steps reduce their losses; spectral norm and R1 behave; the GAN trains and resumes on the core."""
import functools
import os
import shutil
import tempfile

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import train as jt
from jaxml.generative import gan, get_dataset, vae

DS = get_dataset("mix1d_sep4")


class GANTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters((False, 0.0), (True, 0.0), (False, 1.0))
  def test_d_and_g_updates_reduce_their_losses(self, spectral_norm, gp_weight):
    cfg = gan.GANConfig(data_dim=1, latent_dim=2, hidden=16, depth=2, spectral_norm=spectral_norm, gp_weight=gp_weight)
    params = gan.init(jax.random.PRNGKey(0), cfg)
    sn_u = gan.init_sn_vectors(jax.random.PRNGKey(3), params["disc"])
    real = DS.sample(jax.random.PRNGKey(1), 256)
    z = jax.random.normal(jax.random.PRNGKey(2), (256, cfg.latent_dim))
    tx = optax.adam(1e-2)

    @jax.jit
    def d_steps(disc):
      def body(carry, _):
        disc, opt = carry
        (loss, _), g = jax.value_and_grad(gan.d_loss_fn, has_aux=True)(disc, params["gen"], sn_u, real, z, cfg)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(disc, upd), opt), loss
      return jax.lax.scan(body, (disc, tx.init(disc)), None, length=30)

    (disc, _), d_losses = d_steps(params["disc"])
    self.assertLess(float(d_losses[-1]), float(d_losses[0]))

    @jax.jit
    def g_steps(gen):
      def body(carry, _):
        gen, opt = carry
        loss, g = jax.value_and_grad(gan.g_loss_fn)(gen, disc, sn_u, z, cfg)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(gen, upd), opt), loss
      return jax.lax.scan(body, (gen, tx.init(gen)), None, length=30)

    _, g_losses = g_steps(params["gen"])
    self.assertLess(float(g_losses[-1]), float(g_losses[0]))

  def test_spectral_norm_divides_by_top_singular_value(self):
    cfg = gan.GANConfig(data_dim=2, hidden=16, depth=2, spectral_norm=True)
    params = gan.init(jax.random.PRNGKey(0), cfg)
    u = gan.init_sn_vectors(jax.random.PRNGKey(1), params["disc"])
    for _ in range(50):  # power iterations converge
      weights, u = gan.spectral_weights(params["disc"], u)
    for w in weights:
      self.assertAlmostEqual(float(np.linalg.svd(np.asarray(w), compute_uv=False)[0]), 1.0, delta=1e-3)

  def test_spectrally_normalised_discriminator_is_1_lipschitz(self):
    # Trained-looking (large) weights, so that the bound binds: without the norm D is far steeper.
    cfg = gan.GANConfig(data_dim=2, hidden=32, depth=3, spectral_norm=True)
    params = gan.init(jax.random.PRNGKey(0), cfg)
    disc = jax.tree_util.tree_map(lambda w: 5.0 * w, params["disc"])
    u = gan.init_sn_vectors(jax.random.PRNGKey(3), disc)
    for _ in range(50):  # converge the persistent power-iteration vectors, as training does
      _, u = gan.spectral_weights(disc, u)
    x = jax.random.normal(jax.random.PRNGKey(1), (512, 2))
    y = x + 0.06 * jax.random.normal(jax.random.PRNGKey(2), (512, 2))  # about 3 ring-8 stds apart
    dist = np.linalg.norm(np.asarray(x - y), axis=-1)
    d_sn = np.abs(np.asarray(gan.discriminate(disc, x, cfg, u)[0] - gan.discriminate(disc, y, cfg, u)[0]))
    self.assertLessEqual(float(np.max(d_sn / dist)), 1.0 + 1e-3)
    plain = gan.GANConfig(data_dim=2, hidden=32, depth=3)
    d_plain = np.abs(np.asarray(gan.discriminate(disc, x, plain)[0] - gan.discriminate(disc, y, plain)[0]))
    self.assertGreater(float(np.max(d_plain / dist)), 2.0)

  def test_r1_penalty_adds_to_the_loss(self):
    base = gan.GANConfig(data_dim=1, latent_dim=2, hidden=16, depth=2)
    pen = gan.GANConfig(data_dim=1, latent_dim=2, hidden=16, depth=2, gp_weight=10.0)
    params = gan.init(jax.random.PRNGKey(0), base)
    sn_u = gan.init_sn_vectors(jax.random.PRNGKey(3), params["disc"])
    real = DS.sample(jax.random.PRNGKey(1), 64)
    z = jax.random.normal(jax.random.PRNGKey(2), (64, 2))
    l0, _ = gan.d_loss_fn(params["disc"], params["gen"], sn_u, real, z, base)
    l1, _ = gan.d_loss_fn(params["disc"], params["gen"], sn_u, real, z, pen)
    self.assertGreater(float(l1), float(l0))

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "hidden"):
      gan.GANConfig(hidden=0)


class GANTrainingTest(absltest.TestCase):
  """The GAN's own step on `jaxml.train`: a resumed run is the uninterrupted one, bit for bit."""

  CFG = gan.GANConfig(data_dim=1, latent_dim=2, hidden=16, depth=2, spectral_norm=True, learning_rate=1e-3)

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_gan_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def train(self, step, workdir, num_steps, k):
    init = functools.partial(gan.init_state, cfg=self.CFG)
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=k, async_save=False)
    try:
      state, start = jt.restore_or_init(ckpt, jax.eval_shape(init, jax.random.PRNGKey(0)),
                                        lambda: init(jax.random.PRNGKey(0)))
      result = jt.train(step, state, None, num_steps=num_steps, workdir=workdir, start_step=start, steps_per_call=k,
                        checkpointer=ckpt, log_every=k, tensorboard=False, plot=False, print_fn=lambda s: None)
    finally:
      ckpt.close()
    return start, result

  def test_resumed_training_equals_uninterrupted(self):
    k = 5
    step = jax.jit(gan.make_train_step(self.CFG, 64, sample_fn=DS.sample, steps_per_call=k), donate_argnums=0)
    _, full = self.train(step, self.tmpdir(), 20, k)
    workdir = self.tmpdir()
    self.train(step, workdir, 10, k)              # "interrupted" after 10 steps (checkpoints at 5 and 10)
    start, resumed = self.train(step, workdir, 20, k)
    self.assertEqual(start, 10)
    self.assertEqual(int(resumed.state.step), 20)
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(full.state))
    # Both players and the power-iteration vectors moved (the output layer's u is [1], a unit vector: +-1).
    fresh = gan.init_state(jax.random.PRNGKey(0), self.CFG)
    moved = [(a.size, not np.array_equal(a, b)) for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get((fresh.params, fresh.extras))),
        jax.tree_util.tree_leaves(jax.device_get((full.state.params, full.state.extras))))]
    self.assertTrue(all(changed for size, changed in moved if size > 1), moved)
    record = full.history[-1]
    for name in ("loss", "d_loss", "g_loss", "grad_norm", "d_grad_norm", "g_grad_norm"):
      self.assertTrue(np.isfinite(record[name]), name)
    self.assertAlmostEqual(record["loss"], record["d_loss"] + record["g_loss"], places=5)

  def test_non_finite_data_raises_the_cores_error(self):
    step = jax.jit(gan.make_train_step(self.CFG, 8, steps_per_call=2))   # real data from the batch
    state = gan.init_state(jax.random.PRNGKey(0), self.CFG)
    batch = lambda s: np.full((8, 1), np.nan if s == 2 else 0.5, np.float32)  # noqa: E731
    with self.assertRaisesRegex(jt.NonFiniteLossError, "at step 3"):
      jt.train(step, state, batch, num_steps=6, workdir=self.tmpdir(), steps_per_call=2, tensorboard=False,
               plot=False, print_fn=lambda s: None)
    with self.assertRaisesRegex(ValueError, "batch_size must be positive"):
      gan.make_train_step(self.CFG, 0)


class VAETest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters("gaussian", "bernoulli")
  def test_training_raises_elbo(self, decoder):
    cfg = vae.VAEConfig(data_dim=4, latent_dim=2, hidden=16, depth=2, decoder=decoder)
    if decoder == "gaussian":
      data = jnp.concatenate([DS.sample(jax.random.PRNGKey(0), 256)] * 4, axis=1)
    else:
      data = jax.random.bernoulli(jax.random.PRNGKey(0), jnp.array([0.9, 0.1, 0.8, 0.2]), (256, 4)).astype(jnp.float32)
    params = vae.init(jax.random.PRNGKey(1), cfg)
    tx = optax.adam(1e-2)

    @jax.jit
    def train(params):
      def body(carry, key):
        params, opt = carry
        loss, g = jax.value_and_grad(vae.loss_fn)(params, key, data, cfg)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(params, upd), opt), loss
      return jax.lax.scan(body, (params, tx.init(params)), jax.random.split(jax.random.PRNGKey(2), 150))

    (params, _), losses = train(params)
    self.assertLess(float(losses[-10:].mean()), float(losses[:10].mean()))
    x = vae.sample(jax.random.PRNGKey(3), params, 10, cfg)
    self.assertEqual(x.shape, (10, 4))

  def test_kl_term_matches_closed_form(self):
    cfg = vae.VAEConfig(data_dim=2, latent_dim=3, hidden=8, depth=1)
    params = vae.init(jax.random.PRNGKey(0), cfg)
    x = jnp.ones((4, 2))
    _, parts = vae.elbo(params, jax.random.PRNGKey(1), x, cfg)
    mu, log_s = vae.encode(params, x)
    var = np.exp(2 * np.asarray(log_s))
    kl = 0.5 * np.sum(np.asarray(mu) ** 2 + var - 1 - np.log(var), axis=-1)
    np.testing.assert_allclose(np.asarray(parts["kl"]), kl, rtol=1e-5)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "decoder"):
      vae.VAEConfig(decoder="poisson")


if __name__ == "__main__":
  absltest.main()
