"""jaxml.rl against the recursions and formulas written out in plain Python/numpy."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import rl


def gae_loops(rewards, values, mask, gamma, lam):
  """GAE the textbook way, row by row over the valid tokens only (float64)."""
  adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
    next_value, next_adv = 0.0, 0.0
    for t in reversed(idx):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values[b, t]
      adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
  return adv, ret


def gae_zero_padded(rewards, values, mask, gamma, lam):
  """The full-length recursion with padding zeroed (how right-padded rollouts are often done)."""
  r, v = rewards * mask, values * mask
  T = r.shape[1]
  adv, last = np.zeros(r.shape), np.zeros(r.shape[0])
  for t in reversed(range(T)):
    next_v = v[:, t + 1] if t + 1 < T else 0.0
    last = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last
    adv[:, t] = last
  return adv * mask


def _masks(rng, B, T):
  right = (np.arange(T)[None] < rng.integers(1, T + 1, size=(B, 1))).astype(np.float32)
  left = right[:, ::-1].copy()
  holes = (rng.random((B, T)) < 0.7).astype(np.float32)
  return {"right": right, "left": left, "holes": holes}


class GaeTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden(self):
    # From the alignment notes; changes only if the GAE definition changes.
    adv, ret = self.variant(functools.partial(rl.gae, gamma=1.0, lam=0.95))(
        jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.4, 0.3]]), jnp.ones((1, 3)))
    np.testing.assert_allclose(adv[0], [0.43675, 0.565, 0.7], rtol=1e-6)
    np.testing.assert_allclose(ret[0], [0.93675, 0.965, 1.0], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=("right", "left", "holes"), gamma_lam=((1.0, 0.95), (0.9, 0.5), (0.99, 1.0),
                                                                      (0.97, 0.0)))
  def test_matches_python_recursion(self, kind, gamma_lam):
    gamma, lam = gamma_lam
    rng = np.random.default_rng(1)
    B, T = 6, 11
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = _masks(rng, B, T)[kind]
    adv, ret = self.variant(functools.partial(rl.gae, gamma=gamma, lam=lam))(rewards, values, mask)
    want_adv, want_ret = gae_loops(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=2e-5)
    np.testing.assert_allclose(ret, want_ret, atol=2e-5)

  @parameterized.parameters("right", "left")
  def test_contiguous_mask_equals_zero_padded_recursion(self, kind):
    rng = np.random.default_rng(2)
    rewards, values = rng.normal(size=(2, 5, 9)).astype(np.float32)
    mask = _masks(rng, 5, 9)[kind]
    adv, _ = rl.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    np.testing.assert_allclose(adv, gae_zero_padded(rewards, values, mask, 0.95, 0.9), atol=2e-5)

  def test_lambda_limits(self):
    rng = np.random.default_rng(3)
    rewards, values = rng.normal(size=(2, 3, 7)).astype(np.float32)
    mask = np.ones((3, 7), np.float32)
    gamma = 0.9
    adv0, _ = rl.gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_v = np.concatenate([values[:, 1:], np.zeros((3, 1), np.float32)], axis=1)
    np.testing.assert_allclose(adv0, rewards + gamma * next_v - values, atol=1e-5)  # one-step TD residual
    _, ret1 = rl.gae(rewards, values, mask, gamma=gamma, lam=1.0)
    to_go = np.stack([(rewards[:, t:] * gamma ** np.arange(7 - t)).sum(1) for t in range(7)], axis=1)
    np.testing.assert_allclose(ret1, to_go, atol=1e-5)  # lambda 1: discounted reward-to-go

  def test_episode_boundary_in_a_row_equals_the_hand_recursion(self):
    # One row, gamma 0.9, lam 0.5: an episode ends after step 1 (d = 1), the next runs to the row's end and is
    # bootstrapped with V = 2.0 after it. Written out backwards:
    r, v = [1.0, 0.0, 2.0, -1.0], [0.5, 0.2, 1.0, 0.3]
    g, l, last = 0.9, 0.5, 2.0
    a3 = r[3] + g * last - v[3]                       # 1.5
    a2 = r[2] + g * v[3] - v[2] + g * l * a3          # 1.945
    a1 = r[1] - v[1]                                  # episode end: neither V_2 nor A_2 is carried back
    a0 = r[0] + g * v[1] - v[0] + g * l * a1
    adv, ret = rl.gae(jnp.array([r]), jnp.array([v]), jnp.ones((1, 4)), gamma=g, lam=l,
                      dones_BxT=jnp.array([[0, 1, 0, 0]]), last_values_B=jnp.array([last]))
    np.testing.assert_allclose(adv[0], [a0, a1, a2, a3], rtol=1e-6)
    np.testing.assert_allclose(ret[0], np.array([a0, a1, a2, a3]) + v, rtol=1e-6)

  @parameterized.parameters("right", "holes")
  def test_dones_equal_gae_on_each_episode_alone(self, kind):
    # A row holding several episodes gives each episode's steps the advantages GAE gives that episode as its
    # own row (the masked-out steps skipped as before); the rows' last episodes bootstrap from last_values_B.
    rng = np.random.default_rng(7)
    B, T, gamma, lam = 4, 13, 0.95, 0.8
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float64)
    mask = _masks(rng, B, T)[kind]
    dones = (rng.random((B, T)) < 0.25).astype(np.float32)
    last = rng.normal(size=B)
    adv, ret = rl.gae(rewards.astype(np.float32), values.astype(np.float32), mask, gamma=gamma, lam=lam,
                      dones_BxT=dones, last_values_B=last.astype(np.float32))
    want_adv, want_ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
      valid = [t for t in range(T) if mask[b, t]]
      ends = [i for i, t in enumerate(valid) if dones[b, t]]
      pieces = np.split(np.array(valid, int), [i + 1 for i in ends])
      for j, idx in enumerate(pieces):
        if not len(idx):
          continue
        nv = last[b] if j == len(pieces) - 1 and not (len(ends) and ends[-1] == len(valid) - 1) else 0.0
        next_value, next_adv = nv, 0.0
        for t in reversed(idx):
          next_adv = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * next_adv
          next_value = values[b, t]
          want_adv[b, t], want_ret[b, t] = next_adv, next_adv + values[b, t]
    self.assertGreater(int(dones[mask > 0].sum()), B)     # several boundaries inside rows
    np.testing.assert_allclose(adv, want_adv, atol=2e-5)
    np.testing.assert_allclose(ret, want_ret, atol=2e-5)

  def test_without_dones_unchanged_and_zero_dones_equal(self):
    rng = np.random.default_rng(8)
    rewards, values = rng.normal(size=(2, 3, 6)).astype(np.float32)
    mask = _masks(rng, 3, 6)["holes"]
    base = rl.gae(rewards, values, mask, gamma=0.9, lam=0.7)
    zero = rl.gae(rewards, values, mask, gamma=0.9, lam=0.7, dones_BxT=np.zeros((3, 6)), last_values_B=np.zeros(3))
    want, _ = gae_loops(rewards.astype(np.float64), values.astype(np.float64), mask, 0.9, 0.7)
    np.testing.assert_allclose(base[0], want, atol=2e-5)
    np.testing.assert_allclose(zero[0], base[0], atol=1e-6)

  def test_bad_shapes_raise(self):
    with self.assertRaisesRegex(ValueError, "values_BxT"):
      rl.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), gamma=1.0, lam=1.0)
    with self.assertRaisesRegex(ValueError, "rewards_BxT"):
      rl.gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), gamma=1.0, lam=1.0)
    with self.assertRaisesRegex(ValueError, "dones_BxT"):
      rl.gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), gamma=1.0, lam=1.0, dones_BxT=jnp.zeros((2, 2)))
    with self.assertRaisesRegex(ValueError, "last_values_B"):
      rl.gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), gamma=1.0, lam=1.0, last_values_B=jnp.zeros(3))


class KlTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      # (logp, ref_logp, k1, k2, k3); the first from the alignment notes, the others by hand.
      ("notes", -1.0, -1.5, 0.5, 0.125, np.exp(-0.5) - 0.5),
      ("below_ref", -2.0, -1.0, -1.0, 0.5, np.e - 2.0),
      ("equal", -3.0, -3.0, 0.0, 0.0, 0.0))
  def test_known_points(self, logp, ref, k1, k2, k3):
    for kind, want in (("k1", k1), ("k2", k2), ("k3", k3)):
      got = self.variant(functools.partial(rl.kl_penalty, kind=kind))(jnp.float32(logp), jnp.float32(ref))
      self.assertAlmostEqual(float(got), want, places=6, msg=kind)

  def test_k3_and_k2_nonnegative(self):
    rng = np.random.default_rng(4)
    logp, ref = (rng.normal(scale=3.0, size=(64, 32)).astype(np.float32) for _ in range(2))
    self.assertGreaterEqual(float(rl.kl_penalty(logp, ref, "k3").min()), 0.0)
    self.assertGreaterEqual(float(rl.kl_penalty(logp, ref, "k2").min()), 0.0)
    self.assertLess(float(rl.kl_penalty(logp, ref, "k1").min()), 0.0)  # k1 alone can go negative

  def test_k1_k3_expectations_are_the_exact_kl(self):
    rng = np.random.default_rng(5)
    p = jax.nn.log_softmax(jnp.asarray(rng.normal(size=10)))
    q = jax.nn.log_softmax(jnp.asarray(rng.normal(size=10)))
    kl = float(jnp.sum(jnp.exp(p) * (p - q)))
    for kind in ("k1", "k3"):
      self.assertAlmostEqual(float(jnp.sum(jnp.exp(p) * rl.kl_penalty(p, q, kind))), kl, places=5, msg=kind)

  def test_bad_kind_raises(self):
    with self.assertRaisesRegex(ValueError, "k1"):
      rl.kl_penalty(jnp.zeros(3), jnp.zeros(3), kind="k4")


class WhitenTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_moments(self):
    rng = np.random.default_rng(6)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 9)).astype(np.float32)
    mask = (rng.random((4, 9)) < 0.6).astype(np.float32)
    out = np.asarray(self.variant(rl.whiten)(x, mask))
    sel = out[mask > 0]
    self.assertAlmostEqual(float(sel.mean()), 0.0, places=5)
    self.assertAlmostEqual(float(sel.std()), 1.0, places=4)
    np.testing.assert_array_equal(out[mask == 0], 0.0)
    xs = x[mask > 0].astype(np.float64)
    np.testing.assert_allclose(sel, (xs - xs.mean()) / np.sqrt(xs.var() + 1e-8), atol=1e-5)
    # Values under the mask do not matter.
    np.testing.assert_allclose(self.variant(rl.whiten)(np.where(mask > 0, x, 1e4), mask), out, atol=1e-5)

  def test_keep_mean(self):
    rng = np.random.default_rng(7)
    x = rng.normal(loc=3.0, size=(3, 5)).astype(np.float32)
    mask = np.ones((3, 5), np.float32)
    out = np.asarray(rl.whiten(x, mask, shift_mean=False))
    self.assertAlmostEqual(float(out.mean()), float(x.mean()), places=5)
    np.testing.assert_allclose(out, (x - x.mean()) / x.std() + x.mean(), atol=1e-4)

  def test_masked_mean(self):
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 0, 1], [0, 0, 0]])
    self.assertEqual(float(rl.masked_mean(x, mask)), 2.0)
    np.testing.assert_array_equal(rl.masked_mean(x, mask, axis=1), [2.0, 0.0])  # an empty row gives 0


def _ref_clip(logp, old, adv, eps):
  ratio = np.exp(logp - old)
  return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))


class PpoPolicyLossTest(chex.TestCase, parameterized.TestCase):

  def test_gradient_at_the_clip_boundaries(self):
    eps = 0.2
    # (advantage, ratio): outside the trust region on the side the advantage pushes towards -> clipped.
    cases = [(1.0, 1.3, True), (1.0, 0.7, False), (-1.0, 0.7, True), (-1.0, 1.3, False),
             (2.0, 1.1, False), (-2.0, 0.9, False), (0.5, 1.25, True), (-0.5, 0.75, True)]
    adv = jnp.array([c[0] for c in cases])
    old = jnp.full(len(cases), -1.0)
    logp = old + jnp.log(jnp.array([c[1] for c in cases]))
    mask = jnp.ones(len(cases))
    clipped = np.array([c[2] for c in cases])
    loss_fn = lambda lp: rl.ppo_policy_loss(lp, old, adv, mask, clip_eps=eps)[0]
    unclipped_fn = lambda lp: rl.masked_mean(-adv * jnp.exp(lp - old), mask)
    g, g_plain = np.asarray(jax.grad(loss_fn)(logp)), np.asarray(jax.grad(unclipped_fn)(logp))
    np.testing.assert_array_equal(g[clipped], 0.0)
    np.testing.assert_allclose(g[~clipped], g_plain[~clipped], rtol=1e-6)
    self.assertTrue(np.all(g_plain != 0))
    loss, metrics = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=eps)
    self.assertAlmostEqual(float(metrics["clip_fraction"]), clipped.mean(), places=6)
    self.assertAlmostEqual(float(loss), float(_ref_clip(np.asarray(logp), -1.0, np.asarray(adv), eps).mean()),
                           places=6)

  def test_clip_higher(self):
    adv, old = jnp.array([1.0, 1.0]), jnp.array([0.0, 0.0])
    logp = jnp.log(jnp.array([1.25, 1.35]))
    g = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, jnp.ones(2), clip_eps=0.2, clip_eps_high=0.28)[0])(logp)
    self.assertNotEqual(float(g[0]), 0.0)  # 1.25 < 1.28: still inside
    self.assertEqual(float(g[1]), 0.0)

  @parameterized.parameters("token", "sequence")
  def test_one_epoch_unclipped_is_the_policy_gradient(self, reduction):
    rng = np.random.default_rng(8)
    B, T, D, V = 4, 6, 5, 7
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, V, size=(B, T)))
    adv = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    mask = jnp.asarray(np.arange(T)[None] < np.array([[6], [3], [5], [1]]), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)

    def logp_fn(w):
      return jnp.take_along_axis(jax.nn.log_softmax(x @ w), actions[..., None], -1)[..., 0]

    old = logp_fn(w)  # a fresh rollout: pi_old = pi_theta
    ppo = lambda w: rl.ppo_policy_loss(logp_fn(w), old, adv, mask, clip_eps=1e9, reduction=reduction)[0]
    if reduction == "token":
      pg = lambda w: -rl.masked_mean(adv * logp_fn(w), mask)
    else:
      pg = lambda w: -jnp.mean(jnp.sum(adv * logp_fn(w) * mask, 1) / jnp.sum(mask, 1))
    np.testing.assert_allclose(jax.grad(ppo)(w), jax.grad(pg)(w), rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_metrics_and_masking(self):
    rng = np.random.default_rng(9)
    logp, old = (rng.normal(scale=0.3, size=(3, 8)).astype(np.float32) - 2.0 for _ in range(2))
    adv = rng.normal(size=(3, 8)).astype(np.float32)
    mask = (rng.random((3, 8)) < 0.7).astype(np.float32)
    loss, m = self.variant(functools.partial(rl.ppo_policy_loss, clip_eps=0.2))(logp, old, adv, mask)
    sel = mask > 0
    per = _ref_clip(logp.astype(np.float64), old, adv, 0.2)
    self.assertAlmostEqual(float(loss), per[sel].mean(), places=5)
    log_r = (logp - old)[sel].astype(np.float64)
    self.assertAlmostEqual(float(m["approx_kl"]), np.mean(np.expm1(log_r) - log_r), places=5)
    self.assertAlmostEqual(float(m["ratio"]), np.mean(np.exp(log_r)), places=5)

  def test_bad_input_raises(self):
    z = jnp.zeros((2, 3))
    with self.assertRaisesRegex(ValueError, "old_logp"):
      rl.ppo_policy_loss(z, jnp.zeros((2, 4)), z, z, clip_eps=0.2)
    with self.assertRaisesRegex(ValueError, "clip_eps"):
      rl.ppo_policy_loss(z, z, z, z, clip_eps=0.0)
    with self.assertRaisesRegex(ValueError, "reduction"):
      rl.ppo_policy_loss(z, z, z, z, clip_eps=0.2, reduction="tokens")


class PpoValueLossTest(chex.TestCase):

  def test_clipping_boundaries(self):
    c = 0.2
    old, ret = jnp.zeros(5), jnp.ones(5)
    values = jnp.array([0.5, 1.5, 0.1, -0.5, -0.1])
    clipped = np.array([True, True, False, False, False])  # where the clipped error is the larger
    loss_fn = lambda v: rl.ppo_value_loss(v, old, ret, jnp.ones(5), clip_eps=c)[0]
    plain_fn = lambda v: rl.ppo_value_loss(v, old, ret, jnp.ones(5))[0]
    g, g_plain = np.asarray(jax.grad(loss_fn)(values)), np.asarray(jax.grad(plain_fn)(values))
    np.testing.assert_array_equal(g[clipped], 0.0)
    np.testing.assert_allclose(g[~clipped], g_plain[~clipped], rtol=1e-6)
    np.testing.assert_allclose(g_plain, (np.asarray(values) - 1.0) / 5, rtol=1e-6)
    v = np.asarray(values, np.float64)
    want = 0.5 * np.mean(np.maximum((v - 1) ** 2, (np.clip(v, -c, c) - 1) ** 2))
    loss, m = rl.ppo_value_loss(values, old, ret, jnp.ones(5), clip_eps=c)
    self.assertAlmostEqual(float(loss), want, places=6)
    self.assertAlmostEqual(float(m["value_clip_fraction"]), clipped.mean(), places=6)
    self.assertAlmostEqual(float(m["value_error"]), np.mean((v - 1) ** 2), places=6)

  def test_bad_clip_raises(self):
    z = jnp.zeros(3)
    with self.assertRaisesRegex(ValueError, "clip_eps"):
      rl.ppo_value_loss(z, z, z, z, clip_eps=-1.0)
    with self.assertRaisesRegex(ValueError, "returns"):
      rl.ppo_value_loss(z, z, jnp.zeros(4), z)


class GroupAdvantageTest(chex.TestCase):
  """GRPO and RLOO as trl 1.16.0 computes them (grpo_trainer.py / rloo_trainer.py, `_generate_and_score_completions`)."""

  def test_hand_values(self):
    r = np.asarray([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    std0 = np.sqrt(14.0 / 3.0)                       # Bessel-corrected, as trl's nanstd
    std1 = np.sqrt(1.0 / 3.0)
    want = np.asarray([[-2, -1, 0, 3], [-0.5, -0.5, 0.5, 0.5]]) / np.asarray([[std0 + 1e-4], [std1 + 1e-4]])
    np.testing.assert_allclose(rl.grpo_advantages(r), want, rtol=1e-6)
    np.testing.assert_allclose(rl.grpo_advantages(r, scale_rewards="none"), r - r.mean(1, keepdims=True), rtol=1e-6)
    batch_std = np.std(r, ddof=1)
    np.testing.assert_allclose(rl.grpo_advantages(r, scale_rewards="batch"),
                               (r - r.mean(1, keepdims=True)) / (batch_std + 1e-4), rtol=1e-6)
    # RLOO: each reward minus the mean of its siblings = G/(G-1) (r - mean r).
    np.testing.assert_allclose(rl.rloo_advantages(r)[0], [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(rl.rloo_advantages(r), 4 / 3 * (r - r.mean(1, keepdims=True)), rtol=1e-6)

  def test_equal_rewards_give_zero_advantage_and_bad_shapes_raise(self):
    r = np.full((2, 3), 0.7)
    np.testing.assert_allclose(rl.grpo_advantages(r), 0.0, atol=1e-6)
    np.testing.assert_allclose(rl.rloo_advantages(r), 0.0, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "rewards_PxG must be"):
      rl.rloo_advantages(np.ones((4, 1)))
    with self.assertRaisesRegex(ValueError, "scale_rewards must be one of"):
      rl.grpo_advantages(r, scale_rewards="std")


class RunningMomentsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equal_numpy_moments_of_the_concatenated_stream(self):
    rng = np.random.default_rng(12)
    moments = rl.running_moments()
    update = self.variant(moments.update)
    state = moments.init()
    seen = []
    for i, n in enumerate([1, 7, 3, 12]):
      x = rng.normal(loc=2.0 + i, scale=0.5 + i, size=(n,)).astype(np.float32)
      mask = (rng.random(n) < 0.7).astype(np.float32) if i == 2 else None
      state = update(state, x, mask)
      seen.append(x if mask is None else x[mask > 0])
      stream = np.concatenate(seen).astype(np.float64)
      self.assertEqual(float(state.count), stream.size)
      self.assertAlmostEqual(float(state.mean), stream.mean(), places=5)
      self.assertAlmostEqual(float(state.var), stream.var(), places=4)
      if stream.size > 1:
        self.assertAlmostEqual(float(rl.moments_std(state)), stream.std(ddof=1), places=4)

  def test_empty_start_and_empty_batch(self):
    moments = rl.running_moments()
    state = moments.init()
    self.assertEqual(float(rl.moments_std(state)), 1.0)   # nothing seen: no scaling
    state = moments.update(state, jnp.array([1.0, 3.0]))
    same = moments.update(state, jnp.array([5.0, 7.0]), jnp.zeros(2))   # a batch with nothing valid
    chex.assert_trees_all_close(same, state)
    self.assertAlmostEqual(float(state.var), 1.0, places=6)


if __name__ == "__main__":
  absltest.main()
