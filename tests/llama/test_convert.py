"""Checkpoint conversion: rotary permutation, lossless round trips, Meta .pth reading, bad input.

Logit parity with transformers lives in test_hf_parity.py; here the peer is
used once, to write real torch files for the torch-free .pth reader.
"""
import json
import os
import pathlib
import pickle
import shutil
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxml.llama import convert, model
from jaxml.llama.config import LlamaConfig
from jaxml.nn import layers as nn
from tests import peer

pytestmark = pytest.mark.xdist_group("test_convert")  # one worker per module: its peer fixture starts once

TINY = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=32)
CONFIGS = {"mha": LlamaConfig(n_kv_heads=4, **TINY), "gqa": LlamaConfig(n_kv_heads=2, **TINY),
           "mqa": LlamaConfig(n_kv_heads=1, **TINY)}


def _random_params(cfg, seed=0):
  """Random values in every leaf (numpy, no compiles), so a wrong mapping cannot hide."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32), s.dtype),
                                model.param_shapes(cfg))


# ----------------------------------------------------------------------------- rotary permutation


def _rope_rotate_half(x_TxNxDh, positions_T, theta=10000.0):
  """Hugging Face's rotary convention, written independently in numpy: pairs (j, j + Dh/2)."""
  Dh = x_TxNxDh.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
  ang = positions_T[:, None] * freqs  # [T, Dh/2]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
  first, second = x_TxNxDh[..., :Dh // 2], x_TxNxDh[..., Dh // 2:]
  rotated = np.concatenate([-second, first], -1)
  return x_TxNxDh * cos + rotated * sin


@pytest.mark.parametrize("n_heads, head_dim", [(4, 8), (1, 16), (3, 2)])
def test_permutation_turns_meta_rope_into_rotate_half(n_heads, head_dim):
  """rope_meta(x W_meta), rows permuted == rope_hf(x W_hf) with W_hf = meta_to_hf_rows(W_meta)."""
  rng = np.random.default_rng(0)
  D, T = 12, 5
  w_meta = rng.normal(size=(n_heads * head_dim, D))  # torch layout (out, in)
  w_hf = convert.meta_to_hf_rows(w_meta, n_heads)
  x = rng.normal(size=(T, D))
  pos = np.arange(T, dtype=np.float64) + 3
  q_meta = (x @ w_meta.T).reshape(1, T, n_heads, head_dim)
  rot_meta = np.asarray(nn.apply_rope(jnp.asarray(q_meta, jnp.float32), jnp.asarray(pos[None], jnp.int32)))
  rot_hf = _rope_rotate_half((x @ w_hf.T).reshape(T, n_heads, head_dim), pos)
  # Moving Meta's output channels into HF's order must give HF's rotated vector.
  as_rows = rot_meta[0].reshape(T, n_heads * head_dim).T  # channels as "rows"
  np.testing.assert_allclose(convert.meta_to_hf_rows(as_rows, n_heads).T.reshape(T, n_heads, head_dim), rot_hf,
                             atol=1e-5)
  # And the two directions are inverse permutations (exact).
  np.testing.assert_array_equal(convert.hf_to_meta_rows(w_hf, n_heads), w_meta)
  assert not np.array_equal(w_hf, w_meta) or head_dim == 2


# ----------------------------------------------------------------------------- FFN width recovery


@pytest.mark.parametrize("dim, hidden, expect", [
    (4096, 11008, (256, None)),  # Llama 2 7B
    (5120, 13824, (256, None)),  # Llama 2 13B
    (8192, 28672, (4096, 1.3)),  # Llama 2 70B
    (4096, 14336, (1024, 1.3)),  # Llama 3 8B
    (32, 80, None), (48, 128, None), (64, 1000, None), (96, 7, None),
])
def test_ffn_rounding_recovers_intermediate_size(dim, hidden, expect):
  multiple_of, mult = convert._ffn_rounding(dim, hidden)
  if expect is not None:
    assert (multiple_of, mult) == expect
  assert nn.swiglu_hidden_dim(dim, multiple_of, mult) == hidden


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_is_lossless(name, dtype, tmp_path):
  cfg = CONFIGS[name].replace(param_dtype=dtype, dtype=dtype, norm_eps=1e-6, rope_theta=5e5)
  params = _random_params(cfg)
  convert.to_hf(cfg, params, tmp_path)
  cfg2, params2 = convert.from_hf(tmp_path)
  chex.assert_trees_all_equal(params2, params)
  chex.assert_trees_all_equal_dtypes(params2, params)
  skip = {"multiple_of", "ffn_dim_multiplier"}  # re-derived; the width they give is compared below
  assert {k: v for k, v in cfg2.to_dict().items() if k not in skip} == \
         {k: v for k, v in cfg.to_dict().items() if k not in skip}
  assert cfg2.hidden_dim == cfg.hidden_dim
  # Exporting the import again writes the same bytes.
  convert.to_hf(cfg2, params2, tmp_path / "again")
  a, b = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in a)


