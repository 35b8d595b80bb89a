"""Parity of jaxml's Llama with Hugging Face `transformers` (peer env, torch CPU).

Random tiny `LlamaForCausalLM`s (MHA, GQA, MQA; float32, seeded) are built and
saved by the peer; jaxml imports them with `from_hf` and must reproduce HF's
logits within 1e-4, and HF must reproduce jaxml's logits after `to_hf`. A
random Meta checkpoint in two model-parallel shards, imported with
`from_meta`, must match the HF model transformers' converter makes from the
same weights. Greedy generation must equal HF `generate(do_sample=False)`
token for token. `sequence_logprobs` on right- and left-padded batches must
equal the summed log-softmax of HF's logits (given the same attention mask
and position ids) within 1e-4. The peer process starts twice in all (module
fixtures).
"""
import pathlib

import numpy as np
import pytest

from jaxml import llama
from jaxml.llama import convert, model
from jaxml.llama.generate import generate
from tests import peer

pytestmark = pytest.mark.xdist_group("test_hf_parity")  # one worker per module: its peer fixture starts once

TOL = 1e-4
VOCAB = 96
# intermediate sizes chosen to hit each branch of the FFN rounding recovery:
# 80 < int(8*32/3) (multiplier < 1), 128 (rounded to itself), 256 (Meta's multiple_of=256).
HF_CONFIGS = [
    dict(name="mha", vocab_size=VOCAB, dim=32, intermediate_size=80, n_layers=2, n_heads=4, n_kv_heads=4, seed=1),
    dict(name="gqa", vocab_size=VOCAB, dim=48, intermediate_size=128, n_layers=2, n_heads=6, n_kv_heads=2, seed=2,
         rope_theta=500000.0, norm_eps=1e-6, max_shard_size="40KB", generate=True),
    dict(name="mqa", vocab_size=VOCAB, dim=64, intermediate_size=256, n_layers=3, n_heads=4, n_kv_heads=1, seed=3),
]
META_CONFIG = dict(name="meta", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                   ffn_dim_multiplier=1.3, norm_eps=1e-5, n_shards=2, seed=4)
PROMPTS = [[1, 17, 42], [1, 5, 9, 33, 61, 70, 12], [1, 88, 23, 4, 50]]
MAX_NEW = 8
# Strong enough that greedy decoding with the penalty departs from decoding without it (asserted below).
REPETITION_PENALTY = 3.0
# Padded batches for sequence_logprobs: rows of these lengths, scored after their first PROMPT_LENS tokens.
SEQ_LENS, PROMPT_LENS, SEQ_T = [14, 6, 9], [3, 1, 5], 14


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).astype(np.int32)


def _seq_batch(side):
  """`(tokens, attention mask, loss mask)` `[3, SEQ_T]` int32, rows padded on `side` with id 0."""
  rows = [np.random.default_rng(10 + i).integers(1, VOCAB, size=n) for i, n in enumerate(SEQ_LENS)]
  tokens, attention, loss = (np.zeros((len(rows), SEQ_T), np.int32) for _ in range(3))
  for i, (r, p) in enumerate(zip(rows, PROMPT_LENS)):
    s = 0 if side == "right" else SEQ_T - len(r)
    tokens[i, s:s + len(r)], attention[i, s:s + len(r)], loss[i, s + p:s + len(r)] = r, 1, 1
  return tokens, attention, loss


@pytest.fixture(scope="module")
def ref(tokens, tmp_path_factory):
  """Everything the peer builds, in one process."""
  workdir = str(tmp_path_factory.mktemp("hf_llama_models"))
  inputs = {"tokens": tokens}
  for side in ("right", "left"):
    inputs.update(zip([f"seq_{side}_tokens", f"seq_{side}_attention", f"seq_{side}_loss"], _seq_batch(side)))
  return peer.run("hf_llama_models", inputs, workdir=workdir, hf_configs=HF_CONFIGS, prompts=PROMPTS,
                  max_new_tokens=MAX_NEW, meta=META_CONFIG, seq_batches=["right", "left"],
                  repetition_penalty=REPETITION_PENALTY)


