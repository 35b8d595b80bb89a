"""Forward SDEs of score-based generative modelling, and DDPM as the discrete VP case.

Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations" (arXiv 2011.13456), section 3.4 and appendix B/C:

  forward   dx = f(x, t) dt + g(t) dw,                         t in [0, 1]
  reverse   dx = [f(x, t) - g(t)^2 score(x, t)] dt + g(t) dw_bar
  ODE       dx = [f(x, t) - 0.5 g(t)^2 score(x, t)] dt           (probability flow)

Every SDE here has a Gaussian transition kernel
`p_0t(x_t | x_0) = N(x_t; m(t) x_0, s(t)^2 I)`; `marginal_prob` returns
`(m(t) x_0, s(t))`. Defaults are the paper's: VP / sub-VP with
`beta_min = 0.1, beta_max = 20`, VE with `sigma_min = 0.01, sigma_max = 50`,
`N = 1000` discretisation steps.

Arrays: `x` is `[B, ...]` (any trailing data shape), `t` is `[B]` float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _bcast(v_B: Array, x: Array) -> Array:
  """Reshapes a per-sample `[B]` vector so it broadcasts against `x` `[B, ...]`."""
  return jnp.reshape(v_B, v_B.shape + (1,) * (x.ndim - v_B.ndim))


def _flat_sum(x: Array) -> Array:
  return jnp.sum(jnp.reshape(x, (x.shape[0], -1)), axis=-1)


@dataclasses.dataclass(frozen=True)
class SDE:
  """Base class: a linear forward SDE with a Gaussian transition kernel.

  Subclasses hold the parameters (and `N`, the number of steps of the
  discrete counterpart) and give the coefficients; everything else (reverse SDE,
  probability-flow drift, Euler discretisation) is shared here.
  """

  def __post_init__(self):
    if int(self.N) <= 0:
      raise ValueError(f"{type(self).__name__}: N must be a positive number of steps, got {self.N}")

  # --- to be provided by subclasses
  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Returns `(f(x, t), g(t))`, drift `[B, ...]` and diffusion `[B]`."""
    raise NotImplementedError

  def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
    """Returns `(m(t), s(t))`, each `[B]`: `p_0t(x_t|x_0) = N(m x_0, s^2 I)`."""
    raise NotImplementedError

  def prior_sample(self, rng: Array, shape: tuple[int, ...]) -> Array:
    raise NotImplementedError

  def prior_logp(self, z: Array) -> Array:
    """Log-density of the prior at `z` `[B, ...]`, summed over data dims: `[B]`."""
    raise NotImplementedError

  # --- shared
  def marginal_prob(self, x0: Array, t: Array) -> tuple[Array, Array]:
    """Mean `m(t) x0` `[B, ...]` and std `s(t)` `[B]` of `p_0t(x_t | x_0)`; `t` in (0, 1]."""
    check_time(t)
    m, s = self.marginal_coeffs(t)
    return _bcast(m, x0) * x0, s

  def marginal_std(self, t: Array) -> Array:
    return self.marginal_coeffs(t)[1]

  def discretize(self, x: Array, t: Array, dt: Array | float) -> tuple[Array, Array]:
    """One forward step `x_{t+dt} = x + f_d + G_d z`; returns `(f_d, G_d)`.

    The generic rule is Euler-Maruyama, `f_d = f dt`, `G_d = g sqrt(dt)`;
    VP and VE override it with their exact DDPM / SMLD discretisations.
    """
    f, g = self.sde(x, t)
    return f * dt, g * jnp.sqrt(dt)

  def reverse_drift(self, x: Array, t: Array, score: Array, probability_flow: bool = False) -> Array:
    """Drift of the reverse SDE `f - g^2 score`, or of the ODE `f - g^2 score / 2`."""
    f, g = self.sde(x, t)
    coeff = 0.5 if probability_flow else 1.0
    return f - coeff * _bcast(g**2, x) * score

  def reverse_discretize(self, x: Array, t: Array, dt: Array | float, score: Array) -> tuple[Array, Array]:
    """Reverse-diffusion predictor coefficients: `x_{t-dt} = x - rev_f + G z`."""
    f, G = self.discretize(x, t, dt)
    return f - _bcast(G**2, x) * score, G

  def langevin_alpha(self, t: Array, dt: Array | float) -> Array:
    """`alpha_i` of the Langevin step size (`1 - beta_i` for VP, 1 otherwise)."""
    return jnp.ones_like(t)


