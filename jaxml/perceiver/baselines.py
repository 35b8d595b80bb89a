"""Baselines the Perceiver is measured against: an MLP, a transformer encoder (ViT-style on image patches,
byte-level for masked LM, or on any `[B, M, C]` array) and a small conv net.

All are pure functions over plain parameter dicts built from `jaxml.nn` (dense
layers, `mlp`, `layer_norm`, `dot_product_attention`), initialised from one
normal draw (`nn.init_from_specs`) like the Perceiver.

Transformer encoder (pre-LN, as ViT and BERT-style byte encoders):

    x <- x + Attn(LN(x))          H heads of width/H, softmax(q k^T / sqrt(width/H)) v, output dense
    x <- x + MLP(LN(x))           dense(width -> widening * width) -> GELU -> dense(-> width)
    out = LN(x)                   after the last layer

Its attention costs O(M^2 width) per layer for M tokens, the quadratic cost the
Perceiver's latent bottleneck removes. Inputs:
  - "patches": images `[B, H, W, C]` cut into `patch_size` squares, each
    flattened and projected to `width`, learned positions added, a learned
    class token prepended; logits from the class token (ViT).
  - "bytes": ids `[B, M]` embedded (`vocab_size x width`) plus learned
    positions; logits per position through the tied embedding (`h E^T + b`),
    the same output layer as the Perceiver IO masked LM.
  - "array": `[B, M, input_dim]` projected to `width`; outputs `[B, M, width]`.
Conv net: `3 x 3` SAME convolutions with ReLU, then a global average pool and
a dense layer: translation-equivariant features, so it depends on which
pixels are neighbours (the spatial prior a pixel permutation destroys).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxml import nn

Params = dict[str, Any]
Array = jax.Array
_EMBED_STD = 0.02  # learned positions, class token, byte embedding (as the Perceiver's)


def _check_positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


# ----------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """An MLP classifier on flattened inputs: `in_dim -> hidden... -> num_classes`, ReLU between."""

  in_dim: int = 64
  hidden: tuple[int, ...] = (128, 128)
  num_classes: int = 10

  def __post_init__(self):
    object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
    _check_positive("MLPConfig", self, ("in_dim", "num_classes"))
    if any(h <= 0 for h in self.hidden):
      raise ValueError(f"MLPConfig.hidden must hold positive widths, got {self.hidden}")

  @property
  def sizes(self) -> tuple[int, ...]:
    return (self.in_dim, *self.hidden, self.num_classes)


def mlp_init(rng: Array, cfg: MLPConfig) -> list[Params]:
  return nn.init_from_specs(rng, nn.mlp_specs(cfg.sizes))


def mlp_apply(params: list[Params], x, cfg: MLPConfig) -> Array:
  """`x` `[B, ...]` (flattened to `[B, in_dim]`) -> logits `[B, num_classes]`."""
  x = jnp.asarray(x)
  flat = x.reshape(x.shape[0], -1)
  if flat.shape[1] != cfg.in_dim:
    raise ValueError(f"x has {flat.shape[1]} features per example, MLPConfig.in_dim is {cfg.in_dim}")
  return nn.mlp(params, flat, act=jax.nn.relu)


# ----------------------------------------------------------------------------- transformer encoder


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A pre-LN transformer encoder and its input/output layers (module docstring)."""

  inputs: str = "patches"  # "patches" (ViT classifier), "bytes" (masked LM) or "array".
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  widening_factor: int = 4
  gelu: str = "exact"  # "exact" or "tanh"
  layer_norm_eps: float = 1e-5
  scan_layers: bool = True  # lax.scan over the stacked layers; False unrolls them
  # patches
  image_size: tuple[int, int] = (8, 8)
  image_channels: int = 1
  patch_size: int = 2
  num_classes: int = 10
  # bytes
  vocab_size: int = 262
  max_len: int = 128
  # array
  input_dim: int = 64

  def __post_init__(self):
    own = "TransformerConfig"
    if self.inputs not in ("patches", "bytes", "array"):
      raise ValueError(f"{own}.inputs must be 'patches', 'bytes' or 'array', got {self.inputs!r}")
    object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
    _check_positive(own, self, ("width", "num_layers", "num_heads", "widening_factor", "image_channels",
                                "patch_size", "num_classes", "vocab_size", "max_len", "input_dim"))
    if self.width % self.num_heads:
      raise ValueError(f"{own}.num_heads ({self.num_heads}) must divide width ({self.width})")
    if self.gelu not in ("exact", "tanh"):
      raise ValueError(f"{own}.gelu must be 'exact' or 'tanh', got {self.gelu!r}")
    if self.inputs == "patches":
      if len(self.image_size) != 2 or any(s % self.patch_size for s in self.image_size):
        raise ValueError(f"{own}.patch_size ({self.patch_size}) must divide both image_size sides "
                         f"{self.image_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)


def _norm_spec(width: int, lead: tuple[int, ...] = ()) -> Params:
  return {"scale": nn.ParamSpec((*lead, width), value=1.0), "bias": nn.ParamSpec((*lead, width))}


def _dense_spec(n_in: int, n_out: int, lead: tuple[int, ...] = ()) -> Params:
  return {"w": nn.ParamSpec((*lead, n_in, n_out), 1.0 / math.sqrt(n_in)), "b": nn.ParamSpec((*lead, n_out))}


def transformer_specs(cfg: TransformerConfig) -> Params:
  """The parameter tree as `nn.ParamSpec`s; the layers' leaves are stacked on a leading `[num_layers]` axis."""
  W, L = cfg.width, (cfg.num_layers,)
  specs: Params = {
      "layers": {"norm_attn": _norm_spec(W, L), "qkv": _dense_spec(W, 3 * W, L), "out": _dense_spec(W, W, L),
                 "norm_mlp": _norm_spec(W, L),
                 "mlp": [_dense_spec(W, cfg.widening_factor * W, L), _dense_spec(cfg.widening_factor * W, W, L)]},
      "final_norm": _norm_spec(W),
  }
  if cfg.inputs == "patches":
    specs["embed"] = _dense_spec(cfg.patch_size ** 2 * cfg.image_channels, W)
    specs["positions"] = nn.ParamSpec((cfg.num_patches + 1, W), _EMBED_STD)
    specs["cls"] = nn.ParamSpec((W,), _EMBED_STD)
    specs["head"] = _dense_spec(W, cfg.num_classes)
  elif cfg.inputs == "bytes":
    specs["embeddings"] = nn.ParamSpec((cfg.vocab_size, W), _EMBED_STD)
    specs["positions"] = nn.ParamSpec((cfg.max_len, W), _EMBED_STD)
    specs["output_bias"] = nn.ParamSpec((cfg.vocab_size,))
  else:
    specs["embed"] = _dense_spec(cfg.input_dim, W)
  return specs


def transformer_init(rng: Array, cfg: TransformerConfig) -> Params:
  return nn.init_from_specs(rng, transformer_specs(cfg))


def param_count(params) -> int:
  """Number of parameters in a tree of arrays (or `ShapeDtypeStruct`s)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _layer(p: Params, x: Array, mask_Bx1x1xS: Array | None, cfg: TransformerConfig) -> Array:
  eps, (B, T, W), H = cfg.layer_norm_eps, x.shape, cfg.num_heads
  h = nn.layer_norm(x, p["norm_attn"]["scale"], p["norm_attn"]["bias"], eps)
  q, k, v = jnp.split(nn.dense(p["qkv"], h).reshape(B, T, 3 * H, W // H), 3, axis=2)
  a = nn.dot_product_attention(q, k, v, mask_Bx1x1xS)
  x = x + nn.dense(p["out"], a.reshape(B, T, W))
  h = nn.layer_norm(x, p["norm_mlp"]["scale"], p["norm_mlp"]["bias"], eps)
  return x + nn.mlp(p["mlp"], h, act=functools.partial(jax.nn.gelu, approximate=cfg.gelu == "tanh"))


def transformer_encode(params: Params, x_BxTxW, cfg: TransformerConfig, *, mask_BxT=None) -> Array:
  """The encoder layers over embedded tokens `[B, T, width]`, then the final LayerNorm. `[B, T, width]`.

  `mask_BxT` (optional, True or 1 for real tokens) hides the other tokens as keys.
  """
  x = jnp.asarray(x_BxTxW)
  if x.ndim != 3 or x.shape[-1] != cfg.width:
    raise ValueError(f"x_BxTxW must be [B, T, width={cfg.width}], got shape {tuple(x.shape)}")
  mask = None
  if mask_BxT is not None:
    if tuple(jnp.shape(mask_BxT)) != x.shape[:2]:
      raise ValueError(f"mask_BxT must have shape {x.shape[:2]}, got {tuple(jnp.shape(mask_BxT))}")
    mask = (jnp.asarray(mask_BxT) != 0)[:, None, None, :]
  layers = params["layers"]
  if cfg.scan_layers:
    x = jax.lax.scan(lambda x, p: (_layer(p, x, mask, cfg), None), x, layers)[0]
  else:
    for p in nn.unstack(layers):  # its gradient: one stack per weight (see `nn.unstack`)
      x = _layer(p, x, mask, cfg)
  return nn.layer_norm(x, params["final_norm"]["scale"], params["final_norm"]["bias"], cfg.layer_norm_eps)


def patchify(images_BxHxWxC, patch_size: int) -> Array:
  """`[B, H, W, C]` -> `[B, (H/p)(W/p), p p C]`, patches in raster order."""
  x = jnp.asarray(images_BxHxWxC)
  B, H, W, C = x.shape
  p = patch_size
  x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (H // p) * (W // p), p * p * C)


def transformer_apply(params: Params, inputs, cfg: TransformerConfig, *, mask_BxT=None) -> Array:
  """patches: images `[B, H, W, C]` -> logits `[B, num_classes]`; bytes: ids `[B, M]` -> logits
  `[B, M, vocab_size]`; array: `[B, M, input_dim]` -> `[B, M, width]`."""
  x = jnp.asarray(inputs)
  if cfg.inputs == "patches":
    if x.ndim != 4 or tuple(x.shape[1:]) != (*cfg.image_size, cfg.image_channels):
      raise ValueError(f"inputs must be images [B, {cfg.image_size[0]}, {cfg.image_size[1]}, "
                       f"{cfg.image_channels}], got shape {tuple(x.shape)}")
    tokens = nn.dense(params["embed"], patchify(x, cfg.patch_size))
    cls = jnp.broadcast_to(params["cls"], (x.shape[0], 1, cfg.width))
    h = transformer_encode(params, jnp.concatenate([cls, tokens], axis=1) + params["positions"], cfg)
    return nn.dense(params["head"], h[:, 0])
  if cfg.inputs == "bytes":
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer) or x.shape[1] > cfg.max_len:
      raise ValueError(f"inputs must be integer byte ids [B, M <= max_len={cfg.max_len}], got {x.dtype} "
                       f"{tuple(x.shape)}")
    emb = params["embeddings"]
    h = transformer_encode(params, jnp.take(emb, x, axis=0) + params["positions"][:x.shape[1]], cfg,
                           mask_BxT=mask_BxT)
    return jnp.einsum("bmc,vc->bmv", h, emb) + params["output_bias"]
  if x.ndim != 3 or x.shape[-1] != cfg.input_dim:
    raise ValueError(f"inputs must be [B, M, input_dim={cfg.input_dim}], got shape {tuple(x.shape)}")
  return transformer_encode(params, nn.dense(params["embed"], x), cfg, mask_BxT=mask_BxT)


# ----------------------------------------------------------------------------- conv net


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """3x3 SAME conv layers (ReLU), global average pool, dense classifier."""

  image_channels: int = 1
  channels: tuple[int, ...] = (32, 64)
  num_classes: int = 10

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    _check_positive("ConvConfig", self, ("image_channels", "num_classes"))
    if not self.channels or any(c <= 0 for c in self.channels):
      raise ValueError(f"ConvConfig.channels must hold positive widths, got {self.channels}")


def conv_specs(cfg: ConvConfig) -> Params:
  """Each 3x3 convolution is a dense layer over the `9 C` values of a pixel's neighbourhood (rows ordered
  (dy, dx, channel)); the head is a dense layer on the pooled features."""
  chans = (cfg.image_channels, *cfg.channels)
  return {"convs": [_dense_spec(9 * ci, co) for ci, co in zip(chans[:-1], chans[1:])],
          "head": _dense_spec(chans[-1], cfg.num_classes)}


def conv_init(rng: Array, cfg: ConvConfig) -> Params:
  return nn.init_from_specs(rng, conv_specs(cfg))


def neighbourhoods(x_BxHxWxC: Array) -> Array:
  """The 3x3 neighbourhood of every pixel, zero-padded at the border: `[B, H, W, 9 C]`, ordered (dy, dx, c).

  A SAME 3x3 convolution is `dense(neighbourhoods(x))`; written this way it runs as one matmul (XLA:CPU's
  convolution backward is several times slower on these tiny images).
  """
  B, H, W, C = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([padded[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], axis=-1)


def conv_apply(params: Params, images_BxHxWxC, cfg: ConvConfig) -> Array:
  """Images `[B, H, W, C]` -> logits `[B, num_classes]`: ReLU(3x3 conv) layers, global average pool, dense."""
  x = jnp.asarray(images_BxHxWxC)
  if x.ndim != 4 or x.shape[-1] != cfg.image_channels:
    raise ValueError(f"images_BxHxWxC must be [B, H, W, {cfg.image_channels}], got shape {tuple(x.shape)}")
  for p in params["convs"]:
    x = jax.nn.relu(nn.dense(p, neighbourhoods(x)))
  return nn.dense(params["head"], jnp.mean(x, axis=(1, 2)))
