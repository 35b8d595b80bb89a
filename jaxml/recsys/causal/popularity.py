"""Popularity-bias methods as losses and scoring rules on any backbone score f(u, i).

PDA / PD (Zhang et al., SIGIR 2021, "Causal Intervention for Leveraging Popularity Bias"):
item popularity Z confounds exposure and clicks; training fits the popularity-aware score

    s(u, i, t) = ELU'(f(u, i)) * (m_i^t)^gamma,     ELU'(x) = elu(x) + 1 > 0,

with the BPR loss -mean log sigmoid(s(u, i+, t) - s(u, i-, t)) (+ L2), where m_i^t is item i's
popularity in time stage t: (n_i^t + 1) / (N^t + |I|), min-max scaled within the stage (the
least popular item gets 0, and 0^gamma = 0). Inference, P(C | do(U, I)):
  PD:   rank by ELU'(f(u, i))                          (popularity removed)
  PDA:  rank by ELU'(f(u, i)) * m~_i^gamma, with m~ the last stage's popularity, or its linear
        drift m^T + 0.5 (m^T - m^{T-1}); clipped to [1e-9, 1].

MACR (Wei et al., KDD 2021, "Model-Agnostic Counterfactual Reasoning"): a matching score y_k,
an item branch y_i and a user branch y_u; training fits y = y_k * sigmoid(y_i) * sigmoid(y_u)
with BCE(sigmoid(y), c) + alpha BCE(sigmoid(y_i), c) + beta BCE(sigmoid(y_u), c); the
counterfactual ranking is (y_k - c_ref) * sigmoid(y_i) * sigmoid(y_u) (c_ref = 0 gives the
training score).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def elu_prime(x: Array) -> Array:
  """ELU'(x) = elu(x) + 1, the positive transform PDA puts on the backbone's score."""
  return jax.nn.elu(x) + 1.0


def stage_popularity(counts_SxI: Array) -> Array:
  """Per-stage item popularity, (n + 1) / (N + |I|) min-max scaled within each stage.

  Args:
    counts_SxI: `[S, I]` interaction counts of each item in each time stage.

  Returns:
    `[S, I]` float32 in [0, 1] (each stage's least popular item 0, most popular 1; a stage
    where all items tie gives 0).
  """
  c = jnp.asarray(counts_SxI, jnp.float32)
  if c.ndim != 2:
    raise ValueError(f"counts_SxI must be [stages, items], got shape {c.shape}")
  m = (c + 1.0) / (jnp.sum(c, axis=1, keepdims=True) + c.shape[1])
  lo, hi = jnp.min(m, axis=1, keepdims=True), jnp.max(m, axis=1, keepdims=True)
  return jnp.where(hi > lo, (m - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)


def pda_score(f: Array, popularity: Array, gamma: float) -> Array:
  """s = ELU'(f) * popularity^gamma (module docstring)."""
  if gamma < 0:
    raise ValueError(f"gamma must be >= 0, got {gamma}")
  return elu_prime(f) * jnp.power(jnp.asarray(popularity, jnp.float32), gamma)


def pda_bpr_loss(f_pos_B: Array, f_neg_B: Array, pop_pos_B: Array, pop_neg_B: Array, *,
                 gamma: float) -> tuple[Array, dict[str, Array]]:
  """PDA's BPR loss on backbone scores of (user, positive, negative) triples.

  Args:
    f_pos_B, f_neg_B: `[B]` backbone scores f(u, i+), f(u, i-).
    pop_pos_B, pop_neg_B: `[B]` the items' popularity in the triple's stage.
    gamma: the popularity exponent (authors: 0.02 for PD, 0.16-0.22 for PDA).

  Returns:
    `(loss, {"bpr_accuracy": fraction with s+ > s-})`; add L2 in the caller's loss.
  """
  for name, a in (("f_neg_B", f_neg_B), ("pop_pos_B", pop_pos_B), ("pop_neg_B", pop_neg_B)):
    if np.shape(a) != np.shape(f_pos_B):
      raise ValueError(f"{name} has shape {np.shape(a)}, f_pos_B {np.shape(f_pos_B)}")
  d = pda_score(f_pos_B, pop_pos_B, gamma) - pda_score(f_neg_B, pop_neg_B, gamma)
  return -jnp.mean(jax.nn.log_sigmoid(d)), {"bpr_accuracy": jnp.mean((d > 0).astype(jnp.float32))}


def pd_inference(f: Array) -> Array:
  """PD's ranking score: ELU'(f), popularity removed."""
  return elu_prime(f)


def pda_inference(f_UxI: Array, pop_last_I: Array, *, gamma: float, pop_prev_I: Array | None = None) -> Array:
  """PDA's ranking score with the predicted popularity of the next stage.

  Args:
    f_UxI: backbone scores.
    pop_last_I: `[I]` popularity of the last training stage.
    gamma: the exponent used in training.
    pop_prev_I: `[I]` the stage before; given, the popularity is extrapolated linearly,
      m + 0.5 (m - m_prev).

  Returns:
    `ELU'(f) * clip(m~, 1e-9, 1)^gamma`, the shape of `f_UxI`.
  """
  m = jnp.asarray(pop_last_I, jnp.float32)
  if pop_prev_I is not None:
    m = m + 0.5 * (m - jnp.asarray(pop_prev_I, jnp.float32))
  return pda_score(f_UxI, jnp.clip(m, 1e-9, 1.0), gamma)


def macr_score(y_k: Array, y_i: Array, y_u: Array, c: float = 0.0) -> Array:
  """(y_k - c) * sigmoid(y_i) * sigmoid(y_u): MACR's training score at c = 0, its counterfactual
  ranking at the reference c > 0."""
  return (y_k - c) * jax.nn.sigmoid(y_i) * jax.nn.sigmoid(y_u)


def _bce_logits(logits: Array, labels: Array) -> Array:
  return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def macr_loss(y_k_B: Array, y_i_B: Array, y_u_B: Array, labels_B: Array, *, alpha: float = 1e-3,
              beta: float = 1e-3) -> tuple[Array, dict[str, Array]]:
  """MACR's multi-task loss (module docstring).

  Args:
    y_k_B: `[B]` matching scores (the backbone's logits).
    y_i_B, y_u_B: `[B]` item-branch and user-branch logits.
    labels_B: `[B]` clicks in {0, 1}.
    alpha, beta: weights of the item and user branch losses (authors: 1e-3..1e-2, 1e-3).

  Returns:
    `(loss, {"main", "item", "user"})` BCE terms.
  """
  main = _bce_logits(macr_score(y_k_B, y_i_B, y_u_B), labels_B)
  item = _bce_logits(y_i_B, labels_B)
  user = _bce_logits(y_u_B, labels_B)
  return main + alpha * item + beta * user, {"main": main, "item": item, "user": user}
