"""Llama 2 checkpoints in and out: Hugging Face safetensors and Meta `consolidated.*.pth`.

    from_hf(path)             -> (LlamaConfig, params)   config.json + model*.safetensors
    from_meta(path)           -> (LlamaConfig, params)   params.json + consolidated.NN.pth
    to_hf(cfg, params, path)                             config.json + model.safetensors

The jaxml parameter tree (see `jaxml.llama.model`) keeps Meta's names, stores
linear weights `(in, out)` and keeps the rows of `wq`/`wk` in Meta's
interleaved rotary layout. Torch checkpoints store `(out, in)`, so every
linear weight is transposed on the way in and out.

Rotary layouts. Inside one head of width `Dh`, Meta rotates the pairs
`(x[2j], x[2j+1])`; Hugging Face rotates `(x[j], x[j + Dh/2])` ("rotate
half"). The two models agree once the output rows of `wq` and `wk` are
permuted within each head:

    HF row  c * Dh/2 + j   <->   Meta row  2 j + c        (j < Dh/2, c in {0, 1})

i.e. Meta -> HF views the rows of a head as `[Dh/2, 2]` and transposes them
to `[2, Dh/2]`; HF -> Meta is the inverse. `wq` is permuted with `n_heads`
heads, `wk` with `n_kv_heads` heads; `wv` is untouched (no rotation on values).

Meta model-parallel shards (`consolidated.00.pth`, `consolidated.01.pth`, ...)
split each weight as Meta's fairscale layers do: column-parallel layers (`wq`,
`wk`, `wv`, `w1`, `w3`, `output`) along torch dim 0 (output features),
row-parallel layers (`wo`, `w2`) and the parallel embedding (`tok_embeddings`)
along torch dim 1; norms are replicated. The shards are concatenated back in
file order. Whole heads live in one shard, so the rotary layout is unaffected.

`.pth` files are read without torch: a torch checkpoint is a zip archive whose
`data.pkl` describes tensors by reference to raw storages `data/<key>`. A
restricted unpickler (`_TorchUnpickler`) admits only the handful of globals a
state dict needs and rebuilds each tensor as a numpy array from its storage,
offset, shape and strides. Anything else in the pickle is refused.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxml.checkpoint_files import hf_weight_files as _hf_files, load_torch_state_dict  # noqa: F401
from jaxml.checkpoint_files import read_hf_weights as _read_weights, read_json as _read_json
from jaxml.llama import model
from jaxml.llama.config import LlamaConfig
from jaxml.nn.layers import swiglu_hidden_dim

Params = dict[str, Any]
PathLike = str | pathlib.Path

_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}

# jaxml per-layer name -> (Hugging Face name inside `model.layers.{i}.`, Meta name inside `layers.{i}.`)
_LAYER_KEYS = {
    "attention_norm": ("input_layernorm.weight", "attention_norm.weight"),
    "wq": ("self_attn.q_proj.weight", "attention.wq.weight"),
    "wk": ("self_attn.k_proj.weight", "attention.wk.weight"),
    "wv": ("self_attn.v_proj.weight", "attention.wv.weight"),
    "wo": ("self_attn.o_proj.weight", "attention.wo.weight"),
    "ffn_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "w1": ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    "w3": ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    "w2": ("mlp.down_proj.weight", "feed_forward.w2.weight"),
}
_LINEAR = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
# Buffers some checkpoints carry that are recomputed from the config.
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_IGNORED_META = ("rope.freqs",)


# ----------------------------------------------------------------------------- rotary permutation


def meta_to_hf_rows(w_out_x_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Permutes the output rows of a torch-layout `(out, in)` q/k weight, Meta -> HF.

  Per head, rows `2j + c` move to `c * Dh/2 + j` (see the module docstring).
  """
  out, cols = w_out_x_in.shape
  if out % (2 * n_heads):
    raise ValueError(f"q/k weight with {out} rows cannot hold {n_heads} heads of even width")
  half = out // n_heads // 2
  return w_out_x_in.reshape(n_heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(out, cols)


def hf_to_meta_rows(w_out_x_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `meta_to_hf_rows`: HF rotate-half rows back to Meta's interleaved pairs."""
  out, cols = w_out_x_in.shape
  if out % (2 * n_heads):
    raise ValueError(f"q/k weight with {out} rows cannot hold {n_heads} heads of even width")
  half = out // n_heads // 2
  return w_out_x_in.reshape(n_heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(out, cols)


# ----------------------------------------------------------------------------- shared helpers


def _check_keys(root, config_name: str, n_layers: int, expected: set[str], tensors) -> None:
  """Raises ValueError listing (up to 10 of) the missing and unexpected checkpoint keys."""
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    msg = [f"{root}: checkpoint keys do not match {config_name} ({n_layers} layers)"]
    if missing:
      msg.append(f"missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
      msg.append(f"unexpected: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    raise ValueError("\n  ".join(msg))



def _ffn_rounding(dim: int, hidden: int) -> tuple[int, float | None]:
  """`(multiple_of, ffn_dim_multiplier)` such that `swiglu_hidden_dim(dim, ...) == hidden`.

  Tries the pairs Meta's own checkpoints use (Llama 2 7B/13B: 256 and none;
  70B: 4096 and 1.3; Llama 3: 1024 and 1.3) so converted configs look like the
  originals; otherwise rounds to `hidden` itself, with a multiplier that
  shrinks the base width `int(8 * dim / 3)` below `hidden` when needed.
  """
  if hidden <= 0:
    raise ValueError(f"intermediate_size must be positive, got {hidden}")
  for multiple_of, mult in ((256, None), (4096, 1.3), (1024, 1.3)):
    if swiglu_hidden_dim(dim, multiple_of, mult) == hidden:
      return multiple_of, mult
  base = int(2 * (4 * dim) / 3)
  if base <= hidden:
    return hidden, None
  mult = hidden / base
  if swiglu_hidden_dim(dim, hidden, mult) != hidden:  # cannot happen for hidden >= 1; kept as a guard
    raise ValueError(f"cannot express FFN width {hidden} for dim {dim} with multiple_of/ffn_dim_multiplier")
  return hidden, mult


def _target_dtype(dtype: str | None, arrays: list[np.ndarray], source: str) -> np.dtype:
  """The parameter dtype: `dtype` if given, else the checkpoint's own (which must be uniform)."""
  if dtype is not None:
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_FLOAT_DTYPES)}, got {dtype!r}")
    return _FLOAT_DTYPES[dtype]
  found = {np.dtype(a.dtype) for a in arrays}
  bad = [d for d in found if d not in _FLOAT_DTYPES.values()]
  if bad:
    raise ValueError(f"{source}: unsupported tensor dtype(s) {sorted(map(str, bad))}")
  if len(found) != 1:
    raise ValueError(f"{source}: tensors have mixed dtypes {sorted(map(str, found))}; pass dtype= to choose one")
  return found.pop()


def _expect_shape(name: str, arr: np.ndarray, shape: tuple[int, ...], source: str) -> None:
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"{source}: {name} has shape {tuple(arr.shape)}, the config expects {tuple(shape)}")


def _torch_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Torch-layout `(out, in)` shapes of one layer's tensors, by jaxml name."""
  D, F, H, K, Dh = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  return {"attention_norm": (D,), "ffn_norm": (D,), "wq": (H * Dh, D), "wk": (K * Dh, D), "wv": (K * Dh, D),
          "wo": (D, H * Dh), "w1": (F, D), "w3": (F, D), "w2": (D, F)}


def _assemble(cfg: LlamaConfig, get, dtype: np.dtype, source: str, qk_to_meta) -> Params:
  """Builds the jaxml tree from torch-layout tensors.

  `get(jaxml_name, layer)` returns a torch-layout array (layer None for the
  non-layer tensors); `qk_to_meta(w, n_heads)` maps q/k rows to Meta's layout.
  """
  shapes = _torch_shapes(cfg)
  layers: dict[str, list[np.ndarray]] = {k: [] for k in _LAYER_KEYS}
  for i in range(cfg.n_layers):
    for name in _LAYER_KEYS:
      w = get(name, i)
      _expect_shape(f"layer {i} {name}", w, shapes[name], source)
      if name == "wq":
        w = qk_to_meta(w, cfg.n_heads)
      elif name == "wk":
        w = qk_to_meta(w, cfg.kv_heads)
      if name in _LINEAR:
        w = w.T
      layers[name].append(np.asarray(w, dtype=dtype))
  emb = get("tok_embeddings", None)
  _expect_shape("tok_embeddings", emb, (cfg.vocab_size, cfg.dim), source)
  norm = get("norm", None)
  _expect_shape("norm", norm, (cfg.dim,), source)
  out = get("output", None)
  _expect_shape("output", out, (cfg.vocab_size, cfg.dim), source)
  params = {
      "tok_embeddings": jnp.asarray(np.asarray(emb, dtype=dtype)),
      "layers": {k: jnp.asarray(np.stack(v)) for k, v in layers.items()},
      "norm": jnp.asarray(np.asarray(norm, dtype=dtype)),
      "output": jnp.asarray(np.asarray(out, dtype=dtype).T),
  }
  model.check_params(params, cfg)
  return params


def _check_dir(path: PathLike, what: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_dir():
    raise FileNotFoundError(f"{what}: {p} is not a directory")
  return p


# ----------------------------------------------------------------------------- Hugging Face


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """Maps a Hugging Face `LlamaConfig` dict (config.json) to `LlamaConfig`.

  Refuses what the jaxml model does not implement (rope scaling, biases,
  a head_dim other than hidden_size / num_attention_heads, other activations).
  """
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"config.json: model_type {model_type!r} is not 'llama'")
  missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                         "vocab_size") if k not in hf]
  if missing:
    raise ValueError(f"config.json: missing field(s) {missing}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported (Llama uses silu)")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"config.json: {flag}=true is not supported by the Llama 2 model")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  rope_type = rope.get("rope_type", "default")
  if scaling or rope_type != "default":
    raise ValueError(f"config.json: rope scaling {scaling or rope!r} is not supported (only default RoPE)")
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim")
  if head_dim is not None and H and D % H == 0 and int(head_dim) != D // H:
    raise ValueError(f"config.json: head_dim {head_dim} != hidden_size / num_attention_heads = {D // H}")
  multiple_of, mult = _ffn_rounding(D, int(hf["intermediate_size"]))
  fields = dict(vocab_size=int(hf["vocab_size"]), dim=D, n_layers=int(hf["num_hidden_layers"]), n_heads=H,
                n_kv_heads=int(hf.get("num_key_value_heads") or H), multiple_of=multiple_of,
                ffn_dim_multiplier=mult, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                max_seq_len=int(hf.get("max_position_embeddings", 4096)))
  fields.update(overrides)
  cfg = LlamaConfig(**fields)
  if cfg.hidden_dim != int(hf["intermediate_size"]):
    raise ValueError(f"config: FFN width {cfg.hidden_dim} != intermediate_size {hf['intermediate_size']}")
  return cfg


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
  """The Hugging Face config.json for `cfg` (LlamaForCausalLM, untied, no biases)."""
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.hidden_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "rope_scaling": None,
      "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": False,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def from_hf(path: PathLike, *, dtype: str | None = None, **config_overrides) -> tuple[LlamaConfig, Params]:
  """Loads a Hugging Face Llama folder (`config.json` + `model.safetensors` or shards).

  Older folders with `pytorch_model.bin` (or its sharded index) are read too,
  without torch, by the restricted reader of `load_torch_state_dict`.

  Args:
    path: folder written by `save_pretrained` or `to_hf`.
    dtype: parameter dtype ("float32", "bfloat16", "float16"); None keeps the
      checkpoint's dtype (which must then be uniform). Casting happens only on request.
    **config_overrides: LlamaConfig fields to replace (e.g. `max_seq_len`).

  Returns:
    `(cfg, params)`; `cfg.param_dtype` and `cfg.dtype` (compute) are both the
    parameter dtype; use `cfg.replace(dtype=...)` for another compute dtype.
  Raises:
    FileNotFoundError / ValueError naming the missing file, key or bad shape.
  """
  root = _check_dir(path, "from_hf")
  hf = _read_json(root / "config.json")
  tensors = _read_weights(_hf_files(root))
  tensors = {k: v for k, v in tensors.items() if not _IGNORED_HF.match(k)}
  tied = bool(hf.get("tie_word_embeddings", False))
  if tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # untied copy of the shared matrix
  np_dtype = _target_dtype(dtype, list(tensors.values()), str(root))
  dt_name = np_dtype.name
  overrides = {"param_dtype": dt_name, "dtype": dt_name, **config_overrides}
  cfg = config_from_hf(hf, **overrides)

  expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
  expected |= {f"model.layers.{i}.{hf_name}" for i in range(cfg.n_layers) for hf_name, _ in _LAYER_KEYS.values()}
  _check_keys(root, "config.json", cfg.n_layers, expected, tensors)

  top = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}

  def get(name, layer):
    key = top[name] if layer is None else f"model.layers.{layer}.{_LAYER_KEYS[name][0]}"
    return tensors[key]

  return cfg, _assemble(cfg, get, np_dtype, str(root), hf_to_meta_rows)


