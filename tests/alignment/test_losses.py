"""jaxml.alignment.losses: live parity with trl 1.16.0, golden values, SLiC-HF's formula, bad input.

Every DPO loss type trl 1.16.0 accepts, and weighted combinations (MPO), are
computed by TRL's own `DPOTrainer._compute_loss` in the peer environment
(tests/peer_scripts/trl_losses.py, float64) on the same float32 inputs:
losses and the gradients with respect to the four sequence log-probs must
agree to 1e-5 relative (of the largest entry), and so must TRL's metrics.
The reward-model loss is compared with `RewardTrainer.compute_loss` the same
way. The peer process starts once for the module.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from jaxml import alignment
from jaxml.alignment import losses
from tests import peer

pytestmark = pytest.mark.xdist_group("test_trl_losses")  # one worker per module: the peer runs once

RTOL = 1e-5
B, T = 16, 24
# The label smoothing each type is exercised with (TRL ignores it for the others); the golden pair uses only
# the first two.
EPS = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.05, "aot_unpaired": 0.05}
GOLDEN_EPS = {"robust": 0.1, "exo_pair": 1e-3}
MPO = dict(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0))
# The golden pair from the alignment notes (computed there with trl 1.16.0's own code; also checked live below):
# logpi_c -10, logpi_r -12, logref -11 for both, 4-token completions, beta 0.1, robust eps 0.1, exo eps 1e-3.
GOLDEN = {"sigmoid": 0.598139, "hinge": 0.8, "ipo": 20.25, "exo_pair": 2.422015, "nca_pair": 1.338793,
          "robust": 0.573139, "bco_pair": 1.288793, "sppo_hard": 32.0, "aot": 0.598139, "aot_unpaired": 0.598139,
          "apo_zero": 0.950042, "apo_down": 0.975145, "discopop": 0.814763, "sft": 2.5, "sigmoid_norm": 0.668460,
          "mpo": 3.236270}
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def _random_pairs(seed, *, equal=False):
  """Four `[B]` float32 log-prob arrays and a `[2B, T]` completion mask (first column a prompt token)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T, size=2 * B)
  mask = (np.arange(T)[None] >= 1) & (np.arange(T)[None] <= lengths[:, None])
  if equal:
    logps = [np.full(B, -20.0, np.float32)] * 4
  else:
    policy_c = -rng.uniform(5.0, 60.0, size=B)
    policy_r = -rng.uniform(5.0, 60.0, size=B)
    logps = [policy_c, policy_r, policy_c + rng.normal(scale=3.0, size=B), policy_r + rng.normal(scale=3.0, size=B)]
  return [np.asarray(x, np.float32) for x in logps], mask.astype(np.int32)


def _golden_pairs():
  logps = [np.full(2, v, np.float32) for v in (-10.0, -12.0, -11.0, -11.0)]
  mask = np.zeros((4, 6), np.int32)
  mask[:, 1:5] = 1
  return logps, mask


def _cases():
  """name -> (dpo_loss kwargs, log-probs, completion mask)."""
  cases = {}
  for t in losses.DPO_LOSS_TYPES:
    settings = dict(loss_type=(t,), label_smoothing=EPS.get(t, 0.0))
    cases[f"rand_{t}"] = (settings, *_random_pairs(1))
    cases[f"rand_beta_{t}"] = (dict(settings, beta=0.7), *_random_pairs(2))
    cases[f"equal_{t}"] = (settings, *_random_pairs(3, equal=True))
    cases[f"golden_{t}"] = (dict(loss_type=(t,), label_smoothing=GOLDEN_EPS.get(t, 0.0)), *_golden_pairs())
  cases["rand_mpo"] = (MPO, *_random_pairs(4))
  cases["golden_mpo"] = (MPO, *_golden_pairs())
  cases["rand_combo"] = (dict(loss_type=("robust", "ipo", "aot", "discopop"), loss_weights=(0.5, 0.3, 1.2, 0.7),
                              label_smoothing=0.1, beta=0.3, discopop_tau=0.2), *_random_pairs(5))
  cases["robust_eps_0.49"] = (dict(loss_type=("robust",), label_smoothing=0.49), *_random_pairs(6))
  return cases


CASES = _cases()
# Outside our accepted range: TRL computes these anyway (we raise), reported for the record.
TRL_ONLY = {"robust_eps_0.5": (dict(loss_type=("robust",), label_smoothing=0.5), *_random_pairs(7))}
REWARD_CASES = {"rm_margin_center": dict(margin=True, center_coef=0.01),
                "rm_plain": dict(margin=False, center_coef=0.0),
                "rm_center": dict(margin=False, center_coef=0.5),
                "rm_margin": dict(margin=True, center_coef=0.0)}


