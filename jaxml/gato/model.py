"""Gato's policy: Gato's embeddings fed to the Llama decoder (`jaxml.llama.model.decoder`).

Embedding of a `Tokens` record (`jaxml.gato.sequence`), per position:

    text / discrete / continuous / separator:  E[id]                      (the shared table)
    image patch:  ResNetV2(patch) + R[row bin] + C[column bin]
    observation tokens, in addition:  L[local position]   (index within the timestep's observation)

`ResNetV2` is one pre-activation residual block over the `p x p x C` patch (GroupNorm, GELU,
3x3 conv, GroupNorm, GELU, 3x3 conv; a 1x1 conv projection shortcut from the pre-activated input),
flattened and projected to the model width. The row and column encodings index 128 bins: a
patch's normalised interval [lo, hi) in bins is sampled uniformly in training and replaced by its
rounded mean, round((lo + hi - 1) / 2), at evaluation (Reed et al. 2022, Sec. 2.2).

Parameter tree: `decoder` (the Llama tree: `tok_embeddings` is the shared table `E`, `layers`,
`norm`, and `output` unless `tie_embeddings`), `local_pos` [max_local, D], `row_pos`/`col_pos`
[128, D], `patch` (the ResNet block and its projection).

Paper shapes (Reed et al. 2022, Table C.1): 79M (8 layers, 24 heads, d 768, FFN 3072), 364M
(12, 12, 1536, 6144), 1.18B (24, 16, 2048, 8192). Their FFN is a 2-matrix GELU MLP of width
FFN; the Llama decoder's SwiGLU has 3 matrices, so the presets use its usual width
`ceil(2/3 * FFN)` (rounded to `multiple_of`): the same parameters per block up to that rounding.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.gato.sequence import POSITION_BINS, Tokens
from jaxml.llama import model as llama
from jaxml.llama.config import LlamaConfig
from jaxml.llama.config import param_count as llama_param_count
from jaxml.nn import layers as nn
from jaxml.nn.init import ParamSpec, init_from_specs

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GatoConfig:
  """The policy's shapes. `vocab_size` must equal the token layout's `vocab_size`."""
  vocab_size: int = 34049  # TokenLayout().vocab_size
  dim: int = 768
  n_layers: int = 8
  n_heads: int = 24
  n_kv_heads: int | None = None
  multiple_of: int = 256  # SwiGLU width rounding
  max_seq_len: int = 1024  # context (tokens)
  max_local: int = 512  # local observation positions
  patch_size: int = 16
  image_channels: int = 3  # patches carry this many channels (images with fewer are zero-padded)
  patch_width: int = 32  # channels of the ResNet block
  patch_groups: int = 32  # GroupNorm groups (the gcd with the channel count is used)
  tie_embeddings: bool = True  # logits from the shared table E (no separate output matrix)
  dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "max_local", "patch_size",
                 "image_channels", "patch_width", "patch_groups", "multiple_of"):
      if getattr(self, name) <= 0:
        raise ValueError(f"GatoConfig.{name} must be positive, got {getattr(self, name)}")
    self.llama()  # the decoder's own checks

  def llama(self) -> LlamaConfig:
    return LlamaConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                       n_kv_heads=self.n_kv_heads, multiple_of=self.multiple_of, max_seq_len=self.max_seq_len,
                       dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat)

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.image_channels

  def replace(self, **kw) -> "GatoConfig":
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, GatoConfig] = {
    "tiny": GatoConfig(dim=32, n_layers=2, n_heads=2, multiple_of=32, max_seq_len=256, max_local=64,
                       patch_size=5, image_channels=1, patch_width=8, patch_groups=8, scan_layers=False),
    "small": GatoConfig(dim=128, n_layers=4, n_heads=4, multiple_of=64, max_seq_len=512, max_local=64,
                        patch_size=5, image_channels=1, patch_width=16, patch_groups=8, scan_layers=False),
    "79m": GatoConfig(dim=768, n_layers=8, n_heads=24),
    "364m": GatoConfig(dim=1536, n_layers=12, n_heads=12),
    "1.18b": GatoConfig(dim=2048, n_layers=24, n_heads=16),
}
PAPER_PARAMS = {"79m": 79e6, "364m": 364e6, "1.18b": 1.18e9}


def preset(name: str, **overrides) -> GatoConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown Gato preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def _groups(cfg: GatoConfig, channels: int) -> int:
  return math.gcd(cfg.patch_groups, channels)


def _extra_specs(cfg: GatoConfig) -> Params:
  p, c, w, d = cfg.patch_size, cfg.image_channels, cfg.patch_width, cfg.dim
  conv = lambda k, cin, cout, scale=1.0: {"w": ParamSpec((k, k, cin, cout), scale / math.sqrt(k * k * cin)),
                                          "b": ParamSpec((cout,))}
  norm = lambda n: {"scale": ParamSpec((n,), value=1.0), "bias": ParamSpec((n,))}
  return {
      "local_pos": ParamSpec((cfg.max_local, d), 0.02),
      "row_pos": ParamSpec((POSITION_BINS, d), 0.02),
      "col_pos": ParamSpec((POSITION_BINS, d), 0.02),
      "patch": {"norm1": norm(c), "conv1": conv(3, c, w), "norm2": norm(w), "conv2": conv(3, w, w),
                "skip": conv(1, c, w), "proj": {"w": ParamSpec((p * p * w, d), 1.0 / math.sqrt(p * p * w)),
                                                "b": ParamSpec((d,))}},
  }


def init(rng: jax.Array, cfg: GatoConfig) -> Params:
  """Parameters: the Llama decoder's (`llama.init`) and Gato's embeddings (module docstring). Compiled once per
  config (one program instead of dozens of small eager ones)."""
  return _init(rng, cfg)


@functools.partial(jax.jit, static_argnums=1)
def _init(rng: jax.Array, cfg: GatoConfig) -> Params:
  k1, k2 = jax.random.split(rng)
  dec = llama.init(k1, cfg.llama())
  if cfg.tie_embeddings:
    dec.pop("output")
  return {"decoder": dec, **init_from_specs(k2, _extra_specs(cfg))}


def param_count(cfg: GatoConfig) -> int:
  """Exact parameter count from the shapes (no arrays)."""
  n = llama_param_count(cfg.llama()) - (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0)
  return n + sum(int(np.prod(s.shape)) for s in jax.tree.leaves(_extra_specs(cfg),
                                                                is_leaf=lambda x: isinstance(x, ParamSpec)))


def flops_per_token(cfg: GatoConfig, seq_len: int) -> float:
  """Training FLOPs per token of the decoder (6 N_matmul + attention), as `jaxml.llama.config.flops_per_token`;
  the logits product counts once whether or not the table is tied (the patch block is not counted)."""
  lc = cfg.llama()
  n_matmul = llama_param_count(lc) - lc.vocab_size * lc.dim
  return 6.0 * n_matmul + 12.0 * lc.n_layers * lc.dim * seq_len


def _conv(p, x_NxHxWxC):
  y = jax.lax.conv_general_dilated(x_NxHxWxC, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["b"]


def patch_embedding(params: Params, patches_NxP: jax.Array, cfg: GatoConfig) -> jax.Array:
  """One ResNet-v2 block over each `p x p x C` patch, flattened and projected: `[N, P] -> [N, D]`."""
  if np.ndim(patches_NxP) != 2 or np.shape(patches_NxP)[-1] != cfg.patch_dim:
    raise ValueError(f"patches_NxP must be [N, patch_dim={cfg.patch_dim}], got shape {np.shape(patches_NxP)}")
  pp = params["patch"]
  s, c, w = cfg.patch_size, cfg.image_channels, cfg.patch_width
  x = patches_NxP.astype(jnp.float32).reshape(-1, s, s, c)
  pre = jax.nn.gelu(nn.group_norm(x, pp["norm1"]["scale"], pp["norm1"]["bias"], _groups(cfg, c)))
  h = _conv(pp["conv1"], pre)
  h = _conv(pp["conv2"], jax.nn.gelu(nn.group_norm(h, pp["norm2"]["scale"], pp["norm2"]["bias"], _groups(cfg, w))))
  h = h + _conv(pp["skip"], pre)
  return nn.linear(h.reshape(h.shape[0], s * s * w), pp["proj"]["w"]) + pp["proj"]["b"]


def position_bins(interval_Nx2: jax.Array, rng: jax.Array | None) -> jax.Array:
  """A bin per interval [lo, hi): uniform in it when `rng` is given (training), else round((lo + hi - 1) / 2)."""
  lo, hi = interval_Nx2[..., 0], interval_Nx2[..., 1]
  if rng is None:
    return jnp.round((lo + hi - 1) / 2).astype(jnp.int32)
  u = jax.random.uniform(rng, lo.shape)
  return jnp.clip(lo + jnp.floor(u * (hi - lo)).astype(jnp.int32), lo, jnp.maximum(hi - 1, lo))


def check_tokens(tokens: Tokens, cfg: GatoConfig, *, what: str = "tokens") -> None:
  """Shapes of a `[B, T]` record against `cfg`; ids and local positions in range where concrete."""
  if not isinstance(tokens, Tokens):
    raise TypeError(f"{what} must be a jaxml.gato.sequence.Tokens record, got {type(tokens).__name__}")
  shape = tuple(np.shape(tokens.ids))
  if len(shape) != 2:
    raise ValueError(f"{what}.ids must be [batch, length], got shape {shape}")
  want = {"patches": shape + (cfg.patch_dim,), "rows": shape + (2,), "cols": shape + (2,)}
  for f in Tokens._fields:
    if tuple(np.shape(getattr(tokens, f))) != want.get(f, shape):
      raise ValueError(f"{what}.{f} has shape {np.shape(getattr(tokens, f))}, expected {want.get(f, shape)}")
  if shape[1] > cfg.max_seq_len:
    raise ValueError(f"{what} length {shape[1]} exceeds the context max_seq_len={cfg.max_seq_len}")
  if not isinstance(tokens.ids, jax.core.Tracer):
    ids, loc = np.asarray(tokens.ids), np.asarray(tokens.local_pos)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
      raise ValueError(f"{what}.ids outside [0, {cfg.vocab_size}): min {ids.min()}, max {ids.max()}")
    if loc.size and loc.max() >= cfg.max_local:
      raise ValueError(f"{what}.local_pos reaches {loc.max()}, beyond max_local={cfg.max_local}")


def embed(params: Params, tokens: Tokens, cfg: GatoConfig, rng: jax.Array | None = None, *,
          with_patches: bool = True) -> jax.Array:
  """`[B, T, D]` input vectors (module docstring); `rng` samples the patch position bins (training).

  `with_patches=False` skips the patch block for a record known to hold no patches (a task without image
  fields): the ResNet block runs on every position otherwise, patch or not, and costs about as much as
  the decoder at small widths.
  """
  dt = cfg.llama().compute_dtype
  x = params["decoder"]["tok_embeddings"].astype(dt)[tokens.ids]
  b, t = tokens.ids.shape
  if with_patches:
    kr, kc = (None, None) if rng is None else jax.random.split(rng)
    patch = patch_embedding(params, tokens.patches.reshape(b * t, -1), cfg).reshape(b, t, -1)
    patch = patch + params["row_pos"][position_bins(tokens.rows, kr)] + \
        params["col_pos"][position_bins(tokens.cols, kc)]
    x = jnp.where(tokens.is_patch[..., None], patch.astype(dt), x)
  local = params["local_pos"].astype(dt)[jnp.clip(tokens.local_pos, 0, cfg.max_local - 1)]
  return x + jnp.where((tokens.local_pos >= 0)[..., None], local, 0).astype(dt)


def head(params: Params, h_BxTxD: jax.Array, cfg: GatoConfig) -> jax.Array:
  """`[B, T, V]` float32 logits via `llama.head` (with the shared table as the output when tied)."""
  dec = params["decoder"]
  out = {"output": dec["tok_embeddings"].T} if cfg.tie_embeddings else dec
  return llama.head(out, h_BxTxD, cfg.llama())


def apply(params: Params, tokens: Tokens, cfg: GatoConfig, *, rng: jax.Array | None = None,
          cache: llama.KVCache | None = None, cache_index: jax.Array | int = 0):
  """Logits `[B, T, V]` of a `[B, T]` record (with `cache`: `(logits, new_cache)`, as `llama.decoder`)."""
  check_tokens(tokens, cfg)
  x = embed(params, tokens, cfg, rng)
  out = llama.decoder(params["decoder"], x, cfg.llama(), cache=cache, cache_index=cache_index)
  if cache is None:
    return head(params, out, cfg)
  return head(params, out[0], cfg), out[1]


def loss_fn(params: Params, batch: Tokens, cfg: GatoConfig, rng: jax.Array | None = None):
  """Masked next-token loss: the logits at t score `ids[t + 1]` where `loss_mask[t + 1]` (text and actions).

  Returns:
    `(loss, metrics)`: mean cross-entropy over the scored tokens (nats); metrics `loss`, `accuracy`
    (argmax over the whole vocabulary), `tokens`.
  """
  logits = apply(params, batch, cfg, rng=rng)[:, :-1]
  targets, mask = batch.ids[:, 1:], batch.loss_mask[:, 1:].astype(jnp.float32)
  loss, n = nn.cross_entropy(logits, targets, mask)
  correct = (nn.first_argmax(logits) == targets).astype(jnp.float32)
  acc = (correct * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {"loss": loss, "accuracy": acc, "tokens": n}
