"""Plain MLPs over dict parameters, shared by the GAN and VAE (same widths as the score MLP)."""
from __future__ import annotations

import math

import jax

from jaxml.diffusion.nets import ParamSpec, init_from_specs


def mlp_init(rng, sizes: tuple[int, ...], out_scale: float = 1.0) -> list[dict]:
  """Dense layers `sizes[0] -> sizes[1] -> ... -> sizes[-1]`, LeCun-normal weights (one normal draw)."""
  specs = []
  for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:])):
    scale = out_scale if i == len(sizes) - 2 else 1.0
    specs.append({"w": ParamSpec((fi, fo), scale / math.sqrt(fi)), "b": ParamSpec((fo,))})
  return init_from_specs(rng, specs)


def mlp_apply(layers, x, act=jax.nn.silu, weights=None):
  """Hidden layers use `act`; `weights` optionally replaces each layer's `w` (spectral norm)."""
  h = x
  for i, layer in enumerate(layers):
    w = layer["w"] if weights is None else weights[i]
    h = h @ w + layer["b"]
    if i < len(layers) - 1:
      h = act(h)
  return h