@pytest.fixture(scope="module")
def imported(ref):
  return {c["name"]: convert.from_hf(ref[f"{c['name']}/folder"]) for c in HF_CONFIGS}


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", [c["name"] for c in HF_CONFIGS])
def test_from_hf_logits_match(name, ref, imported, tokens):
  cfg, params = imported[name]
  spec = next(c for c in HF_CONFIGS if c["name"] == name)
  assert (cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == (spec["n_heads"], spec["n_kv_heads"],
                                                         spec["intermediate_size"])
  assert cfg.rope_theta == spec.get("rope_theta", 10000.0) and cfg.norm_eps == spec.get("norm_eps", 1e-5)
  logits = np.asarray(model.apply(params, tokens, cfg))
  diff = _max_diff(logits, ref[f"{name}/logits"])
  print(f"from_hf {name}: max |logit diff| = {diff:.2e}")
  assert diff < TOL, f"{name}: jaxml vs HF logits differ by {diff}"


def test_sharded_hf_checkpoint_was_sharded(ref):
  folder = pathlib.Path(ref["gqa/folder"])
  assert (folder / "model.safetensors.index.json").exists()
  assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1


@pytest.fixture(scope="module")
def exported(imported, tokens, tmp_path_factory):
  """jaxml -> HF: each imported model written back with to_hf (float32), plus a bfloat16 export."""
  root = tmp_path_factory.mktemp("to_hf")
  folders, jaxml_logits = [], []
  for name, (cfg, params) in imported.items():
    folders.append(str(convert.to_hf(cfg, params, root / name)))
    jaxml_logits.append(np.asarray(model.apply(params, tokens, cfg)))
  cfg, params = imported["gqa"]
  folders.append(str(convert.to_hf(cfg, params, root / "gqa_bf16", dtype="bfloat16")))
  cfg16, params16 = convert.from_hf(folders[-1], dtype="float32")  # the bf16 values, exactly, in float32
  jaxml_logits.append(np.asarray(model.apply(params16, tokens, cfg16)))
  out = peer.run("hf_llama_load", {"tokens": tokens}, workdir=str(root / "peer"), folders=folders)
  return folders, jaxml_logits, out


def test_to_hf_logits_reproduced_by_hf(exported):
  folders, jaxml_logits, out = exported
  for i, (folder, logits) in enumerate(zip(folders, jaxml_logits)):
    assert not out[f"{i}/problems"], f"HF loading {folder}: {out[f'{i}/problems']}"
    diff = _max_diff(logits, out[f"{i}/logits"])
    print(f"to_hf {pathlib.Path(folder).name}: max |logit diff| = {diff:.2e}")
    assert diff < TOL, f"{folder}: HF logits differ from jaxml's by {diff}"
  assert out[f"{len(folders) - 1}/stored_dtypes"] == ["torch.bfloat16"]
  assert out["0/stored_dtypes"] == ["torch.float32"]


def test_from_meta_sharded_matches_hf_conversion(ref, tokens):
  cfg, params = convert.from_meta(ref["meta/folder"], max_seq_len=64)
  assert cfg.hidden_dim == 224  # int(1.3 * int(8 * 64 / 3)) = 221, rounded up to a multiple of 32
  logits = np.asarray(model.apply(params, tokens, cfg))
  diff = _max_diff(logits, ref["meta/logits"])
  print(f"from_meta (2 shards): max |logit diff| = {diff:.2e}")
  assert diff < TOL, f"from_meta vs HF-converted logits differ by {diff}"


@pytest.mark.parametrize("name", [c["name"] for c in HF_CONFIGS if c.get("generate")])
def test_greedy_generation_matches_hf(name, ref, imported):
  cfg, params = imported[name]
  free = generate(params, cfg, PROMPTS, MAX_NEW)
  assert free == [list(map(int, g)) for g in ref[f"{name}/gen_free"]]
  eos = int(ref[f"{name}/eos_id"])
  stopped = generate(params, cfg, PROMPTS, MAX_NEW, eos_id=eos)
  expected = [list(map(int, g)) for g in ref[f"{name}/gen_eos"]]
  assert stopped == expected
  assert len(stopped[0]) < MAX_NEW  # the EOS picked by the peer really stops the first prompt


@pytest.mark.parametrize("name", [c["name"] for c in HF_CONFIGS if c.get("generate")])
def test_greedy_generation_with_repetition_penalty_matches_hf(name, ref, imported):
  """`repetition_penalty` penalises prompt and new tokens as transformers' `repetition_penalty` does."""
  cfg, params = imported[name]
  expected = [list(map(int, g)) for g in ref[f"{name}/gen_penalty"]]
  assert expected != [list(map(int, g)) for g in ref[f"{name}/gen_free"]]  # the penalty changes the path
  got = generate(params, cfg, PROMPTS, MAX_NEW, repetition_penalty=REPETITION_PENALTY)
  assert got == expected
  tokens, lengths = np.zeros((len(PROMPTS), 7), np.int32), np.array([len(p) for p in PROMPTS])
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  arrays, _, _ = llama.generate_arrays(params, cfg, tokens, lengths, MAX_NEW, repetition_penalty=REPETITION_PENALTY)
  assert np.asarray(arrays).tolist() == expected


@pytest.mark.parametrize("name", [c["name"] for c in HF_CONFIGS])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logprobs_match_hf(name, side, ref, imported):
  """Sums of log_softmax(HF logits) at the next tokens over the loss mask, padding and positions given to HF."""
  cfg, params = imported[name]
  tokens, attention, loss = _seq_batch(side)
  got = np.asarray(llama.sequence_logprobs(params, tokens, loss, cfg, attention_mask_BxT=attention))
  want = ref[f"{name}/seq_{side}"]
  diff = _max_diff(got, want)
  print(f"sequence_logprobs {name} {side}-padded: max |sum diff| = {diff:.2e} (sums {np.round(want, 2).tolist()})")
  assert np.all(want < -1.0)  # really scored something
  assert diff < TOL, f"{name} {side}: jaxml vs HF sequence log-probs differ by {diff}"


# The attention forms of `LlamaConfig.attention_impl` against the same HF logits ("cpu", the default on
# this backend, is the path of the tests above). Blocks of 5 do not divide the 12 tokens.
# cudnn (XLA's expansion of jax.nn.dot_product_attention on CPU) on one config, to keep the suite short.
FORMS = [("blockwise", c["name"]) for c in HF_CONFIGS] + [("cudnn", "gqa")]


@pytest.mark.parametrize("impl,name", FORMS)
def test_from_hf_logits_match_every_attention_form(name, impl, ref, imported, tokens):
  cfg, params = imported[name]
  cfg = cfg.replace(attention_impl=impl, attention_block=5)
  diff = _max_diff(model.apply(params, tokens, cfg), ref[f"{name}/logits"])
  print(f"from_hf {name} attention {impl}: max |logit diff| = {diff:.2e}")
  assert diff < TOL, f"{name} ({impl}): jaxml vs HF logits differ by {diff}"


def test_from_hf_logits_match_pallas_attention(ref, imported, tokens):
  """The Pallas TPU kernel, interpreted on CPU (slow: one config)."""
  import jax.experimental.pallas.tpu as pltpu  # noqa: PLC0415

  cfg, params = imported["gqa"]
  with pltpu.force_tpu_interpret_mode():
    logits = model.apply(params, tokens, cfg.replace(attention_impl="pallas"))
  diff = _max_diff(logits, ref["gqa/logits"])
  print(f"from_hf gqa attention pallas: max |logit diff| = {diff:.2e}")
  assert diff < TOL, f"gqa (pallas): jaxml vs HF logits differ by {diff}"


@pytest.mark.parametrize("impl,side", [("blockwise", "right"), ("blockwise", "left")])
def test_sequence_logprobs_match_hf_every_attention_form(impl, side, ref, imported):
  """Padded rows (the attention mask path; there "cudnn" and "pallas" run as "blockwise")."""
  cfg, params = imported["gqa"]
  tokens, attention, loss = _seq_batch(side)
  got = np.asarray(llama.sequence_logprobs(params, tokens, loss, cfg.replace(attention_impl=impl, attention_block=5),
                                           attention_mask_BxT=attention))
  diff = _max_diff(got, ref[f"gqa/seq_{side}"])
  print(f"sequence_logprobs gqa {side}-padded attention {impl}: max |sum diff| = {diff:.2e}")
  assert diff < TOL, f"gqa {side} ({impl}): jaxml vs HF sequence log-probs differ by {diff}"
