"""A ratings simulator with known truth: every rating, every propensity, every stage.

Beside `jaxml.recsys.simulator` (clicks on categorical features), this one
makes the users x items world that debiasing methods are judged on.

Ratings. Users and items have latent factors `p_u, q_i ~ N(0, I / dim)`,
biases `b_u, b_i ~ N(0, bias_scale^2)`, and each item a log-popularity
`g_i^t` at stage t (`g^0 ~ N(0, popularity_sigma^2)`, then a linear drift
`g^t = g^0 + t * popularity_drift * d_i` with `d_i ~ N(0, 1)`). With `z^t` the
log-popularity standardised by stage 0's mean and spread, the affinity is

    A_ui^t = b_u + b_i + <p_u, q_i> + c * z_i^t + noise * eps_ui,     c = popularity_on_rating,

and the true rating `Y_ui^t` in {1, ..., L} cuts `A^t` at stage 0's quantiles
so that the missing-at-random marginal P(Y = r) is `rating_probs` (the default
(0.52, 0.24, 0.14, 0.07, 0.03) is the marginal Schnabel et al. 2016 imposed on
their semi-synthetic ML-100K ratings; with it the constant-3 predictor has
true MSE 2.51 and, under the rating rule below with alpha = 0.25, naive bias -1.008). `c > 0` makes popular items
rated higher: popularity confounds ratings and exposure. The noise matters:
exposure that selects on a noisy rating selects on its noise, which biases a
naive fit everywhere; with `noise = 0` the ratings are a quantised low-rank
matrix that a well-specified MF recovers from MNAR cells almost as well as
from MAR ones (measured with MF of dim 4, each at its best L2 of 1e-4, 1e-3,
1e-2, true propensities, seed 0: MAR MSE 0.55 naive vs 0.52 MF-IPS on
`confounded_config(noise=0)`, 1.24 vs 0.80 at the default noise 0.5; on
`schnabel_config`, 0.73 vs 0.75 at noise 0, 2.51 vs 1.03 at 0.5).

Exposure (the true propensities). With user activity `a_u ~ exp(N(0, activity_sigma^2))`
and item popularity `m_i^t = exp(g_i^t)`, both scaled to mean 1,

    P_ui^t = min(1, k_t * a_u * (m_i^t)^e * alpha^max(0, L - 1 - Y_ui^t)),    e = popularity_on_exposure,

with `k_t` solved (bisection) so that the mean propensity is `density`.
`e = 0, activity_sigma = 0` is Schnabel's semi-synthetic rule (with L = 5:
`P = k` for ratings 4 and 5, `k alpha^(4 - r)` below); `alpha = 1` makes
exposure depend on popularity and activity only. `O_ui ~ Bernoulli(P_ui)`
independently; a missing-at-random (MAR) test split draws `per_user` items
per user uniformly, as the Coat and Yahoo! R3 test sets do.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RatingSimConfig:
  n_users: int = 290                    # Coat's shape by default
  n_items: int = 300
  dim: int = 4                          # latent factor dimension of the true affinity
  bias_scale: float = 0.5               # spread of the user and item biases
  noise: float = 0.5                    # unstructured affinity noise (what no low-rank model fits)
  rating_probs: tuple[float, ...] = (0.52, 0.24, 0.14, 0.07, 0.03)   # MAR marginal of ratings 1..L
  popularity_sigma: float = 1.0         # spread of the log-popularity
  popularity_on_rating: float = 0.0     # c: popularity's effect on the affinity (confounding)
  density: float = 0.05                 # mean propensity = expected fraction observed
  alpha: float = 0.25                   # exposure factor per rating step below 4 (1: rating-blind)
  popularity_on_exposure: float = 0.0   # e: exposure grows as popularity^e
  activity_sigma: float = 0.0           # spread of the log user activity in exposure
  n_stages: int = 1                     # time stages (popularity drifts across them)
  popularity_drift: float = 0.0         # per-stage drift of the log-popularity, in units of d_i ~ N(0, 1)
  seed: int = 0


def schnabel_config(**overrides) -> RatingSimConfig:
  """Schnabel et al.'s semi-synthetic rule: exposure depends on the rating only."""
  return dataclasses.replace(RatingSimConfig(), **overrides)


def confounded_config(**overrides) -> RatingSimConfig:
  """Popularity raises both ratings and exposure; exposure also favours high ratings."""
  base = RatingSimConfig(popularity_on_rating=0.5, popularity_on_exposure=1.0, alpha=0.5, activity_sigma=0.3)
  return dataclasses.replace(base, **overrides)