def to_hf(cfg: LlamaConfig, params: Params, path: PathLike, *, dtype: str | None = None) -> pathlib.Path:
  """Writes `config.json` + `model.safetensors` that `LlamaForCausalLM.from_pretrained` loads.

  `dtype` None keeps the parameters' dtype; "float32"/"bfloat16"/"float16"
  casts (bfloat16 from float32 is lossy, and only done when asked).
  Returns the folder.
  """
  from safetensors.numpy import save_file
  model.check_params(params, cfg)
  leaves = [np.asarray(params["tok_embeddings"])]
  np_dtype = _target_dtype(dtype, leaves + [np.asarray(v) for v in params["layers"].values()]
                           + [np.asarray(params["norm"]), np.asarray(params["output"])], "to_hf params")
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)

  def arr(x):
    return np.ascontiguousarray(np.asarray(x).astype(np_dtype))

  out = {"model.embed_tokens.weight": arr(params["tok_embeddings"]), "model.norm.weight": arr(params["norm"]),
         "lm_head.weight": arr(np.asarray(params["output"]).T)}
  for name, (hf_name, _) in _LAYER_KEYS.items():
    stacked = np.asarray(params["layers"][name])
    for i in range(cfg.n_layers):
      w = stacked[i]
      if name in _LINEAR:
        w = w.T  # (in, out) -> torch (out, in)
      if name == "wq":
        w = meta_to_hf_rows(w, cfg.n_heads)
      elif name == "wk":
        w = meta_to_hf_rows(w, cfg.kv_heads)
      out[f"model.layers.{i}.{hf_name}"] = arr(w)
  save_file(out, str(root / "model.safetensors"), metadata={"format": "pt"})
  (root / "config.json").write_text(json.dumps(config_to_hf(cfg, np_dtype.name), indent=2) + "\n")
  return root