def _reward_inputs(name):
  rng = np.random.default_rng(100 + list(REWARD_CASES).index(name))
  r_c, r_r = (rng.normal(scale=2.0, size=B).astype(np.float32) for _ in range(2))
  margin = rng.uniform(0.0, 1.5, size=B).astype(np.float32) if REWARD_CASES[name]["margin"] else None
  return r_c, r_r, margin


def _lengths(mask):
  """Completion token counts `(chosen [B], rejected [B])` from a `[2B, T]` mask."""
  n = mask.sum(1).astype(np.float32)
  return n[: len(n) // 2], n[len(n) // 2:]


def _ours(settings, logps, mask):
  """jaxml's loss, gradients and metrics (eager: faster here than compiling each case; jit is tested below)."""
  n_c, n_r = _lengths(mask)

  def loss_fn(pc, pr, rc, rr):
    return losses.dpo_loss(pc, pr, rc, rr, chosen_lengths_B=n_c, rejected_lengths_B=n_r, **settings)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(*logps)
  return float(loss), [np.asarray(g, np.float64) for g in grads], {k: float(v) for k, v in metrics.items()}


def _peer_settings(name, settings):
  return dict(name=name, loss_type=list(settings["loss_type"]), loss_weights=list(settings.get("loss_weights", ())),
              beta=settings.get("beta", 0.1), label_smoothing=settings.get("label_smoothing", 0.0),
              discopop_tau=settings.get("discopop_tau", 0.05))


@functools.lru_cache(maxsize=None)
def trl_reference():
  """One peer run computing every case with TRL."""
  inputs, dpo_cases = {}, []
  for name, (settings, logps, mask) in {**CASES, **TRL_ONLY}.items():
    for key, x in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), logps):
      inputs[f"{name}__{key}"] = x.astype(np.float64)
    inputs[f"{name}__completion_mask"] = mask
    dpo_cases.append(_peer_settings(name, settings))
  reward_cases = []
  for name, spec in REWARD_CASES.items():
    r_c, r_r, margin = _reward_inputs(name)
    inputs[f"{name}__chosen"], inputs[f"{name}__rejected"] = r_c.astype(np.float64), r_r.astype(np.float64)
    if margin is not None:
      inputs[f"{name}__margin"] = margin.astype(np.float64)
    reward_cases.append(dict(name=name, center_rewards_coefficient=spec["center_coef"] or None))
  return peer.run("trl_losses", inputs, dpo_cases=dpo_cases, reward_cases=reward_cases)


