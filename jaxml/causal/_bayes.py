"""NUTS runner and posterior summaries shared by the numpyro estimators."""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS


class PosteriorSummary(NamedTuple):
  """Posterior of a scalar effect: mean, sd, central credible interval, r_hat, bulk ESS.

  samples: [num_chains, num_samples]; seconds: wall time of warmup + sampling
  (including compilation); ess_per_second = ess / seconds.
  """
  mean: float
  sd: float
  lower: float
  upper: float
  level: float
  r_hat: float
  ess: float
  seconds: float
  samples: np.ndarray

  @property
  def ess_per_second(self) -> float:
    return self.ess / self.seconds

  def __str__(self) -> str:
    return (f"{self.mean:.4f} (sd {self.sd:.4f}; {100 * self.level:.0f}% CrI [{self.lower:.4f}, "
            f"{self.upper:.4f}]; r_hat {self.r_hat:.3f}; ESS {self.ess:.0f})")


def summarize(draws: np.ndarray, level: float, seconds: float) -> PosteriorSummary:
  """draws: [chains, samples] of one scalar."""
  draws = np.asarray(draws, dtype=np.float64)
  lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
  r_hat = float(split_gelman_rubin(draws)) if draws.shape[1] >= 4 else float("nan")
  return PosteriorSummary(float(draws.mean()), float(draws.std(ddof=1)), float(lo), float(hi), level,
                          r_hat, float(effective_sample_size(draws)), seconds, draws)


def run_nuts(model: Callable, seed: int, *, num_warmup: int, num_samples: int, num_chains: int,
             target_accept: float = 0.85, dense_mass: bool = False, **data) -> tuple[dict[str, np.ndarray], float]:
  """Runs NUTS (chains vectorised in one program) and returns draws grouped by chain and seconds."""
  kernel = NUTS(model, target_accept_prob=target_accept, dense_mass=dense_mass)
  mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
              chain_method="vectorized", progress_bar=False)
  start = time.perf_counter()
  mcmc.run(jax.random.PRNGKey(seed), **data)
  samples = mcmc.get_samples(group_by_chain=True)
  samples = jax.tree_util.tree_map(lambda v: np.asarray(jax.block_until_ready(v)), samples)
  return samples, time.perf_counter() - start
