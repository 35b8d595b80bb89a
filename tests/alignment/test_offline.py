"""Offline preference training on the Llama policy: data layout, precomputed vs live reference, the losses equal
dpo_loss / slic_loss on the policy's sequence log-probs, sample-and-rank pairing, and bad input rejected before
compute. (Training through jaxml.train, with resume, is tested by tests/alignment/test_experiment.py.)"""
import jax
import numpy as np
from absl.testing import absltest

from jaxml import alignment, llama
from jaxml.alignment import offline

EOS = 3
CFG = llama.LlamaConfig(vocab_size=4, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=5,
                        scan_layers=False)
PROMPT = np.asarray([EOS], np.int32)
RNG = np.random.default_rng(0)
N = 24


def responses(n):
  lengths = RNG.integers(1, 5, n).astype(np.int32)
  resp = RNG.integers(0, EOS, (n, 4)).astype(np.int32)
  ends = lengths < 4
  resp[np.arange(n)[ends], lengths[ends] - 1] = EOS         # shorter responses end with EOS
  return resp, lengths


C, CL = responses(N)
R, RL = responses(N)
T, TL = responses(N)
DATA = offline.preference_data(PROMPT, C, CL, R, RL, pad_id=EOS, targets_NxL=T, target_lengths_N=TL)
POLICY = llama.init(jax.random.PRNGKey(1), CFG)
REF = llama.init(jax.random.PRNGKey(2), CFG)
WITH_REF = offline.precompute_reference(DATA, REF, CFG, batch_size=16)


_SEQ = jax.jit(lambda p, t, m: llama.sequence_logprobs(p, t, m, CFG))


def plain_logps(params, resp, lengths):
  """Log-probs from rows padded with another id and no attention mask: causality alone keeps the padding out."""
  n = resp.shape[0]
  tokens = np.concatenate([np.full((n, 1), EOS), np.where(np.arange(4) < lengths[:, None], resp, 0)], axis=1)
  mask = np.concatenate([np.zeros((n, 1)), np.arange(4)[None, :] < lengths[:, None]], axis=1).astype(np.int32)
  return np.asarray(_SEQ(params, tokens, mask))


PLAIN = {name: {side: plain_logps(params, resp, n) for side, resp, n in (("c", C, CL), ("r", R, RL), ("t", T, TL))}
         for name, params in (("policy", POLICY), ("ref", REF))}