def test_to_hf_writes_hf_layout(tmp_path):
  cfg = CONFIGS["gqa"]
  params = _random_params(cfg)
  convert.to_hf(cfg, params, tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert (hf["intermediate_size"], hf["num_key_value_heads"], hf["tie_word_embeddings"]) == (cfg.hidden_dim, 2, False)
  t = load_file(str(tmp_path / "model.safetensors"))
  assert len(t) == 3 + 9 * cfg.n_layers
  np.testing.assert_array_equal(t["model.layers.1.mlp.down_proj.weight"], np.asarray(params["layers"]["w2"][1]).T)
  np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(params["output"]).T)
  wk = np.asarray(params["layers"]["wk"][0]).T
  np.testing.assert_array_equal(t["model.layers.0.self_attn.k_proj.weight"], convert.meta_to_hf_rows(wk, 2))


def test_to_hf_float32_to_bfloat16_only_on_request(tmp_path):
  cfg = CONFIGS["mha"]
  params = _random_params(cfg)
  convert.to_hf(cfg, params, tmp_path, dtype="bfloat16")
  cfg16, p16 = convert.from_hf(tmp_path)
  assert cfg16.param_dtype == "bfloat16" and p16["norm"].dtype == jnp.bfloat16
  chex.assert_trees_all_equal(p16, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))
  _, p32 = convert.from_hf(tmp_path, dtype="float32")
  assert p32["norm"].dtype == jnp.float32


def test_tied_embeddings_are_untied_on_import(tmp_path):
  cfg = CONFIGS["mha"]
  params = _random_params(cfg)
  convert.to_hf(cfg, params, tmp_path)
  t = load_file(str(tmp_path / "model.safetensors"))
  del t["lm_head.weight"]
  save_file(t, str(tmp_path / "model.safetensors"))
  hf = json.loads((tmp_path / "config.json").read_text())
  hf["tie_word_embeddings"] = True
  (tmp_path / "config.json").write_text(json.dumps(hf))
  _, p = convert.from_hf(tmp_path)
  np.testing.assert_array_equal(p["output"], np.asarray(params["tok_embeddings"]).T)


def test_config_from_hf_reads_both_rope_theta_spellings():
  base = dict(hidden_size=32, intermediate_size=96, num_attention_heads=4, num_hidden_layers=1, vocab_size=10)
  assert convert.config_from_hf({**base, "rope_theta": 1e6}).rope_theta == 1e6  # transformers 4
  assert convert.config_from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) \
      .rope_theta == 5e5  # transformers 5
  with pytest.raises(ValueError, match="rope scaling"):
    convert.config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
  with pytest.raises(ValueError, match="attention_bias"):
    convert.config_from_hf({**base, "attention_bias": True})
  with pytest.raises(ValueError, match="missing field"):
    convert.config_from_hf({"hidden_size": 32})


# ----------------------------------------------------------------------------- bad HF input


@pytest.fixture
def hf_dir(tmp_path):
  cfg = CONFIGS["gqa"]
  convert.to_hf(cfg, _random_params(cfg), tmp_path / "hf")
  return tmp_path / "hf"


