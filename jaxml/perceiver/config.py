"""Perceiver / Perceiver IO configuration: the encoder, its input preprocessor and its output queries.

One frozen `PerceiverConfig` describes a whole model:

- `inputs`: what `apply` takes. "bytes": UTF-8 byte ids `[B, M]` (the 262-id
  vocabulary below) embedded with learned positions; "pixels": images
  `[B, H, W, C]` (channels last) concatenated with the Fourier features of
  their grid positions; "array": any `[B, M, d_model]` array, with whatever
  position features the user concatenated.
- the encoder: `num_latents x d_latents` learned latents cross-attend once to
  the inputs, then `num_blocks` passes through the same
  `num_self_attends_per_block` self-attention layers (weights shared across
  blocks, as deepmind-research's Perceiver IO). `repeat_cross_attention`
  gives the original Perceiver's iterative form: a cross-attend before every
  block, the first with its own weights, the later ones sharing one set (the
  Perceiver paper's ImageNet models share all cross-attends but the first).
- `task`: "masked_lm" (Perceiver IO's byte masked LM: one query per input
  position, logits through the tied byte embedding), "classifier" (one learned
  query, projected to `num_classes` logits) or "multitask" (several named
  query sets, `decoders`, all reading the same latents).

Defaults are deepmind's language Perceiver (transformers' `PerceiverConfig`
defaults): bytes in, 256 x 1280 latents, 26 self-attends, 8 heads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxml.perceiver.positions import fourier_channels

# The byte vocabulary of Perceiver IO (transformers' PerceiverTokenizer): 6 special ids, then byte b at b + 6.
PAD_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3, 4, 5
BYTE_OFFSET = 6
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET

TASKS = ("masked_lm", "classifier", "multitask")
INPUTS = ("bytes", "pixels", "array")
# The masked-LM decoder transformers hard-codes (PerceiverForMaskedLM): 8 heads, 8 * 32 qk channels.
HF_MLM_DECODER_HEADS, HF_MLM_DECODER_QK_CHANNELS = 8, 256


def _positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _optional_positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(obj, name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
      raise ValueError(f"{owner}.{name} must be None or a positive int, got {value!r}")


def _divides(owner: str, heads_field: str, heads: int, channels: int, what: str) -> None:
  if channels % heads:
    raise ValueError(f"{owner}.{heads_field} ({heads}) must divide the {what}: {channels} channels")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """One Perceiver IO output: a set of queries that cross-attend to the latents.

  The queries are learned (`queries="learned"`, `prod(index_dims)` rows of
  `query_channels`) or the Fourier features of the output grid's positions
  (`queries="fourier"`, `linear_positions(index_dims)` with `num_bands` bands
  up to `max_resolution`). One cross-attention layer (LayerNorm on queries and
  latents, `num_heads` heads, an MLP `widening_factor` wide) maps them to
  outputs of the query width, optionally followed by a linear projection to
  `output_channels`. Outputs are `[B, prod(index_dims), channels]`.
  """

  name: str = "output"
  queries: str = "learned"  # "learned" or "fourier".
  index_dims: tuple[int, ...] = (1,)  # the output grid; prod(index_dims) queries.
  query_channels: int | None = None  # learned query width; None: d_latents. Fourier: derived (leave None).
  num_bands: int = 64  # Fourier queries: bands per dimension.
  max_resolution: tuple[int, ...] | None = None  # Fourier queries: None means index_dims.
  concat_pos: bool = True  # Fourier queries: prepend the raw positions.
  sine_only: bool = False  # Fourier queries: sines only.
  num_heads: int = 1
  qk_channels: int | None = None  # None: the latent width ("kv") or the query width ("q"), as the encoder's setting.
  v_channels: int | None = None  # None: qk channels.
  widening_factor: int = 1
  use_query_residual: bool = False  # add the queries to the attention output (off when outputs mean other things).
  output_channels: int | None = None  # final linear projection; None: none (outputs keep the query width).
  loss: str = "cross_entropy"  # multitask loss_fn: "cross_entropy" (integer targets [B, Q]) or "mse" ([B, Q, C]).
  loss_weight: float = 1.0  # multitask loss_fn: weight of this output's loss in the sum.

  def __post_init__(self):
    owner = f"DecoderConfig({self.name!r})"
    if not isinstance(self.name, str) or not self.name or "/" in self.name:
      raise ValueError(f"DecoderConfig.name must be a non-empty string without '/', got {self.name!r}")
    if self.queries not in ("learned", "fourier"):
      raise ValueError(f"{owner}.queries must be 'learned' or 'fourier', got {self.queries!r}")
    object.__setattr__(self, "index_dims", tuple(int(n) for n in self.index_dims))
    if not self.index_dims or any(n <= 0 for n in self.index_dims):
      raise ValueError(f"{owner}.index_dims must be non-empty positive sizes, got {self.index_dims}")
    _positive(owner, self, ("num_bands", "num_heads", "widening_factor"))
    _optional_positive(owner, self, ("query_channels", "qk_channels", "v_channels", "output_channels"))
    if self.max_resolution is not None:
      object.__setattr__(self, "max_resolution", tuple(int(r) for r in self.max_resolution))
      if len(self.max_resolution) != len(self.index_dims) or any(r <= 0 for r in self.max_resolution):
        raise ValueError(f"{owner}.max_resolution must hold {len(self.index_dims)} positive sizes, got "
                         f"{self.max_resolution}")
    if self.queries == "fourier" and self.query_channels is not None and self.query_channels != self.fourier_width:
      raise ValueError(f"{owner}.query_channels ({self.query_channels}) must be None for Fourier queries (their "
                       f"width is {self.fourier_width})")
    if self.loss not in ("cross_entropy", "mse"):
      raise ValueError(f"{owner}.loss must be 'cross_entropy' or 'mse', got {self.loss!r}")

  @property
  def num_queries(self) -> int:
    return math.prod(self.index_dims)

  @property
  def resolution(self) -> tuple[int, ...]:
    return self.index_dims if self.max_resolution is None else self.max_resolution

  @property
  def fourier_width(self) -> int:
    return fourier_channels(len(self.index_dims), self.num_bands, concat_pos=self.concat_pos,
                            sine_only=self.sine_only)

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  """Shape and numerics of a Perceiver (IO) model; see the module docstring.

  Field names follow transformers' `PerceiverConfig` where one exists, so a
  `config.json` maps field by field.
  """

  task: str = "masked_lm"  # "masked_lm", "classifier" or "multitask".
  inputs: str = "bytes"  # "bytes", "pixels" or "array".
  num_latents: int = 256
  d_latents: int = 1280  # latent width.
  d_model: int | None = None  # input width (encoder keys/values). None: pixels -> derived, otherwise 768.
  num_cross_attention_heads: int = 8
  num_self_attention_heads: int = 8
  qk_channels: int | None = None  # encoder q/k width; None: see cross_attention_shape_for_attention / d_latents.
  v_channels: int | None = None  # encoder value width; None: the qk width.
  cross_attention_shape_for_attention: str = "kv"  # default cross qk width: "kv" the input's, "q" the latents'.
  cross_attention_widening_factor: int = 1  # cross-attention MLP width / d_latents.
  self_attention_widening_factor: int = 1  # self-attention MLP width / d_latents (deepmind's ImageNet uses 1).
  num_blocks: int = 1  # passes through the shared self-attention block.
  num_self_attends_per_block: int = 26
  repeat_cross_attention: bool = False  # original Perceiver: cross-attend before every block (see docstring).
  use_query_residual: bool = True  # encoder cross-attend adds the latents to its attention output.
  gelu: str = "exact"  # MLP activation: "exact" (erf; transformers) or "tanh" (deepmind's jax.nn.gelu).
  layer_norm_eps: float = 1e-5
  dropout: float = 0.0  # on every attention and MLP output before its residual add (training only).
  scan_layers: bool = True  # lax.scan over blocks and layers (fast compile); False unrolls them.
  # inputs == "pixels": channels, and the Fourier features of the pixel grid.
  image_channels: int = 3
  num_bands: int = 64
  max_resolution: tuple[int, ...] = (224, 224)
  concat_pos: bool = True
  sine_only: bool = False
  # inputs == "bytes".
  vocab_size: int = BYTE_VOCAB_SIZE
  max_position_embeddings: int = 2048  # learned input positions (and masked-LM queries).
  # task == "classifier".
  num_classes: int = 1000
  # Output queries. masked_lm / classifier: () takes transformers' decoder for the task, or give one
  # DecoderConfig to change it; multitask: one or more, with distinct names.
  decoders: tuple[DecoderConfig, ...] = ()

  def __post_init__(self):
    own = "PerceiverConfig"
    if self.task not in TASKS:
      raise ValueError(f"{own}.task must be one of {TASKS}, got {self.task!r}")
    if self.inputs not in INPUTS:
      raise ValueError(f"{own}.inputs must be one of {INPUTS}, got {self.inputs!r}")
    if self.task == "masked_lm" and self.inputs != "bytes":
      raise ValueError(f"{own}.inputs must be 'bytes' for task 'masked_lm' (its decoder is tied to the byte "
                       f"embedding), got {self.inputs!r}")
    object.__setattr__(self, "max_resolution", tuple(int(r) for r in self.max_resolution))
    # Plain dicts (an experiment config, or `to_dict` output read back) become DecoderConfigs.
    object.__setattr__(self, "decoders", tuple(DecoderConfig(**d) if isinstance(d, dict) else d
                                               for d in self.decoders))
    _positive(own, self, ("num_latents", "d_latents", "num_cross_attention_heads", "num_self_attention_heads",
                          "cross_attention_widening_factor", "self_attention_widening_factor", "num_blocks",
                          "num_self_attends_per_block", "image_channels", "num_bands", "vocab_size",
                          "max_position_embeddings", "num_classes"))
    _optional_positive(own, self, ("d_model", "qk_channels", "v_channels"))
    if self.inputs == "pixels":
      if len(self.max_resolution) != 2 or any(r <= 0 for r in self.max_resolution):
        raise ValueError(f"{own}.max_resolution must hold 2 positive sizes (height, width) for pixel inputs, "
                         f"got {self.max_resolution}")
      width = self.image_channels + self.pixel_fourier_channels
      if self.d_model is None:
        object.__setattr__(self, "d_model", width)
      elif self.d_model != width:
        raise ValueError(f"{own}.d_model ({self.d_model}) must be image_channels + Fourier channels = {width} "
                         "for pixel inputs (or None)")
    elif self.d_model is None:
      object.__setattr__(self, "d_model", 768)
    if self.cross_attention_shape_for_attention not in ("kv", "q"):
      raise ValueError(f"{own}.cross_attention_shape_for_attention must be 'kv' or 'q', got "
                       f"{self.cross_attention_shape_for_attention!r}")
    if self.gelu not in ("exact", "tanh"):
      raise ValueError(f"{own}.gelu must be 'exact' or 'tanh', got {self.gelu!r}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"{own}.layer_norm_eps must be positive, got {self.layer_norm_eps}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{own}.dropout must be in [0, 1), got {self.dropout}")
    _divides(own, "num_cross_attention_heads", self.num_cross_attention_heads, self.cross_qk_channels,
             "encoder cross-attention qk width (qk_channels, or by cross_attention_shape_for_attention)")
    _divides(own, "num_cross_attention_heads", self.num_cross_attention_heads, self.cross_v_channels,
             "encoder cross-attention value width (v_channels, or its qk width)")
    _divides(own, "num_self_attention_heads", self.num_self_attention_heads, self.self_qk_channels,
             "self-attention qk width (qk_channels, or d_latents)")
    _divides(own, "num_self_attention_heads", self.num_self_attention_heads, self.self_v_channels,
             "self-attention value width (v_channels, or its qk width)")
    self._check_decoders()

  def _check_decoders(self) -> None:
    own = "PerceiverConfig.decoders"
    for d in self.decoders:
      if not isinstance(d, DecoderConfig):
        raise ValueError(f"{own} must hold DecoderConfig objects, got {type(d).__name__}")
    names = [d.name for d in self.decoders]
    if len(set(names)) != len(names):
      raise ValueError(f"{own}: names must be distinct, got {names}")
    if self.task == "multitask" and not self.decoders:
      raise ValueError(f"{own} must hold at least one DecoderConfig for task 'multitask'")
    if self.task != "multitask" and len(self.decoders) > 1:
      raise ValueError(f"{own} holds {len(self.decoders)} decoders; task {self.task!r} takes one (or none)")
    for d in self.decoder_configs:
      owner = f"{own}[{d.name!r}]"
      _divides(owner, "num_heads", d.num_heads, self.decoder_qk_channels(d), "decoder qk width")
      _divides(owner, "num_heads", d.num_heads, self.decoder_v_channels(d), "decoder value width")
      if self.task == "masked_lm":
        if d.index_dims != (self.max_position_embeddings,) or d.output_channels is not None:
          raise ValueError(f"{owner}: the masked-LM decoder needs index_dims (max_position_embeddings,) = "
                           f"({self.max_position_embeddings},) and no output projection, got index_dims "
                           f"{d.index_dims}, output_channels {d.output_channels}")
        if self.decoder_query_channels(d) != self.d_model:
          raise ValueError(f"{owner}: the masked-LM decoder's query width ({self.decoder_query_channels(d)}) must "
                           f"be d_model ({self.d_model}): its outputs meet the tied byte embedding")
      if self.task == "classifier" and (d.num_queries != 1 or d.output_channels != self.num_classes):
        raise ValueError(f"{owner}: the classifier decoder needs one query and output_channels = num_classes "
                         f"({self.num_classes}), got {d.num_queries} queries, output_channels {d.output_channels}")

  # ---------------------------------------------------------------------------- derived widths

  @property
  def pixel_fourier_channels(self) -> int:
    return fourier_channels(2, self.num_bands, concat_pos=self.concat_pos, sine_only=self.sine_only)

  @property
  def cross_qk_channels(self) -> int:
    if self.qk_channels is not None:
      return self.qk_channels
    return self.d_model if self.cross_attention_shape_for_attention == "kv" else self.d_latents

  @property
  def cross_v_channels(self) -> int:
    return self.cross_qk_channels if self.v_channels is None else self.v_channels

  @property
  def self_qk_channels(self) -> int:
    return self.d_latents if self.qk_channels is None else self.qk_channels

  @property
  def self_v_channels(self) -> int:
    return self.self_qk_channels if self.v_channels is None else self.v_channels

  @property
  def decoder_configs(self) -> tuple[DecoderConfig, ...]:
    """The decoders `init`/`apply` build: `decoders`, or the task's default (transformers' own)."""
    if self.decoders:
      return self.decoders
    if self.task == "masked_lm":
      return (self.hf_masked_lm_decoder(),)
    if self.task == "classifier":
      return (self.hf_classifier_decoder(),)
    return ()

  def hf_masked_lm_decoder(self) -> DecoderConfig:
    """transformers' `PerceiverForMaskedLM` decoder: one learned d_model-wide query per position, 8 heads,
    qk 256 (hard-coded there), values d_model, no query residual, no projection."""
    return DecoderConfig(name="masked_lm", queries="learned", index_dims=(self.max_position_embeddings,),
                         query_channels=self.d_model, num_heads=HF_MLM_DECODER_HEADS,
                         qk_channels=HF_MLM_DECODER_QK_CHANNELS, v_channels=self.d_model, widening_factor=1,
                         use_query_residual=False, output_channels=None)

  def hf_classifier_decoder(self) -> DecoderConfig:
    """transformers' `PerceiverClassificationDecoder`: one learned d_latents-wide query, 1 head, query
    residual, a linear projection to num_classes."""
    return DecoderConfig(name="classifier", queries="learned", index_dims=(1,), query_channels=self.d_latents,
                         num_heads=1, widening_factor=1, use_query_residual=True,
                         output_channels=self.num_classes)

  def decoder_query_channels(self, d: DecoderConfig) -> int:
    if d.queries == "fourier":
      return d.fourier_width
    return self.d_latents if d.query_channels is None else d.query_channels

  def decoder_qk_channels(self, d: DecoderConfig) -> int:
    if d.qk_channels is not None:
      return d.qk_channels
    return self.d_latents if self.cross_attention_shape_for_attention == "kv" else self.decoder_query_channels(d)

  def decoder_v_channels(self, d: DecoderConfig) -> int:
    return self.decoder_qk_channels(d) if d.v_channels is None else d.v_channels

  def decoder_output_channels(self, d: DecoderConfig) -> int:
    return self.decoder_query_channels(d) if d.output_channels is None else d.output_channels

  def replace(self, **kw) -> "PerceiverConfig":
    """`dataclasses.replace`; a pixel model's derived d_model is derived again unless given."""
    if kw.get("inputs", self.inputs) == "pixels" and "d_model" not in kw:
      kw["d_model"] = None
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
