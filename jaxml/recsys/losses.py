"""Losses and training practices from "On the Factory Floor" (arXiv 2209.05310).

- `logloss_from_logits`: weighted binary cross-entropy.
- `pairwise_rank_loss`: `log(1 + exp(-(s_i - s_j)))` over pairs in the same group with y_i > y_j.
- `distillation_loss`: `LL(y, p) + lam * LL(p_teacher, p)` (soft-label cross-entropy).
- `negative_subsample`: keep negatives with rate r, weight kept ones 1 / r.
- `ensemble_logits`: mean of member logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def logloss_from_logits(logits: Array, targets: Array, weights: Array | None = None) -> Array:
  """Weighted mean of `-t log sigmoid(z) - (1 - t) log(1 - sigmoid(z))`; targets may be soft."""
  per = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  if weights is None:
    return per.mean()
  return (per * weights).sum() / weights.sum()


def pairwise_rank_loss(logits: Array, labels: Array, groups: Array, weights: Array | None = None) -> Array:
  """Mean pairwise logistic loss over ordered pairs (i, j) in one group with `y_i > y_j`.

  `l_ij = log(1 + exp(-(s_i - s_j)))`: depends on scores only through differences,
  so adding a constant to every score leaves it unchanged. Returns 0 when there
  is no such pair. Cost is O(B^2) in memory; batches of a few thousand are fine.
  """
  diff = logits[:, None] - logits[None, :]
  valid = (groups[:, None] == groups[None, :]) & (labels[:, None] > labels[None, :])
  w = valid.astype(logits.dtype)
  if weights is not None:
    w = w * weights[:, None] * weights[None, :]
  per = jax.nn.softplus(-diff)
  return (per * w).sum() / jnp.maximum(w.sum(), 1e-12)


def distillation_loss(logits: Array, labels: Array, teacher_probs: Array, lam: float = 1.0,
                      weights: Array | None = None) -> Array:
  """`LL(y, p) + lam * LL(p_T, p)`: logloss on labels plus cross-entropy to the teacher's probabilities."""
  return logloss_from_logits(logits, labels, weights) + lam * logloss_from_logits(logits, teacher_probs, weights)


def negative_subsample(rng: np.random.Generator, labels: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
  """Keeps every positive and each negative with probability `rate`.

  Returns (indices kept, importance weights): 1 for positives, `1 / rate` for
  kept negatives, so weighted sums over the kept examples estimate sums over all.
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"rate must be in (0, 1], got {rate}")
  labels = np.asarray(labels)
  keep = (labels > 0) | (rng.random(labels.shape[0]) < rate)
  idx = np.nonzero(keep)[0]
  w = np.where(labels[idx] > 0, 1.0, 1.0 / rate).astype(np.float32)
  return idx, w


def ensemble_logits(member_logits: list[Array] | Array) -> Array:
  """An ensemble's logit: the mean of its members' logits (`[K, B] -> [B]`)."""
  return jnp.mean(jnp.stack(list(member_logits)) if isinstance(member_logits, (list, tuple)) else member_logits, axis=0)