def test_missing_key_is_named(hf_dir):
  t = load_file(str(hf_dir / "model.safetensors"))
  del t["model.layers.1.mlp.up_proj.weight"]
  save_file(t, str(hf_dir / "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing: \['model.layers.1.mlp.up_proj.weight'\]"):
    convert.from_hf(hf_dir)


def test_unexpected_layer_is_named(hf_dir):
  hf = json.loads((hf_dir / "config.json").read_text())
  hf["num_hidden_layers"] = 1
  (hf_dir / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="unexpected: .*model.layers.1"):
    convert.from_hf(hf_dir)


def test_wrong_shape_is_named(hf_dir):
  hf = json.loads((hf_dir / "config.json").read_text())
  hf["intermediate_size"] += 16
  (hf_dir / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"layer 0 w1 has shape \(96, 32\), the config expects \(112, 32\)"):
    convert.from_hf(hf_dir)


def test_corrupted_and_partial_files(hf_dir):
  data = (hf_dir / "model.safetensors").read_bytes()
  (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="corrupted"):
    convert.from_hf(hf_dir)
  (hf_dir / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    convert.from_hf(hf_dir)
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="missing"):
    convert.from_hf(hf_dir)
  (hf_dir / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.from_hf(hf_dir)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    convert.from_hf(hf_dir / "nowhere")


def test_mixed_dtypes_need_an_explicit_choice(hf_dir):
  t = load_file(str(hf_dir / "model.safetensors"))
  t["model.norm.weight"] = t["model.norm.weight"].astype(np.float16)
  save_file(t, str(hf_dir / "model.safetensors"))
  with pytest.raises(ValueError, match="mixed dtypes"):
    convert.from_hf(hf_dir)
  cfg, p = convert.from_hf(hf_dir, dtype="float32")
  assert p["norm"].dtype == jnp.float32


def test_to_hf_rejects_params_that_do_not_match(tmp_path):
  cfg = CONFIGS["gqa"]
  params = _random_params(cfg)
  params["layers"]["wk"] = params["layers"]["wk"][:, :, :4]
  with pytest.raises(ValueError, match=r"\['layers'\]\['wk'\]"):
    convert.to_hf(cfg, params, tmp_path)
  assert not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------- Meta .pth (files written by torch)

META_BF16 = dict(name="meta_bf16", vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=16,
                 norm_eps=1e-6, rope_theta=1e6, n_shards=1, bf16=True, seed=11)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  tokens = np.arange(2 * 7, dtype=np.int32).reshape(2, 7) % 40
  workdir = tmp_path_factory.mktemp("torch_files")
  out = peer.run("hf_llama_models", {"tokens": tokens}, workdir=str(workdir), meta=META_BF16, torch_file=True)
  out["tokens"] = tokens
  return out


def test_torch_reader_recovers_every_tensor(torch_files):
  sd = convert.load_torch_state_dict(torch_files["torch_file/path"])
  names = ["bf16", "f16", "i64", "transposed", "shared_a", "shared_b", "scalar"]
  assert sorted(sd) == sorted(names)
  for name in names:
    want = torch_files[f"torch_file/{name}"]
    assert str(sd[name].dtype) == torch_files[f"torch_file/{name}/dtype"], name
    assert sd[name].shape == want.shape, name
    np.testing.assert_array_equal(sd[name].astype(want.dtype), want, err_msg=name)


def test_from_hf_reads_legacy_pytorch_model_bin(torch_files):
  cfg_st, p_st = convert.from_hf(torch_files["torch_file/hf_st"])
  cfg_bin, p_bin = convert.from_hf(torch_files["torch_file/hf_bin"])
  assert cfg_bin == cfg_st
  chex.assert_trees_all_equal(p_bin, p_st)


def test_from_meta_bfloat16_single_shard_matches_hf(torch_files):
  cfg, params = convert.from_meta(torch_files["meta_bf16/folder"], max_seq_len=32)
  assert cfg.param_dtype == "bfloat16" and cfg.rope_theta == 1e6 and cfg.norm_eps == 1e-6
  cfg32, params32 = convert.from_meta(torch_files["meta_bf16/folder"], dtype="float32", max_seq_len=32)
  chex.assert_trees_all_equal(params32, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params))
  logits = np.asarray(model.apply(params32, torch_files["tokens"], cfg32))
  assert np.max(np.abs(logits - torch_files["meta_bf16/logits"])) < 1e-4


@pytest.fixture
def meta_dir(torch_files, tmp_path):
  return pathlib.Path(shutil.copytree(torch_files["meta_bf16/folder"], tmp_path / "meta"))


def test_meta_bad_inputs(meta_dir):
  pth = meta_dir / "consolidated.00.pth"
  params_json = json.loads((meta_dir / "params.json").read_text())
  # Wrong layer count: keys named.
  (meta_dir / "params.json").write_text(json.dumps({**params_json, "n_layers": 3}))
  with pytest.raises(ValueError, match=r"missing: \['layers.2.attention.wk.weight'"):
    convert.from_meta(meta_dir)
  # Wrong width: shape named.
  (meta_dir / "params.json").write_text(json.dumps({**params_json, "multiple_of": 64}))
  with pytest.raises(ValueError, match="layer 0 w1 has shape"):
    convert.from_meta(meta_dir)
  (meta_dir / "params.json").write_text(json.dumps(params_json))
  # A second shard that is not a model-parallel half: merged shapes cannot match.
  shutil.copy(pth, meta_dir / "consolidated.01.pth")
  with pytest.raises(ValueError, match="has shape"):
    convert.from_meta(meta_dir)
  # A missing shard.
  pth.unlink()
  with pytest.raises(FileNotFoundError, match="a shard is missing"):
    convert.from_meta(meta_dir)
  # A truncated shard.
  data = (meta_dir / "consolidated.01.pth").read_bytes()
  (meta_dir / "consolidated.01.pth").unlink()
  (meta_dir / "consolidated.00.pth").write_bytes(data[: len(data) // 3])
  with pytest.raises(ValueError, match="corrupted"):
    convert.from_meta(meta_dir)


def test_torch_reader_refuses_arbitrary_globals(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (os.system, ("true",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": Exploit()}, protocol=2))
  with pytest.raises(ValueError, match="refusing to unpickle global"):
    convert.load_torch_state_dict(path)
  (tmp_path / "plain.pth").write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match="not a torch zip checkpoint"):
    convert.load_torch_state_dict(tmp_path / "plain.pth")
