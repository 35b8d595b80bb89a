"""The CTR towers (`jaxml.recsys.towers`: MLP, DCN-v2, DLRM, DHEN) as backbones of the debiasing losses.

A tower reads raw categorical ids (`batch["cat"]` [B, C] int32, hashed into its table) and optional
dense features. The adapter feeds it the user id and the item id as two categorical fields (plus,
optionally, dense side features), so every `score_fn`-based objective (`objectives.pda_loss`,
`objectives.macr_train_loss`, `objectives.bce_loss`, `objectives.dr_jl_loss`) runs on a tower:

    cfg = towers_adapter.id_tower_config("dcnv2", n_users, n_items)
    params = towers.init(rng, cfg)
    score_fn = towers_adapter.tower_score_fn(cfg)          # score_fn(params, users_B, items_B) -> logits
    loss = functools.partial(objectives.pda_loss, gamma=0.1, score_fn=score_fn)

and `tower_ips_loss` is the (SN)IPS-weighted logloss on a tower batch (`tower_batch`):

    IPS    (1 / B) sum_b w_b l_b               (w = ips weights on the MSE scale, `mf.ips_weights`)
    SNIPS  sum_b w_b l_b / sum_b w_b            (`recsys.train.loss_fn` with `batch["weight"]`)

with l_b the logloss of example b; with every w_b = 1 both equal the plain tower loss.
Ids are hashed (`features.hash_ids`): `buckets_per_id` buckets per id keep collisions rare
(about 1 - exp(-1 / buckets_per_id) of ids share a bucket; 6% at the default 16).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.recsys import losses, towers
from jaxml.recsys.causal import _checks
from jaxml.recsys.config import FeatureConfig, TowerConfig

Array = jax.Array


def id_tower_config(kind: str, n_users: int, n_items: int, *, embed_dim: int = 8, hidden: tuple[int, ...] = (32, 16),
                    n_dense: int = 0, buckets_per_id: int = 16, **tower_fields) -> TowerConfig:
  """A `TowerConfig` whose inputs are (user id, item id) and `n_dense` dense features.

  Args:
    kind: "mlp", "dcnv2", "dlrm" or "dhen".
    n_users, n_items: the id ranges.
    embed_dim: D of every slot.
    hidden: the top MLP.
    n_dense: dense side features per example (0: ids only).
    buckets_per_id: hash buckets per id of each field.
    **tower_fields: any other `TowerConfig` field (cross_layers, dhen_modules, ...).
  """
  for name, v in (("n_users", n_users), ("n_items", n_items), ("buckets_per_id", buckets_per_id)):
    if int(v) != v or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v}")
  fc = FeatureConfig(n_dense=n_dense, vocab_sizes=(buckets_per_id * n_users + 1, buckets_per_id * n_items + 1),
                     embed_dim=embed_dim, dense_hidden=(max(embed_dim, 8),))
  return TowerConfig(features=fc, kind=kind, hidden=tuple(hidden), **tower_fields)


def tower_batch(users_B, items_B, *, labels_B=None, weights_B=None, dense_BxF=None) -> dict:
  """The tower's batch for (user, item) pairs: `cat` [B, 2] int32 (+ `label`, `weight`, `dense`)."""
  _checks.same_shape("users_B", users_B, items_B=items_B, labels_B=labels_B, weights_B=weights_B)
  out = {"cat": jnp.stack([jnp.asarray(users_B, jnp.int32), jnp.asarray(items_B, jnp.int32)], -1)}
  if labels_B is not None:
    out["label"] = jnp.asarray(labels_B, jnp.float32)
  if weights_B is not None:
    out["weight"] = jnp.asarray(weights_B, jnp.float32)
  if dense_BxF is not None:
    out["dense"] = jnp.asarray(dense_BxF, jnp.float32)
  return out


def tower_score_fn(cfg: TowerConfig):
  """`score_fn(params, users_B, items_B) -> logits [B]` of a tower from `id_tower_config` (ids only)."""
  if cfg.features.n_dense:
    raise ValueError("tower_score_fn feeds ids only; a tower with dense features needs its own batch "
                     "(tower_batch(..., dense_BxF=...)) and tower_ips_loss")

  def score(params, users_B, items_B):
    return towers.apply(params, {"cat": jnp.stack([users_B.astype(jnp.int32), items_B.astype(jnp.int32)], -1)}, cfg)

  return score


def tower_ips_loss(params: dict, batch: dict, rng: Array | None = None, *, cfg: TowerConfig,
                   self_normalize: bool = False) -> tuple[Array, dict]:
  """The (SN)IPS-weighted logloss of a tower (module docstring).

  Args:
    params: `towers.init(rng, cfg)`.
    batch: `tower_batch(...)` with `label` [B] and `weight` [B] (inverse-propensity weights).
    rng: unused.
    cfg: the tower.
    self_normalize: divide by the weight sum (SNIPS) instead of B.

  Returns:
    `(loss, {"logloss": the unweighted mean logloss, "weighted_logloss"})`.
  """
  del rng
  for key in ("label", "weight"):
    if key not in batch:
      raise ValueError(f"batch lacks {key!r}; a tower IPS batch holds cat, label and weight (tower_batch)")
  logits = towers.apply(params, batch, cfg)
  y, w = batch["label"], batch["weight"].astype(jnp.float32)
  snips = losses.logloss_from_logits(logits, y, w)
  loss = snips if self_normalize else snips * jnp.mean(w)
  return loss, {"logloss": losses.logloss_from_logits(logits, y), "weighted_logloss": loss}


def tower_logits(params: dict, cfg: TowerConfig, n_users: int, n_items: int, chunk: int = 16384) -> np.ndarray:
  """Every cell's logit [U, I] (ids-only tower), in chunks of `chunk` pairs."""
  score = jax.jit(tower_score_fn(cfg))
  u, i = np.indices((n_users, n_items))
  n = n_users * n_items
  pad = -n % chunk                                   # one chunk shape: one compile
  u = np.concatenate([u.ravel(), np.zeros(pad, np.int64)]).astype(np.int32)
  i = np.concatenate([i.ravel(), np.zeros(pad, np.int64)]).astype(np.int32)
  out = [np.asarray(score(params, jnp.asarray(u[s:s + chunk]), jnp.asarray(i[s:s + chunk])))
         for s in range(0, u.size, chunk)]
  return np.concatenate(out)[:n].reshape(n_users, n_items)
