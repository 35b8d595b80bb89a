"""jaxml.causal against linearmodels and dowhy on the same machine, in the same run.

    python -m benchmarks.causal_bench            # n = 1,000,000 (several minutes: linearmodels is slow)
    python -m benchmarks.causal_bench --n=100000 --parts=iv,frontdoor

1. 2SLS with robust errors and all diagnostics, 1 endogenous regressor, 2 instruments,
   5 controls plus a constant: jaxml.causal.iv2sls vs linearmodels IV2SLS (+ first
   stage, Wu-Hausman, Durbin, Sargan, Basmann). Coefficients must agree to 1e-8.
2. Linear frontdoor (one mediator): jaxml.causal.frontdoor vs dowhy's
   frontdoor.two_stage_regression (CausalModel + identify + estimate).
3. Bayesian IV by NUTS: effective samples per second of the effect (sampling phase,
   after warmup and compilation).
Times are medians over all timed calls; jaxml is timed after one warm-up call (compilation),
from numpy arrays to numpy results. Peer calls run in the peer environment
(tests/peer.py) in rounds that alternate with the jaxml rounds, so both see the same load.
Ends with `name: value` lines.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jaxml import causal
from jaxml.causal import scm
from jaxml.train import hostmem
from tests import peer


def _iv_data(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=n)
  z = rng.normal(size=(n, 2))
  w = np.c_[np.ones(n), rng.normal(size=(n, 5))]
  x = z @ [0.6, 0.3] + w[:, 1:] @ [0.2, -0.1, 0.3, 0.0, 0.1] + u + rng.normal(size=n)
  y = 1.0 * x + w[:, 1:] @ [0.5, 0.2, -0.3, 0.1, 0.0] + u + rng.normal(size=n) * (1 + 0.5 * np.abs(z[:, 0]))
  return {"y": y, "w": w, "x": x[:, None], "z": z}


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def bench_iv(n: int, repeats: int, inner: int) -> dict[str, float]:
  data = _iv_data(n)
  fit = lambda: causal.iv2sls(data["y"], data["w"], data["x"], data["z"], cov_type="robust")
  fit()  # compile
  ours, theirs, ref = [], [], None
  for _ in range(repeats):
    out = peer.run("causal_bench_linearmodels", data, repeats=1)
    theirs += list(out["seconds"])
    ref = out["params"]
    for _ in range(inner):
      res, sec = _timed(fit)
      ours.append(sec)
  err = float(np.max(np.abs(res.params - ref) / np.abs(ref)))
  if err > 1e-8:
    raise AssertionError(f"coefficients disagree with linearmodels: max relative error {err:.2e}")
  t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
  return {"iv2sls_jaxml_seconds": t_ours, "iv2sls_linearmodels_seconds": t_theirs,
          "iv2sls_speedup_vs_linearmodels": t_theirs / t_ours, "iv2sls_max_rel_param_diff": err}


def bench_frontdoor(n: int, repeats: int, inner: int) -> dict[str, float]:
  d = scm.simulate(scm.frontdoor_linear, 0, n=n)
  x, m, y = (np.asarray(d[k], np.float64) for k in ("x", "m", "y"))
  est = lambda: causal.frontdoor(y, x, m)
  est()
  ours, theirs, ref = [], [], None
  for _ in range(repeats):
    out = peer.run("causal_dowhy", {"0.x": x, "0.m": m[:, 0], "0.y": y}, count=1, repeats=inner)
    theirs += list(out["0.seconds"])
    ref = out["0.effect"]
    for _ in range(inner):
      res, sec = _timed(est)
      ours.append(sec)
  err = abs(res.effect - ref) / abs(ref)
  if err > 1e-6:
    raise AssertionError(f"frontdoor effect disagrees with dowhy: relative error {err:.2e}")
  t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
  return {"frontdoor_jaxml_seconds": t_ours, "frontdoor_dowhy_seconds": t_theirs,
          "frontdoor_speedup_vs_dowhy": t_theirs / t_ours, "frontdoor_rel_diff": err}


def bench_nuts(n: int, num_samples: int) -> dict[str, float]:
  """ESS/s of the Bayesian IV effect in the sampling phase (compiled, after warmup)."""
  import jax.numpy as jnp
  from numpyro.diagnostics import effective_sample_size
  from numpyro.infer import MCMC, NUTS
  d = scm.simulate(scm.confounded_iv, 0, n=n)
  std = lambda a: (a - a.mean(0)) / a.std(0)
  args = dict(y=jnp.asarray(std(d["y"])), x=jnp.asarray(std(d["x"])[:, None]), z=jnp.asarray(std(d["z"])),
              w=jnp.asarray(std(d["w"])[:, None]))
  mcmc = MCMC(NUTS(causal.bayes_iv_model), num_warmup=num_samples, num_samples=num_samples, num_chains=2,
              chain_method="vectorized", progress_bar=False)
  start = time.perf_counter()
  mcmc.warmup(jax.random.PRNGKey(0), **args)
  warm = time.perf_counter() - start
  start = time.perf_counter()
  mcmc.run(jax.random.PRNGKey(1), **args)
  beta = np.asarray(jax.block_until_ready(mcmc.get_samples(group_by_chain=True)["beta"]))[..., 0]
  sample = time.perf_counter() - start
  ess = float(effective_sample_size(beta))
  return {"bayes_iv_nuts_ess": ess, "bayes_iv_nuts_sampling_seconds": sample,
          "bayes_iv_nuts_warmup_seconds_incl_compile": warm, "bayes_iv_nuts_ess_per_second": ess / sample}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=1_000_000, help="rows for 2SLS and frontdoor")
  parser.add_argument("--repeats", type=int, default=3, help="rounds; each round times the peer, then jaxml")
  parser.add_argument("--inner", type=int, default=5,
                      help="jaxml calls per round (and dowhy calls per round; linearmodels: 1)")
  parser.add_argument("--parts", default="iv,frontdoor,nuts", help="comma-separated subset to run")
  parser.add_argument("--nuts_rows", type=int, default=1000, help="rows for the Bayesian IV NUTS run")
  parser.add_argument("--nuts_samples", type=int, default=500, help="warmup = draws per chain (2 chains)")
  args = parser.parse_args()
  results = {"n": float(args.n), "cpu_devices": float(len(jax.devices("cpu")))}
  parts = set(args.parts.split(","))
  if "iv" in parts:
    results.update(bench_iv(args.n, args.repeats, args.inner))
  if "frontdoor" in parts:
    results.update(bench_frontdoor(args.n, args.repeats, args.inner))
  if "nuts" in parts:
    results.update(bench_nuts(args.nuts_rows, args.nuts_samples))
  for name, value in results.items():
    print(f"{name}: {value:.6g}")


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  main()
