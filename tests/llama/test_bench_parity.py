"""`benchmarks.llama_bench` times the same model on both sides.

Both sides start from jaxml's initial weights (written with `to_hf`, loaded by
the transformers peer) and the benchmark stops unless their first training
two steps' losses agree (`FIRST_LOSS_RTOL`, per precision). Here that check runs
on a tiny config in float32 and bfloat16, and must fail when the peer is handed
another seed's weights.
"""
import pathlib

import jax
import pytest

from benchmarks import llama_bench
from benchmarks.common import PeerWorker
from jaxml import llama

CFG = llama.LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                        max_seq_len=192, scan_layers=False)
SCRIPT = pathlib.Path(llama_bench.__file__).with_name("peer_hf_llama.py")


@pytest.fixture(scope="module")
def worker():
  with PeerWorker(SCRIPT, threads=1) as w:
    w.request("hello", threads=1)
    yield w


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench_weights")
  return {seed: llama.to_hf(CFG, llama.init(jax.random.PRNGKey(seed), CFG), root / str(seed)) for seed in (0, 1)}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_first_step_losses_agree_from_the_same_weights(worker, folders, precision):
  r = llama_bench.bench_train("tiny", CFG, worker, folders[0], precision=precision, rounds=1, budget_s=0.0, seed=0)
  for step in ("first", "second"):
    rel = abs(r[f"{step}_loss_jax"] - r[f"{step}_loss_hf"]) / abs(r[f"{step}_loss_hf"])
    assert rel <= llama_bench.FIRST_LOSS_RTOL[precision], (step, r)
  assert r["second_loss_jax"] != r["first_loss_jax"]  # the update moved the weights
  assert r["jax_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_first_step_check_fails_on_other_weights(worker, folders, precision):
  # jaxml starts from seed 0, the peer from the weights of seed 1.
  with pytest.raises(AssertionError, match="first-step losses differ"):
    llama_bench.bench_train("tiny", CFG, worker, folders[1], precision=precision, rounds=1, budget_s=0.0, seed=0)
