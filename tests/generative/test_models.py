"""GAN and VAE steps reduce their losses; spectral norm and R1 behave; the study writes results.json."""
import dataclasses
import json
import os
import tempfile

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml.generative import gan, get_dataset, vae
from jaxml.generative.study import METRICS, run_from_config

DS = get_dataset("mix1d_sep4")


class GANTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters((False, 0.0), (True, 0.0), (False, 1.0))
  def test_d_and_g_updates_reduce_their_losses(self, spectral_norm, gp_weight):
    cfg = gan.GANConfig(data_dim=1, latent_dim=2, hidden=16, depth=2, spectral_norm=spectral_norm, gp_weight=gp_weight)
    params = gan.init(jax.random.PRNGKey(0), cfg)
    real = DS.sample(jax.random.PRNGKey(1), 256)
    z = jax.random.normal(jax.random.PRNGKey(2), (256, cfg.latent_dim))
    tx = optax.adam(1e-2)

    @jax.jit
    def d_steps(disc):
      def body(carry, _):
        disc, opt = carry
        (loss, _), g = jax.value_and_grad(gan.d_loss_fn, has_aux=True)(disc, params["gen"], params["sn_u"], real, z, cfg)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(disc, upd), opt), loss
      return jax.lax.scan(body, (disc, tx.init(disc)), None, length=30)

    (disc, _), d_losses = d_steps(params["disc"])
    self.assertLess(float(d_losses[-1]), float(d_losses[0]))

    @jax.jit
    def g_steps(gen):
      def body(carry, _):
        gen, opt = carry
        loss, g = jax.value_and_grad(gan.g_loss_fn)(gen, disc, params["sn_u"], z, cfg)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(gen, upd), opt), loss
      return jax.lax.scan(body, (gen, tx.init(gen)), None, length=30)

    _, g_losses = g_steps(params["gen"])
    self.assertLess(float(g_losses[-1]), float(g_losses[0]))

  def test_spectral_norm_divides_by_top_singular_value(self):
    cfg = gan.GANConfig(data_dim=2, hidden=16, depth=2, spectral_norm=True)
    params = gan.init(jax.random.PRNGKey(0), cfg)
    u = params["sn_u"]
    for _ in range(50):  # power iterations converge
      weights, u = gan.spectral_weights(params["disc"], u)
    for w in weights:
      self.assertAlmostEqual(float(np.linalg.svd(np.asarray(w), compute_uv=False)[0]), 1.0, delta=1e-3)

  def test_spectrally_normalised_discriminator_is_1_lipschitz(self):
    # Trained-looking (large) weights, so that the bound binds: without the norm D is far steeper.
    cfg = gan.GANConfig(data_dim=2, hidden=32, depth=3, spectral_norm=True)
    params = gan.init(jax.random.PRNGKey(0), cfg)
    disc = jax.tree_util.tree_map(lambda w: 5.0 * w, params["disc"])
    u = params["sn_u"]
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
    real = DS.sample(jax.random.PRNGKey(1), 64)
    z = jax.random.normal(jax.random.PRNGKey(2), (64, 2))
    l0, _ = gan.d_loss_fn(params["disc"], params["gen"], params["sn_u"], real, z, base)
    l1, _ = gan.d_loss_fn(params["disc"], params["gen"], params["sn_u"], real, z, pen)
    self.assertGreater(float(l1), float(l0))

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "hidden"):
      gan.GANConfig(hidden=0)


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


