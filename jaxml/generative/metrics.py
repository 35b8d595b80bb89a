"""Mode metrics for samples from a known mixture (VEEGAN / PacGAN protocol).

For samples `x [N, D]`, mode centres `c [K, D]` and mode std `sigma`:
- a sample is *high quality* if it lies within `threshold * sigma` (3 std) of
  its nearest centre (Srivastava et al., VEEGAN, arXiv 1705.07761);
- a mode is *captured* if at least `min_count` high-quality samples are
  assigned to it (VEEGAN counts modes with any high-quality sample: `min_count=1`);
- *reverse KL* is `KL(q || p)` between the histogram `q` of high-quality samples
  over modes and the true mode weights `p` (PacGAN, arXiv 1712.04086, reports
  it against the uniform target); `None` when no sample is high quality;
- *gap mass* is the fraction of samples that are not high quality but lie
  between the modes, i.e. inside the centres' bounding box widened by
  `threshold * sigma` (mass a push-forward generator must put in the gaps to
  connect modes, Salmona et al. arXiv 2206.14476). `1 - high_quality - gap` is
  mass off the support altogether.
"""
from __future__ import annotations

import math

import numpy as np


def mode_metrics(samples, centers, std: float, weights=None, *, threshold: float = 3.0,
                 min_count: int = 1) -> dict:
  """Returns `modes_captured`, `high_quality_frac`, `reverse_kl`, `gap_mass`, `mode_counts`."""
  x = np.asarray(samples, np.float64)
  c = np.asarray(centers, np.float64)
  if c.ndim == 1:
    c = c[:, None]
  if x.ndim == 1 and c.shape[1] == 1:
    x = x[:, None]
  if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
    raise ValueError(f"samples must be [N, D] and centers [K, D] with the same D, got {x.shape} and {c.shape}")
  if x.shape[0] == 0:
    raise ValueError("samples is empty")
  if not np.all(np.isfinite(x)):
    raise ValueError("samples contain NaN or infinite values")
  if not std > 0:
    raise ValueError(f"std must be positive, got {std}")
  k = c.shape[0]
  p = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, np.float64)
  d2 = np.sum((x[:, None, :] - c[None]) ** 2, axis=-1)  # [N, K]
  nearest = np.argmin(d2, axis=1)
  dist = np.sqrt(d2[np.arange(x.shape[0]), nearest])
  hq = dist <= threshold * std
  counts = np.bincount(nearest[hq], minlength=k)
  n_hq = int(hq.sum())
  if n_hq:
    q = counts / n_hq
    nz = q > 0
    rkl = float(np.sum(q[nz] * np.log(q[nz] / p[nz])))
  else:
    rkl = None
  lo = c.min(axis=0) - threshold * std
  hi = c.max(axis=0) + threshold * std
  inside = np.all((x >= lo) & (x <= hi), axis=1)
  gap = (~hq) & inside
  return {
      "modes_captured": int(np.sum(counts >= min_count)),
      "high_quality_frac": float(hq.mean()),
      "reverse_kl": rkl,
      "gap_mass": float(gap.mean()),
      "mode_counts": counts.tolist(),
  }


def uniform_kl_upper(num_modes: int) -> float:
  """`log K`: the reverse KL of a fully collapsed (one-mode) histogram against uniform."""
  return math.log(num_modes)
