"""Every causal estimator on its simulator (true effect known) and on the Mroz data.

`run(config, workdir)` (the experiment contract; `run_study(StudyConfig(...), workdir)` underneath) prints a table (naive OLS, 2SLS, Anderson-Rubin,
Bayesian IV, backdoor, frontdoor, ICP vs truth), and writes workdir/results.json,
workdir/table.md and workdir/estimates.png (estimates with intervals against the truth).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from typing import Any

import numpy as np

from jaxml import experiment, report
from jaxml.causal import scm
from jaxml.causal.adjustment import backdoor, backdoor_posterior, frontdoor, frontdoor_posterior
from jaxml.causal.bayes_iv import bayesian_iv
from jaxml.causal.datasets import load_mroz
from jaxml.causal.icp import icp
from jaxml.causal.iv import WeakInstrumentWarning, iv2sls


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  seed: int = 0                 # base seed of every simulator and sampler
  n: int = 5000                 # rows of each simulated data set
  icp_rows_per_env: int = 300   # rows per environment for ICP (3 environments)
  alpha: float = 0.05           # 1 - interval level, and the ICP / Anderson-Rubin level
  num_warmup: int = 500         # NUTS warmup per chain (Bayesian IV, frontdoor posterior)
  num_samples: int = 500        # NUTS draws per chain
  num_chains: int = 2           # chains (vectorised)
  iv_beta: float = 1.0          # true effect in the IV simulator
  backdoor_tau: float = 2.0     # true effect in the backdoor simulator
  truth_draws: int = 200_000    # Monte Carlo rows for do()-based ground truth


def _row(problem, estimator, estimate, lower, upper, truth, note=""):
  return {"problem": problem, "estimator": estimator, "estimate": float(estimate), "lower": float(lower),
          "upper": float(upper), "truth": None if truth is None else float(truth), "note": note}


def _ols_slope(y, design, col):
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  resid = y - design @ coef
  cov = np.linalg.inv(design.T @ design) * (resid @ resid) / (len(y) - design.shape[1])
  return coef[col], math.sqrt(cov[col, col])


def _iv_rows(cfg, problem, y, exog, x, z, truth, bayes=True):
  level_q = 1.959963984540054
  b, se = _ols_slope(y, np.c_[exog, x], exog.shape[1])
  rows = [_row(problem, "naive OLS", b, b - level_q * se, b + level_q * se, truth)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", WeakInstrumentWarning)
    res = iv2sls(y, exog, x, z, cov_type="robust", alpha=cfg.alpha)
  lo, hi = res.conf_int(1 - cfg.alpha)[-1]
  rows.append(_row(problem, "2SLS (robust)", res.params[-1], lo, hi, truth,
                   f"first-stage partial F {res.first_stage.partial_f[0]:.1f} (chi2 Wald)"))
  cs = res.anderson_rubin.confidence_set
  if cs and len(cs) == 1:
    rows.append(_row(problem, "Anderson-Rubin set", res.params[-1], cs[0][0], cs[0][1], truth,
                     res.anderson_rubin.kind))
  if bayes:
    exog_nc = exog[:, exog.std(0) > 0]
    post = bayesian_iv(y, exog_nc if exog_nc.shape[1] else None, x, z, num_warmup=cfg.num_warmup,
                       num_samples=cfg.num_samples, num_chains=cfg.num_chains, seed=cfg.seed,
                       level=1 - cfg.alpha)
    e = post.effects[0]
    rows.append(_row(problem, "Bayesian IV (NUTS)", e.mean, e.lower, e.upper, truth,
                     f"r_hat {e.r_hat:.3f}, ESS {e.ess:.0f}"))
  return rows, res


def run_study(cfg: StudyConfig, workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Runs every estimator; returns the table rows (also written to workdir)."""
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  level = 1 - cfg.alpha
  rows: list[dict[str, Any]] = []

  # IV: confounded X -> Y with two instruments and one control.
  d = scm.simulate(scm.confounded_iv, cfg.seed, n=cfg.n, beta=cfg.iv_beta)
  exog = np.c_[np.ones(cfg.n), d["w"]]
  iv_rows, _ = _iv_rows(cfg, "IV simulator", d["y"], exog, d["x"], d["z"], cfg.iv_beta)
  rows += iv_rows

  # Mroz (Wooldridge Example 15.1): return to education, fatheduc as instrument.
  m = load_mroz().dropna(subset=["lwage"])
  mroz_rows, res = _iv_rows(cfg, "Mroz (Wooldridge 15.1)", m.lwage.to_numpy(), np.ones((len(m), 1)),
                            m.educ.to_numpy(), m.fatheduc.to_numpy(), None)
  for r in mroz_rows:
    r["note"] = (r["note"] + "; published IV 0.059 (0.035), OLS 0.109 (0.014)").lstrip("; ")
  rows += mroz_rows

  # Backdoor: observed discrete confounder.
  d = scm.simulate(scm.backdoor_discrete, cfg.seed + 1, n=cfg.n, tau=cfg.backdoor_tau)
  naive = d["y"][d["x"] == 1].mean() - d["y"][d["x"] == 0].mean()
  rows.append(_row("backdoor simulator", "naive difference", naive, naive, naive, cfg.backdoor_tau))
  for method in ("discrete", "gformula"):
    e = backdoor(d["y"], d["x"], d["z"], method=method, level=level, interactions=False)
    rows.append(_row("backdoor simulator", e.method, e.effect, e.lower, e.upper, cfg.backdoor_tau))
  p = backdoor_posterior(d["y"], d["x"], d["z"], level=level, num_samples=cfg.num_samples,
                         num_chains=cfg.num_chains, seed=cfg.seed)
  rows.append(_row("backdoor simulator", "backdoor posterior (numpyro model, exact)", p.mean, p.lower,
                   p.upper, cfg.backdoor_tau))

  # Frontdoor: linear, two mediators (dowhy handles one).
  a, b = (0.8, -0.5), (1.5, 1.0)
  d = scm.simulate(scm.frontdoor_linear, cfg.seed + 2, n=cfg.n, a=a, b=b)
  truth = scm.average_effect(scm.frontdoor_linear, cfg.seed + 3, treatment="x", outcome="y",
                             n=cfg.truth_draws, a=a, b=b)
  slope, se = _ols_slope(d["y"], np.c_[np.ones(cfg.n), d["x"]], 1)
  rows.append(_row("frontdoor linear (2 mediators)", "naive OLS", slope, slope - 1.96 * se, slope + 1.96 * se,
                   truth))
  e = frontdoor(d["y"], d["x"], d["m"], level=level)
  rows.append(_row("frontdoor linear (2 mediators)", e.method, e.effect, e.lower, e.upper, truth))

  # Frontdoor: binary variables, formula and NUTS posterior.
  d = scm.simulate(scm.frontdoor_binary, cfg.seed + 4, n=cfg.n)
  truth = scm.average_effect(scm.frontdoor_binary, cfg.seed + 5, treatment="x", outcome="y", n=cfg.truth_draws)
  naive = d["y"][d["x"] == 1].mean() - d["y"][d["x"] == 0].mean()
  rows.append(_row("frontdoor binary", "naive difference", naive, naive, naive, truth))
  e = frontdoor(d["y"], d["x"], d["m"], method="discrete", level=level)
  rows.append(_row("frontdoor binary", e.method, e.effect, e.lower, e.upper, truth))
  p = frontdoor_posterior(d["y"], d["x"], d["m"], inference="nuts", level=level, num_warmup=cfg.num_warmup,
                          num_samples=cfg.num_samples, num_chains=cfg.num_chains, seed=cfg.seed)
  rows.append(_row("frontdoor binary", "frontdoor posterior (NUTS)", p.mean, p.lower, p.upper, truth,
                   f"r_hat {p.r_hat:.3f}, ESS {p.ess:.0f}"))

  # ICP: parents {x0, x1} of Y with coefficients (1.0, -0.8); x2 is a child.
  d = scm.icp_data(cfg.seed + 6, n_per_env=cfg.icp_rows_per_env)
  r = icp(d["x"], d["y"], d["env"], alpha=cfg.alpha)
  if r.all_rejected:
    rows.append(_row("ICP", "ICP", float("nan"), float("nan"), float("nan"), None, "no invariant set"))
  else:
    naive = np.linalg.lstsq(np.c_[np.ones(len(d["y"])), d["x"]], d["y"], rcond=None)[0]
    for j, coef in ((0, 1.0), (1, -0.8)):
      rows.append(_row(f"ICP coefficient x{j}", "naive OLS (all predictors)", naive[1 + j], naive[1 + j],
                       naive[1 + j], coef))
      rows.append(_row(f"ICP coefficient x{j}", "ICP interval", (r.conf_intervals[0, j] + r.conf_intervals[1, j]) / 2,
                       r.conf_intervals[0, j], r.conf_intervals[1, j], coef,
                       f"estimate {sorted(r.estimate)}"))

  _write(rows, out)
  return rows


