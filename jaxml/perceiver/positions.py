"""Position features: linear grid positions and Fourier features (Perceiver, Perceiver IO).

For an input with index shape `(n_1, ..., n_d)` (an image: `(H, W)`), each
element gets its grid position `p in [-1, 1]^d` (`linear_positions`), and the
Fourier features of `p` with `K` bands per dimension:

    f_{j,k} = p_j * nu_{j,k},   nu_{j,k} = linspace(1, r_j / 2, K)_k     (r_j: max_resolution[j])
    features = [p_1..p_d (concat_pos),  sin(pi f) (d*K),  cos(pi f) (d*K, dropped when sine_only)]

with `f` flattened dimension-major (`f_{1,1..K}, f_{2,1..K}, ...`): `d K (2 or 1) + d`
channels; 258 for K = 64 on a 224 x 224 image. The top band is the Nyquist
frequency of a grid of `r_j` points (Perceiver paper, section 3.2). This is
deepmind-research's `generate_fourier_features` (transformers' port computes
the same numbers).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def linear_positions(shape: Sequence[int]) -> np.ndarray:
  """Grid positions in `[-1, 1]` per axis, row-major: `[prod(shape), len(shape)]` float32.

  Axis `j` takes `linspace(-1, 1, shape[j])` (a length-1 axis sits at -1), and
  the rows run over the grid in C order (`meshgrid(..., indexing="ij")`), the
  order in which `x.reshape(B, -1, C)` flattens an array `[B, *shape, C]`.
  """
  shape = tuple(int(n) for n in shape)
  if not shape or any(n <= 0 for n in shape):
    raise ValueError(f"linear_positions: shape must be non-empty positive sizes, got {shape}")
  axes = [np.linspace(-1.0, 1.0, n) for n in shape]
  grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
  return grid.reshape(-1, len(shape)).astype(np.float32)


def fourier_channels(num_dims: int, num_bands: int, *, concat_pos: bool = True, sine_only: bool = False) -> int:
  """Channels of `fourier_features` for `num_dims`-D positions: `d K (1 if sine_only else 2) + (d if concat_pos)`."""
  return num_dims * num_bands * (1 if sine_only else 2) + (num_dims if concat_pos else 0)


def fourier_features(positions_NxD, num_bands: int, max_resolution: Sequence[int], *, concat_pos: bool = True,
                     sine_only: bool = False):
  """Fourier features of positions (see the module docstring for the formula).

  Args:
    positions_NxD: `[..., N, D]` positions (usually `linear_positions`); any
      leading axes are kept, so a batch may carry its own positions per example.
      A NumPy array gives a NumPy result computed in float64 (a constant when
      traced under `jax.jit`, as the pixel preprocessor uses it); a JAX array
      gives a float32 JAX result.
    num_bands: `K >= 1`, frequency bands per dimension.
    max_resolution: `D` positive sizes `r_j`; band `k` of dimension `j` has
      frequency `linspace(1, r_j / 2, K)[k]`.
    concat_pos: prepend the `D` raw positions.
    sine_only: drop the cosines.

  Returns:
    `[..., N, fourier_channels(D, K, ...)]` float32.
  """
  xp = np if isinstance(positions_NxD, np.ndarray) else jnp
  pos = positions_NxD.astype(np.float64) if xp is np else jnp.asarray(positions_NxD, jnp.float32)
  if pos.ndim < 1:
    raise ValueError(f"fourier_features: positions_NxD needs a last axis of D coordinates, got shape {pos.shape}")
  d = pos.shape[-1]
  res = tuple(max_resolution)
  if len(res) != d or any(r <= 0 for r in res):
    raise ValueError(f"fourier_features: max_resolution must hold {d} positive sizes (one per position "
                     f"dimension), got {res}")
  if int(num_bands) < 1:
    raise ValueError(f"fourier_features: num_bands must be >= 1, got {num_bands}")
  freqs_DxK = np.stack([np.linspace(1.0, r / 2.0, int(num_bands)) for r in res])
  if xp is jnp:
    freqs_DxK = jnp.asarray(freqs_DxK, jnp.float32)
  f = (pos[..., :, None] * freqs_DxK).reshape(*pos.shape[:-1], d * int(num_bands))
  parts = [pos] if concat_pos else []
  parts.append(xp.sin(math.pi * f))
  if not sine_only:
    parts.append(xp.cos(math.pi * f))
  out = xp.concatenate(parts, axis=-1)
  return out.astype(np.float32) if xp is np else out

