"""`benchmarks.alignment_bench` compares PPO's compiled rollout and update with Python-stepped forms of
the same functions (`benchmarks.ppo_forms`); those must compute the same thing, or the ratio measures nothing.

Run on the alignment experiment's small config (the benchmark's `ppo_*` figures), with the update
shortened to one epoch of two minibatches to keep the compile short. The check must also fail when
the stepped forms are handed another key (other tokens, other minibatch permutations).
"""
import jax
import numpy as np
import pytest

from benchmarks import ppo_forms

pytestmark = pytest.mark.xdist_group("test_alignment_bench")  # one worker: the module fixture compiles once


@pytest.fixture(scope="module")
def parts():
  setup = ppo_forms.small_config_setup(0)
  setup["pcfg"] = setup["pcfg"].replace(ppo_epochs=1, num_minibatches=2)
  return ppo_forms.ppo_parts(setup, seed=0)


def test_stepped_rollout_and_update_equal_the_compiled_ones(parts):
  experience, info = ppo_forms.check_stepped_forms(parts)
  assert info["rows_equal"] == parts["B"] == 64
  assert info["token_fraction"] == 1.0
  assert info["param_gap"] <= 1e-5
  # The rollout ran with EOS: some rows end before the 6-token budget, so what the stepped form
  # writes past a row's EOS was compared (its early stop is the next test's).
  lengths = np.asarray(experience["response_mask"]).sum(axis=1)
  assert lengths.min() < parts["N"]


def test_stepped_rollout_stops_once_every_row_has_ended():
  # Two rows, so that some key ends both before the budget: the stepped loop then stops early and
  # pads the missing columns, which must equal the compiled loop's early exit.
  setup = ppo_forms.small_config_setup(0)
  setup["pcfg"] = setup["pcfg"].replace(ppo_epochs=1, num_minibatches=2)
  setup["prompts"] = setup["prompts"][:2]
  parts = ppo_forms.ppo_parts(setup, seed=0)
  for s in range(40):
    keyed = dict(parts, key=jax.random.PRNGKey(100 + s))
    experience, info = ppo_forms.check_stepped_forms(keyed)
    if np.asarray(experience["response_mask"]).sum(axis=1).max() < parts["N"]:
      break
  else:
    pytest.fail("no key in 40 ended both rows early")
  assert info["rows_equal"] == 2 and info["token_fraction"] == 1.0


def test_the_check_fails_on_another_key(parts):
  other = lambda k: jax.random.fold_in(k, 1)  # noqa: E731
  stepped, stepped_update = parts["stepped"], parts["stepped_update"]
  with pytest.raises(AssertionError, match="rollout disagrees"):
    ppo_forms.check_stepped_forms(dict(parts, stepped=lambda p, e, pr, k: stepped(p, e, pr, other(k))))
  with pytest.raises(AssertionError, match="update disagrees"):
    ppo_forms.check_stepped_forms(
        dict(parts, stepped_update=lambda p, o, e, k: stepped_update(p, o, e, other(k))))
