"""Llama 2 model configuration and the published presets."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxml.nn.layers import swiglu_hidden_dim


ATTENTION_IMPLS = ("auto", "cpu", "blockwise", "cudnn", "pallas")
# `jax.checkpoint_policies` that need no arguments, from keeping nothing (recompute the whole block) to
# keeping everything. The block's matmuls (`nn.linear`) and attention run under hand-written VJPs, which
# the dots policies do not see: for this model they keep what "nothing_saveable" keeps (the 7b recipe
# compiles to the same per-device memory with either).
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama 2 decoder.

  Field names follow Meta's `ModelArgs` (`params.json`), so a Meta config maps
  one to one.
  """

  vocab_size: int = 32000
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int | None = None  # None: equal to n_heads (MHA).
  multiple_of: int = 256  # SwiGLU hidden width is rounded up to this.
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seq_len: int = 4096
  dtype: str = "float32"  # activation / compute dtype ("bfloat16" on TPU/GPU).
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass.
  scan_layers: bool = True  # lax.scan over layers (fast compile); False unrolls (faster small models on CPU).
  # What a rematerialised block keeps for the backward pass: a `jax.checkpoint_policies` name (REMAT_POLICIES).
  remat_policy: str = "nothing_saveable"
  # Attention without a KV cache (training, scoring): "cpu" (the materialised `[T, S]` scores with the
  # hand-written backward of `nn.cached_attention`, fastest for small models on CPU), "blockwise"
  # (`nn.blockwise_attention`: memory linear in T, any backend), "cudnn" (`jax.nn.dot_product_attention`,
  # cuDNN's kernel on GPU; with an attention mask the decoder uses "blockwise"),
  # "pallas" (the Pallas TPU flash kernel), or "auto": `resolved_attention_impl()` picks per backend.
  # Decoding against a KV cache always uses `nn.cached_attention`.
  attention_impl: str = "auto"
  attention_block: int = 512  # "blockwise": query and key tile length.
  # Training loss: 0 materialises the `[B, T, V]` float32 logits; n > 0 computes them n positions at a
  # time, hidden states to loss (`nn.chunked_token_nll`), never holding the whole batch's logits.
  loss_chunk: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    if self.dim % self.n_heads:
      raise ValueError(f"LlamaConfig: n_heads ({self.n_heads}) must divide dim ({self.dim})")
    if (self.dim // self.n_heads) % 2:
      raise ValueError(f"LlamaConfig: head_dim ({self.dim // self.n_heads}) must be even for rotary embeddings")
    if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
      raise ValueError(f"LlamaConfig: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"LlamaConfig.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"LlamaConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.attention_block <= 0:
      raise ValueError(f"LlamaConfig.attention_block must be positive, got {self.attention_block}")
    if self.loss_chunk < 0:
      raise ValueError(f"LlamaConfig.loss_chunk must be 0 (off) or positive, got {self.loss_chunk}")

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def hidden_dim(self) -> int:
    return swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

  def resolved_attention_impl(self, backend: str | None = None) -> str:
    """`attention_impl`, with "auto" resolved for `backend` (default: JAX's default backend).

    "auto": "cpu" on CPU; on GPU "cudnn" for bfloat16/float16 compute with
    `head_dim <= 128` (what cuDNN's flash kernel takes), else "blockwise"; on
    TPU "pallas" when `head_dim` is a multiple of 128 (the kernel's lane
    width; the 7b/13b/70b shapes), else "blockwise".
    """
    if self.attention_impl != "auto":
      return self.attention_impl
    backend = jax.default_backend() if backend is None else backend
    if backend in ("gpu", "cuda"):
      return "cudnn" if self.dtype in ("bfloat16", "float16") and self.head_dim <= 128 else "blockwise"
    if backend == "tpu":
      return "pallas" if self.head_dim % 128 == 0 else "blockwise"
    return "cpu"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def param_count(cfg: LlamaConfig) -> int:
  """Exact number of parameters, computed from the shapes (no arrays built)."""
  d, f, v = cfg.dim, cfg.hidden_dim, cfg.vocab_size
  kv = cfg.kv_heads * cfg.head_dim
  per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d
  return cfg.n_layers * per_layer + 2 * v * d + d


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward).

  `6 * N_matmul + 12 * n_layers * dim * seq_len` (the attention score and value
  products), where `N_matmul` excludes the embedding lookup table.
  """
  n_matmul = param_count(cfg) - cfg.vocab_size * cfg.dim
  return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


PRESETS: dict[str, LlamaConfig] = {
    # Published Llama 2 shapes (context 4096, vocab 32000). For accelerators: bfloat16 compute, each block
    # rematerialised keeping only its input (the llama_lm recipes then need 10-14 GiB per device; keeping
    # every activation, "everything_saveable", does not fit a 16 GiB chip), attention by the backend's
    # kernel ("auto"), logits 512 positions at a time. BUILD_NOTES.md has the per-device memory XLA reports.
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, dtype="bfloat16", remat=True, loss_chunk=512),
    "13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, dtype="bfloat16", remat=True,
                       loss_chunk=512),
    "70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                       dtype="bfloat16", remat=True, loss_chunk=512),
    # Small shapes for CPU runs and tests.
    "tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128,
                        scan_layers=False),
    "small": LlamaConfig(vocab_size=2048, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, multiple_of=64, max_seq_len=256,
                         scan_layers=False),
}


def preset(name: str, **overrides) -> LlamaConfig:
  """Returns a named preset, optionally with fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# The mesh axes that split the batch (`jaxml.train.sharding.BATCH_AXES`): the decoder constrains its
# activations to them when traced for such a mesh (see `jaxml.llama.model`).
BATCH_AXES = ("data", "fsdp")

# Partition rules for `jaxml.train` (regex on the leaf path -> PartitionSpec over the
# (data, fsdp, tensor) mesh). # Llama parameter tree (see jaxml/llama/model.py). The leading layer axis of
# the stacked `layers/*` weights is never sharded (it is the scan axis).
LLAMA_RULES = (
    (r"(^|/)tok_embeddings$", P("tensor", "fsdp")),         # [V, D]
    (r"(^|/)layers/w[qkv]$", P(None, "fsdp", "tensor")),    # [L, D, heads*Dh]
    (r"(^|/)layers/wo$", P(None, "tensor", "fsdp")),        # [L, H*Dh, D]
    (r"(^|/)layers/w[13]$", P(None, "fsdp", "tensor")),     # [L, D, F]
    (r"(^|/)layers/w2$", P(None, "tensor", "fsdp")),        # [L, F, D]
    (r"(^|/)layers/[^/]*norm$", P(None, None)),             # [L, D]
    (r"(^|/)norm$", P(None)),                               # [D]
    (r"(^|/)output$", P("fsdp", "tensor")),                 # [D, V]
)
