"""Gato's tokenization (Reed et al. 2022, arXiv 2205.06175, Sec. 2.1) with an explicit layout.

Every modality becomes integer ids in one vocabulary; each kind owns its own range:

    [0, text_vocab)                                     text (a SentencePiece vocabulary)
    [continuous_start, continuous_start + 1024)         continuous values, 1024 bins
    [discrete_start, discrete_start + discrete_vocab)   discrete values (e.g. Atari buttons)
    separator                                           between observation and action
    [extra_start, extra_start + n_extra)                anything else a user needs

`TokenLayout()` is the paper's: 32,000 text ids, then the bins at 32,000-33,023. The paper gives
discrete values the ids [0, 1024), overlapping text; here they follow the bins, so no two kinds
share an id.

Continuous values are mu-law companded (mu = 100, M = 256),

    F(x) = sgn(x) log(|x| mu + 1) / log(M mu + 1),

unless the field is declared to lie in [-1, 1] already (normalised actions): the choice is made
per field, never per value, which would make the map non-monotonic. Then 1024 uniform bins over
[-1, 1]: bin = clip(floor((y + 1) / 2 * 1024), 0, 1023), so y = 1 lands in bin 1023 (a bin 1024
would be the next kind's first id). Decoding returns the bin's centre, undoing the companding.

Image patches: pixels to [-1, 1], then divided by sqrt(patch size), as the paper normalises
patches; patches row-major over the image, each flattened row-major (rows, columns, channels).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_BINS = 1024
MU, M = 100.0, 256.0


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """The id ranges of one vocabulary (module docstring). `TokenLayout()` is the paper's.

  Attributes:
    text_vocab: text ids [0, text_vocab).
    num_bins: continuous bins (1024 in the paper).
    discrete_vocab: discrete ids after the bins.
    n_extra: extra ids after the separator.
  """
  text_vocab: int = 32000
  num_bins: int = NUM_BINS
  discrete_vocab: int = 1024
  n_extra: int = 0

  def __post_init__(self):
    for name in ("text_vocab", "num_bins", "discrete_vocab", "n_extra"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < (0 if name in ("text_vocab", "n_extra") else 1):
        raise ValueError(f"TokenLayout.{name} must be a non-negative integer (num_bins, discrete_vocab >= 1), "
                         f"got {value!r}")

  @property
  def continuous_start(self) -> int:
    return self.text_vocab

  @property
  def discrete_start(self) -> int:
    return self.text_vocab + self.num_bins

  @property
  def separator(self) -> int:
    return self.discrete_start + self.discrete_vocab

  @property
  def extra_start(self) -> int:
    return self.separator + 1

  @property
  def vocab_size(self) -> int:
    """The number of ids in all: the embedding table's rows."""
    return self.extra_start + self.n_extra

  def ranges(self) -> dict[str, tuple[int, int]]:
    """`{kind: (start, stop)}` half-open ranges, in id order."""
    return {"text": (0, self.text_vocab), "continuous": (self.continuous_start, self.discrete_start),
            "discrete": (self.discrete_start, self.separator), "separator": (self.separator, self.extra_start),
            "extra": (self.extra_start, self.vocab_size)}


def mu_law_encode(x: Array, mu: float = MU, m: float = M) -> Array:
  """F(x) = sgn(x) log(|x| mu + 1) / log(M mu + 1); maps [-M, M] onto [-1, 1] monotonically.

  Args:
    x: any float array.
    mu, m: the companding constants (paper: 100, 256).

  Returns:
    An array of `x`'s shape (float32).
  """
  x = jnp.asarray(x, jnp.float32)
  return jnp.sign(x) * jnp.log1p(jnp.abs(x) * mu) / np.log1p(m * mu)


def mu_law_decode(y: Array, mu: float = MU, m: float = M) -> Array:
  """The inverse of `mu_law_encode`: sgn(y) ((M mu + 1)^|y| - 1) / mu.

  Args:
    y: values in [-1, 1].
    mu, m: as `mu_law_encode`.

  Returns:
    An array of `y`'s shape (float32).
  """
  y = jnp.asarray(y, jnp.float32)
  return jnp.sign(y) * jnp.expm1(jnp.abs(y) * np.log1p(m * mu)) / mu


