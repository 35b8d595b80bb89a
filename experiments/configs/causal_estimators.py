"""Causal estimators on simulators with known effects and on the Mroz data.

    python -m experiments.causal_estimators --workdir=workdirs/causal
    python -m experiments.causal_estimators --workdir=/tmp/causal --config=experiments/configs/causal_estimators.py:small
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # base seed of every simulator and sampler
  c.n = 5000  # rows of each simulated data set
  c.icp_rows_per_env = 300  # rows per environment for ICP (3 environments)
  c.alpha = 0.05  # 1 - interval level; also the ICP and Anderson-Rubin level
  c.num_warmup = 500  # NUTS warmup per chain (Bayesian IV, frontdoor posterior)
  c.num_samples = 500  # NUTS draws per chain
  c.num_chains = 2  # chains, vectorised in one program
  c.iv_beta = 1.0  # true effect of X on Y in the IV simulator
  c.backdoor_tau = 2.0  # true effect in the backdoor simulator
  c.truth_draws = 200_000  # Monte Carlo rows for the do()-based ground truth
  if variant == "small":  # under a minute on a laptop CPU: smoke runs and tests
    c.n = 1000
    c.icp_rows_per_env = 150
    c.num_warmup = 150
    c.num_samples = 150
    c.truth_draws = 50_000
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; expected '' or 'small'")
  return c
