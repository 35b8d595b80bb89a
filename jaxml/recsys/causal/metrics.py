"""Ranking metrics over full rankings, and rating metrics on a (MAR) test split.

Ranking. For user u, every item with `exclude_UxI` (the training items) is
removed from the ranking (scored -inf), the rest are ranked by score, and
`R(u) = {i : relevant_ui and not exclude_ui}` is the relevant set (an
excluded item cannot be recommended, so it cannot count as missed). With
`hit_uj = 1` when the item at rank j is in R(u):

    Recall@K = |top_K(u) & R(u)| / |R(u)|
    NDCG@K   = sum_{j<=K} hit_uj / log2(j + 1)  /  sum_{j<=min(|R(u)|, K)} 1 / log2(j + 1)
    HR@K     = 1[top_K(u) & R(u) is not empty]

each averaged over the users with a non-empty R(u); users with an empty one
are left out of the mean (RecBole evaluates only the users with test items;
scikit-learn's `ndcg_score` would count them as 0). If every R(u) is empty
the call raises (where concrete; under jit the mean is NaN). These are
RecBole's definitions (`recbole.evaluator.metrics`: Recall, NDCG, Hit).
Ties are broken by item index, lower first (`jax.lax.top_k`).

Ratings. `masked_mse`, `masked_mae` average over the cells of a mask (e.g.
the MAR test split); `masked_auc` is `jaxml.recsys.metrics.auc` (ties count
one half) over the mask's cells, with binary labels (e.g. rating >= 4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.recsys.causal import _checks
from jaxml.recsys.metrics import auc as _auc

Array = jax.Array


def _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k):
  _checks.matrix("scores_UxI", scores_UxI)
  _checks.same_shape("scores_UxI", scores_UxI, relevant_UxI=relevant_UxI, exclude_UxI=exclude_UxI)
  _checks.mask("relevant_UxI", relevant_UxI)
  if exclude_UxI is not None:
    _checks.mask("exclude_UxI", exclude_UxI)
  n_items = np.shape(scores_UxI)[1]
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_items:
    raise ValueError(f"k must be an integer in [1, {n_items}] (the number of items), got {k}")
  if _checks.is_concrete(relevant_UxI) and (exclude_UxI is None or _checks.is_concrete(exclude_UxI)):
    rel = np.asarray(relevant_UxI).astype(bool)
    if exclude_UxI is not None:
      rel = rel & ~np.asarray(exclude_UxI).astype(bool)
    if not rel.any():
      raise ValueError("relevant_UxI has no relevant item outside exclude_UxI for any user: every ranking "
                       "metric would be undefined")


@functools.partial(jax.jit, static_argnums=(3,))
def _ranked(scores, relevant, exclude, k):
  """hits [U, K] (1 where rank j holds a relevant item) and |R(u)| [U]."""
  s = scores.astype(jnp.float32)
  rel = relevant.astype(bool)
  if exclude is not None:
    ex = exclude.astype(bool)
    s = jnp.where(ex, -jnp.inf, s)
    rel = rel & ~ex
  _, top = jax.lax.top_k(s, k)
  hits = jnp.take_along_axis(rel, top, axis=1).astype(jnp.float32)
  return hits, rel.sum(1).astype(jnp.float32)


def _user_mean(per_user, n_rel):
  keep = n_rel > 0
  return jnp.sum(jnp.where(keep, per_user, 0.0)) / jnp.sum(keep)


def recall_at_k(scores_UxI: Array, relevant_UxI: Array, exclude_UxI: Array | None, k: int) -> Array:
  """Recall@K over full rankings (module docstring).

  Args:
    scores_UxI: [users, items] float scores, higher ranks first.
    relevant_UxI: [users, items] 0/1 or boolean, the test items.
    exclude_UxI: [users, items] 0/1 or boolean, items removed from the
      ranking (the training items), or None.
    k: the cut-off, 1 <= k <= items.

  Returns:
    A float32 scalar, the mean over users with a relevant item.
  """
  _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k)
  hits, n_rel = _ranked(scores_UxI, relevant_UxI, exclude_UxI, int(k))
  return _user_mean(hits.sum(1) / jnp.maximum(n_rel, 1.0), n_rel)


def ndcg_at_k(scores_UxI: Array, relevant_UxI: Array, exclude_UxI: Array | None, k: int) -> Array:
  """NDCG@K with binary relevance over full rankings (module docstring; arguments as `recall_at_k`).

  Returns:
    A float32 scalar, the mean over users with a relevant item.
  """
  _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k)
  hits, n_rel = _ranked(scores_UxI, relevant_UxI, exclude_UxI, int(k))
  discount = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
  dcg = hits @ discount
  ideal = jnp.cumsum(discount)[jnp.clip(n_rel.astype(jnp.int32), 1, k) - 1]
  return _user_mean(dcg / ideal, n_rel)


def hit_rate_at_k(scores_UxI: Array, relevant_UxI: Array, exclude_UxI: Array | None, k: int) -> Array:
  """HR@K: the fraction of users with a relevant item in their top K (module docstring; arguments as `recall_at_k`).

  Returns:
    A float32 scalar, the mean over users with a relevant item.
  """
  _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k)
  hits, n_rel = _ranked(scores_UxI, relevant_UxI, exclude_UxI, int(k))
  return _user_mean((hits.sum(1) > 0).astype(jnp.float32), n_rel)


def _check_masked(pred_name, pred, target_name, target, mask_UxI):
  _checks.same_shape(pred_name, pred, **{target_name: target, "mask_UxI": mask_UxI})
  _checks.mask("mask_UxI", mask_UxI)
  if _checks.is_concrete(mask_UxI) and not np.any(np.asarray(mask_UxI)):
    raise ValueError("mask_UxI selects no cell")


@jax.jit
def _masked_mean(values, mask):
  m = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(m > 0, values, 0.0)) / jnp.sum(m)


def masked_mse(predictions_UxI: Array, targets_UxI: Array, mask_UxI: Array) -> Array:
  """Mean squared error over the cells of `mask_UxI` (targets elsewhere are never read).

  Args:
    predictions_UxI, targets_UxI: [users, items] floats.
    mask_UxI: [users, items] 0/1 or boolean (e.g. the MAR test split).

  Returns:
    A float32 scalar.
  """
  _check_masked("predictions_UxI", predictions_UxI, "targets_UxI", targets_UxI, mask_UxI)
  d = jnp.asarray(predictions_UxI, jnp.float32) - jnp.asarray(targets_UxI, jnp.float32)
  return _masked_mean(jnp.square(d), jnp.asarray(mask_UxI))


def masked_mae(predictions_UxI: Array, targets_UxI: Array, mask_UxI: Array) -> Array:
  """Mean absolute error over the cells of `mask_UxI` (arguments as `masked_mse`)."""
  _check_masked("predictions_UxI", predictions_UxI, "targets_UxI", targets_UxI, mask_UxI)
  d = jnp.asarray(predictions_UxI, jnp.float32) - jnp.asarray(targets_UxI, jnp.float32)
  return _masked_mean(jnp.abs(d), jnp.asarray(mask_UxI))


def masked_auc(labels_UxI: Array, scores_UxI: Array, mask_UxI: Array) -> Array:
  """ROC AUC over the cells of `mask_UxI` (`jaxml.recsys.metrics.auc`; not jit-able: the mask selects).

  Args:
    labels_UxI: [users, items] 0/1 labels (e.g. `test >= 4`).
    scores_UxI: [users, items] float scores.
    mask_UxI: [users, items] 0/1 or boolean, concrete.

  Returns:
    A float32 scalar; NaN when the selected cells hold one class only.
  """
  _check_masked("labels_UxI", labels_UxI, "scores_UxI", scores_UxI, mask_UxI)
  _checks.mask("labels_UxI", labels_UxI)
  if not _checks.is_concrete(mask_UxI):
    raise ValueError("mask_UxI must be concrete (masked_auc selects cells; call it outside jit)")
  m = np.asarray(mask_UxI).astype(bool)
  return _auc(jnp.asarray(labels_UxI)[m], jnp.asarray(scores_UxI)[m])


@functools.partial(jax.jit, static_argnums=(3,))
def _all_at_k(scores, relevant, exclude, ks):
  hits, n_rel = _ranked(scores, relevant, exclude, max(ks))
  out = {}
  for k in ks:
    h = hits[:, :k]
    discount = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    ideal = jnp.cumsum(discount)[jnp.clip(n_rel.astype(jnp.int32), 1, k) - 1]
    out[f"recall@{k}"] = _user_mean(h.sum(1) / jnp.maximum(n_rel, 1.0), n_rel)
    out[f"ndcg@{k}"] = _user_mean((h @ discount) / ideal, n_rel)
    out[f"hit@{k}"] = _user_mean((h.sum(1) > 0).astype(jnp.float32), n_rel)
  return out


def ranking_metrics(scores_UxI: Array, relevant_UxI: Array, exclude_UxI: Array | None,
                    ks: tuple[int, ...] = (20,)) -> dict[str, Array]:
  """Recall, NDCG and HR at every k of `ks` from one top-max(ks) ranking (as `recall_at_k` etc. each compute).

  Returns:
    `{"recall@k", "ndcg@k", "hit@k"}` float32 scalars for each k.
  """
  ks = tuple(int(k) for k in ks)
  if not ks:
    raise ValueError("ks must name at least one cut-off")
  for k in ks:
    _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k)
  return _all_at_k(scores_UxI, relevant_UxI, exclude_UxI, ks)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _top_k_chunks(scores_fn_args, exclude, k, chunk):
  u, v, bu, bi = scores_fn_args
  n_u = u.shape[0]
  pad = -n_u % chunk
  pad_rows = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
  u_c = pad_rows(u).reshape(-1, chunk, u.shape[1])
  bu_c = pad_rows(bu).reshape(-1, chunk)
  ex_c = pad_rows(exclude).reshape(-1, chunk, exclude.shape[1])

  def one(args):
    uu, bb, ee = args
    s = uu @ v.T + bb[:, None] + bi[None, :]
    return jax.lax.top_k(jnp.where(ee, -jnp.inf, s), k)[1]

  return jax.lax.map(one, (u_c, bu_c, ex_c)).reshape(-1, k)[:n_u]


def mf_top_k(params: dict, exclude_UxI: Array, k: int, *, chunk: int = 1024) -> Array:
  """Every user's top-k items under MF (`mf.mf_scores`), `exclude_UxI` (training items) masked, in chunks.

  One compiled program scores `chunk` users at a time (`lax.map`), so the [users, items] score
  matrix is never held whole.

  Args:
    params: `mf.mf_init`'s layout (user, item, user_bias, item_bias, bias).
    exclude_UxI: [users, items] boolean, items never recommended.
    k: the list length.
    chunk: users per chunk.

  Returns:
    int32 [users, k] item ids, best first (ties: lower item index first).
  """
  n_u, n_i = params["user"].shape[0], params["item"].shape[0]
  _checks.matrix("exclude_UxI", exclude_UxI)
  if np.shape(exclude_UxI) != (n_u, n_i):
    raise ValueError(f"exclude_UxI has shape {tuple(np.shape(exclude_UxI))}, the model scores ({n_u}, {n_i})")
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_i:
    raise ValueError(f"k must be an integer in [1, {n_i}] (the number of items), got {k}")
  bias = params["item_bias"] + params["bias"]
  args = (params["user"], params["item"], params["user_bias"], bias)
  return _top_k_chunks(args, jnp.asarray(exclude_UxI, bool), int(k), int(min(chunk, n_u)))
