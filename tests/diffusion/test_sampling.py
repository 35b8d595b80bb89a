"""Every sampler, driven by the exact score of a Gaussian mixture, reproduces the mixture."""
from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxml.diffusion as jd

MIX = jd.GaussianMixture.create([[-2.0], [2.0]], 0.25, [0.3, 0.7])
SDES = {"vp": jd.VPSDE(), "subvp": jd.subVPSDE(), "ve": jd.VESDE()}
# One score function object per SDE, so that repeated calls reuse the compiled sampler.
SCORES = {k: jd.mixture_score_fn(MIX, v) for k, v in SDES.items()}
STEPS = {"euler_maruyama": 200, "reverse_diffusion": 200, "pc": 150, "ode": 60}


class SamplerTest(chex.TestCase, parameterized.TestCase):

  @parameterized.product(sde=("vp", "subvp", "ve"), method=jd.METHODS)
  def test_mode_weights_and_widths(self, sde, method):
    x = jd.sample(jax.random.PRNGKey(0), SDES[sde], SCORES[sde], (2000, 1), method=method, num_steps=STEPS[method])
    x = np.asarray(x)[:, 0]
    right = x > 0
    self.assertAlmostEqual(right.mean(), 0.7, delta=0.04, msg=f"{sde}/{method}: weight of the +2 mode")
    # Every sample sits in a mode (within 4 std), and the mode widths match 0.25.
    self.assertGreater(np.mean(np.abs(np.abs(x) - 2.0) < 1.0), 0.99)
    self.assertAlmostEqual(x[right].std(), 0.25, delta=0.04, msg=f"{sde}/{method}: width of the +2 mode")

  def test_deterministic_per_key(self):
    kw = dict(method="pc", num_steps=STEPS["pc"])
    a = jd.sample(jax.random.PRNGKey(3), SDES["vp"], SCORES["vp"], (2000, 1), **kw)
    b = jd.sample(jax.random.PRNGKey(3), SDES["vp"], SCORES["vp"], (2000, 1), **kw)
    c = jd.sample(jax.random.PRNGKey(4), SDES["vp"], SCORES["vp"], (2000, 1), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.assertGreater(float(jnp.abs(a - c).max()), 0.1)

  def test_compiled_loop_equals_python_loop(self):
    sde, score = SDES["ve"], SCORES["ve"]
    rng = jax.random.PRNGKey(5)
    compiled = jd.sample(rng, sde, score, (64, 1), method="reverse_diffusion", num_steps=30)
    parts = jd.sampler_parts(sde, score, (64, 1), method="reverse_diffusion", num_steps=30)
    step = jax.jit(parts.step)
    state = parts.init(rng)
    for i in range(parts.num_steps):
      state = step(jnp.int32(i), state)
    np.testing.assert_allclose(np.asarray(parts.finish(state)), np.asarray(compiled), rtol=1e-4, atol=1e-4)

  @parameterized.parameters(*jd.METHODS)
  def test_chunked_noise_matches_python_steps(self, method):
    # `sample` draws each chunk's noise in one vectorised call; it must be the noise that `step` draws per
    # step, so the compiled sampler and the Python-stepped one agree to float rounding, for every chunking
    # (a single chunk, several chunks and a remainder, one step per chunk).
    from jaxml.diffusion import sampling  # pylint: disable=import-outside-toplevel
    sde, score = SDES["vp"], SCORES["vp"]
    rng = jax.random.PRNGKey(8)
    n, shape = 23, (16, 1)
    kw = dict(method=method, num_steps=n, snr=0.16, denoise=True, eps=1e-3, n_corrector=2 if method == "pc" else 1)
    pieces = sampling._pieces(sde, score, shape, **kw)  # pylint: disable=protected-access
    parts = pieces.parts
    step = jax.jit(parts.step)
    state = parts.init(rng)
    for i in range(n):
      state = step(jnp.int32(i), state)
    want = np.asarray(parts.finish(state))
    for chunk in (n, 5, 1):
      run = jax.jit(lambda r, chunk=chunk: parts.finish(sampling.run_steps(pieces, parts.init(r), chunk)))
      np.testing.assert_allclose(np.asarray(run(rng)), want, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}")
    got = jd.sample(rng, sde, score, shape, **kw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  def test_batched_draws_are_the_per_step_draws(self):
    from jaxml.diffusion import sampling  # pylint: disable=import-outside-toplevel
    pieces = sampling._pieces(SDES["ve"], SCORES["ve"], (8, 3), method="pc", num_steps=4, snr=0.16,  # pylint: disable=protected-access
                              denoise=True, eps=1e-3, n_corrector=2)
    keys = jax.random.split(jax.random.PRNGKey(9), 6)
    batched = jax.jit(jax.vmap(pieces.draw))(keys)
    self.assertLen(batched, 3)
    for j, key in enumerate(keys):
      for z_all, z in zip(batched, jax.jit(pieces.draw)(key)):
        np.testing.assert_array_equal(np.asarray(z_all[j]), np.asarray(z))

  def test_noise_chunk_steps(self):
    from jaxml.diffusion import sampling  # pylint: disable=import-outside-toplevel
    self.assertEqual(sampling.noise_chunk_steps((64, 2), "euler_maruyama", 1000), 1000)
    big = sampling.noise_chunk_steps((2500, 2), "pc", 1000, n_corrector=1)
    self.assertLessEqual(big * 2500 * 2 * 4 * 2, sampling.NOISE_CHUNK_BYTES)
    self.assertGreater(big, 1)
    self.assertEqual(sampling.noise_chunk_steps((1 << 22, 2), "euler_maruyama", 10), 1)

  def test_denoise_removes_last_noise(self):
    kw = dict(method="euler_maruyama", num_steps=STEPS["euler_maruyama"])
    rng = jax.random.PRNGKey(6)
    den = jd.sample(rng, SDES["vp"], SCORES["vp"], (2000, 1), denoise=True, **kw)
    raw = jd.sample(rng, SDES["vp"], SCORES["vp"], (2000, 1), denoise=False, **kw)
    # The two differ by exactly the last step's noise g(t) sqrt(dt), taken at t = t_{n-1}.
    n, eps = STEPS["euler_maruyama"], 1e-3
    dt = (1.0 - eps) / n
    _, g = SDES["vp"].sde(jnp.zeros((1, 1)), jnp.array([eps + dt]))
    self.assertAlmostEqual(float(jnp.std(den - raw)) / float(g[0] * np.sqrt(dt)), 1.0, delta=0.1)

  def test_bad_input(self):
    sde, score = SDES["vp"], SCORES["vp"]
    rng = jax.random.PRNGKey(0)
    with self.assertRaisesRegex(ValueError, "unknown sampler method"):
      jd.sample(rng, sde, score, (4, 1), method="heun")
    for n in (0, -5):
      with self.assertRaisesRegex(ValueError, "num_steps must be a positive"):
        jd.sample(rng, sde, score, (4, 1), num_steps=n)
    with self.assertRaisesRegex(ValueError, "shape must be"):
      jd.sample(rng, sde, score, (4,))
    with self.assertRaisesRegex(ValueError, "snr must be positive"):
      jd.sample(rng, sde, score, (4, 1), method="pc", snr=0.0)
    with self.assertRaisesRegex(TypeError, "sde must be"):
      jd.sample(rng, "vp", score, (4, 1))

  @parameterized.parameters(*jd.METHODS)
  def test_score_output_shape_is_checked_before_compiling(self, method):
    # A [B, 1] score for [B, 2] data broadcasts through every update: without the check it gave samples with
    # mean -3690 and no error.
    sde = SDES["vp"]
    bad = lambda x, t: -x[:, :1]  # noqa: E731
    msg = r"score_fn\(x, t\) must return x's shape \(8, 2\).*got shape \(8, 1\)"
    with self.assertRaisesRegex(ValueError, msg):
      jd.sample(jax.random.PRNGKey(0), sde, bad, (8, 2), method=method, num_steps=4)
    with self.assertRaisesRegex(ValueError, msg):
      jd.sampler_parts(sde, bad, (8, 2), method=method, num_steps=4)

  def test_score_output_dtype_and_structure_are_checked(self):
    sde = SDES["vp"]
    rng = jax.random.PRNGKey(0)
    with self.assertRaisesRegex(TypeError, r"score_fn\(x, t\) must return a floating array, got dtype int32"):
      jd.sample(rng, sde, lambda x, t: jnp.zeros(x.shape, jnp.int32), (8, 1), num_steps=4)
    with self.assertRaisesRegex(TypeError, r"score_fn\(x, t\) must return one array.*got tuple"):
      jd.sample(rng, sde, lambda x, t: (x, x), (8, 1), num_steps=4)
    # Narrower floats are fine: the update promotes them to the float32 carry.
    half = jd.sample(rng, sde, lambda x, t: SCORES["vp"](x, t).astype(jnp.bfloat16), (8, 1), num_steps=4)
    self.assertEqual(half.dtype, jnp.float32)

  def test_check_works_on_closures_under_jit_and_vmap(self):
    # As in the mode-collapse study: the score closes over vmapped parameters inside `jit`.
    sde, true = SDES["vp"], SCORES["vp"]

    def draw(scale, rng):
      parts = jd.sampler_parts(sde, lambda x, t: scale * true(x, t), (16, 1), num_steps=5)
      return parts.finish(jax.lax.fori_loop(0, parts.num_steps, parts.step, parts.init(rng)))

    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    out = jax.jit(jax.vmap(draw))(jnp.array([1.0, 1.0]), keys)
    self.assertEqual(out.shape, (2, 16, 1))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(jax.jit(draw)(1.0, keys[0])), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