class StudyTest(absltest.TestCase):

  def test_small_config_writes_results(self):
    from experiments.configs.mode_collapse import get_config
    cfg = get_config("small")
    with tempfile.TemporaryDirectory() as d:
      results = run_from_config(cfg, d, log=lambda s: None)
      with open(os.path.join(d, "results.json")) as f:
        on_disk = json.load(f)
      self.assertTrue(os.path.exists(os.path.join(d, "samples.png")))
      self.assertTrue(os.path.exists(os.path.join(d, "table.md")))
    self.assertEqual(set(on_disk), set(cfg.datasets))
    for dname in cfg.datasets:
      self.assertEqual(set(on_disk[dname]), {"gan", "vae", "diffusion"})
      for model in on_disk[dname].values():
        self.assertEqual(set(model), set(METRICS))
        self.assertEqual(len(model["modes_captured"]), cfg.num_seeds)
    self.assertEqual(on_disk, json.loads(json.dumps(results)))

  def test_interrupted_study_resumes_with_the_same_results(self):
    from experiments.configs.mode_collapse import get_config
    cfg = get_config("small")
    with tempfile.TemporaryDirectory() as d:
      first = json.loads(json.dumps(run_from_config(cfg, d, log=lambda s: None)))
      # An interruption while the VAE trained: later pairs and the final files never got written.
      for name in ("results.json", "table.md", "samples.png", "pairs/mix1d_sep4__vae.json",
                   "pairs/mix1d_sep4__diffusion.json"):
        os.remove(os.path.join(d, name))
      lines = []
      second = json.loads(json.dumps(run_from_config(cfg, d, log=lines.append)))
      self.assertTrue(os.path.exists(os.path.join(d, "samples.png")))
      with open(os.path.join(d, "results.json")) as f:
        self.assertEqual(json.load(f), second)
    self.assertEqual(second, first)  # seeds follow the pair, so resuming changes nothing
    loaded = [l for l in lines if "earlier run" in l]
    self.assertEqual(len(loaded), 1)
    self.assertIn("gan", loaded[0])

  def test_every_config_variant_is_a_valid_study(self):
    from experiments.configs.mode_collapse import get_config
    from jaxml.generative.study import config_from_dict
    base, _, long = (dataclasses.asdict(config_from_dict(get_config(v).to_dict())) for v in ("", "small", "gan_long"))
    # The long-budget GAN is the study's GAN with only its budget and rate changed (same networks, batch, eval).
    self.assertEqual({k for k in base if base[k] != long[k]},
                     {"datasets", "models", "gan_learning_rate", "num_steps", "chunk"})
    self.assertEqual(long["models"], ("gan",))
    self.assertGreater(long["num_steps"], 8 * base["num_steps"])
    with self.assertRaisesRegex(ValueError, "unknown config variant"):
      get_config("huge")

  def test_resuming_with_another_config_raises(self):
    from experiments.configs.mode_collapse import get_config
    cfg = get_config("small")
    cfg.models = ("gan",)
    with tempfile.TemporaryDirectory() as d:
      run_from_config(cfg, d, log=lambda s: None)
      cfg.num_steps = cfg.num_steps + 1
      with self.assertRaisesRegex(ValueError, "num_steps"):
        run_from_config(cfg, d, log=lambda s: None)
      # Finished pairs whose configuration file is gone cannot be trusted either.
      os.remove(os.path.join(d, "config.json"))
      with self.assertRaisesRegex(ValueError, "configuration is unknown"):
        run_from_config(cfg, d, log=lambda s: None)
      # With no finished pair there is nothing to mix up: the new configuration simply starts.
      os.remove(os.path.join(d, "pairs", "mix1d_sep4__gan.json"))
      run_from_config(cfg, d, log=lambda s: None)
      with open(os.path.join(d, "config.json")) as f:
        on_disk = json.load(f)
      self.assertEqual(on_disk["config"]["num_steps"], cfg.num_steps)
      self.assertEqual(set(on_disk["seconds"]), {"mix1d_sep4/gan"})

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "unknown study config keys"):
      run_from_config({"nope": 1}, "/nonexistent")
    with self.assertRaisesRegex(ValueError, "unknown model"):
      run_from_config({"models": ("flow",)}, "/nonexistent")


if __name__ == "__main__":
  absltest.main()