class DataTest(absltest.TestCase):

  def test_layout_and_reference_logps_equal_the_unpadded_rows(self):
    self.assertEqual(DATA["chosen"].shape, (N, 5))
    np.testing.assert_array_equal(DATA["chosen_loss_mask"].sum(1), CL)
    np.testing.assert_array_equal(DATA["chosen_attention"].sum(1), CL + 1)
    # Padding (pad id == EOS) after the end is never scored: each stored log-prob is the unpadded row's.
    np.testing.assert_allclose(WITH_REF["ref_chosen_logps"], PLAIN["ref"]["c"], atol=1e-4)
    np.testing.assert_allclose(WITH_REF["ref_rejected_logps"], PLAIN["ref"]["r"], atol=1e-4)

  def test_sample_and_rank_pairs_the_best_with_each_other(self):
    resp = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    lengths = np.asarray([[1, 2, 3], [4, 1, 2]])
    scores = np.asarray([[0.1, 0.9, 0.3], [2.0, -1.0, 0.0]])
    c, cl, r, rl = offline.sample_and_rank(resp, lengths, scores)
    np.testing.assert_array_equal(c, resp[[0, 0, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(r, resp[[0, 0, 1, 1], [0, 2, 1, 2]])
    np.testing.assert_array_equal(cl, [2, 2, 4, 4])
    np.testing.assert_array_equal(rl, [1, 3, 1, 2])
    with self.assertRaisesRegex(ValueError, "m >= 2"):
      offline.sample_and_rank(resp[:, :1], lengths[:, :1], scores[:, :1])


class LossTest(absltest.TestCase):

  def _minibatch(self, key, b):
    return np.asarray(jax.random.randint(key, (b,), 0, N))

  def test_dpo_loss_fn_is_dpo_loss_on_the_policy_logps_and_the_flag_changes_nothing(self):
    key = jax.random.PRNGKey(5)
    idx = self._minibatch(key, 8)
    pc, pr = PLAIN["policy"]["c"][idx], PLAIN["policy"]["r"][idx]
    rc, rr = PLAIN["ref"]["c"][idx], PLAIN["ref"]["r"][idx]
    # Precomputed and live reference: the same loss, metrics and gradients; a mix that reads the lengths (ipo).
    mix = dict(beta=0.3, loss_type=("sigmoid", "ipo"), loss_weights=(1.0, 0.5))
    want, _ = alignment.dpo_loss(pc, pr, rc, rr, chosen_lengths_B=CL[idx], rejected_lengths_B=RL[idx], **mix)
    pre = jax.jit(jax.value_and_grad(offline.dpo_loss_fn(CFG, WITH_REF, batch_size=8, **mix), has_aux=True))
    live = jax.jit(jax.value_and_grad(offline.dpo_loss_fn(CFG, DATA, batch_size=8, ref_params=REF, **mix),
                                      has_aux=True))
    (l_pre, m_pre), g_pre = pre(POLICY, None, key)
    (l_live, m_live), g_live = live(POLICY, None, key)
    self.assertAlmostEqual(float(l_pre), float(want), places=4)
    self.assertAlmostEqual(float(l_live), float(l_pre), places=5)
    self.assertAlmostEqual(float(m_live["rewards/margins"]), float(m_pre["rewards/margins"]), places=5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_live, g_pre)
    # The policy at its reference: every log-ratio is 0, sigmoid gives log 2 and ipo 1 / (2 beta)^2.
    (l_ref, m_ref), _ = pre(REF, None, key)
    self.assertAlmostEqual(float(m_ref["loss/sigmoid"]), float(np.log(2.0)), places=5)
    self.assertAlmostEqual(float(m_ref["loss/ipo"]), (1 / 0.6) ** 2, places=4)
    self.assertAlmostEqual(float(l_ref), np.log(2.0) + 0.5 * (1 / 0.6) ** 2, places=4)

  def test_slic_loss_fn_is_slic_loss_on_the_policy_logps(self):
    key = jax.random.PRNGKey(6)
    idx = self._minibatch(key, 8)
    pos, neg, tgt = (PLAIN["policy"][s][idx] for s in ("c", "r", "t"))
    want, _ = alignment.slic_loss(pos, neg, tgt, delta=1.0, reg_weight=0.5)
    loss = offline.slic_loss_fn(CFG, DATA, batch_size=8, delta=1.0, reg_weight=0.5)
    got, metrics = jax.jit(loss)(POLICY, None, key)
    self.assertAlmostEqual(float(got), float(want), places=4)
    self.assertAlmostEqual(float(metrics["regularizer"]), float(-tgt.mean()), places=4)


class SeedEnsembleTest(absltest.TestCase):

  def test_each_seed_trains_as_its_own_run(self):
    # A toy regression whose minibatch comes from the key: seed s of the ensemble (summed loss, vmapped
    # clipped Adam) equals a single run whose loss draws from fold_in(key, s), update by update.
    import optax  # noqa: PLC0415
    from jaxml import train as jt  # noqa: PLC0415
    x_all = jax.random.normal(jax.random.PRNGKey(3), (64, 3))
    y_all = x_all @ jax.numpy.array([1.0, -2.0, 0.5])

    def loss(params, batch, rng):
      del batch
      idx = jax.random.randint(rng, (8,), 0, 64)
      err = x_all[idx] @ params["w"] - y_all[idx]
      return jax.numpy.mean(err ** 2), {"err": jax.numpy.mean(jax.numpy.abs(err))}

    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.1))
    init = {"w": jax.numpy.zeros(3)}
    ens_loss, ens_tx = offline.seed_ensemble(loss, tx, 2)
    state = jt.create_train_state(jax.tree_util.tree_map(lambda a: jax.numpy.stack([a, a]), init), ens_tx,
                                  jax.random.PRNGKey(0))
    step = jax.jit(jt.make_train_step(ens_loss, ens_tx))
    # The single runs: the batch carries the seed s, the loss draws from fold_in(key, s).
    single = jax.jit(jt.make_train_step(lambda p, s, r: loss(p, None, jax.random.fold_in(r, s)), tx))
    singles = [jt.create_train_state(init, tx, jax.random.PRNGKey(0)) for _ in range(2)]
    for _ in range(5):
      state, _ = step(state, None)
      singles = [single(one, jax.numpy.uint32(s))[0] for s, one in enumerate(singles)]
    for s, one in enumerate(singles):
      np.testing.assert_allclose(np.asarray(state.params["w"][s]), np.asarray(one.params["w"]), rtol=1e-5, atol=1e-6)
    self.assertGreater(float(np.abs(np.asarray(state.params["w"][0] - state.params["w"][1])).max()), 1e-3)


class BadInputTest(absltest.TestCase):

  def test_errors_name_the_argument_before_compute(self):
    with self.assertRaisesRegex(ValueError, "chosen_NxL has 24 rows but rejected_NxL 23"):
      offline.preference_data(PROMPT, C, CL, R[:-1], RL[:-1], pad_id=EOS)
    short = dict(DATA, rejected_lengths=DATA["rejected_lengths"][:-1])
    with self.assertRaisesRegex(ValueError, r"data\['rejected_lengths'\] has 23 rows"):
      offline.dpo_loss_fn(CFG, short, batch_size=4, beta=0.1, ref_params=REF)
    bad = dict(WITH_REF, ref_rejected_logps=np.where(np.arange(N) == 3, np.nan, WITH_REF["ref_rejected_logps"]))
    with self.assertRaisesRegex(ValueError, r"data\['ref_rejected_logps'\] has non-finite log-probs .* \[3\]"):
      offline.dpo_loss_fn(CFG, bad, batch_size=4, beta=0.1)
    for beta in (0.0, -0.5):
      with self.assertRaisesRegex(ValueError, "beta must be a finite number > 0"):
        offline.dpo_loss_fn(CFG, WITH_REF, batch_size=4, beta=beta)
    with self.assertRaisesRegex(ValueError, "loss_type 'dpo' is unknown"):
      offline.dpo_loss_fn(CFG, WITH_REF, batch_size=4, beta=0.1, loss_type="dpo")
    with self.assertRaisesRegex(ValueError, "label_smoothing"):
      offline.dpo_loss_fn(CFG, WITH_REF, batch_size=4, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with self.assertRaisesRegex(ValueError, "ref_params is required"):
      offline.dpo_loss_fn(CFG, DATA, batch_size=4, beta=0.1)
    other = llama.param_shapes(CFG.replace(dim=16, n_heads=2, n_kv_heads=1))
    with self.assertRaisesRegex(ValueError, "ref_params do not match the policy's config"):
      offline.dpo_loss_fn(CFG, DATA, batch_size=4, beta=0.1, ref_params=other)
    with self.assertRaisesRegex(ValueError, "batch_size"):
      offline.dpo_loss_fn(CFG, WITH_REF, batch_size=0, beta=0.1)
    with self.assertRaisesRegex(ValueError, "'target' entry"):
      offline.slic_loss_fn(CFG, {k: v for k, v in DATA.items() if not k.startswith("target")}, batch_size=4,
                           delta=1.0, reg_weight=0.1)
    with self.assertRaisesRegex(ValueError, "delta"):
      offline.slic_loss_fn(CFG, DATA, batch_size=4, delta=-1.0, reg_weight=0.1)
    with self.assertRaisesRegex(ValueError, "lengths_N must lie in"):
      offline.encode(PROMPT, C, np.zeros(N, np.int32), pad_id=EOS)


if __name__ == "__main__":
  absltest.main()
