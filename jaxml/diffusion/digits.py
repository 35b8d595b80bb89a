"""The scikit-learn 8x8 digits (1797 grey images, levels 0..16) as arrays.

`load_digits()` reads `data/digits.npz` beside this module (exported once from
scikit-learn by `data/export_digits.py`); when that file is absent it falls back
to `sklearn.datasets.load_digits` if scikit-learn is installed. Any user array
of integer images `[N, H, W]` or `[N, H, W, C]` works with the same helpers.
"""
from __future__ import annotations

import os

import numpy as np

NUM_LEVELS = 17  # grey levels 0..16


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images uint8 [1797, 8, 8], labels uint8 [1797])`."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["images"], f["labels"]
  try:
    from sklearn.datasets import load_digits as sk_load  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError(f"{path} is missing and scikit-learn is not installed; run "
                            "jaxml/diffusion/data/export_digits.py where scikit-learn is available") from e
  d = sk_load()
  return np.asarray(d.images, np.uint8), np.asarray(d.target, np.uint8)


def to_model_space(images_int: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
  """Integer images -> float32 `[N, H, W, C]` in `[-1, 1]` (pixel centres `(k + 0.5) / K`)."""
  x = np.asarray(images_int)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
  if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > num_levels - 1:
    raise ValueError(f"images must hold integers in [0, {num_levels - 1}]")
  return (2.0 * (x.astype(np.float32) + 0.5) / num_levels - 1.0).astype(np.float32)


def from_model_space(x: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
  """Inverse of `to_model_space`, rounded and clipped to integer levels."""
  k = np.floor((np.asarray(x) + 1.0) * 0.5 * num_levels)
  return np.clip(k, 0, num_levels - 1).astype(np.uint8)
