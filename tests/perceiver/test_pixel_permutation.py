"""The Perceiver paper's permutation claim at the model level: pixels that keep their own position features
can come in any order (the classifier's logits do not change), while the same pixels moved on the grid (so
they take other pixels' positions) do change them; and a masked pixel changes nothing, with the mask given
per pixel `[B, H, W]` or per input `[B, H*W]`."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxml import perceiver as pc

PIX = pc.PerceiverConfig(task="classifier", inputs="pixels", image_channels=1, num_bands=3, max_resolution=(6, 5),
                         num_latents=4, d_latents=8, num_cross_attention_heads=1, num_self_attention_heads=2,
                         num_self_attends_per_block=1, num_classes=3)
ARR = PIX.replace(inputs="array", d_model=PIX.d_model)  # the same parameters, reading precomputed features
PARAMS = pc.init(jax.random.PRNGKey(0), PIX)
IMAGES = jax.random.uniform(jax.random.PRNGKey(1), (2, 6, 5, 1), minval=-1.0, maxval=1.0)
PERM = np.random.default_rng(0).permutation(30)
apply = jax.jit(pc.apply, static_argnums=2)


class PixelPermutationTest(absltest.TestCase):

  def test_pixels_with_their_positions_in_any_order(self):
    feats = pc.pixel_features(IMAGES, PIX)
    self.assertEqual(feats.shape, (2, 30, 1 + 2 * 3 * 2 + 2))  # grey value, then 2-D Fourier features (K=3)
    logits = apply(PARAMS, IMAGES, PIX)
    np.testing.assert_allclose(apply(PARAMS, feats, ARR), logits, atol=1e-6)  # the array path is the pixel path
    np.testing.assert_allclose(apply(PARAMS, feats[:, PERM], ARR), logits, atol=1e-5)
    # Moving the pixels on the grid gives them other positions: a different input set, other logits.
    moved = IMAGES.reshape(2, 30, 1)[:, PERM].reshape(2, 6, 5, 1)
    self.assertGreater(float(jnp.abs(apply(PARAMS, moved, PIX) - logits).max()), 1e-3)

  def test_masked_pixels_change_nothing(self):
    mask_hw = np.ones((2, 6, 5), bool)
    mask_hw[1, 4:] = False  # the last two rows of the second image
    junk = IMAGES.at[1, 4:].set(50.0)
    logits = apply(PARAMS, IMAGES, PIX, input_mask=mask_hw)
    np.testing.assert_array_equal(apply(PARAMS, junk, PIX, input_mask=mask_hw), logits)
    np.testing.assert_array_equal(apply(PARAMS, junk, PIX, input_mask=mask_hw.reshape(2, 30)), logits)
    self.assertGreater(float(jnp.abs(apply(PARAMS, junk, PIX) - logits).max()), 1e-3)
    with self.assertRaisesRegex(ValueError, r"input_mask must have shape \(2, 6, 5\)"):
      pc.apply(PARAMS, IMAGES, PIX, input_mask=np.ones((2, 5, 6), bool))


if __name__ == "__main__":
  absltest.main()
