"""Causal recommendation experiment (`experiments/causal_recsys.py`): `run(config, workdir) -> dict`.

Sections (each a table in `results.md`, all in `results.json`, one figure `summary.png`):
  estimators  the naive, IPS, SNIPS and DR estimates of several predictors' true MSE on the
              simulator, over `estimator_draws` exposure draws: bias (mean - truth) and spread (sd).
  ratings     the simulator's confounded world: MF trained naively vs MF-IPS (true and naive-Bayes
              propensities) vs DR-JL, judged on the true ratings of a missing-at-random split
              (MSE, MAE, AUC of rating >= 4, NDCG@5 within the split's cells), over `seeds`.
  implicit    a staged, popularity-drifting world: clicks (exposed and rated >= 4) of the first
              stages train BPR-MF, PD / PDA, MACR and DecRS (with its FM); judged on the last
              stage's true relevance on a MAR split (AUC, NDCG@5) and on its logged clicks
              (Recall@20, NDCG@20, training items masked), over `seeds`.
  coat        naive MF, MF-IPS and DR-JL on Coat (the authors' propensities): MSE / MAE on the
              random test split, AUC and NDCG@5 of rating >= 4, beside Schnabel et al.'s figures.
  ml100k      MovieLens-100K, PDA's temporal split: Recall@20 / NDCG@20 of BPR-MF, PD and PDA;
              skipped (with the reason printed) when `ml100k_path` is empty or missing.
  tower       a DCN-v2 CTR tower on (user, item) ids, trained on the simulator's observed cells
              (label: rating >= 4) with and without IPS weights; AUC, logloss and calibration on
              the MAR split.

Every model trains through `jaxml.train.train` (`make_train_step` on the objective's loss).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import report
from jaxml import train as jt
from jaxml.recsys import metrics as ctr_metrics
from jaxml.recsys import towers
from jaxml.recsys.causal import (_checks, data, estimators, metrics, mf, movielens, objectives, popularity, propensity,
                                 simulator, towers_adapter)

# Schnabel et al., ICML 2016, Table 2 (Coat test set), as quoted in the project's reference notes
# (`specs/causal_recsys.md`); not re-read from the paper in this session.
COAT_PUBLISHED = {"MF-Naive": {"mae": 0.920, "mse": 1.202}, "MF-IPS": {"mae": 0.860, "mse": 1.093}}
COAT_SOURCE = "Schnabel et al. 2016, Table 2 (as quoted in the reference notes; unverified)"


# ----------------------------------------------------------------------------- training


_STEPS: dict = {}


def _loss_key(loss_fn):
  """A hashable identity for a `functools.partial` loss (None when a keyword is an array)."""
  if not isinstance(loss_fn, functools.partial) or loss_fn.args:
    return None
  try:
    key = (loss_fn.func, tuple(sorted(loss_fn.keywords.items())))
    hash(key)
  except TypeError:
    return None
  return key


def fit_model(loss_fn, init_fn: Callable, batch_fn: Callable[[int], dict], *, steps: int, lr: float, seed: int,
              steps_per_call: int = 50, dr_jl_period: int | None = None) -> tuple[dict, list]:
  """Trains `init_fn(rng)` on `loss_fn` with Adam through `jaxml.train.fit` (no checkpoints: each fit takes
  seconds); returns (params, history).

  Runs with the same loss (the same function and keywords) and learning rate share one compiled
  step (the jit cache then only retraces for new shapes). `dr_jl_period`: `loss_fn` is a partial of
  `objectives.dr_jl_loss`, trained with the paper's alternating updates
  (`objectives.make_dr_jl_alternating_step`, `period` steps per model and phase) instead of the
  simultaneous step.
  """
  steps = max(steps_per_call, steps // steps_per_call * steps_per_call)
  tx, _ = jt.make_optimizer(lr, total_steps=steps, kind="adam", schedule="constant", clip_norm=None, b1=0.9,
                            b2=0.999, eps=1e-8)
  key = _loss_key(loss_fn)
  key = None if key is None else (key, lr, steps_per_call, dr_jl_period)
  step = _STEPS.get(key) if key is not None else None
  if step is None:
    if dr_jl_period is None:
      built = jt.make_train_step(loss_fn, tx, steps_per_call=steps_per_call)
    else:
      if not (isinstance(loss_fn, functools.partial) and loss_fn.func is objectives.dr_jl_loss and not loss_fn.args):
        raise ValueError("dr_jl_period needs loss_fn = functools.partial(objectives.dr_jl_loss, **keywords)")
      built = objectives.make_dr_jl_alternating_step(tx, period=dr_jl_period, steps_per_call=steps_per_call,
                                                     **loss_fn.keywords)
    step = jax.jit(built, donate_argnums=0)
    if key is not None:
      _STEPS[key] = step
  state_tx = tx if dr_jl_period is None else objectives.dr_jl_optimizer(tx)
  result = jt.fit(None, init_fn, state_tx, jax.random.PRNGKey(seed), num_steps=steps, batch_fn=batch_fn, step=step,
                  steps_per_call=steps_per_call, log_every=steps, print_fn=lambda s: None)
  return result.state.params, result.history


def _const(batch):
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return lambda step: batch


def bpr_batches(users, items, stages, pop_SxI, n_items, batch_size, seed):
  """`batch_fn(step)` of PDA triples: positives drawn uniformly, negatives uniform over items."""
  users, items, stages = (np.asarray(a) for a in (users, items, stages))
  pop = np.asarray(pop_SxI, np.float32)

  def at(step):
    rng = np.random.default_rng([seed, step])
    k = rng.integers(0, users.size, batch_size)
    neg = rng.integers(0, n_items, batch_size)
    return {"users": users[k].astype(np.int32), "pos_items": items[k].astype(np.int32),
            "neg_items": neg.astype(np.int32), "pos_pop": pop[stages[k], items[k]],
            "neg_pop": pop[stages[k], neg]}

  return at


def click_batches(users, items, n_items, batch_size, seed):
  """`batch_fn(step)` of labelled pairs: half positives, half uniform negatives (label 0)."""
  users, items = np.asarray(users), np.asarray(items)
  half = batch_size // 2

  def at(step):
    rng = np.random.default_rng([seed, step])
    k = rng.integers(0, users.size, half)
    neg_u = users[rng.integers(0, users.size, half)]
    return {"users": np.concatenate([users[k], neg_u]).astype(np.int32),
            "items": np.concatenate([items[k], rng.integers(0, n_items, half)]).astype(np.int32),
            "labels": np.concatenate([np.ones(half), np.zeros(half)]).astype(np.float32)}

  return at


# ----------------------------------------------------------------------------- section: estimators


def _shape(config) -> dict:
  n_users, n_items = config.world_shape
  return {"n_users": int(n_users), "n_items": int(n_items)}


def _predictors(y, rng):
  """Schnabel-style predictors of a true rating matrix (their errors depend on the rating)."""
  rotate = np.where(y == 1, 5, y - 1).astype(np.float32)
  skewed = np.clip(y + rng.normal(0.0, (6.0 - y) / 2.0), 1, 5).astype(np.float32)
  return {"constant 3": np.full_like(y, 3.0, dtype=np.float32), "rotate (Y-1, 1->5)": rotate,
          "skewed N(Y, (6-Y)/2)": skewed}


def estimators_section(config, log) -> dict:
  rows = []
  shape = _shape(config)
  for world, cfg in (("schnabel", simulator.schnabel_config(**shape)),
                     ("confounded", simulator.confounded_config(**shape))):
    sim = simulator.RatingSimulator(cfg)
    y = sim.ratings_UxI.astype(np.float32)
    p = sim.propensities_UxI.astype(np.float32)
    draws = jnp.asarray(sim.sample_observed(0, n_draws=config.estimator_draws))
    for name, pred in _predictors(y, np.random.default_rng(0)).items():
      e = np.square(pred - y)
      truth = float(e.mean())

      def one(o, e=e, pred=pred):
        o_f = o.astype(jnp.float32)
        r_bar = jnp.sum(o_f * y) / jnp.sum(o_f)            # the imputed rating: the observed mean
        e_hat = jnp.square(pred - r_bar)
        return jnp.stack([estimators.naive_risk(e, o), estimators.ips_risk(e, o, p),
                          estimators.snips_risk(e, o, p), estimators.dr_risk(e, o, p, e_hat)])

      est = np.asarray(jax.jit(jax.vmap(one))(draws), np.float64)
      for col, est_name in enumerate(("naive", "IPS", "SNIPS", "DR")):
        rows.append({"world": world, "predictor": name, "estimator": est_name, "truth": truth,
                     "bias": float(est[:, col].mean() - truth), "sd": float(est[:, col].std(ddof=1))})
  log(f"estimators: {len(rows)} rows over {config.estimator_draws} draws")
  return {"rows": rows}


# ----------------------------------------------------------------------------- rating metrics


def rating_metrics(pred_UxI, ratings_UxI, mask_UxI, *, threshold=4) -> dict:
  """MSE / MAE (predictions clipped to the rating range), AUC and NDCG@5 of rating >= threshold in the mask."""
  pred = np.clip(np.asarray(pred_UxI, np.float32), 1.0, 5.0)
  mask = np.asarray(mask_UxI, bool)
  labels = (np.asarray(ratings_UxI) >= threshold) & mask
  users = labels.any(1)
  out = {"mse": float(metrics.masked_mse(pred, ratings_UxI, mask)),
         "mae": float(metrics.masked_mae(pred, ratings_UxI, mask)),
         "auc": float(metrics.masked_auc(labels.astype(np.float32), np.asarray(pred_UxI, np.float32), mask))}
  out["ndcg@5"] = float(metrics.ndcg_at_k(np.asarray(pred_UxI, np.float32)[users], labels[users], ~mask[users], 5))
  return out


def train_rating_models(train_UxI, observed, p_true, p_nb, cfg_fit, seed) -> dict:
  """Naive MF, MF-IPS (true / naive-Bayes propensities) and DR-JL (naive-Bayes); returns score matrices."""
  n_u, n_i = observed.shape
  out = {}
  batches = {"MF (naive)": mf.observed_batch(train_UxI, observed)}
  if p_true is not None:
    batches["MF-IPS (true p)"] = mf.observed_batch(train_UxI, observed, mf.ips_weights(observed, p_true))
  batches["MF-IPS (naive Bayes p)"] = mf.observed_batch(train_UxI, observed, mf.ips_weights(observed, p_nb))
  for name, b in batches.items():
    mean = float(np.average(b["ratings"], weights=b["weights"]))
    loss = functools.partial(mf.mf_ips_loss, l2=cfg_fit.l2)
    params, _ = fit_model(loss, lambda r, mean=mean: mf.mf_init(r, n_u, n_i, cfg_fit.dim, global_bias=mean), _const(b),
                    steps=cfg_fit.steps, lr=cfg_fit.lr, seed=seed)
    out[name] = np.asarray(mf.mf_scores(params))
  dr_props = {"DR-JL (naive Bayes p)": p_nb}
  if p_true is not None:
    dr_props = {"DR-JL (true p)": p_true, **dr_props}
  mean = float(np.asarray(train_UxI)[observed].mean())
  period = cfg_fit.get("dr_jl_period") or None
  for name, p in dr_props.items():
    b = objectives.all_cells_batch(train_UxI, observed, p)
    loss = functools.partial(objectives.dr_jl_loss, l2=cfg_fit.l2, imputation_l2=cfg_fit.imputation_l2)
    # Alternating: each model takes cfg_fit.steps updates, so twice as many steps in all.
    params, _ = fit_model(loss, lambda r: objectives.dr_jl_init(r, n_u, n_i, cfg_fit.dim, global_bias=mean), _const(b),
                    steps=cfg_fit.steps * (1 if period is None else 2), lr=cfg_fit.lr, seed=seed, dr_jl_period=period)
    out[name] = np.asarray(mf.mf_scores(params["prediction"]))
  return out


def ratings_section(config, log) -> dict:
  sim = simulator.RatingSimulator(simulator.confounded_config(seed=config.world_seed, **_shape(config)))
  per = {}
  for seed in config.seeds:
    split = sim.sample_split(seed, mar_per_user=config.mar_test_per_user)
    o = split["observed_UxI"]
    mar_sample = np.where(sim.mar_mask(seed + 1000, config.mar_sample_per_user), sim.ratings_UxI, 0)
    p_nb = np.asarray(propensity.rating_propensities(propensity.naive_bayes_propensity(split["train_UxI"], mar_sample),
                                                     split["train_UxI"]))
    scores = train_rating_models(split["train_UxI"], o, split["propensities_UxI"], p_nb, config.fit, seed)
    test = split["mar_UxI"] & ~o                      # MAR cells the models did not train on
    for name, s in scores.items():
      per.setdefault(name, []).append(rating_metrics(s, split["ratings_UxI"], test))
  rows = [{"model": k, **_mean_sd(v)} for k, v in per.items()]
  log("ratings: " + ", ".join(f"{r['model']} mse={r['mse']:.3f}" for r in rows))
  return {"rows": rows}


def _mean_sd(runs: list[dict]) -> dict:
  out = {}
  for k in runs[0]:
    v = np.asarray([r[k] for r in runs], np.float64)
    out[k] = float(v.mean())
    out[f"{k}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
  return out


# ----------------------------------------------------------------------------- section: implicit (PDA, MACR, DecRS)


def implicit_models(train_pos_TxUxI, n_items, item_groups_IxG, c, seed) -> dict:
  """BPR-MF, PD, PDA, MACR and DecRS (+FM) on stage-wise positives; returns {name: score matrix [U, I]}."""
  n_t, n_u, _ = train_pos_TxUxI.shape
  st, us, it = np.nonzero(train_pos_TxUxI)
  counts = np.stack([train_pos_TxUxI[t].sum(0) for t in range(n_t)])
  pop = np.asarray(popularity.stage_popularity(counts))
  init = lambda r: mf.mf_init(r, n_u, n_items, c.dim)  # noqa: E731
  out = {}
  for gamma, names in ((0.0, ("BPR-MF",)), (c.pda_gamma, ("PD", "PDA"))):
    loss = functools.partial(objectives.pda_loss, gamma=gamma, l2=c.l2)
    params, _ = fit_model(loss, init, bpr_batches(us, it, st, pop, n_items, c.batch_size, seed), steps=c.steps, lr=c.lr,
                    seed=seed)
    f = mf.mf_scores(params)
    if gamma == 0.0:
      out["BPR-MF"] = np.asarray(f)
    else:
      out["PD"] = np.asarray(popularity.pd_inference(f))
      prev = pop[-2] if n_t > 1 else None
      out["PDA"] = np.asarray(popularity.pda_inference(f, pop[-1], gamma=gamma, pop_prev_I=prev))
  clicks = click_batches(us, it, n_items, c.batch_size, seed)
  loss = functools.partial(objectives.macr_train_loss, alpha=c.macr_alpha, beta=c.macr_beta, l2=c.l2)
  params, _ = fit_model(loss, lambda r: objectives.macr_init(init(r), n_u, n_items), clicks, steps=c.steps, lr=c.lr,
                  seed=seed)
  y_k = mf.mf_scores(params["backbone"])
  out["MACR (c=0: training score)"] = np.asarray(objectives.macr_scores(params, y_k, 0.0))
  out[f"MACR (c={c.macr_c})"] = np.asarray(objectives.macr_scores(params, y_k, c.macr_c))
  loss = functools.partial(objectives.bce_loss, l2=c.l2)
  fm_params, _ = fit_model(loss, init, clicks, steps=c.steps, lr=c.lr, seed=seed)
  fm_logits = mf.mf_scores(fm_params)
  out["FM (BCE)"] = np.asarray(fm_logits)
  pos = train_pos_TxUxI.any(0)
  d_u = objectives.group_distribution(pos, item_groups_IxG)
  prior = d_u[pos.any(1)].mean(0)
  loss = functools.partial(objectives.decrs_loss, prior_G=jnp.asarray(prior, jnp.float32), l2=c.l2)
  dec_params, _ = fit_model(loss, lambda r: objectives.decrs_init(r, n_u, n_items, item_groups_IxG.shape[1], c.dim), clicks,
                      steps=c.steps, lr=c.lr, seed=seed)
  first = objectives.group_distribution(train_pos_TxUxI[: max(1, n_t // 2)].any(0), item_groups_IxG)
  second = objectives.group_distribution(train_pos_TxUxI[max(1, n_t // 2):].any(0), item_groups_IxG)
  lam = objectives.decrs_lambda(first, second, c.decrs_alpha)
  out["DecRS (mix)"] = np.asarray(objectives.decrs_mix(objectives.decrs_scores(dec_params, prior), fm_logits, lam))
  return out


def ranking_metrics(scores, relevant, exclude, ks=(20,)) -> dict:
  keep = (relevant & ~exclude).any(1)
  out = {}
  for k in ks:
    out[f"recall@{k}"] = float(metrics.recall_at_k(scores[keep], relevant[keep], exclude[keep], k))
    out[f"ndcg@{k}"] = float(metrics.ndcg_at_k(scores[keep], relevant[keep], exclude[keep], k))
  return out


def implicit_section(config, log) -> dict:
  c = config.implicit
  cfg = simulator.confounded_config(n_stages=c.n_stages, popularity_drift=c.popularity_drift, density=c.density,
                                    seed=config.world_seed, **_shape(config))
  sim = simulator.RatingSimulator(cfg)
  groups = np.eye(cfg.dim)[np.argmax(sim.item_factors_IxD, 1)]        # item group: its largest true factor
  per = {}
  last = cfg.n_stages - 1
  y_last = sim.ratings_TxUxI[last]
  for seed in config.seeds:
    pos = np.stack([sim.sample_observed(seed, stage=t) & (sim.ratings_TxUxI[t] >= 4) for t in range(last)])
    train = pos.any(0)
    test_logged = sim.sample_observed(seed, stage=last) & (y_last >= 4) & ~train
    mar = sim.mar_mask(seed, config.mar_test_per_user) & ~train
    scores = implicit_models(pos, cfg.n_items, groups, c, seed)
    for name, s in scores.items():
      m = {"mar_auc": float(metrics.masked_auc((y_last >= 4).astype(np.float32), s, mar)),
           "mar_ndcg@5": float(metrics.ndcg_at_k(s[(mar & (y_last >= 4)).any(1)], (mar & (y_last >= 4))[
               (mar & (y_last >= 4)).any(1)], ~mar[(mar & (y_last >= 4)).any(1)], 5))}
      m.update({f"logged_{k}": v for k, v in ranking_metrics(s, test_logged, train).items()})
      per.setdefault(name, []).append(m)
  rows = [{"model": k, **_mean_sd(v)} for k, v in per.items()]
  log("implicit: " + ", ".join(f"{r['model']} auc={r['mar_auc']:.3f} r@20={r['logged_recall@20']:.3f}" for r in rows))
  return {"rows": rows}


# ----------------------------------------------------------------------------- section: Coat


def coat_section(config, log) -> dict:
  coat = data.load_coat()
  train, test = coat["train_UxI"], coat["test_UxI"]
  o = train > 0
  per = {}
  for seed in config.seeds:
    scores = train_rating_models(train, o, None, coat["propensities_UxI"], config.coat_fit, seed)
    overlap = _checks.warn_mar_overlap("train_UxI", o, "test_UxI", test > 0)   # Coat's split shares cells: warns
    for name, s in scores.items():
      per.setdefault(name.replace("naive Bayes p", "authors' p"), []).append(rating_metrics(s, test, test > 0))
  rows = [{"model": k, **_mean_sd(v)} for k, v in per.items()]
  log("coat: " + ", ".join(f"{r['model']} mse={r['mse']:.3f} mae={r['mae']:.3f}" for r in rows))
  return {"rows": rows, "published": COAT_PUBLISHED, "published_source": COAT_SOURCE, "train_test_overlap": overlap}


# ----------------------------------------------------------------------------- section: ML-100K


def ml100k_section(config, log) -> dict:
  path = config.ml100k_path
  if not path or not os.path.exists(path):
    reason = ("config.ml100k_path is empty" if not path else f"{path} does not exist") + \
        " (MovieLens-100K ships in the recbole wheel: recbole/dataset_example/ml-100k/ml-100k.inter)"
    log(f"ml100k: skipped: {reason}")
    return {"skipped": reason}
  c = config.ml100k
  split = movielens.temporal_split(movielens.read_inter(path), c.n_stages)
  pop = np.asarray(popularity.stage_popularity(split["counts_SxI"]))
  n_u, n_i = split["n_users"], split["n_items"]
  init = lambda r: mf.mf_init(r, n_u, n_i, c.dim)  # noqa: E731
  rows = []
  for seed in config.seeds[:1]:
    for label, gamma in (("BPR-MF", 0.0), ("PD", c.pd_gamma), ("PDA", c.pda_gamma)):
      loss = functools.partial(objectives.pda_loss, gamma=gamma, l2=c.l2)
      params, _ = fit_model(loss, init, bpr_batches(split["train_users"], split["train_items"], split["train_stages"], pop,
                                              n_i, c.batch_size, seed), steps=c.steps, lr=c.lr, seed=seed)
      f = mf.mf_scores(params)
      if label == "BPR-MF":
        s = f
      elif label == "PD":
        s = popularity.pd_inference(f)
      else:
        s = popularity.pda_inference(f, pop[-1], gamma=gamma, pop_prev_I=pop[-2])
      m = ranking_metrics(np.asarray(s), split["test_UxI"], split["train_UxI"], ks=(20,))
      rows.append({"model": f"{label} (gamma={gamma})", **m})
  log("ml100k: " + ", ".join(f"{r['model']} r@20={r['recall@20']:.4f}" for r in rows))
  return {"rows": rows, "n_users": n_u, "n_items": n_i, "n_test_pairs": int(split["test_UxI"].sum())}


# ----------------------------------------------------------------------------- section: CTR tower


def tower_section(config, log) -> dict:
  c = config.tower
  sim = simulator.RatingSimulator(simulator.confounded_config(seed=config.world_seed, **_shape(config)))
  cfg = towers_adapter.id_tower_config(c.kind, sim.cfg.n_users, sim.cfg.n_items, embed_dim=c.embed_dim,
                                       hidden=tuple(c.hidden), cross_layers=c.cross_layers)
  per = {}
  for seed in config.seeds:
    split = sim.sample_split(seed, mar_per_user=config.mar_test_per_user)
    o = split["observed_UxI"]
    u, i = np.nonzero(o)
    labels = (split["ratings_UxI"][u, i] >= 4).astype(np.float32)
    w_ips = np.asarray(mf.ips_weights(o, split["propensities_UxI"]))[u, i]
    test = split["mar_UxI"] & ~o
    truth = (split["ratings_UxI"] >= 4).astype(np.float32)[test]
    for name, w, sn in (("tower (naive)", np.ones_like(w_ips), False), ("tower + IPS", w_ips, False),
                        ("tower + SNIPS", w_ips, True)):
      b = towers_adapter.tower_batch(u, i, labels_B=labels, weights_B=w)
      loss = functools.partial(towers_adapter.tower_ips_loss, cfg=cfg, self_normalize=sn)
      params, _ = fit_model(loss, lambda r: towers.init(r, cfg), lambda s, b=b: b, steps=c.steps, lr=c.lr, seed=seed)
      probs = jax.nn.sigmoid(towers_adapter.tower_logits(params, cfg, *o.shape))[test]
      per.setdefault(name, []).append({"auc": float(ctr_metrics.auc(truth, probs)),
                                       "logloss": float(ctr_metrics.logloss(truth, probs)),
                                       "calibration": float(ctr_metrics.calibration(truth, probs))})
  rows = [{"model": k, **_mean_sd(v)} for k, v in per.items()]
  log("tower: " + ", ".join(f"{r['model']} auc={r['auc']:.3f} ll={r['logloss']:.3f} cal={r['calibration']:.2f}"
                            for r in rows))
  return {"rows": rows, "tower": c.kind}


# ----------------------------------------------------------------------------- tables, figure, contract


def tables(res: dict) -> str:
  out = []
  est = res["estimators"]["rows"]
  out.append("## Estimators of the true MSE (bias and sd over exposure draws)\n")
  out.append(report.markdown_table(["world", "predictor", "true MSE", "estimator", "bias", "sd"],
                                   [[r["world"], r["predictor"], r["truth"], r["estimator"], r["bias"], r["sd"]]
                                    for r in est]))

  def mtable(title, rows, keys):
    head = ["model"] + [k for k in keys]
    cells = [[r["model"]] + [f"{r[k]:.4f}" + (f" ± {r[k + '_sd']:.4f}" if np.isfinite(r.get(k + "_sd", np.nan))
                                              else "") for k in keys] for r in rows]
    return f"## {title}\n\n" + report.markdown_table(head, cells)

  out.append(mtable("Simulator, ratings: true quality on the MAR split", res["ratings"]["rows"],
                    ("mse", "mae", "auc", "ndcg@5")))
  out.append(mtable("Simulator, implicit clicks with drifting popularity", res["implicit"]["rows"],
                    ("mar_auc", "mar_ndcg@5", "logged_recall@20", "logged_ndcg@20")))
  coat = res["coat"]
  out.append(mtable("Coat (random test split)", coat["rows"], ("mse", "mae", "auc", "ndcg@5")))
  out.append(f"Published ({coat['published_source']}): " + "; ".join(
      f"{k} MSE {v['mse']:.3f} MAE {v['mae']:.3f}" for k, v in coat["published"].items()) +
      f". Coat's train and test share {coat['train_test_overlap']} cells.\n")
  ml = res["ml100k"]
  if "skipped" in ml:
    out.append(f"## ML-100K\n\nskipped: {ml['skipped']}\n")
  else:
    out.append(f"## ML-100K, temporal split ({ml['n_users']} users, {ml['n_items']} items, {ml['n_test_pairs']} "
               "test pairs)\n\n" + report.markdown_table(["model", "Recall@20", "NDCG@20"],
                                                        [[r["model"], r["recall@20"], r["ndcg@20"]] for r in ml["rows"]],
                                                        digits=4))
  out.append(mtable(f"CTR tower ({res['tower']['tower']}) on the simulator, MAR split", res["tower"]["rows"],
                    ("auc", "logloss", "calibration")))
  return "\n".join(out)


def figure(res: dict, path: str) -> None:
  with report.figure(path, figsize=(18, 8)) as fig:
    axes = fig.subplots(2, 3)
    ax = axes[0, 0]
    est = [r for r in res["estimators"]["rows"] if r["world"] == "confounded"]
    preds = list(dict.fromkeys(r["predictor"] for r in est))
    names = ("naive", "IPS", "SNIPS", "DR")
    for j, name in enumerate(names):
      rs = [next(r for r in est if r["predictor"] == p and r["estimator"] == name) for p in preds]
      ax.errorbar(np.arange(len(preds)) + 0.15 * (j - 1.5), [r["bias"] for r in rs], yerr=[r["sd"] for r in rs],
                  fmt="o", capsize=3, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(preds)), preds, fontsize=8)
    ax.set_ylabel("estimate - true MSE (± sd over draws)")
    ax.set_title("confounded world: risk estimators")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    rows = res["ratings"]["rows"]
    ax.barh(range(len(rows)), [r["mse"] for r in rows], xerr=[np.nan_to_num(r["mse_sd"]) for r in rows])
    ax.set_yticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("true MSE on the MAR split")
    ax.set_title("simulator: rating models")
    ax = axes[1, 0]
    rows = res["implicit"]["rows"]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["mar_auc"] for r in rows], 0.4, label="MAR AUC (true relevance)")
    ax.bar(x + 0.2, [r["logged_recall@20"] for r in rows], 0.4, label="logged Recall@20 (next stage)")
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0.3, 0.9)
    ax.set_title("simulator: implicit clicks, drifting popularity")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    rows = res["coat"]["rows"]
    ax.barh(range(len(rows)), [r["mse"] for r in rows], label="jaxml (MSE)")
    for k, (name, v) in enumerate(res["coat"]["published"].items()):
      ax.axvline(v["mse"], color=f"C{k + 1}", ls="--", lw=1, label=f"{name} published MSE")
    ax.set_yticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MSE on Coat's random test split")
    ax.set_title("Coat")
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    ml = res["ml100k"]
    if "skipped" in ml:
      ax.text(0.5, 0.5, "ML-100K skipped:\n" + ml["skipped"][:60], ha="center", va="center", fontsize=8, wrap=True)
      ax.set_axis_off()
    else:
      x = np.arange(len(ml["rows"]))
      ax.bar(x - 0.2, [r["recall@20"] for r in ml["rows"]], 0.4, label="Recall@20")
      ax.bar(x + 0.2, [r["ndcg@20"] for r in ml["rows"]], 0.4, label="NDCG@20")
      ax.set_xticks(x, [r["model"] for r in ml["rows"]], fontsize=8)
      ax.set_title("ML-100K, temporal split (last stage)")
      ax.legend(fontsize=8)
    ax = axes[1, 2]
    rows = res["tower"]["rows"]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["auc"] for r in rows], 0.4, label="AUC")
    ax.bar(x + 0.2, [r["logloss"] for r in rows], 0.4, label="logloss")
    for j, r in enumerate(rows):
      ax.annotate(f"calib {r['calibration']:.2f}", (j, max(r["auc"], r["logloss"])), ha="center", fontsize=7,
                  xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, [r["model"] for r in rows], fontsize=8)
    ax.set_title(f"CTR tower ({res['tower']['tower']}) on the MAR split")
    ax.legend(fontsize=8)


SECTIONS = ("estimators", "ratings", "implicit", "coat", "ml100k", "tower")


def run(config, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs `config.sections` (module docstring); writes results.json, results.md and summary.png to `workdir`.

  Returns:
    `{section: results, "seconds": {section: s}, "table": markdown, "preempted": False}`.
  """
  if not workdir:
    raise ValueError("the causal recommendation experiment needs a workdir (results and figure)")
  sections = tuple(config.sections)
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    raise ValueError(f"config.sections has unknown {unknown}; choose from {SECTIONS}")
  os.makedirs(workdir, exist_ok=True)
  fns = {"estimators": estimators_section, "ratings": ratings_section, "implicit": implicit_section,
         "coat": coat_section, "ml100k": ml100k_section, "tower": tower_section}
  res, seconds = {}, {}
  for name in sections:
    t0 = time.time()
    res[name] = fns[name](config, log)
    seconds[name] = time.time() - t0
    log(f"[{name}] {seconds[name]:.1f}s")
  out = dict(res, seconds=seconds)
  if set(SECTIONS) <= set(sections):
    out["table"] = tables(res)
    report.save_text(out["table"], os.path.join(workdir, "results.md"))
    figure(res, os.path.join(workdir, "summary.png"))
    log(out["table"])
  report.save_json(out, os.path.join(workdir, "results.json"))
  log(f"total {sum(seconds.values()):.0f}s; results in {os.path.join(workdir, 'results.json')}")
  return dict(out, preempted=False)

