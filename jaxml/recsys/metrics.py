"""Jitted CTR metrics over probabilities.

    auc(labels, scores)                      ties count one half
    logloss(labels, probs)                   mean binary cross-entropy (probs clipped to [eps, 1 - eps])
    normalized_entropy(labels, probs)        logloss / entropy of the base rate
    calibration(labels, probs)               mean prediction / base rate (1 is calibrated)
    prediction_difference(p1, p2)            mean |p1 - p2| / ((p1 + p2) / 2)

`prediction_difference` is the relative PD of the ads paper between two
identically configured models' predictions on the same examples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_EPS = 1e-7


def _check(labels, scores):
  if jnp.shape(labels) != jnp.shape(scores) or jnp.ndim(labels) != 1:
    raise ValueError(f"labels and scores must be 1-D of the same shape, got {jnp.shape(labels)} and {jnp.shape(scores)}")


@jax.jit
def _auc(labels: Array, scores: Array) -> Array:
  s = scores.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  sorted_s = jnp.sort(s)
  lo = jnp.searchsorted(sorted_s, s, side="left")
  hi = jnp.searchsorted(sorted_s, s, side="right")
  avg_rank = (lo + hi + 1).astype(jnp.float32) / 2.0  # 1-based rank, ties averaged
  n_pos = y.sum()
  n_neg = y.shape[0] - n_pos
  u = (avg_rank * y).sum() - n_pos * (n_pos + 1) / 2.0
  return u / (n_pos * n_neg)


def auc(labels: Array, scores: Array) -> Array:
  """ROC AUC via the Mann-Whitney statistic with average ranks (a tie counts 1/2). NaN if one class is absent."""
  _check(labels, scores)
  return _auc(jnp.asarray(labels), jnp.asarray(scores))


@jax.jit
def _logloss(labels, probs):
  p = jnp.clip(probs.astype(jnp.float32), _EPS, 1 - _EPS)
  y = labels.astype(jnp.float32)
  return -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))


def logloss(labels: Array, probs: Array) -> Array:
  _check(labels, probs)
  return _logloss(jnp.asarray(labels), jnp.asarray(probs))


@jax.jit
def _ne(labels, probs):
  rate = jnp.clip(labels.astype(jnp.float32).mean(), _EPS, 1 - _EPS)
  base = -(rate * jnp.log(rate) + (1 - rate) * jnp.log1p(-rate))
  return _logloss(labels, probs) / base


def normalized_entropy(labels: Array, probs: Array) -> Array:
  """Logloss divided by the logloss of always predicting the base rate (< 1 beats the prior)."""
  _check(labels, probs)
  return _ne(jnp.asarray(labels), jnp.asarray(probs))


@jax.jit
def _calibration(labels, probs):
  return probs.astype(jnp.float32).mean() / labels.astype(jnp.float32).mean()


def calibration(labels: Array, probs: Array) -> Array:
  _check(labels, probs)
  return _calibration(jnp.asarray(labels), jnp.asarray(probs))


@jax.jit
def _pd(p1, p2):
  p1 = p1.astype(jnp.float32)
  p2 = p2.astype(jnp.float32)
  return jnp.mean(jnp.abs(p1 - p2) / jnp.maximum((p1 + p2) / 2.0, _EPS))


def prediction_difference(p1: Array, p2: Array) -> Array:
  _check(p1, p2)
  return _pd(jnp.asarray(p1), jnp.asarray(p2))
