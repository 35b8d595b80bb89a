"""Variational autoencoder (Kingma & Welling, arXiv 1312.6114).

Encoder `q(z|x) = N(mu(x), diag sigma(x)^2)`, prior `N(0, I)`, decoder
Gaussian `p(x|z) = N(f(z), diag exp(2 log_sigma))` with a learned per-dimension
`log_sigma`, or Bernoulli `p(x|z) = Bern(sigmoid(f(z)))` for data in [0, 1].

  ELBO(x) = E_q log p(x|z) - KL(q(z|x) || N(0, I)),
  KL = 0.5 sum(mu^2 + sigma^2 - 1 - log sigma^2),

estimated with one reparameterised draw `z = mu + sigma eps`. Samples of the
model are `x ~ p(x|z)`, `z ~ N(0, I)` (decoder noise included; `mean=True`
returns the decoder mean).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxml import nn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  data_dim: int = 2
  latent_dim: int = 8
  hidden: int = 128  # width of every hidden layer (encoder and decoder)
  depth: int = 3  # hidden layers (encoder and decoder)
  decoder: str = "gaussian"  # "gaussian" or "bernoulli"

  def __post_init__(self):
    for name in ("data_dim", "latent_dim", "hidden", "depth"):
      if getattr(self, name) <= 0:
        raise ValueError(f"VAEConfig.{name} must be positive, got {getattr(self, name)}")
    if self.decoder not in ("gaussian", "bernoulli"):
      raise ValueError(f"VAEConfig.decoder must be 'gaussian' or 'bernoulli', got {self.decoder!r}")


def init(rng: Array, cfg: VAEConfig) -> dict:
  e_rng, d_rng = jax.random.split(rng)
  hid = (cfg.hidden,) * cfg.depth
  return {"enc": nn.mlp_init(e_rng, (cfg.data_dim,) + hid + (2 * cfg.latent_dim,), out_scale=0.1, single_draw=True),
          "dec": nn.mlp_init(d_rng, (cfg.latent_dim,) + hid + (cfg.data_dim,), single_draw=True),
          "log_sigma": jnp.zeros((cfg.data_dim,))}


def encode(params, x_BxD):
  out = nn.mlp(params["enc"], x_BxD, act=jax.nn.silu)
  mu, log_sigma = jnp.split(out, 2, axis=-1)
  return mu, log_sigma


def decode(params, z_BxL):
  return nn.mlp(params["dec"], z_BxL, act=jax.nn.silu)


def elbo(params, rng: Array, x_BxD: Array, cfg: VAEConfig) -> tuple[Array, dict]:
  """Per-sample ELBO `[B]` (nats) and its parts."""
  mu, log_s = encode(params, x_BxD)
  z = mu + jnp.exp(log_s) * jax.random.normal(rng, mu.shape)
  f = decode(params, z)
  if cfg.decoder == "gaussian":
    ls = params["log_sigma"]
    rec = jnp.sum(-0.5 * ((x_BxD - f) / jnp.exp(ls)) ** 2 - ls - 0.5 * math.log(2 * math.pi), axis=-1)
  else:
    rec = jnp.sum(x_BxD * jax.nn.log_sigmoid(f) + (1 - x_BxD) * jax.nn.log_sigmoid(-f), axis=-1)
  kl = 0.5 * jnp.sum(mu**2 + jnp.exp(2 * log_s) - 1.0 - 2 * log_s, axis=-1)
  return rec - kl, {"reconstruction": rec, "kl": kl}


def loss_fn(params, rng: Array, x_BxD: Array, cfg: VAEConfig) -> Array:
  """Negative mean ELBO."""
  return -jnp.mean(elbo(params, rng, x_BxD, cfg)[0])


def sample(rng: Array, params: dict, n: int, cfg: VAEConfig, mean: bool = False) -> Array:
  z_rng, x_rng = jax.random.split(rng)
  f = decode(params, jax.random.normal(z_rng, (n, cfg.latent_dim)))
  if cfg.decoder == "gaussian":
    return f if mean else f + jnp.exp(params["log_sigma"]) * jax.random.normal(x_rng, f.shape)
  probs = jax.nn.sigmoid(f)
  return probs if mean else jax.random.bernoulli(x_rng, probs).astype(jnp.float32)