def _rel(ours, ref):
  """Largest |ours - ref| relative to the largest |ref| (floored at 1e-3 for all-zero references)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-3))


class TrlParityTest(parameterized.TestCase):

  def test_written_against_trl_1_16_0(self):
    self.assertEqual(trl_reference()["trl_version"], "1.16.0")

  @parameterized.named_parameters(*[(name, name) for name in CASES])
  def test_dpo_loss_and_gradients_match_trl(self, name):
    ref = trl_reference()
    loss, grads, metrics = _ours(*CASES[name])
    self.assertLess(_rel(loss, ref[f"{name}__loss"]), RTOL, msg=f"loss {loss} vs TRL {float(ref[f'{name}__loss'])}")
    for key, g in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), grads):
      self.assertLess(_rel(g, ref[f"{name}__grad_{key}"]), RTOL, msg=f"d loss / d {key}")
    for key in DPO_METRICS:
      self.assertAlmostEqual(metrics[key], float(ref[f"{name}__metric__{key}"]), places=4, msg=key)

  def test_equal_logps_sigmoid_is_log_2(self):
    ref = trl_reference()
    loss, _, _ = _ours(*CASES["equal_sigmoid"])
    self.assertAlmostEqual(loss, np.log(2.0), places=6)
    self.assertAlmostEqual(float(ref["equal_sigmoid__loss"]), np.log(2.0), places=12)

  def test_golden_values_are_trls(self):
    ref = trl_reference()
    for name, want in GOLDEN.items():
      self.assertAlmostEqual(float(ref[f"golden_{name}__loss"]), want, places=5, msg=name)

  def test_robust_label_smoothing_half_raises_here_but_not_in_trl(self):
    settings, logps, mask = TRL_ONLY["robust_eps_0.5"]
    with self.assertRaisesRegex(ValueError, "label_smoothing"):
      _ours(settings, logps, mask)
    # TRL 1.16.0 only logs a warning in DPOTrainer.__init__ and then divides by 1 - 2 eps = 0.
    self.assertFalse(np.isfinite(float(trl_reference()["robust_eps_0.5__loss"])))

  @parameterized.named_parameters(*[(name, name) for name in REWARD_CASES])
  def test_reward_loss_matches_trl(self, name):
    ref = trl_reference()
    r_c, r_r, margin = _reward_inputs(name)
    coef = REWARD_CASES[name]["center_coef"]
    fn = lambda c, r: alignment.reward_loss(c, r, margin_B=margin, center_coef=coef)
    (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(r_c, r_r)
    self.assertLess(_rel(loss, ref[f"{name}__loss"]), RTOL)
    self.assertLess(_rel(grads[0], ref[f"{name}__grad_chosen"]), RTOL)
    self.assertLess(_rel(grads[1], ref[f"{name}__grad_rejected"]), RTOL)
    for key in ("accuracy", "margin"):
      self.assertAlmostEqual(float(metrics[key]), float(ref[f"{name}__metric__{key}"]), places=5, msg=key)


class DpoLossTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(t, t) for t in GOLDEN])
  def test_golden(self, name):
    logps, _ = _golden_pairs()
    settings = MPO if name == "mpo" else dict(loss_type=name, label_smoothing=GOLDEN_EPS.get(name, 0.0))
    n = jnp.full(2, 4.0)
    fn = functools.partial(losses.dpo_loss, chosen_lengths_B=n, rejected_lengths_B=n, **settings)
    loss, _ = self.variant(fn)(*logps)
    self.assertAlmostEqual(float(loss), GOLDEN[name], places=5,
                           msg="golden from trl 1.16.0; change only if TRL's formula for this type changes")

  def test_combination_is_the_weighted_sum_of_means(self):
    logps, mask = _random_pairs(11)
    n_c, n_r = _lengths(mask)
    kw = dict(chosen_lengths_B=n_c, rejected_lengths_B=n_r)
    total, metrics = losses.dpo_loss(*logps, **MPO, **kw)
    parts = [float(losses.dpo_loss(*logps, loss_type=t, **kw)[0]) for t in MPO["loss_type"]]
    self.assertAlmostEqual(float(total), float(np.dot(MPO["loss_weights"], parts)), places=4)
    self.assertAlmostEqual(float(metrics["loss/bco_pair"]), parts[1], places=5)

  def test_metrics(self):
    logps, _ = _random_pairs(12)
    _, m = losses.dpo_loss(*logps, beta=0.2)
    cl, rl = (logps[0] - logps[2]).astype(np.float64), (logps[1] - logps[3]).astype(np.float64)
    self.assertAlmostEqual(float(m["rewards/chosen"]), 0.2 * cl.mean(), places=4)
    self.assertAlmostEqual(float(m["rewards/margins"]), 0.2 * (cl - rl).mean(), places=4)
    self.assertAlmostEqual(float(m["rewards/accuracies"]), float(np.mean(cl > rl)), places=6)

  def test_bad_input_raises_naming_the_argument(self):
    good = [jnp.full(3, -5.0)] * 4
    n = jnp.full(3, 4.0)
    with self.assertRaisesRegex(ValueError, "policy_rejected_logps_B"):
      losses.dpo_loss(good[0], jnp.full(4, -5.0), good[2], good[3])
    with self.assertRaisesRegex(ValueError, "ref_chosen_logps_B"):
      losses.dpo_loss(good[0], good[1], jnp.array([-5.0, np.nan, -5.0]), good[3])
    with self.assertRaisesRegex(ValueError, "policy_chosen_logps_B"):
      losses.dpo_loss(jnp.array([-5.0, -np.inf, -5.0]), *good[1:])
    for beta in (0.0, -0.1, float("nan")):
      with self.assertRaisesRegex(ValueError, "beta"):
        losses.dpo_loss(*good, beta=beta)
    with self.assertRaisesRegex(ValueError, "label_smoothing.*robust"):
      losses.dpo_loss(*good, loss_type="robust", label_smoothing=0.5)
    with self.assertRaisesRegex(ValueError, "label_smoothing.*exo_pair"):
      losses.dpo_loss(*good, loss_type="exo_pair")
    with self.assertRaisesRegex(ValueError, "label_smoothing.*sigmoid"):
      losses.dpo_loss(*good, label_smoothing=0.1)
    with self.assertRaisesRegex(ValueError, "sigmoid_norm"):  # the message lists the valid types
      losses.dpo_loss(*good, loss_type="dpo")
    with self.assertRaisesRegex(ValueError, "loss_weights"):
      losses.dpo_loss(*good, loss_type=("sigmoid", "sft"), loss_weights=(1.0,), chosen_lengths_B=n)
    for t, missing in (("ipo", "chosen_lengths_B"), ("sigmoid_norm", "chosen_lengths_B"), ("sft", "chosen_lengths_B")):
      with self.assertRaisesRegex(ValueError, missing):
        losses.dpo_loss(*good, loss_type=t)
    with self.assertRaisesRegex(ValueError, "rejected_lengths_B"):
      losses.dpo_loss(*good, loss_type="ipo", chosen_lengths_B=n)
    losses.dpo_loss(*good, loss_type="sft", chosen_lengths_B=n)  # sft needs only the chosen lengths

  def test_shapes_are_checked_under_jit_values_are_not(self):
    fn = jax.jit(lambda a, b: losses.dpo_loss(a, b, a, b)[0])
    with self.assertRaisesRegex(ValueError, "policy_rejected_logps_B"):
      fn(jnp.zeros(3), jnp.zeros(2))
    self.assertTrue(np.isnan(float(fn(jnp.array([np.nan, 0.0]), jnp.zeros(2)))))


def slic_by_hand(pos, neg, target, delta, reg):
  """SLiC-HF's Eq. 1 per example, then the batch mean, in float64 Python."""
  per = [max(0.0, delta - float(p) + float(n)) - reg * float(t) for p, n, t in zip(pos, neg, target)]
  return sum(per) / len(per)


class SlicAndRewardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_slic_matches_the_paper_formula(self):
    rng = np.random.default_rng(13)
    pos, neg, target = (-rng.uniform(5.0, 40.0, size=B).astype(np.float32) for _ in range(3))
    neg[:4] = pos[:4] - 10.0  # a few pairs already past the margin: zero hinge
    fn = functools.partial(alignment.slic_loss, delta=1.5, reg_weight=0.3)
    loss, m = self.variant(fn)(pos, neg, target)
    self.assertAlmostEqual(float(loss), slic_by_hand(pos, neg, target, 1.5, 0.3), places=4)
    self.assertAlmostEqual(float(m["regularizer"]), -float(np.mean(target.astype(np.float64))), places=4)
    g_pos, g_neg, g_target = jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1, 2))(pos, neg, target)
    active = (1.5 - pos.astype(np.float64) + neg) > 0
    np.testing.assert_allclose(g_pos, np.where(active, -1.0 / B, 0.0), rtol=1e-6)
    np.testing.assert_allclose(g_neg, np.where(active, 1.0 / B, 0.0), rtol=1e-6)
    np.testing.assert_allclose(g_target, np.full(B, -0.3 / B), rtol=1e-6)

  def test_trl_hinge_is_beta_times_slic_with_a_flat_reference(self):
    rng = np.random.default_rng(14)
    pos, neg = (-rng.uniform(5.0, 20.0, size=B).astype(np.float32) for _ in range(2))
    ref = np.full(B, -7.0, np.float32)
    beta = 0.25
    hinge, _ = alignment.dpo_loss(pos, neg, ref, ref, beta=beta, loss_type="hinge")
    slic, m = alignment.slic_loss(pos, neg, np.zeros(B, np.float32), delta=1.0 / beta, reg_weight=0.0)
    self.assertAlmostEqual(float(hinge), beta * float(slic), places=5)
    self.assertAlmostEqual(float(m["calibration_loss"]), float(slic), places=6)

  def test_reward_loss_by_hand(self):
    r_c = np.array([1.0, -0.5, 2.0], np.float32)
    r_r = np.array([0.0, 0.5, 2.5], np.float32)
    margin = np.array([0.5, 0.0, 1.0], np.float32)
    loss, m = alignment.reward_loss(r_c, r_r, margin_B=margin, center_coef=0.01)
    z = (r_c - r_r - margin).astype(np.float64)
    want = np.mean(np.log1p(np.exp(-z))) + 0.01 * np.mean((r_c + r_r).astype(np.float64) ** 2)
    self.assertAlmostEqual(float(loss), want, places=5)
    self.assertAlmostEqual(float(m["accuracy"]), 1.0 / 3.0, places=6)
    self.assertAlmostEqual(float(m["margin"]), float(np.mean(r_c - r_r)), places=6)

  def test_bad_input_raises(self):
    z = jnp.zeros(3)
    with self.assertRaisesRegex(ValueError, "r_rejected_B"):
      alignment.reward_loss(z, jnp.zeros(2))
    with self.assertRaisesRegex(ValueError, "margin_B"):
      alignment.reward_loss(z, z, margin_B=jnp.zeros(4))
    with self.assertRaisesRegex(ValueError, "center_coef"):
      alignment.reward_loss(z, z, center_coef=-1.0)
    with self.assertRaisesRegex(ValueError, "logp_neg_B"):
      alignment.slic_loss(z, jnp.zeros(2), z, delta=1.0, reg_weight=0.1)
    with self.assertRaisesRegex(ValueError, "logp_ref_target_B"):
      alignment.slic_loss(z, z, jnp.array([0.0, np.nan, 0.0]), delta=1.0, reg_weight=0.1)
    with self.assertRaisesRegex(ValueError, "delta"):
      alignment.slic_loss(z, z, z, delta=-1.0, reg_weight=0.1)


if __name__ == "__main__":
  absltest.main()
