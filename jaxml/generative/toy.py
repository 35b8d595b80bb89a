"""Toy multi-modal datasets of the mode-collapse literature.

- `ring8`: 8 Gaussians evenly spaced on a circle of radius 2, std 0.02
  (Metz et al., Unrolled GAN, arXiv 1611.02163; VEEGAN, arXiv 1705.07761). PacGAN's
  released configuration (arXiv 1712.04086) uses radius 1, std 0.01: the same ring at half
  the scale, so every metric measured in mode stds is unchanged.
- `grid25`: 25 Gaussians on the grid {-4, -2, 0, 2, 4}^2, std 0.05, as in PacGAN's
  released configuration (and VEEGAN).
- `mix1d_sep{S}`: two equal 1D Gaussians at -S/2 and +S/2, std 0.1, so the
  separation in units of the mode std is 10 S.

Each is a `ToyDataset` holding a `GaussianMixture` (means, stds, weights), the
same object that gives the exact diffused score in `jaxml.diffusion.mixture`.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from jaxml.diffusion.mixture import GaussianMixture

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ToyDataset:
  name: str
  mixture: GaussianMixture

  @property
  def centers(self) -> np.ndarray:
    return np.asarray(self.mixture.means, np.float32)

  @property
  def std(self) -> float:
    return float(self.mixture.stds[0])

  @property
  def weights(self) -> np.ndarray:
    return np.asarray(self.mixture.weights, np.float32)

  @property
  def dim(self) -> int:
    return self.mixture.dim

  def sample(self, rng: Array, n: int) -> Array:
    """`[n, D]` float32 samples (pure JAX: usable inside jit / scan)."""
    return self.mixture.sample(rng, n)


def ring8(radius: float = 2.0, std: float = 0.02, num_modes: int = 8) -> ToyDataset:
  angles = 2 * math.pi * np.arange(num_modes) / num_modes
  centers = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  return ToyDataset(f"ring{num_modes}", GaussianMixture.create(centers, std))


def grid25(spacing: float = 2.0, std: float = 0.05, side: int = 5) -> ToyDataset:
  coords = spacing * (np.arange(side) - (side - 1) / 2)
  centers = np.stack(np.meshgrid(coords, coords, indexing="ij"), axis=-1).reshape(-1, 2)
  return ToyDataset(f"grid{side * side}", GaussianMixture.create(centers, std))


def mixture1d(separation: float, std: float = 0.1, weights=(0.5, 0.5)) -> ToyDataset:
  if not separation > 0:
    raise ValueError(f"separation must be positive, got {separation}")
  centers = np.array([[-separation / 2], [separation / 2]])
  sep = f"{separation:g}".replace(".", "p")
  return ToyDataset(f"mix1d_sep{sep}", GaussianMixture.create(centers, std, weights))


def get_dataset(name: str) -> ToyDataset:
  """`"ring8"`, `"grid25"`, `"mix1d_sep<S>"` (e.g. `mix1d_sep4`, `mix1d_sep0p5`) or `"ring8_x<K>"`.

  `ring8_x<K>` is ring-8 scaled by K (radius 2K, std 0.02K): the same data in units of the
  mode std, so its metrics compare with ring-8's, at a K times larger absolute scale.
  """
  if name == "ring8":
    return ring8()
  m = re.fullmatch(r"ring8_x(\d+)", str(name))
  if m and int(m.group(1)) > 0:
    k = int(m.group(1))
    ds = ring8(radius=2.0 * k, std=0.02 * k)
    return dataclasses.replace(ds, name=name)
  if name == "grid25":
    return grid25()
  m = re.fullmatch(r"mix1d_sep(\d+(?:p\d+)?)", str(name))
  if m:
    return mixture1d(float(m.group(1).replace("p", ".")))
  raise ValueError(f"unknown toy dataset {name!r}; expected 'ring8', 'grid25', 'mix1d_sep<S>' or 'ring8_x<K>'")
