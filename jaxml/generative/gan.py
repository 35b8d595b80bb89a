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

Training runs on `jaxml.train`: `init_state(rng, cfg)` is a `TrainState` whose
`params` are `{"gen", "disc"}`, whose `opt_state` holds both players' Adam
states under the same keys and whose `extras` are `{"sn_u": [...]}`, the
power-iteration vectors (carried, and checkpointed, with or without spectral
norm). `make_train_step(cfg, batch_size, ...)` is the family's own step
`(state, batch) -> (state, metrics)` for `jaxml.train.train`:

    state = gan.init_state(jax.random.PRNGKey(0), cfg)
    step = jax.jit(gan.make_train_step(cfg, 256, sample_fn=ds.sample, steps_per_call=50), donate_argnums=0)
    result = jt.train(step, state, None, num_steps=3000, workdir=workdir, steps_per_call=50)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxml import nn
from jaxml import train as jt

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
  """`{"gen": G's layers, "disc": D's layers}` (`nn.mlp_init`)."""
  g_rng, d_rng = jax.random.split(rng)
  gen = nn.mlp_init(g_rng, _sizes(cfg, cfg.latent_dim, cfg.data_dim), single_draw=True)
  disc = nn.mlp_init(d_rng, _sizes(cfg, cfg.data_dim, 1), single_draw=True)
  return {"gen": gen, "disc": disc}


def init_sn_vectors(rng: Array, disc) -> list:
  """One random unit vector `u [out]` per layer of `D`: the start of the power iterations."""
  keys = jax.random.split(rng, len(disc))
  return [_normalize(jax.random.normal(k, (layer["w"].shape[1],))) for k, layer in zip(keys, disc)]


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
  return nn.mlp(gen, z_BxL, act=jax.nn.relu)


def discriminate(disc, x_BxD: Array, cfg: GANConfig, sn_u=None) -> tuple[Array, Any]:
  """Logits `[B]` and the updated power-iteration vectors (unchanged without spectral norm)."""
  if cfg.spectral_norm:
    weights, sn_u = spectral_weights(disc, sn_u)
    disc = [dict(layer, w=w) for layer, w in zip(disc, weights)]
  logits = nn.mlp(disc, x_BxD, act=lambda h: jax.nn.leaky_relu(h, 0.2))
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




def optimizer(cfg: GANConfig) -> optax.GradientTransformation:
  """Adam(`learning_rate`, b1=`beta1`), the optimizer of each player (each keeps its own state)."""
  return optax.adam(cfg.learning_rate, b1=cfg.beta1)


def init_state(rng: Array, cfg: GANConfig) -> jt.TrainState:
  """A fresh `TrainState` (module docstring): both players, both Adam states, the `sn_u` vectors.

  Args:
    rng: the run's key, split into the parameter key (and from it the `sn_u` key)
      and the state's key (the steps draw from `fold_in(state.rng, step)`).
    cfg: the GAN.

  Returns:
    The state at step 0 (vmap this function over keys for an ensemble of seeds).
  """
  p_rng, s_rng = jax.random.split(rng)
  params = init(p_rng, cfg)
  tx = optimizer(cfg)
  opt_state = {"gen": tx.init(params["gen"]), "disc": tx.init(params["disc"])}
  extras = {"sn_u": init_sn_vectors(jax.random.fold_in(p_rng, 1), params["disc"])}
  return jt.TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                       rng=jnp.asarray(s_rng, jnp.uint32), extras=extras)


def make_train_step(cfg: GANConfig, batch_size: int, *, sample_fn: Callable[[Array, int], Array] | None = None,
                    steps_per_call: int = 1) -> Callable[[jt.TrainState, Any], tuple[jt.TrainState, dict]]:
  """The GAN's step for `jaxml.train.train`: one `D` update, then one `G` update against the new `D`.

  Args:
    cfg: the GAN.
    batch_size: `B`, the number of latent draws per update (and of real samples
      when `sample_fn` draws them).
    sample_fn: `sample_fn(rng, B) -> [B, data_dim]`, real data drawn inside the
      step from its key (pure JAX; the step then takes a batch of None). None:
      the step's batch is the real data `[B, data_dim]`.
    steps_per_call: k steps per call under `lax.scan` (`jt.scan_steps`).

  Returns:
    `step(state, batch) -> (state, metrics)` with metrics `d_loss`, `g_loss`,
    `loss = d_loss + g_loss` (what the loop's NaN guard reads and logs; 3 log 2
    at the players' equilibrium `D = 1/2`), `d_grad_norm`, `g_grad_norm` and
    `grad_norm`, the norm of both gradients together. The keys of step `t` come
    from `jt.step_rng(state)`, so a resumed run draws what an uninterrupted one does.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  tx = optimizer(cfg)
  d_grad = jax.value_and_grad(d_loss_fn, has_aux=True)
  g_grad = jax.value_and_grad(g_loss_fn)

  def step(state: jt.TrainState, batch: Any) -> tuple[jt.TrainState, dict[str, Array]]:
    b_rng, z1_rng, z2_rng = jax.random.split(jt.step_rng(state), 3)
    if batch is None:
      if sample_fn is None:
        raise ValueError("the GAN step got a batch of None but no sample_fn to draw real data with")
      real = sample_fn(b_rng, batch_size)
    else:
      real = batch
    p, opt = state.params, state.opt_state
    (d_loss, sn_u), d_grads = d_grad(p["disc"], p["gen"], state.extras["sn_u"], real,
                                     jax.random.normal(z1_rng, (batch_size, cfg.latent_dim)), cfg)
    d_upd, d_opt = tx.update(d_grads, opt["disc"], p["disc"])
    disc = optax.apply_updates(p["disc"], d_upd)
    g_loss, g_grads = g_grad(p["gen"], disc, sn_u, jax.random.normal(z2_rng, (batch_size, cfg.latent_dim)), cfg)
    g_upd, g_opt = tx.update(g_grads, opt["gen"], p["gen"])
    gen = optax.apply_updates(p["gen"], g_upd)
    d_norm, g_norm = jt.global_norm(d_grads), jt.global_norm(g_grads)
    metrics = {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, "d_grad_norm": d_norm,
               "g_grad_norm": g_norm, "grad_norm": jnp.sqrt(d_norm**2 + g_norm**2)}
    new_state = state._replace(params={"gen": gen, "disc": disc}, opt_state={"gen": g_opt, "disc": d_opt},
                               step=state.step + 1, extras={"sn_u": sn_u})
    return new_state, metrics

  return jt.scan_steps(step, steps_per_call)