def tokenize_continuous(x: Array, layout: TokenLayout, *, mu_law: bool = True) -> Array:
  """Continuous values to ids in the layout's continuous range.

  Args:
    x: float array of one field (any shape).
    layout: the vocabulary layout.
    mu_law: compand the field first (False for a field that lies in [-1, 1] by declaration,
      e.g. normalised actions); values beyond the range saturate in the end bins.

  Returns:
    int32 ids of `x`'s shape, in `[layout.continuous_start, layout.discrete_start)`.
  """
  y = mu_law_encode(x) if mu_law else jnp.asarray(x, jnp.float32)
  y = jnp.clip(y, -1.0, 1.0)
  bins = jnp.clip(jnp.floor((y + 1.0) / 2.0 * layout.num_bins), 0, layout.num_bins - 1).astype(jnp.int32)
  return bins + jnp.int32(layout.continuous_start)


def detokenize_continuous(ids: Array, layout: TokenLayout, *, mu_law: bool = True) -> Array:
  """Ids of the continuous range back to values: the centre of each bin, companding undone.

  Args:
    ids: int ids in the layout's continuous range (checked where concrete).
    layout: the vocabulary layout.
    mu_law: whether the field was companded when tokenized.

  Returns:
    float32 values of `ids`' shape.

  Raises:
    ValueError: concrete ids outside the continuous range (naming `ids`).
  """
  if not isinstance(ids, jax.core.Tracer):
    a = np.asarray(ids)
    lo, hi = layout.continuous_start, layout.discrete_start
    if a.size and (a.min() < lo or a.max() >= hi):
      raise ValueError(f"ids must lie in the continuous range [{lo}, {hi}), got values in [{a.min()}, {a.max()}]")
  bins = jnp.asarray(ids, jnp.int32) - layout.continuous_start
  y = (bins.astype(jnp.float32) + 0.5) / layout.num_bins * 2.0 - 1.0
  return mu_law_decode(y) if mu_law else y


def tokenize_discrete(values: Array, layout: TokenLayout) -> Array:
  """Integer values in [0, discrete_vocab) to ids in the layout's discrete range.

  Args:
    values: int array (any shape); checked in range where concrete.
    layout: the vocabulary layout.

  Returns:
    int32 ids, `values + layout.discrete_start`.

  Raises:
    ValueError/TypeError: concrete values out of range, or not integers (naming `values`).
  """
  if not jnp.issubdtype(jnp.asarray(values).dtype, jnp.integer):
    raise TypeError(f"values must be integers, got dtype {jnp.asarray(values).dtype}")
  if not isinstance(values, jax.core.Tracer):
    a = np.asarray(values)
    if a.size and (a.min() < 0 or a.max() >= layout.discrete_vocab):
      raise ValueError(f"values must lie in [0, {layout.discrete_vocab}), got values in [{a.min()}, {a.max()}]")
  return jnp.asarray(values, jnp.int32) + jnp.int32(layout.discrete_start)


def image_patches(images_BxHxWxC: Array, patch: int = 16) -> Array:
  """Non-overlapping patches, normalised as Gato's (module docstring).

  Args:
    images_BxHxWxC: uint8 pixels in [0, 255], or floats in [0, 1]; H and W divisible by `patch`.
    patch: the patch side (16 in the paper).

  Returns:
    `[B, (H / patch) * (W / patch), patch * patch * C]` float32, patches row-major.

  Raises:
    ValueError: not 4-D, or H/W not divisible by `patch` (naming the argument).
  """
  if np.ndim(images_BxHxWxC) != 4:
    raise ValueError(f"images_BxHxWxC must be [B, H, W, C], got shape {np.shape(images_BxHxWxC)}")
  b, h, w, c = np.shape(images_BxHxWxC)
  if patch < 1 or h % patch or w % patch:
    raise ValueError(f"image height {h} and width {w} must be divisible by patch={patch}")
  x = jnp.asarray(images_BxHxWxC)
  x = x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
  x = (x * 2.0 - 1.0) / np.sqrt(patch)
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)
