"""GAN with the non-saturating loss; spectral normalisation and R1 gradient penalty options.

Goodfellow et al. 2014: the discriminator `D` (logits) minimises
`E softplus(-D(x)) + E softplus(D(G(z)))`; the generator minimises the
non-saturating `E softplus(-D(G(z)))` (= `-E log sigmoid(D(G(z)))`).
Options (Lipschitz control of `D`):
- `spectral_norm`: every weight of `D` is divided by its largest singular
  value, estimated by one power iteration per step with a persistent vector
  `u` (Miyato et al., arXiv 1802.05957);
- `gp_weight > 0`: R1 penalty `gp_weight / 2 * E ||grad_x D(x)||^2` on real data
  (Mescheder et al., arXiv 1801.04406), the gradient penalty suited to the
  non-saturating loss (WGAN-GP's two-sided penalty belongs with the WGAN loss).
One training step is one `D` update followed by one `G` update, each with Adam.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxml.generative.nets import mlp_apply, mlp_init

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GANConfig:
  data_dim: int = 2
  latent_dim: int = 8  # z ~ N(0, I)
  hidden: int = 128  # width of every hidden layer (G and D)
  depth: int = 3  # hidden layers (G and D)
  spectral_norm: bool = False
  gp_weight: float = 0.0  # R1 weight; 0 disables
  learning_rate: float = 1e-4
  beta1: float = 0.5  # Adam beta1 (DCGAN practice)

  def __post_init__(self):
    for name in ("data_dim", "latent_dim", "hidden", "depth"):
      if getattr(self, name) <= 0:
        raise ValueError(f"GANConfig.{name} must be positive, got {getattr(self, name)}")
    if self.gp_weight < 0 or self.learning_rate <= 0:
      raise ValueError("GANConfig: gp_weight must be >= 0 and learning_rate > 0")


def _sizes(cfg: GANConfig, fan_in: int, fan_out: int):
  return (fan_in,) + (cfg.hidden,) * cfg.depth + (fan_out,)


def init(rng: Array, cfg: GANConfig) -> dict:
  g_rng, d_rng, u_rng = jax.random.split(rng, 3)
  gen = mlp_init(g_rng, _sizes(cfg, cfg.latent_dim, cfg.data_dim))
  disc = mlp_init(d_rng, _sizes(cfg, cfg.data_dim, 1))
  u_keys = jax.random.split(u_rng, len(disc))
  sn_u = [_normalize(jax.random.normal(k, (layer["w"].shape[1],))) for k, layer in zip(u_keys, disc)]
  return {"gen": gen, "disc": disc, "sn_u": sn_u}


def _normalize(v):
  return v / (jnp.linalg.norm(v) + 1e-12)


def spectral_weights(disc, sn_u):
  """`W / sigma(W)` per layer with one power iteration; returns `(weights, new_u)`."""
  weights, new_u = [], []
  for layer, u in zip(disc, sn_u):
    w = layer["w"]  # [in, out]
    v = _normalize(w @ u)
    u2 = _normalize(w.T @ v)
    v, u2 = jax.lax.stop_gradient(v), jax.lax.stop_gradient(u2)
    sigma = v @ w @ u2
    weights.append(w / sigma)
    new_u.append(u2)
  return weights, new_u


def generate(gen, z_BxL: Array) -> Array:
  return mlp_apply(gen, z_BxL, act=jax.nn.relu)


def discriminate(disc, x_BxD: Array, cfg: GANConfig, sn_u=None) -> tuple[Array, Any]:
  """Logits `[B]` and the updated power-iteration vectors (unchanged without spectral norm)."""
  if cfg.spectral_norm:
    weights, sn_u = spectral_weights(disc, sn_u)
  else:
    weights = None
  logits = mlp_apply(disc, x_BxD, act=lambda h: jax.nn.leaky_relu(h, 0.2), weights=weights)
  return logits[:, 0], sn_u


def sample(rng: Array, params: dict, n: int, cfg: GANConfig) -> Array:
  return generate(params["gen"], jax.random.normal(rng, (n, cfg.latent_dim)))


def d_loss_fn(disc, gen, sn_u, real, z, cfg: GANConfig):
  fake = jax.lax.stop_gradient(generate(gen, z))
  d_real, new_u = discriminate(disc, real, cfg, sn_u)
  d_fake, _ = discriminate(disc, fake, cfg, sn_u)
  loss = jnp.mean(jax.nn.softplus(-d_real)) + jnp.mean(jax.nn.softplus(d_fake))
  if cfg.gp_weight > 0:
    grad_x = jax.grad(lambda x: jnp.sum(discriminate(disc, x, cfg, sn_u)[0]))(real)
    loss = loss + 0.5 * cfg.gp_weight * jnp.mean(jnp.sum(grad_x**2, axis=-1))
  return loss, new_u


def g_loss_fn(gen, disc, sn_u, z, cfg: GANConfig):
  d_fake, _ = discriminate(disc, generate(gen, z), cfg, sn_u)
  return jnp.mean(jax.nn.softplus(-d_fake))


class GANState(NamedTuple):
  params: dict
  g_opt: Any
  d_opt: Any
  rng: Array


class GANTrainer(NamedTuple):
  init: Callable[[Array], GANState]
  run_chunk: Callable[[GANState], tuple[GANState, dict]]


def make_trainer(cfg: GANConfig, sample_batch: Callable[[Array], Array], batch_size: int,
                 chunk: int = 100) -> GANTrainer:
  """Pure `init(rng)` and `run_chunk(state)` (`chunk` steps under `lax.scan`; vmap over seeds)."""
  tx_g = optax.adam(cfg.learning_rate, b1=cfg.beta1)
  tx_d = optax.adam(cfg.learning_rate, b1=cfg.beta1)

  def init_state(rng):
    p_rng, rng = jax.random.split(rng)
    params = init(p_rng, cfg)
    return GANState(params, tx_g.init(params["gen"]), tx_d.init(params["disc"]), rng)

  def one_step(state, _):
    rng, b_rng, z1, z2 = jax.random.split(state.rng, 4)
    p = state.params
    real = sample_batch(b_rng)
    (d_loss, new_u), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        p["disc"], p["gen"], p["sn_u"], real, jax.random.normal(z1, (batch_size, cfg.latent_dim)), cfg)
    d_upd, d_opt = tx_d.update(d_grads, state.d_opt, p["disc"])
    disc = optax.apply_updates(p["disc"], d_upd)
    g_loss, g_grads = jax.value_and_grad(g_loss_fn)(p["gen"], disc, new_u,
                                                    jax.random.normal(z2, (batch_size, cfg.latent_dim)), cfg)
    g_upd, g_opt = tx_g.update(g_grads, state.g_opt, p["gen"])
    gen = optax.apply_updates(p["gen"], g_upd)
    new = GANState({"gen": gen, "disc": disc, "sn_u": new_u}, g_opt, d_opt, rng)
    return new, {"d_loss": d_loss, "g_loss": g_loss}

  def run_chunk(state):
    return jax.lax.scan(one_step, state, None, length=chunk)

  return GANTrainer(init_state, run_chunk)
