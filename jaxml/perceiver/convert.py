"""transformers' Perceiver checkpoints in and out: `PerceiverForMaskedLM` and
`PerceiverForImageClassificationFourier` folders (config.json + model.safetensors).

    from_hf(path)             -> (PerceiverConfig, params)
    to_hf(cfg, params, path)  -> folder that `from_pretrained` loads

Torch linear weights are `[out, in]`; jaxml's are `[in, out]`, so each is
transposed on the way in and out. The shared self-attention layers
`perceiver.encoder.self_attends.{i}` are stacked on a leading axis.

What transformers does and jaxml therefore reproduces on import:
- exact (erf) GELU for `hidden_act` "gelu" ("gelu_new" / "gelu_pytorch_tanh":
  the tanh form); LayerNorm eps 1e-5 whatever `layer_norm_eps` says (its
  layers are built with torch's default eps);
- the masked-LM decoder's hard-coded 8 heads and 256 qk channels, values and
  queries `d_model` wide, no query residual, `max_position_embeddings`
  learned queries, the tied embedding decoder;
- the Fourier classifier's pixel preprocessor: 3 channels plus 64 bands of
  Fourier features up to (224, 224), whatever the image size (261 input
  channels), and its decoder (one query, 1 head, query residual, projection).
Deliberate differences (see `jaxml.perceiver.model`): the masked LM returns
logits for the M input positions, not always `max_position_embeddings`
(rows agree); masked (padded) query positions output the bias alone (transformers
ignores the query mask); an example whose inputs are all masked gets a zero
cross-attention output (transformers attends uniformly). transformers'
`attention_probs_dropout_prob` (dropout on attention weights) is not
imported; jaxml's `dropout` acts on the residual branches and starts at 0.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxml import checkpoint_files
from jaxml.perceiver import model
from jaxml.perceiver.config import PerceiverConfig

Params = dict[str, Any]
PathLike = str | pathlib.Path

MASKED_LM, FOURIER_CLASSIFIER = "PerceiverForMaskedLM", "PerceiverForImageClassificationFourier"
_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
_GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# transformers' fixed Fourier preprocessor of PerceiverForImageClassificationFourier.
_HF_PIXELS = dict(image_channels=3, num_bands=64, max_resolution=(224, 224), concat_pos=True, sine_only=False)

# (transformers name inside a PerceiverLayer, jaxml path inside a layer, is a linear weight)
_LAYER = [
    ("attention.self.layernorm1.weight", ("norm_q", "scale"), False),
    ("attention.self.layernorm1.bias", ("norm_q", "bias"), False),
    ("attention.self.layernorm2.weight", ("norm_kv", "scale"), False),
    ("attention.self.layernorm2.bias", ("norm_kv", "bias"), False),
    ("attention.self.query.weight", ("query", "w"), True),
    ("attention.self.query.bias", ("query", "b"), False),
    ("attention.self.key.weight", ("key", "w"), True),
    ("attention.self.key.bias", ("key", "b"), False),
    ("attention.self.value.weight", ("value", "w"), True),
    ("attention.self.value.bias", ("value", "b"), False),
    ("attention.output.dense.weight", ("out", "w"), True),
    ("attention.output.dense.bias", ("out", "b"), False),
    ("layernorm.weight", ("norm_mlp", "scale"), False),
    ("layernorm.bias", ("norm_mlp", "bias"), False),
    ("mlp.dense1.weight", ("mlp", 0, "w"), True),
    ("mlp.dense1.bias", ("mlp", 0, "b"), False),
    ("mlp.dense2.weight", ("mlp", 1, "w"), True),
    ("mlp.dense2.bias", ("mlp", 1, "b"), False),
]


def _layer_entries(hf_prefix: str, path: tuple, cross: bool, layer: int | None = None):
  return [(f"{hf_prefix}.{name}", path + sub, linear, layer) for name, sub, linear in _LAYER
          if cross or "layernorm2" not in name]


def _table(cfg: PerceiverConfig) -> list[tuple[str, tuple, bool, int | None]]:
  """Every checkpoint tensor: (transformers key, jaxml path, is a linear weight, stacked layer index)."""
  rows = [("perceiver.embeddings.latents", ("latents",), False, None)]
  rows += _layer_entries("perceiver.encoder.cross_attention", ("cross_attend",), True)
  for i in range(cfg.num_self_attends_per_block):
    rows += _layer_entries(f"perceiver.encoder.self_attends.{i}", ("self_attends",), False, i)
  d = cfg.decoder_configs[0]
  if cfg.task == "masked_lm":
    rows += [("perceiver.input_preprocessor.embeddings.weight", ("input", "embeddings"), False, None),
             ("perceiver.input_preprocessor.position_embeddings.weight", ("input", "positions"), False, None),
             ("perceiver.decoder.output_position_encodings.position_embeddings", ("decoders", d.name, "queries"),
              False, None),
             ("embedding_decoder.bias", ("output_bias",), False, None)]
    rows += _layer_entries("perceiver.decoder.decoding_cross_attention", ("decoders", d.name, "cross_attend"), True)
  else:
    pre = "perceiver.decoder.decoder"
    rows += [(f"{pre}.output_position_encodings.position_embeddings", ("decoders", d.name, "queries"), False, None),
             (f"{pre}.final_layer.weight", ("decoders", d.name, "final", "w"), True, None),
             (f"{pre}.final_layer.bias", ("decoders", d.name, "final", "b"), False, None)]
    rows += _layer_entries(f"{pre}.decoding_cross_attention", ("decoders", d.name, "cross_attend"), True)
  return rows


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, **overrides) -> PerceiverConfig:
  """Maps a transformers Perceiver `config.json` dict to `PerceiverConfig` (masked LM or Fourier classifier)."""
  if hf.get("model_type", "perceiver") != "perceiver":
    raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'perceiver'")
  arch = (hf.get("architectures") or [None])[0]
  if arch not in (MASKED_LM, FOURIER_CLASSIFIER):
    raise ValueError(f"config.json: architectures {hf.get('architectures')!r}; jaxml imports {MASKED_LM} and "
                     f"{FOURIER_CLASSIFIER}")
  act = hf.get("hidden_act", "gelu")
  if act not in _GELU:
    raise ValueError(f"config.json: hidden_act {act!r} is not supported (one of {sorted(_GELU)})")
  fields = dict(
      num_latents=hf.get("num_latents", 256), d_latents=hf.get("d_latents", 1280),
      num_cross_attention_heads=hf.get("num_cross_attention_heads", 8),
      num_self_attention_heads=hf.get("num_self_attention_heads", 8), qk_channels=hf.get("qk_channels"),
      v_channels=hf.get("v_channels"),
      cross_attention_shape_for_attention=hf.get("cross_attention_shape_for_attention", "kv"),
      cross_attention_widening_factor=hf.get("cross_attention_widening_factor", 1),
      self_attention_widening_factor=hf.get("self_attention_widening_factor", 1),
      num_blocks=hf.get("num_blocks", 1), num_self_attends_per_block=hf.get("num_self_attends_per_block", 26),
      use_query_residual=bool(hf.get("use_query_residual", True)), gelu=_GELU[act],
      layer_norm_eps=1e-5,  # transformers builds nn.LayerNorm(dim): torch's default eps, not config.layer_norm_eps
      dropout=0.0)
  if arch == MASKED_LM:
    fields.update(task="masked_lm", inputs="bytes", d_model=hf.get("d_model", 768),
                  vocab_size=hf.get("vocab_size", 262), max_position_embeddings=hf.get("max_position_embeddings", 2048))
  else:
    labels = hf.get("id2label")
    n = len(labels) if labels else hf.get("num_labels", 2)
    fields.update(task="classifier", inputs="pixels", d_model=None, num_classes=int(n), **_HF_PIXELS)
  fields.update(overrides)
  return PerceiverConfig(**fields)


def _hf_problems(cfg: PerceiverConfig) -> list[str]:
  """What keeps `cfg` from being a transformers masked LM / Fourier classifier (empty: representable)."""
  out = []
  if cfg.task == "masked_lm":
    if cfg.decoder_configs[0] != cfg.hf_masked_lm_decoder():
      out.append("decoders: transformers' masked LM has a fixed decoder (8 heads, qk 256); use decoders=()")
  elif cfg.task == "classifier":
    if cfg.inputs != "pixels" or any(getattr(cfg, k) != v for k, v in _HF_PIXELS.items()):
      out.append(f"inputs: the Fourier classifier takes pixels with {_HF_PIXELS}")
    if cfg.decoder_configs[0] != cfg.hf_classifier_decoder():
      out.append("decoders: transformers' classifier has a fixed decoder (1 head, query residual); use decoders=()")
  else:
    out.append("task: transformers has no multitask Perceiver to export to")
  if cfg.repeat_cross_attention and cfg.num_blocks > 1:
    out.append("repeat_cross_attention: transformers cross-attends once")
  if cfg.layer_norm_eps != 1e-5:
    out.append("layer_norm_eps: transformers' LayerNorms use 1e-5")
  if cfg.self_v_channels != cfg.d_latents:
    out.append(f"v_channels: transformers' self-attention needs value width d_latents ({cfg.d_latents}), "
               f"got {cfg.self_v_channels}")
  return out


def config_to_hf(cfg: PerceiverConfig, dtype: str = "float32") -> dict:
  """The transformers `config.json` for `cfg` (raises ValueError when transformers cannot hold it)."""
  problems = _hf_problems(cfg)
  if problems:
    raise ValueError("cfg cannot be written as a transformers Perceiver:\n  " + "\n  ".join(problems))
  hf = {
      "architectures": [MASKED_LM if cfg.task == "masked_lm" else FOURIER_CLASSIFIER],
      "model_type": "perceiver",
      "num_latents": cfg.num_latents, "d_latents": cfg.d_latents, "d_model": cfg.d_model,
      "num_blocks": cfg.num_blocks, "num_self_attends_per_block": cfg.num_self_attends_per_block,
      "num_self_attention_heads": cfg.num_self_attention_heads,
      "num_cross_attention_heads": cfg.num_cross_attention_heads,
      "qk_channels": cfg.qk_channels, "v_channels": cfg.v_channels,
      "cross_attention_shape_for_attention": cfg.cross_attention_shape_for_attention,
      "self_attention_widening_factor": cfg.self_attention_widening_factor,
      "cross_attention_widening_factor": cfg.cross_attention_widening_factor,
      "hidden_act": "gelu" if cfg.gelu == "exact" else "gelu_new",
      "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02,
      "layer_norm_eps": cfg.layer_norm_eps,
      "use_query_residual": cfg.use_query_residual,
      "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.max_position_embeddings,
      "dtype": dtype,
  }
  if cfg.task == "classifier":
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
  return hf


# ----------------------------------------------------------------------------- files


def _read_safetensors(root: pathlib.Path) -> dict[str, np.ndarray]:
  """model.safetensors, or the shards its index lists (the readers `jaxml.llama` uses too)."""
  files = checkpoint_files.hf_weight_files(root)
  if any(f.suffix == ".bin" for f in files):
    raise ValueError(f"{root}: only safetensors folders are read for Perceiver, found {[f.name for f in files]}")
  return checkpoint_files.read_hf_weights(files)


def _dtype(dtype: str | None, tensors: dict[str, np.ndarray], source: str) -> np.dtype:
  if dtype is not None:
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_FLOAT_DTYPES)}, got {dtype!r}")
    return _FLOAT_DTYPES[dtype]
  found = {np.dtype(a.dtype) for a in tensors.values()}
  if not found <= set(_FLOAT_DTYPES.values()) or len(found) != 1:
    raise ValueError(f"{source}: tensors have dtype(s) {sorted(map(str, found))}; pass dtype= to choose one")
  return found.pop()


def from_hf(path: PathLike, *, dtype: str | None = None, **config_overrides) -> tuple[PerceiverConfig, Params]:
  """Loads a transformers `PerceiverForMaskedLM` or `PerceiverForImageClassificationFourier` folder.

  Args:
    path: a folder written by `save_pretrained` (or `to_hf`).
    dtype: parameter dtype ("float32", "bfloat16", "float16"); None keeps the
      checkpoint's (which must then be uniform).
    **config_overrides: PerceiverConfig fields to replace (e.g. `dropout` for fine-tuning).

  Returns:
    `(cfg, params)`; `apply(params, inputs, cfg)` gives transformers' logits.

  Raises:
    FileNotFoundError: no folder, config.json or weights.
    ValueError: an unsupported architecture or activation, missing or
      unexpected checkpoint keys (listed), a tensor of the wrong shape (named).
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"from_hf: {root} is not a directory")
  cfg = config_from_hf(checkpoint_files.read_json(root / "config.json"), **config_overrides)
  tensors = _read_safetensors(root)
  np_dtype = _dtype(dtype, tensors, str(root))
  table = _table(cfg)
  expected = {row[0] for row in table}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    msg = [f"{root}: checkpoint keys do not match config.json ({cfg.task}, "
           f"{cfg.num_self_attends_per_block} self-attends)"]
    if missing:
      msg.append(f"missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
      msg.append(f"unexpected: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    raise ValueError("\n  ".join(msg))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np_dtype), model.param_shapes(cfg))
  for key, path_, linear, layer in table:
    target = _get(params, path_)
    shape = target.shape[1:] if layer is not None else target.shape
    want = tuple(reversed(shape)) if linear else tuple(shape)
    arr = tensors[key]
    if tuple(arr.shape) != want:
      raise ValueError(f"{root}: {key} has shape {tuple(arr.shape)}, config.json implies {want}")
    arr = arr.T if linear else arr
    if layer is None:
      target[...] = arr
    else:
      target[layer] = arr
  params = jax.tree.map(jnp.asarray, params)
  model.check_params(params, cfg)
  return cfg, params


def to_hf(cfg: PerceiverConfig, params: Params, path: PathLike, *, dtype: str | None = None) -> pathlib.Path:
  """Writes `config.json` + `model.safetensors` that transformers' `from_pretrained` loads.

  `cfg` must be a masked LM or Fourier classifier as transformers builds them
  (`config_to_hf` raises ValueError naming what is not). `dtype` None keeps the
  parameters' dtype. Returns the folder.
  """
  from safetensors.numpy import save_file
  model.check_params(params, cfg)
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  np_dtype = _dtype(dtype, {str(i): a for i, a in enumerate(leaves)}, "to_hf params")
  hf = config_to_hf(cfg, np_dtype.name)
  out = {}
  for key, path_, linear, layer in _table(cfg):
    arr = np.asarray(_get(params, path_))
    if layer is not None:
      arr = arr[layer]
    out[key] = np.ascontiguousarray((arr.T if linear else arr).astype(np_dtype))
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  save_file(out, str(root / "model.safetensors"), metadata={"format": "pt"})
  (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  return root
