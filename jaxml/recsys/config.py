"""Frozen configs for CTR towers: the features they read and the tower built on top.

A tower sees only `TowerConfig` (which holds its `FeatureConfig`); experiment
ConfigDicts are turned into these by `jaxml.recsys.experiment` (`jaxml.experiment.from_config`).
"""
from __future__ import annotations

import dataclasses

TOWER_KINDS = ("mlp", "dcnv2", "dlrm", "dhen")
DHEN_MODULES = ("linear", "attention", "dot", "dcn", "mlp")
ACTIVATIONS = ("relu", "smelu")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Inputs of a tower.

  n_dense: number of float features, sent through an MLP into one embedding slot.
  vocab_sizes: hash buckets of each single-hot categorical field (bucket 0 = missing).
  multi_hot_vocab_sizes: hash buckets of each multi-hot field (ids padded with -1).
  pooling: "sum" or "mean" over the ids of a multi-hot field.
  embed_dim: D, the width of every embedding slot.
  dense_hidden: hidden widths of the dense-feature MLP (its last layer has width D).
  row_multiple: the shared table's row count is padded to a multiple of this, so it
    splits evenly when sharded by rows over a mesh axis.
  """

  n_dense: int = 13
  vocab_sizes: tuple[int, ...] = (1000,) * 8
  multi_hot_vocab_sizes: tuple[int, ...] = ()
  pooling: str = "mean"
  embed_dim: int = 16
  dense_hidden: tuple[int, ...] = (32,)
  row_multiple: int = 64

  def __post_init__(self):
    if self.n_dense < 0:
      raise ValueError(f"n_dense must be >= 0, got {self.n_dense}")
    for name in ("vocab_sizes", "multi_hot_vocab_sizes"):
      sizes = getattr(self, name)
      if any(v < 2 for v in sizes):
        raise ValueError(f"{name} entries must be >= 2 (bucket 0 is reserved for missing), got {sizes}")
    if self.pooling not in ("sum", "mean"):
      raise ValueError(f"pooling must be 'sum' or 'mean', got {self.pooling!r}")
    if self.embed_dim < 1:
      raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
    if self.n_slots == 0:
      raise ValueError("a FeatureConfig needs at least one dense or categorical feature")

  @property
  def n_slots(self) -> int:
    """F: embedding slots (one for all dense features, one per categorical field)."""
    return int(self.n_dense > 0) + len(self.vocab_sizes) + len(self.multi_hot_vocab_sizes)

  @property
  def table_rows(self) -> int:
    rows = sum(self.vocab_sizes) + sum(self.multi_hot_vocab_sizes)
    return -(-rows // self.row_multiple) * self.row_multiple


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """A CTR tower: features -> interaction -> top MLP -> one logit.

  kind: "mlp" (flattened embeddings into an MLP), "dcnv2" (cross network + MLP),
    "dlrm" (pairwise dot interaction + MLP) or "dhen" (stacked DHEN layers + MLP).
  hidden: widths of the top MLP (use `pyramid_widths` for a pyramid).
  bottleneck: if > 0, every top-MLP layer is factorised `n x k` then `k x m` with k = bottleneck.
  activation: "relu" or "smelu"; smelu_beta is SmeLU's half-width b.
  cross_layers / cross_rank / cross_experts / cross_structure: DCN-v2 cross network
    (rank 0 = full rank; experts > 1 = mixture of low-rank experts, needs rank > 0;
    "stacked" = cross then MLP, "parallel" = cross and MLP side by side, concatenated).
  dhen_modules: interaction modules of every DHEN layer (see DHEN_MODULES).
  dhen_rows: output rows of each module that has a free output size ("linear", "dot",
    "mlp"); None = the layer's input rows. "attention" and "dcn" keep the input rows.
  dhen_ensemble: "concat" (rows add up) or "sum" (all modules must give the same rows).
  dhen_layers: number of stacked DHEN layers.
  attention_heads: heads of the feature self-attention module (must divide D).
  dhen_batch_chunks: run the DHEN layers on this many interleaved slices of the batch
    (`towers.dhen_chunks`); 0 = automatic (8 on CPU for batches of 1,024 or more that 8
    divides when no layer reads more than 64 rows, else 1). The result is the same
    function; only the schedule changes.
  """

  features: FeatureConfig = FeatureConfig()
  kind: str = "mlp"
  hidden: tuple[int, ...] = (128, 64)
  bottleneck: int = 0
  activation: str = "relu"
  smelu_beta: float = 1.0
  cross_layers: int = 2
  cross_rank: int = 0
  cross_experts: int = 1
  cross_structure: str = "stacked"
  dhen_modules: tuple[str, ...] = ("attention", "linear")
  dhen_rows: tuple[int | None, ...] | None = None
  dhen_ensemble: str = "concat"
  dhen_layers: int = 2
  attention_heads: int = 2
  dhen_batch_chunks: int = 0

  def __post_init__(self):
    if self.kind not in TOWER_KINDS:
      raise ValueError(f"kind must be one of {TOWER_KINDS}, got {self.kind!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    if self.smelu_beta <= 0:
      raise ValueError(f"smelu_beta must be > 0, got {self.smelu_beta}")
    if self.bottleneck < 0:
      raise ValueError(f"bottleneck must be >= 0, got {self.bottleneck}")
    if self.cross_structure not in ("stacked", "parallel"):
      raise ValueError(f"cross_structure must be 'stacked' or 'parallel', got {self.cross_structure!r}")
    if self.cross_experts < 1 or (self.cross_experts > 1 and self.cross_rank == 0):
      raise ValueError(f"cross_experts={self.cross_experts} needs cross_experts >= 1 and cross_rank > 0 for a mixture")
    if self.dhen_ensemble not in ("concat", "sum"):
      raise ValueError(f"dhen_ensemble must be 'concat' or 'sum', got {self.dhen_ensemble!r}")
    bad = [m for m in self.dhen_modules if m not in DHEN_MODULES]
    if bad or not self.dhen_modules:
      raise ValueError(f"dhen_modules must be a non-empty tuple of {DHEN_MODULES}, got {self.dhen_modules}")
    if self.dhen_rows is not None and len(self.dhen_rows) != len(self.dhen_modules):
      raise ValueError(f"dhen_rows {self.dhen_rows} must give one entry per module {self.dhen_modules}")
    if self.features.embed_dim % self.attention_heads:
      raise ValueError(f"attention_heads ({self.attention_heads}) must divide embed_dim ({self.features.embed_dim})")
    if self.dhen_batch_chunks < 0:
      raise ValueError(f"dhen_batch_chunks must be >= 0 (0 = automatic), got {self.dhen_batch_chunks}")
    if self.kind == "dhen":
      rows = self.features.n_slots
      for _ in range(self.dhen_layers):  # validates ensemble shapes at build time
        rows = dhen_layer_rows(self, rows)[1]


def dhen_layer_rows(cfg: TowerConfig, rows_in: int) -> tuple[tuple[int, ...], int]:
  """(rows of each module's output, rows of the layer output) for an input of `rows_in` rows.

  Raises ValueError when a sum ensemble would add outputs of different shapes.
  """
  module_rows = []
  for i, name in enumerate(cfg.dhen_modules):
    if name in ("attention", "dcn"):
      module_rows.append(rows_in)
    else:
      r = None if cfg.dhen_rows is None else cfg.dhen_rows[i]
      module_rows.append(rows_in if r is None else int(r))
  if any(r < 1 for r in module_rows):
    raise ValueError(f"dhen_rows must be >= 1, got {module_rows}")
  if cfg.dhen_ensemble == "sum":
    if len(set(module_rows)) != 1:
      desc = ", ".join(f"{m}->[{r}, {cfg.features.embed_dim}]" for m, r in zip(cfg.dhen_modules, module_rows))
      raise ValueError(f"dhen_ensemble='sum' needs every module to output the same shape, got {desc} "
                       f"for a layer input of {rows_in} rows; use 'concat' or set dhen_rows")
    return tuple(module_rows), module_rows[0]
  return tuple(module_rows), sum(module_rows)


def pyramid_widths(first: int, last: int, n_layers: int) -> tuple[int, ...]:
  """Widths of a pyramid MLP: geometric from `first` down to `last` over `n_layers` layers."""
  if n_layers < 1 or first < last or last < 1:
    raise ValueError(f"pyramid needs n_layers >= 1 and first >= last >= 1, got {first}, {last}, {n_layers}")
  if n_layers == 1:
    return (first,)
  ratio = (last / first) ** (1.0 / (n_layers - 1))
  return tuple(max(last, int(round(first * ratio**i))) for i in range(n_layers))
