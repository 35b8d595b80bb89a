"""Score networks as pure functions over dict parameters.

- `mlp_init / mlp_apply`: an MLP with a sinusoidal time embedding for
  low-dimensional data `x [B, D]`.
- `unet_init / unet_apply`: a small two-resolution U-Net for images `x [B, H, W, C]`
  (8x8 digits), time embedding added in every residual block.

Both return an unscaled output `F(x_in, t)`; `score_fn_from_net` turns it into
a score with the preconditioning `x_in = x / sqrt(m(t)^2 + s(t)^2)` (data of
unit scale) and `score = F / s(t)` (the NCSN++ "scale by sigma" output), which
keeps inputs and targets O(1) for every SDE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxml import nn
from jaxml.diffusion.sde import SDE, _bcast
from jaxml.nn import ParamSpec, dense, dense_spec, init_from_specs
from jaxml.nn.layers import layer_norm

Array = jax.Array
Params = dict


def time_embedding(t_B: Array, dim: int, max_period: float = 10000.0) -> Array:
  """`nn.sinusoidal_embedding` of `1000 t` (DDPM / Transformer style): `[B, dim]` float32."""
  return nn.sinusoidal_embedding(1000.0 * t_B.astype(jnp.float32), dim, max_period)


# ----------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class ScoreMLPConfig:
  data_dim: int = 2
  hidden: int = 128  # width of every hidden layer
  depth: int = 3  # number of hidden layers
  embed_dim: int = 32  # time embedding width

  def __post_init__(self):
    for name in ("data_dim", "hidden", "depth", "embed_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ScoreMLPConfig.{name} must be positive, got {getattr(self, name)}")


def mlp_init(rng: Array, cfg: ScoreMLPConfig) -> Params:
  """`{"embed", "layers", "out"}`: fan-in scaled normal weights (the output layer's 100x
  smaller), zero biases, all from one normal draw (`nn.init_from_specs`)."""
  specs = {"embed": dense_spec(cfg.embed_dim, cfg.hidden),
           "layers": nn.mlp_specs((cfg.data_dim,) + (cfg.hidden,) * cfg.depth),
           "out": dense_spec(cfg.hidden, cfg.data_dim, scale=1e-2)}
  return init_from_specs(rng, specs)


def mlp_apply(params: Params, x_BxD: Array, t_B: Array, cfg: ScoreMLPConfig) -> Array:
  """`[B, D] x [B] -> [B, D]`; the time embedding is added after the first layer."""
  if x_BxD.ndim != 2 or x_BxD.shape[-1] != cfg.data_dim:
    raise ValueError(f"mlp_apply: x must be [batch, {cfg.data_dim}], got {x_BxD.shape}")
  emb = dense(params["embed"], time_embedding(t_B, cfg.embed_dim))
  first, *rest = params["layers"]
  h = jax.nn.silu(dense(first, x_BxD) + emb)
  return nn.mlp([*rest, params["out"]], h, act=jax.nn.silu)


# ----------------------------------------------------------------------------- U-Net


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  image_size: int = 8  # H = W; must be even
  channels: int = 1  # image channels C
  base: int = 32  # channels at full resolution (2x at half resolution)
  embed_dim: int = 64  # time embedding width

  def __post_init__(self):
    if self.image_size <= 0 or self.image_size % 2:
      raise ValueError(f"UNetConfig.image_size must be a positive even number, got {self.image_size}")
    for name in ("channels", "base", "embed_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"UNetConfig.{name} must be positive, got {getattr(self, name)}")


def _conv_spec(cin, cout, k=3, scale=1.0):
  return {"w": ParamSpec((k, k, cin, cout), scale / math.sqrt(k * k * cin)), "b": ParamSpec((cout,))}


def _conv(p, x_BxHxWxC):
  y = jax.lax.conv_general_dilated(x_BxHxWxC, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["b"]


def _res_spec(cin, cout, embed_dim):
  p = {"norm1": {"scale": ParamSpec((cin,), value=1.0), "bias": ParamSpec((cin,))}, "conv1": _conv_spec(cin, cout),
       "temb": dense_spec(embed_dim, cout), "norm2": {"scale": ParamSpec((cout,), value=1.0), "bias": ParamSpec((cout,))},
       "conv2": _conv_spec(cout, cout, scale=1e-1)}
  if cin != cout:
    p["skip"] = _conv_spec(cin, cout, k=1)
  return p


def _res(p, x, emb):
  h = jax.nn.silu(layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"]))
  h = _conv(p["conv1"], h) + dense(p["temb"], emb)[:, None, None, :]
  h = jax.nn.silu(layer_norm(h, p["norm2"]["scale"], p["norm2"]["bias"]))
  h = _conv(p["conv2"], h)
  skip = _conv(p["skip"], x) if "skip" in p else x
  return skip + h


def _down(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _up(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def unet_init(rng: Array, cfg: UNetConfig) -> Params:
  c1, c2 = cfg.base, 2 * cfg.base
  e = cfg.embed_dim
  specs = {
      "embed1": dense_spec(e, e), "embed2": dense_spec(e, e),
      "stem": _conv_spec(cfg.channels, c1),
      "down": _res_spec(c1, c1, e),
      "mid": _res_spec(c1, c2, e),
      "up": _res_spec(c2 + c1, c1, e),
      "head": _conv_spec(c1, cfg.channels, scale=1e-2),
  }
  return init_from_specs(rng, specs)


def unet_apply(params: Params, x_BxHxWxC: Array, t_B: Array, cfg: UNetConfig) -> Array:
  """`[B, H, W, C] x [B] -> [B, H, W, C]`: a residual block at full resolution, one at half
  resolution (2x channels), then upsample, concatenate the skip and a final residual block."""
  expected = (cfg.image_size, cfg.image_size, cfg.channels)
  if x_BxHxWxC.ndim != 4 or tuple(x_BxHxWxC.shape[1:]) != expected:
    raise ValueError(f"unet_apply: x must be [batch, {expected[0]}, {expected[1]}, {expected[2]}], got {x_BxHxWxC.shape}")
  emb = time_embedding(t_B, cfg.embed_dim)
  emb = dense(params["embed2"], jax.nn.silu(dense(params["embed1"], emb)))
  h = _res(params["down"], _conv(params["stem"], x_BxHxWxC), emb)  # H
  m = _res(params["mid"], _down(h), emb)  # H/2
  u = _res(params["up"], jnp.concatenate([_up(m), h], -1), emb)  # H
  return _conv(params["head"], jax.nn.silu(u))


# ----------------------------------------------------------------------------- net -> score


def precondition(sde: SDE, net_apply: Callable[[Params, Array, Array], Array], params: Params, x: Array,
                 t_B: Array) -> Array:
  """`score(x, t) = F(x / sqrt(m^2 + s^2), t) / s` for a raw network `F = net_apply(params, x, t)`."""
  m, s = sde.marginal_coeffs(t_B)
  x_in = x / _bcast(jnp.sqrt(m**2 + s**2), x)
  return net_apply(params, x_in, t_B) / _bcast(s, x)


def score_fn_from_net(sde: SDE, net_apply: Callable[[Params, Array, Array], Array],
                      params: Params) -> Callable[[Array, Array], Array]:
  """Closes over `params` to give `score_fn(x, t)` for `sample` / `log_likelihood`."""

  def score_fn(x, t_B):
    return precondition(sde, net_apply, params, x, t_B)

  return score_fn