def _table(rows) -> str:
  body = []
  for r in rows:
    truth = "-" if r["truth"] is None else f"{r['truth']:.4f}"
    covers = "-" if r["truth"] is None or r["lower"] == r["upper"] else (
        "yes" if r["lower"] <= r["truth"] <= r["upper"] else "no")
    interval = "-" if r["lower"] == r["upper"] else f"[{r['lower']:.4f}, {r['upper']:.4f}]"
    body.append([r["problem"], r["estimator"], f"{r['estimate']:.4f}", interval, truth, covers, r["note"]])
  return report.markdown_table(["problem", "estimator", "estimate", "interval", "truth", "covers", "note"], body)


def _write(rows, out: pathlib.Path) -> None:
  table = _table(rows)
  print(table)
  report.save_text(table, str(out / "table.md"))
  report.save_json(rows, str(out / "results.json"))
  problems = list(dict.fromkeys(r["problem"] for r in rows))
  height = 1.3 * sum(1 + sum(r["problem"] == p for r in rows) for p in problems) / 2 + 1
  with report.figure(str(out / "estimates.png"), figsize=(8, height), dpi=110) as fig:
    axes = fig.subplots(len(problems), 1, squeeze=False)
    for ax, prob in zip(axes[:, 0], problems):
      sub = [r for r in rows if r["problem"] == prob]
      ypos = np.arange(len(sub))
      est = np.array([r["estimate"] for r in sub])
      err = np.array([[r["estimate"] - r["lower"], r["upper"] - r["estimate"]] for r in sub]).T
      ax.errorbar(est, ypos, xerr=np.maximum(err, 0), fmt="o", capsize=3)
      if sub[0]["truth"] is not None:
        ax.axvline(sub[0]["truth"], color="k", linestyle="--", label="truth")
        ax.legend(loc="best", fontsize=7)
      ax.set_yticks(ypos, [r["estimator"] for r in sub], fontsize=7)
      ax.set_title(prob, fontsize=9)


def run(config, workdir: str) -> dict[str, Any]:
  """The experiment contract (`jaxml.experiment`): `StudyConfig` from `config`, then `run_study`.

  Args:
    config: a ConfigDict/dict of `StudyConfig` fields (unknown keys raise).
    workdir: where results.json, table.md and estimates.png go.

  Returns:
    `{"rows": [...]}`, the table rows.
  """
  return {"rows": run_study(experiment.from_config(StudyConfig, config), workdir)}
