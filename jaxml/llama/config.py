"""Llama 2 model configuration and the published presets."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxml.nn.layers import swiglu_hidden_dim


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

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def hidden_dim(self) -> int:
    return swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

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
    # Published Llama 2 shapes (context 4096, vocab 32000).
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, dtype="bfloat16", remat=True),
    "13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, dtype="bfloat16", remat=True),
    "70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                       dtype="bfloat16", remat=True),
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