# ----------------------------------------------------------------------------- Meta


def _meta_split_dim(name: str) -> int | None:
  """Torch dim along which Meta's model parallelism splits a tensor (None: replicated)."""
  if name in ("wq", "wk", "wv", "w1", "w3", "output"):
    return 0
  if name in ("wo", "w2", "tok_embeddings"):
    return 1
  return None


def from_meta(path: PathLike, *, dtype: str | None = None, **config_overrides) -> tuple[LlamaConfig, Params]:
  """Loads Meta's release format: `params.json` + `consolidated.NN.pth` (one or more shards).

  `params.json` gives dim, n_layers, n_heads, n_kv_heads, multiple_of,
  ffn_dim_multiplier, norm_eps, rope_theta and vocab_size (Meta writes -1 for
  the vocabulary; then the embedding's row count is used). The context length
  is not in params.json: it defaults to 4096 (Llama 2) unless `max_seq_len` is
  passed. Shards are merged as described in the module docstring.
  """
  root = _check_dir(path, "from_meta")
  meta = _read_json(root / "params.json")
  shards = sorted(root.glob("consolidated.*.pth"))
  if not shards:
    raise FileNotFoundError(f"{root}: no consolidated.*.pth files")
  numbers = [int(m.group(1)) for s in shards if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", s.name))]
  if numbers != list(range(len(shards))):
    raise FileNotFoundError(f"{root}: shard files {[s.name for s in shards]} are not consolidated.00 .. "
                            f"consolidated.{len(shards) - 1:02d} (a shard is missing)")
  states = [load_torch_state_dict(s) for s in shards]
  for s, st in zip(shards, states):
    for k in _IGNORED_META:
      st.pop(k, None)
    if set(st) != set(states[0]):
      diff = sorted(set(st) ^ set(states[0]))
      raise ValueError(f"{s}: keys differ from {shards[0].name}: {diff[:10]}")

  vocab = int(meta.get("vocab_size", -1))
  if vocab <= 0:
    if "tok_embeddings.weight" not in states[0]:
      raise ValueError(f"{root}: params.json has no vocab_size and tok_embeddings.weight is missing")
    vocab = int(states[0]["tok_embeddings.weight"].shape[0])
  try:
    fields = dict(vocab_size=vocab, dim=int(meta["dim"]), n_layers=int(meta["n_layers"]),
                  n_heads=int(meta["n_heads"]),
                  n_kv_heads=None if meta.get("n_kv_heads") is None else int(meta["n_kv_heads"]),
                  multiple_of=int(meta.get("multiple_of", 256)), ffn_dim_multiplier=meta.get("ffn_dim_multiplier"),
                  norm_eps=float(meta.get("norm_eps", 1e-5)), rope_theta=float(meta.get("rope_theta", 10000.0)))
  except KeyError as e:
    raise ValueError(f"{root / 'params.json'}: missing field {e}") from e
  np_dtype = _target_dtype(dtype, [a for st in states for a in st.values()], str(root))
  fields.update(param_dtype=np_dtype.name, dtype=np_dtype.name)
  fields.update(config_overrides)
  cfg = LlamaConfig(**fields)
  n = len(states)
  if cfg.kv_heads % n or cfg.n_heads % n:
    raise ValueError(f"{root}: {n} shards cannot split {cfg.n_heads} heads / {cfg.kv_heads} kv heads evenly")

  expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
  expected |= {f"layers.{i}.{meta_name}" for i in range(cfg.n_layers) for _, meta_name in _LAYER_KEYS.values()}
  _check_keys(root, "params.json", cfg.n_layers, expected, states[0])

  top = {"tok_embeddings": "tok_embeddings.weight", "norm": "norm.weight", "output": "output.weight"}

  def get(name, layer):
    key = top[name] if layer is None else f"layers.{layer}.{_LAYER_KEYS[name][1]}"
    parts = [st[key] for st in states]
    axis = _meta_split_dim(name)
    if name == "tok_embeddings" and n > 1 and parts[0].shape == (cfg.vocab_size // n, cfg.dim):
      axis = 0  # Llama 3 splits the vocabulary (VocabParallelEmbedding); Llama 2 the width
    if n == 1:
      return parts[0]
    if axis is None:
      for s, part in zip(shards[1:], parts[1:]):
        if part.shape != parts[0].shape or not np.array_equal(part, parts[0]):
          raise ValueError(f"{s}: replicated tensor {key} differs from {shards[0].name}")
      return parts[0]
    try:
      return np.concatenate(parts, axis=axis)
    except ValueError as e:
      raise ValueError(f"{root}: shards of {key} cannot be concatenated along dim {axis}: "
                       f"{[p.shape for p in parts]}") from e

  return cfg, _assemble(cfg, get, np_dtype, str(root), lambda w, heads: w)