def _check_t_scalar_range(name: str, lo: float, hi: float):
  if not (0.0 <= lo < hi):
    raise ValueError(f"{name}: need 0 <= min < max, got min={lo}, max={hi}")


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
  """Variance preserving SDE (continuous DDPM).

  `beta(t) = beta_min + t (beta_max - beta_min)`, `f = -beta(t) x / 2`,
  `g = sqrt(beta(t))`. With `c(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2`,
  `m(t) = exp(c)`, `s(t) = sqrt(1 - exp(2c))`. Prior `N(0, I)`.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000  # steps of the discrete counterpart (DDPM).

  def __post_init__(self):
    super().__post_init__()
    _check_t_scalar_range("VPSDE beta", self.beta_min, self.beta_max)

  def beta(self, t: Array) -> Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def _log_mean_coeff(self, t: Array) -> Array:
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def sde(self, x, t):
    beta = self.beta(t)
    return -0.5 * _bcast(beta, x) * x, jnp.sqrt(beta)

  def marginal_coeffs(self, t):
    c = self._log_mean_coeff(t)
    return jnp.exp(c), jnp.sqrt(-jnp.expm1(2.0 * c))

  def prior_sample(self, rng, shape):
    return jax.random.normal(rng, shape)

  def prior_logp(self, z):
    d = math.prod(z.shape[1:])
    return -0.5 * d * math.log(2 * math.pi) - 0.5 * _flat_sum(z**2)

  def discretize(self, x, t, dt):
    # DDPM step: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i = beta(t) dt.
    b = self.beta(t) * dt
    return (_bcast(jnp.sqrt(1.0 - b), x) - 1.0) * x, jnp.sqrt(b)

  def langevin_alpha(self, t, dt):
    return 1.0 - self.beta(t) * dt


@dataclasses.dataclass(frozen=True)
class subVPSDE(SDE):  # noqa: N801 - name fixed by the interface.
  """Sub-VP SDE: VP drift, `g^2 = beta(t) (1 - exp(-2 int_0^t beta))`.

  `m(t) = exp(c)` as for VP, `s(t) = 1 - exp(2c)` (not its square root), so the
  variance is bounded by the VP one. Prior `N(0, I)`.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000  # steps of the discrete counterpart (DDPM).

  def __post_init__(self):
    super().__post_init__()
    _check_t_scalar_range("subVPSDE beta", self.beta_min, self.beta_max)

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def _log_mean_coeff(self, t):
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def sde(self, x, t):
    beta = self.beta(t)
    # int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2 = -2 c(t).
    discount = -jnp.expm1(4.0 * self._log_mean_coeff(t))
    return -0.5 * _bcast(beta, x) * x, jnp.sqrt(beta * discount)

  def marginal_coeffs(self, t):
    c = self._log_mean_coeff(t)
    return jnp.exp(c), -jnp.expm1(2.0 * c)

  def prior_sample(self, rng, shape):
    return jax.random.normal(rng, shape)

  def prior_logp(self, z):
    d = math.prod(z.shape[1:])
    return -0.5 * d * math.log(2 * math.pi) - 0.5 * _flat_sum(z**2)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """Variance exploding SDE (continuous SMLD / NCSN).

  `sigma(t) = sigma_min (sigma_max / sigma_min)^t`, `f = 0`,
  `g = sigma(t) sqrt(2 log(sigma_max / sigma_min))`; `m(t) = 1`,
  `s(t) = sigma(t)`. As in the paper, `x(0)` is taken to carry the
  `sigma_min` noise already, so `s(t) = sigma(t)` exactly rather than
  `sqrt(sigma(t)^2 - sigma_min^2)`. Prior `N(0, sigma_max^2 I)`.
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = 1000  # steps of the discrete counterpart (SMLD).

  def __post_init__(self):
    super().__post_init__()
    if not (0.0 < self.sigma_min < self.sigma_max):
      raise ValueError(f"VESDE: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

  def sigma(self, t):
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    g = self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))
    return jnp.zeros_like(x), g

  def marginal_coeffs(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def prior_sample(self, rng, shape):
    return self.sigma_max * jax.random.normal(rng, shape)

  def prior_logp(self, z):
    d = math.prod(z.shape[1:])
    return (-0.5 * d * math.log(2 * math.pi * self.sigma_max**2) - 0.5 * _flat_sum(z**2) / self.sigma_max**2)

  def discretize(self, x, t, dt):
    # SMLD step: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma at t - dt (0 below t = 0).
    sigma = self.sigma(t)
    prev = jnp.where(t - dt > 0.0, self.sigma(t - dt), 0.0)
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)


_SDES = {"vp": VPSDE, "vpsde": VPSDE, "subvp": subVPSDE, "subvpsde": subVPSDE, "ve": VESDE, "vesde": VESDE}


def get_sde(name: str, **kwargs: Any) -> SDE:
  """Builds an SDE from its name (`"vp"`, `"subvp"`, `"ve"`), with keyword parameters."""
  key = str(name).lower().replace("-", "").replace("_", "")
  if key not in _SDES:
    raise ValueError(f"unknown SDE name {name!r}; expected one of 'vp', 'subvp', 've'")
  return _SDES[key](**kwargs)


def check_time(t: Array | float, name: str = "t") -> None:
  """Raises if concrete times lie outside (0, 1] (skipped under tracing)."""
  try:
    arr = np.asarray(t)
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr <= 0.0) or np.any(arr > 1.0)):
    raise ValueError(f"{name} must lie in (0, 1], got values in [{arr.min()}, {arr.max()}]")


# ----------------------------------------------------------------------------- DDPM


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
  """DDPM (Ho et al., arXiv 2006.11239): the discrete VP chain.

  `q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`, linear betas
  from `beta_start` to `beta_end` over `num_timesteps`; indices `t = 1..T`
  are stored at array position `t - 1`. Closed form
  `q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`,
  `abar_t = prod_{s<=t} (1 - beta_s)`.
  """

  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def __post_init__(self):
    if int(self.num_timesteps) <= 0:
      raise ValueError(f"DDPMSchedule: num_timesteps must be positive, got {self.num_timesteps}")
    if not (0.0 < self.beta_start <= self.beta_end < 1.0):
      raise ValueError(f"DDPMSchedule: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

  @property
  def betas(self) -> Array:
    return jnp.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=jnp.float32)

  @property
  def alphas(self) -> Array:
    return 1.0 - self.betas

  @property
  def alpha_bars(self) -> Array:
    return jnp.cumprod(self.alphas)

  def _at(self, arr: Array, t: Array) -> Array:
    return arr[jnp.asarray(t) - 1]

  def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
    """Closed form `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`; `t` int `[B]` in 1..T."""
    abar = _bcast(self._at(self.alpha_bars, t), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise

  def q_step(self, x_prev: Array, t: Array, noise: Array) -> Array:
    """One forward step `x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps`."""
    beta = _bcast(self._at(self.betas, t), x_prev)
    return jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * noise

  def posterior_mean_variance(self, x0: Array, xt: Array, t: Array) -> tuple[Array, Array]:
    """`q(x_{t-1} | x_t, x_0) = N(mu, var)` (eq. 6-7 of Ho et al.); `var` is `[B]`.

    `mu = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t`,
    `var = beta_t (1 - abar_{t-1}) / (1 - abar_t)`, with `abar_0 = 1`.
    """
    abar_all = self.alpha_bars
    abar_prev_all = jnp.concatenate([jnp.ones((1,), abar_all.dtype), abar_all[:-1]])
    beta = self._at(self.betas, t)
    abar = self._at(abar_all, t)
    abar_prev = self._at(abar_prev_all, t)
    c0 = beta * jnp.sqrt(abar_prev) / (1.0 - abar)
    ct = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / (1.0 - abar)
    mean = _bcast(c0, x0) * x0 + _bcast(ct, xt) * xt
    return mean, beta * (1.0 - abar_prev) / (1.0 - abar)

  def predict_x0(self, xt: Array, t: Array, eps: Array) -> Array:
    """`x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`."""
    abar = _bcast(self._at(self.alpha_bars, t), xt)
    return (xt - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