class RatingSimulator:
  """Holds the true world of `cfg`; draws observations and MAR splits from it.

  Attributes (numpy):
    ratings_TxUxI: int32 true ratings 1..L at every stage.
    propensities_TxUxI: float64 true P(O = 1) at every stage.
    log_popularity_TxI: g^t (before scaling to mean 1).
    log_activity_U: log a_u (before scaling to mean 1).
    user_factors_UxD, item_factors_IxD, user_bias_U, item_bias_I: the affinity's parts.
    ratings_UxI, propensities_UxI: stage 0's.
  """

  def __init__(self, cfg: RatingSimConfig = RatingSimConfig()):
    _check_config(cfg)
    self.cfg = cfg
    rng = np.random.default_rng([cfg.seed, 1])
    u, i, t_n = cfg.n_users, cfg.n_items, cfg.n_stages
    self.user_factors_UxD = rng.standard_normal((u, cfg.dim)) / np.sqrt(cfg.dim)
    self.item_factors_IxD = rng.standard_normal((i, cfg.dim)) / np.sqrt(cfg.dim)
    self.user_bias_U = cfg.bias_scale * rng.standard_normal(u)
    self.item_bias_I = cfg.bias_scale * rng.standard_normal(i)
    g0 = cfg.popularity_sigma * rng.standard_normal(i)
    direction = rng.standard_normal(i)
    self.log_popularity_TxI = g0[None] + cfg.popularity_drift * np.arange(t_n)[:, None] * direction[None]
    self.log_activity_U = cfg.activity_sigma * rng.standard_normal(u)
    eps = cfg.noise * rng.standard_normal((u, i))

    z = self.log_popularity_TxI - g0.mean()
    if g0.std() > 0:
      z = z / g0.std()
    base = (self.user_bias_U[:, None] + self.item_bias_I[None] + self.user_factors_UxD @ self.item_factors_IxD.T + eps)
    affinity = base[None] + cfg.popularity_on_rating * z[:, None, :]
    cuts = np.quantile(affinity[0], np.cumsum(cfg.rating_probs)[:-1])
    self.ratings_TxUxI = (1 + np.searchsorted(cuts, affinity, side="right")).astype(np.int32)

    activity = np.exp(self.log_activity_U)
    activity = activity / activity.mean()
    props = []
    for t in range(t_n):
      pop = np.exp(self.log_popularity_TxI[t])
      pop = pop / pop.mean()
      raw = activity[:, None] * pop[None] ** cfg.popularity_on_exposure * cfg.alpha ** np.maximum(
          0, self.n_levels - 1 - self.ratings_TxUxI[t])
      props.append(np.minimum(1.0, _solve_scale(raw, cfg.density) * raw))
    self.propensities_TxUxI = np.stack(props)

  @property
  def n_levels(self) -> int:
    return len(self.cfg.rating_probs)

  @property
  def ratings_UxI(self) -> np.ndarray:
    return self.ratings_TxUxI[0]

  @property
  def propensities_UxI(self) -> np.ndarray:
    return self.propensities_TxUxI[0]

  def _stage(self, stage: int) -> int:
    if not 0 <= stage < self.cfg.n_stages:
      raise ValueError(f"stage must lie in [0, {self.cfg.n_stages}), got {stage}")
    return stage

  def sample_observed(self, seed: int, stage: int = 0, n_draws: int | None = None) -> np.ndarray:
    """Exposure draws `O ~ Bernoulli(P^stage)`.

    Args:
      seed: the draw's seed (the world's own seed is `cfg.seed`).
      stage: the time stage.
      n_draws: None for one [users, items] mask, else a stack of that many.

    Returns:
      bool [users, items], or [n_draws, users, items].
    """
    p = self.propensities_TxUxI[self._stage(stage)]
    rng = np.random.default_rng([self.cfg.seed, 2, stage, seed])
    shape = p.shape if n_draws is None else (n_draws, *p.shape)
    return rng.random(shape) < p

  def mar_mask(self, seed: int, per_user: int = 16) -> np.ndarray:
    """A missing-at-random test mask: `per_user` items per user, uniformly without replacement.

    Returns:
      bool [users, items] with exactly `per_user` True entries in each row.
    """
    if not 1 <= per_user <= self.cfg.n_items:
      raise ValueError(f"per_user must lie in [1, {self.cfg.n_items}], got {per_user}")
    rng = np.random.default_rng([self.cfg.seed, 3, seed])
    order = np.argsort(rng.random((self.cfg.n_users, self.cfg.n_items)), axis=1)[:, :per_user]
    out = np.zeros((self.cfg.n_users, self.cfg.n_items), bool)
    np.put_along_axis(out, order, True, axis=1)
    return out

  def sample_split(self, seed: int, *, mar_per_user: int = 16, stage: int = 0) -> dict:
    """One logged data set in Coat's layout, plus the truth.

    Returns:
      dict of numpy arrays: `train_UxI` / `test_UxI` int32 ratings with 0 =
      missing (train: the exposure draw; test: the MAR mask), `observed_UxI`
      and `mar_UxI` (bool), `propensities_UxI` (true), `ratings_UxI` (every
      true rating).
    """
    stage = self._stage(stage)
    observed = self.sample_observed(seed, stage)
    mar = self.mar_mask(seed, mar_per_user)
    y = self.ratings_TxUxI[stage]
    return {"train_UxI": np.where(observed, y, 0).astype(np.int32), "test_UxI": np.where(mar, y, 0).astype(np.int32),
            "observed_UxI": observed, "mar_UxI": mar, "propensities_UxI": self.propensities_TxUxI[stage].copy(),
            "ratings_UxI": y.copy()}


def _solve_scale(raw: np.ndarray, density: float) -> float:
  """k with mean(min(1, k * raw)) = density (monotone in k: bisection)."""
  lo, hi = 0.0, 1.0 / raw.min()
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    if np.minimum(1.0, mid * raw).mean() < density:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def _check_config(cfg: RatingSimConfig) -> None:
  probs = np.asarray(cfg.rating_probs, np.float64)
  if probs.ndim != 1 or probs.size < 2 or np.any(probs <= 0) or abs(probs.sum() - 1) > 1e-6:
    raise ValueError(f"rating_probs must be >= 2 positive probabilities summing to 1, got {cfg.rating_probs}")
  if not 0.0 < cfg.density < 1.0:
    raise ValueError(f"density must lie in (0, 1), got {cfg.density}")
  if not 0.0 < cfg.alpha <= 1.0:
    raise ValueError(f"alpha must lie in (0, 1], got {cfg.alpha}")
  for name in ("n_users", "n_items", "dim", "n_stages"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
  for name in ("bias_scale", "noise", "popularity_sigma", "activity_sigma"):
    if getattr(cfg, name) < 0:
      raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
