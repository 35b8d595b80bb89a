"""Exact scores and log-densities of Gaussian mixtures diffused by an SDE.

If `x_0 ~ sum_k w_k N(mu_k, s_k^2 I)` and `p_0t(x_t|x_0) = N(m(t) x_0, s(t)^2 I)`,
then `x_t ~ sum_k w_k N(m(t) mu_k, (m(t)^2 s_k^2 + s(t)^2) I)`: a mixture again,
so its score is analytic,
`score(x, t) = sum_k r_k(x) (m mu_k - x) / v_k` with responsibilities `r_k`.
That lets samplers and likelihoods be tested with no training.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.diffusion.sde import SDE

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Isotropic Gaussian mixture: means `[K, D]`, stds `[K]`, weights `[K]` (sum to 1)."""

  means: tuple[tuple[float, ...], ...]
  stds: tuple[float, ...]
  weights: tuple[float, ...]

  @classmethod
  def create(cls, means, stds, weights=None) -> "GaussianMixture":
    means = np.asarray(means, np.float64)
    if means.ndim == 1:
      means = means[:, None]
    if means.ndim != 2:
      raise ValueError(f"GaussianMixture: means must be [K, D], got shape {means.shape}")
    k = means.shape[0]
    stds = np.broadcast_to(np.asarray(stds, np.float64), (k,))
    weights = np.full((k,), 1.0 / k) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (k,) or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
      raise ValueError(f"GaussianMixture: weights must be {k} non-negative numbers summing to 1, got {weights}")
    if np.any(stds <= 0) or not np.all(np.isfinite(means)):
      raise ValueError("GaussianMixture: stds must be positive and means finite")
    return cls(tuple(map(tuple, means.tolist())), tuple(stds.tolist()), tuple(weights.tolist()))

  @property
  def dim(self) -> int:
    return len(self.means[0])

  def arrays(self) -> tuple[Array, Array, Array]:
    return (jnp.asarray(self.means, jnp.float32), jnp.asarray(self.stds, jnp.float32),
            jnp.asarray(self.weights, jnp.float32))

  def sample(self, rng: Array, n: int) -> Array:
    """`[n, D]` samples."""
    means, stds, weights = self.arrays()
    k_rng, z_rng = jax.random.split(rng)
    comp = jax.random.categorical(k_rng, jnp.log(weights), shape=(n,))
    return means[comp] + stds[comp][:, None] * jax.random.normal(z_rng, (n, self.dim))


def _diffused(mix: GaussianMixture, sde: SDE | None, t: Array | None, batch: int):
  means, stds, weights = mix.arrays()
  if sde is None:
    m = jnp.ones((batch,))
    s = jnp.zeros((batch,))
  else:
    m, s = sde.marginal_coeffs(t)
  mean_BxKxD = m[:, None, None] * means[None]
  var_BxK = (m[:, None] * stds[None]) ** 2 + s[:, None] ** 2
  return mean_BxKxD, var_BxK, weights


def _component_logits(x_BxD, mean_BxKxD, var_BxK, weights_K):
  d = x_BxD.shape[-1]
  sq = jnp.sum((x_BxD[:, None, :] - mean_BxKxD) ** 2, axis=-1)
  return jnp.log(weights_K)[None] - 0.5 * sq / var_BxK - 0.5 * d * jnp.log(2 * math.pi * var_BxK)


def mixture_log_prob(mix: GaussianMixture, x_BxD: Array, t_B: Array | None = None, sde: SDE | None = None) -> Array:
  """`log p_t(x)` `[B]` of the mixture diffused to time `t` (the data density when `sde` is None)."""
  mean, var, w = _diffused(mix, sde, t_B, x_BxD.shape[0])
  return jax.nn.logsumexp(_component_logits(x_BxD, mean, var, w), axis=-1)


def mixture_score(mix: GaussianMixture, x_BxD: Array, t_B: Array, sde: SDE) -> Array:
  """Exact `grad_x log p_t(x)` `[B, D]` under `sde`'s marginal at time `t`."""
  mean, var, w = _diffused(mix, sde, t_B, x_BxD.shape[0])
  resp = jax.nn.softmax(_component_logits(x_BxD, mean, var, w), axis=-1)
  return jnp.sum(resp[..., None] * (mean - x_BxD[:, None, :]) / var[..., None], axis=1)


def mixture_score_fn(mix: GaussianMixture, sde: SDE) -> Callable[[Array, Array], Array]:
  """`score_fn(x [B, D], t [B]) -> [B, D]` for use with `sample` / `log_likelihood`."""

  def score_fn(x, t):
    return mixture_score(mix, x, t, sde)

  return score_fn
