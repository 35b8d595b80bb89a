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

Top-K and ties. Scores are first made canonical (`canonical_scores`: NaN
becomes -inf, -0.0 becomes +0.0), then items are ordered by score, higher
first, and among equal scores by item index, lower first: `jax.lax.top_k` on
the canonical scores (on its own, XLA:CPU's `top_k` orders bit patterns,
+0.0 above -0.0 and +NaN above everything). Every ranking function runs
through `jaxml.cpu_kernels.top_k` (a compiled bound-and-filter kernel, where it is
available on the CPU backend: `default_block`), `top_k_blocked` or plain
`top_k` on canonical scores, which return the same values and ids in the
same order. `top_k_blocked` splits each row
into blocks of `block` items, takes the top K blocks by their maximum (ties:
lower block first), and runs `top_k` over those K * block candidates kept in
item order. Exact because, under the order extended by the index, an item in
the overall top K lies in a top-K block: a block outside them has K blocks
ahead of it whose maxima all beat the item. (The float maximum agrees with
that order only without NaN and signed zeros: hence the canonical scores.)
On XLA:CPU, `top_k` over a 10,000-item row costs about as much as the
64-wide score product itself, and two `top_k`s over a few hundred items cost
far less; the kernel costs less again (benchmarks/causal_recsys_bench.py).

Ranking only what the metrics read. A user with an empty R(u) is left out of
every mean, so its row need not be ranked at all; and the metrics need each
relevant item's place, not the list. Under the order above, item i's 0-based
rank among the canonical scores (excluded items at -inf) is

    rank(u, i) = #{j : s_uj > s_ui} + #{j < i : s_uj = s_ui},

its position in `top_k`'s list, so it is a hit at K iff rank(u, i) < K.
`relevant_sets` (on the host: the sizes are shapes) lists the users with a
relevant item; `_ranked_sets` counts the ranks of those with at most
`COUNT_MAX_ITEMS` relevant items (one compare per (pair, item), no sort), runs
`top_k` on the rows of the others, and scatters both into the [U, K] hits
`_ranked` gathers from `top_k` over every row: the same hits, hence the same
floats. On ML-100K's temporal split 87 of 943 users have test items.
`ranking_metrics` and the single-K functions take this path where their masks
are concrete, `top_k` on every row under jit; `ranking_metrics_from_sets` takes
the sets (so it runs under jit), `mf_ranking_metrics` also scores only the
users ranked.

Ratings. `masked_mse`, `masked_mae` average over the cells of a mask (e.g.
the MAR test split); `masked_auc` is `jaxml.recsys.metrics.auc` (ties count
one half) over the mask's cells, with binary labels (e.g. rating >= 4).
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import cpu_kernels
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
  """hits [U, K] (1 where rank j holds a relevant item) and |R(u)| [U]; `top_k_blocked` (= `lax.top_k`)."""
  s = scores.astype(jnp.float32)
  rel = relevant.astype(bool)
  if exclude is not None:
    ex = exclude.astype(bool)
    s = jnp.where(ex, -jnp.inf, s)
    rel = rel & ~ex
  _, top = _top_k(s, k, default_block(s.shape[1], k))
  hits = jnp.take_along_axis(rel, top, axis=1).astype(jnp.float32)
  return hits, rel.sum(1).astype(jnp.float32)


COUNT_MAX_ITEMS = 10
"""Users with at most this many relevant items are ranked by counting, the others by `top_k` on their rows.

One-thread CPU time on ML-100K's temporal split (1,682 items, k = 20; benchmarks/causal_recsys_bench.py):
counting about 0.4 ns per (pair, item), `top_k` about 4 ns per (user, item): counting is the cheaper
up to about 10 relevant items a user."""


class RelevantSets(NamedTuple):
  """Every R(u), laid out for ranking (`relevant_sets` builds it); a pytree, so jit takes it.

  Only the E users with a non-empty R(u) are ranked: the others are left out of every mean. Of those,
  users with at most `count_max` relevant items have their (user, item) pairs listed and the ranks
  counted; the other H users are ranked by `top_k` on their rows. Every array is padded (`_bucket`)
  so that nearby sizes share one compiled program; padding indices are out of range (read clamped,
  written nowhere).

  Attributes:
    user_ids: [E] int32, the users ranked, ascending (padding: the number of users).
    rows: [P] int32, each counted pair's row in `user_ids` (padding: E).
    items: [P] int32, its item (padding: 0).
    ranked_rows: [H] int32, the rows in `user_ids` ranked by `top_k` (padding: E).
    ranked_relevant: [H, items] bool, their R(u) (padding: False).
    n_rel: [users] float32, |R(u)| of every user.
  """
  user_ids: Array
  rows: Array
  items: Array
  ranked_rows: Array
  ranked_relevant: Array
  n_rel: Array


def _bucket(n: int) -> int:
  """n rounded up to m * 2^e with 8 <= m < 16 (at most 1/8 padding; a few shapes per octave, so few compiles)."""
  if n <= 16:
    return n
  e = n.bit_length() - 4
  return -(-n >> e) << e


def _padded(values, size, fill, dtype):
  out = np.full((size, *np.shape(values)[1:]), fill, dtype)
  out[:len(values)] = values
  return jnp.asarray(out)


def relevant_sets(relevant_UxI, exclude_UxI=None, *, count_max: int = COUNT_MAX_ITEMS,
                  pad: bool = True) -> RelevantSets:
  """R(u) = {i : relevant_ui and not exclude_ui} of every user (module docstring), built on the host.

  Args:
    relevant_UxI: [users, items] 0/1 or boolean, concrete.
    exclude_UxI: [users, items] 0/1 or boolean, concrete, or None.
    count_max: users with at most this many relevant items are ranked by counting, the others by
      `top_k` (`COUNT_MAX_ITEMS`); 0 ranks every user by `top_k`. The metrics are the same either way.
    pad: round every size up (`_bucket`, at most 1/8 more); False keeps the exact sizes.

  Returns:
    A `RelevantSets` of device arrays, for `ranking_metrics_from_sets` and `mf_ranking_metrics`.
  """
  _checks.matrix("relevant_UxI", relevant_UxI)
  _checks.same_shape("relevant_UxI", relevant_UxI, exclude_UxI=exclude_UxI)
  if not _checks.is_concrete(relevant_UxI) or (exclude_UxI is not None and not _checks.is_concrete(exclude_UxI)):
    raise ValueError("relevant_sets needs concrete relevant_UxI and exclude_UxI (the sizes of the sets are "
                     "shapes); build them outside jit and pass them in")
  _checks.mask("relevant_UxI", relevant_UxI)
  if exclude_UxI is not None:
    _checks.mask("exclude_UxI", exclude_UxI)
  if isinstance(count_max, bool) or int(count_max) != count_max or count_max < 0:
    raise ValueError(f"count_max must be a non-negative integer, got {count_max}")
  rel = np.asarray(relevant_UxI).astype(bool)
  if exclude_UxI is not None:
    rel = rel & ~np.asarray(exclude_UxI).astype(bool)
  n_rel = rel.sum(1)
  users = np.nonzero(n_rel > 0)[0]
  sub = rel[users]
  counted = n_rel[users] <= count_max
  rows, items = np.nonzero(sub & counted[:, None])
  ranked = np.nonzero(~counted)[0]
  size = _bucket if pad else (lambda n: n)  # noqa: E731
  n_e = size(users.size)
  return RelevantSets(user_ids=_padded(users, n_e, rel.shape[0], np.int32),
                      rows=_padded(rows, size(rows.size), n_e, np.int32),
                      items=_padded(items, size(items.size), 0, np.int32),
                      ranked_rows=_padded(ranked, size(ranked.size), n_e, np.int32),
                      ranked_relevant=_padded(sub[ranked], size(ranked.size), False, bool),
                      n_rel=jnp.asarray(n_rel, jnp.float32))


def _rows_of(x, user_ids):
  return x[jnp.minimum(user_ids, x.shape[0] - 1)]     # padding reads the last user; it is written nowhere


def _compact_scores(scores, exclude, user_ids):
  """The rows `_ranked` ranks, for `user_ids` only: float32, excluded items -inf, canonical."""
  s = _rows_of(scores.astype(jnp.float32), user_ids)
  if exclude is not None:
    s = jnp.where(_rows_of(exclude.astype(bool), user_ids), -jnp.inf, s)
  return canonical_scores(s)


def _ranked_sets(s_ExI, sets, k):
  """`_ranked`'s hits [U, K] and |R(u)| from `_compact_scores`' rows: ranks counted, or `top_k` (module docstring)."""
  n_e, n_i = s_ExI.shape
  hits = jnp.zeros((n_e, k), jnp.float32)
  if sets.rows.size:
    r = jnp.minimum(sets.rows, n_e - 1)
    mine = s_ExI[r, sets.items][:, None]
    row = s_ExI[r]
    j = jnp.arange(n_i, dtype=jnp.int32)[None, :]
    rank = jnp.sum(jnp.where(j < sets.items[:, None], row >= mine, row > mine), axis=1, dtype=jnp.int32)
    hits = hits.at[sets.rows, rank].set(1.0, mode="drop")          # rank >= k: not a hit
  if sets.ranked_rows.size:
    _, top = _top_k(s_ExI[jnp.minimum(sets.ranked_rows, n_e - 1)], k, default_block(n_i, k))
    ranked = jnp.take_along_axis(sets.ranked_relevant, top, axis=1).astype(jnp.float32)
    hits = hits.at[sets.ranked_rows].set(ranked, mode="drop")
  n_u = sets.n_rel.shape[0]
  return jnp.zeros((n_u, k), jnp.float32).at[sets.user_ids].set(hits, mode="drop"), sets.n_rel


@functools.partial(jax.jit, static_argnums=(3,))
def _ranked_from_sets(scores, sets, exclude, k):
  return _ranked_sets(_compact_scores(scores, exclude, sets.user_ids), sets, k)


def _hits(scores, relevant, exclude, k):
  """`_ranked`'s hits and |R(u)|: from `relevant_sets` where the masks are concrete, else `_ranked` itself."""
  if _concrete_masks(relevant, exclude):
    return _ranked_from_sets(scores, relevant_sets(relevant, exclude), _as_mask(exclude), k)
  return _ranked(scores, relevant, exclude, k)


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
  hits, n_rel = _hits(scores_UxI, relevant_UxI, exclude_UxI, int(k))
  return _user_mean(hits.sum(1) / jnp.maximum(n_rel, 1.0), n_rel)


def ndcg_at_k(scores_UxI: Array, relevant_UxI: Array, exclude_UxI: Array | None, k: int) -> Array:
  """NDCG@K with binary relevance over full rankings (module docstring; arguments as `recall_at_k`).

  Returns:
    A float32 scalar, the mean over users with a relevant item.
  """
  _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k)
  hits, n_rel = _hits(scores_UxI, relevant_UxI, exclude_UxI, int(k))
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
  hits, n_rel = _hits(scores_UxI, relevant_UxI, exclude_UxI, int(k))
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


def _at_ks(hits, n_rel, ks):
  out = {}
  for k in ks:
    h = hits[:, :k]
    discount = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))
    ideal = jnp.cumsum(discount)[jnp.clip(n_rel.astype(jnp.int32), 1, k) - 1]
    out[f"recall@{k}"] = _user_mean(h.sum(1) / jnp.maximum(n_rel, 1.0), n_rel)
    out[f"ndcg@{k}"] = _user_mean((h @ discount) / ideal, n_rel)
    out[f"hit@{k}"] = _user_mean((h.sum(1) > 0).astype(jnp.float32), n_rel)
  return out


@functools.partial(jax.jit, static_argnums=(3,))
def _all_at_k(scores, relevant, exclude, ks):
  return _at_ks(*_ranked(scores, relevant, exclude, max(ks)), ks)


@functools.partial(jax.jit, static_argnums=(3,))
def _all_at_k_sets(scores, sets, exclude, ks):
  return _at_ks(*_ranked_from_sets(scores, sets, exclude, max(ks)), ks)


@functools.partial(jax.jit, static_argnums=(3,))
def _all_at_k_mf(params, sets, exclude, ks):
  u = jnp.minimum(sets.user_ids, params["user"].shape[0] - 1)
  s = (params["user"][u] @ params["item"].T + params["user_bias"][u][:, None] + params["item_bias"][None, :]
       + params["bias"])                                           # `mf.mf_scores`' rows u, the same expression
  if exclude is not None:
    s = jnp.where(_rows_of(exclude.astype(bool), sets.user_ids), -jnp.inf, s)
  return _at_ks(*_ranked_sets(canonical_scores(s), sets, max(ks)), ks)


def _check_ks(ks, n_items):
  if not tuple(ks):
    raise ValueError("ks must name at least one cut-off")
  for k in ks:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_items:
      raise ValueError(f"k must be an integer in [1, {n_items}] (the number of items), got {k}")
  return tuple(int(k) for k in ks)


def ranking_metrics(scores_UxI: Array, relevant_UxI: Array, exclude_UxI: Array | None,
                    ks: tuple[int, ...] = (20,)) -> dict[str, Array]:
  """Recall, NDCG and HR at every k of `ks` from one top-max(ks) ranking (as `recall_at_k` etc. each compute).

  With concrete masks, through `relevant_sets` (`ranking_metrics_from_sets`); under jit, `top_k` on
  every row. The same numbers either way.

  Returns:
    `{"recall@k", "ndcg@k", "hit@k"}` float32 scalars for each k.
  """
  ks = tuple(int(k) for k in ks)
  if not ks:
    raise ValueError("ks must name at least one cut-off")
  for k in ks:
    _check_ranking(scores_UxI, relevant_UxI, exclude_UxI, k)
  if _concrete_masks(relevant_UxI, exclude_UxI):
    return _all_at_k_sets(scores_UxI, relevant_sets(relevant_UxI, exclude_UxI), _as_mask(exclude_UxI), ks)
  return _all_at_k(scores_UxI, relevant_UxI, exclude_UxI, ks)


def _check_sets(n_users, n_items, sets, exclude_UxI, ks):
  if exclude_UxI is not None:
    if np.shape(exclude_UxI) != (n_users, n_items):
      raise ValueError(f"exclude_UxI has shape {tuple(np.shape(exclude_UxI))}; the scores are ({n_users}, "
                       f"{n_items})")
    _checks.mask("exclude_UxI", exclude_UxI)
  if np.shape(sets.n_rel) != (n_users,) or np.shape(sets.ranked_relevant)[1] != n_items:
    raise ValueError(f"sets are for {np.shape(sets.n_rel)[0]} users x {np.shape(sets.ranked_relevant)[1]} items "
                     f"but the scores are ({n_users}, {n_items}); build them from masks of the scores' shape")
  if _checks.is_concrete(sets.n_rel) and not np.any(np.asarray(sets.n_rel) > 0):
    raise ValueError("sets hold no relevant item for any user: every ranking metric would be undefined")
  return _check_ks(ks, n_items)


def ranking_metrics_from_sets(scores_UxI: Array, sets: RelevantSets, exclude_UxI: Array | None,
                              ks: tuple[int, ...] = (20,)) -> dict[str, Array]:
  """`ranking_metrics` with R(u) given as `relevant_sets(relevant_UxI, exclude_UxI)`: jit-able.

  Only users with a relevant item are ranked; a user with few is ranked by counting, rank(u, i) =
  #{j : s_uj > s_ui} + #{j < i : s_uj = s_ui} over the canonical scores with the excluded items at
  -inf, which is its position in `lax.top_k`'s order (module docstring); the others by `top_k` on
  their rows. The hits, hence every metric, are those of `ranking_metrics`.

  Args:
    scores_UxI: [users, items] float scores.
    sets: from `relevant_sets` on masks of this shape (built once, outside jit).
    exclude_UxI: [users, items] 0/1 or boolean, the mask `sets` was built with, or None.
    ks: the cut-offs.

  Returns:
    `{"recall@k", "ndcg@k", "hit@k"}` float32 scalars for each k.
  """
  _checks.matrix("scores_UxI", scores_UxI)
  ks = _check_sets(*np.shape(scores_UxI), sets, exclude_UxI, ks)
  return _all_at_k_sets(scores_UxI, sets, _as_mask(exclude_UxI), ks)


def mf_ranking_metrics(params: dict, sets: RelevantSets, exclude_UxI: Array | None,
                       ks: tuple[int, ...] = (20,)) -> dict[str, Array]:
  """`ranking_metrics_from_sets(mf.mf_scores(params), sets, exclude_UxI, ks)`, scoring only the users ranked.

  Users without a relevant item are left out of every mean, so their rows are never computed (as
  RecBole's full-sort evaluation scores only the users with test items). The rows are
  `mf.mf_scores`' expression on the gathered user factors.

  Args:
    params: `mf.mf_init`'s layout (user, item, user_bias, item_bias, bias).
    sets, exclude_UxI, ks: as `ranking_metrics_from_sets`.

  Returns:
    `{"recall@k", "ndcg@k", "hit@k"}` float32 scalars for each k.
  """
  ks = _check_sets(params["user"].shape[0], params["item"].shape[0], sets, exclude_UxI, ks)
  return _all_at_k_mf(params, sets, _as_mask(exclude_UxI), ks)


def _as_mask(x):
  return None if x is None else jnp.asarray(x)


def _concrete_masks(relevant, exclude) -> bool:
  return _checks.is_concrete(relevant) and (exclude is None or _checks.is_concrete(exclude))


def canonical_scores(scores: Array) -> Array:
  """NaN -> -inf (never ranked ahead of a real score), -0.0 -> +0.0 (equal to +0.0, ranked by index);
  float32 (`jaxml.cpu_kernels.canonical`)."""
  return cpu_kernels.canonical(scores)


def top_k_blocked(scores_UxI: Array, k: int, block: int = 50) -> tuple[Array, Array]:
  """`jax.lax.top_k` on canonical scores, by blocks (module docstring): the same values and ids, ties included.

  Equals `jax.lax.top_k(canonical_scores(scores_UxI), k)` on every input, hence `lax.top_k` itself on
  scores without NaN or -0.0.

  Args:
    scores_UxI: [rows, items] float scores (-inf for masked items).
    k: the list length, 1 <= k <= items.
    block: items per block (`auto_block` chooses one); rows are padded to a multiple of it with -inf,
      at higher indices than every real item, so padding is never returned (but costs time).

  Returns:
    (values [rows, k], int32 ids [rows, k]), best first.
  """
  n_rows, n = scores_UxI.shape
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
    raise ValueError(f"k must be an integer in [1, {n}] (the number of items), got {k}")
  if isinstance(block, bool) or int(block) != block or block < 1:
    raise ValueError(f"block must be a positive integer, got {block}")
  n_blocks = -(-n // block)
  s = canonical_scores(scores_UxI)
  if n_blocks <= k:                                  # no fewer candidates than items: plain top_k
    return jax.lax.top_k(s, k)
  if n_blocks * block != n:
    s = jnp.pad(s, ((0, 0), (0, n_blocks * block - n)), constant_values=-jnp.inf)
  s = s.reshape(n_rows, n_blocks, block)
  _, best = jax.lax.top_k(s.max(-1), k)
  best = jnp.sort(best, axis=1)                      # candidates in item order: top_k's tie rule carries over
  cand = jnp.take_along_axis(s, best[:, :, None], axis=1).reshape(n_rows, k * block)
  values, pos = jax.lax.top_k(cand, k)
  ids = jnp.take_along_axis(best, pos // block, axis=1) * block + pos % block
  return values, ids.astype(jnp.int32)


def auto_block(n_items: int, k: int) -> int | None:
  """The block `top_k_blocked` uses by default, or None for plain `top_k`.

  Blocks only where a row holds at least 400 k items, and only of a size that divides `n_items`
  (padding each chunk's scores cost more than blocking saved), preferring multiples of 8 near 40
  (XLA:CPU's vectorised float max). Measured on 2 shared cores, 20,000 users x 10,000 items, k = 20,
  chunks of 128 users, one run (load 13-14): blocks of 40 0.53 s, 80 0.60 s, 25 0.77 s, 50 0.95 s,
  16 1.19 s, plain `top_k` (chunks of 256) 1.37 s; blocks of 48 (padded to 10,032) 2.59 s. At
  ML-100K's 1,682 items and k = 20 blocks of 50 took 1.7x plain `top_k`'s time.
  """
  if n_items < 400 * k:
    return None
  for b in (40, 48, 32, 56, 64, 24, 72, 80, 16, 88, 96, 104, 112, 120, 128):
    if n_items % b == 0:
      return b
  for b in range(20, 129):
    if n_items % b == 0:
      return b
  return None


def default_block(n_items: int, k: int) -> int | str | None:
  """What the ranking functions run by default: "kernel" (`jaxml.cpu_kernels.top_k`, a compiled kernel)
  where it is available, else `auto_block`'s block (`top_k_blocked`) or None (plain `top_k`)."""
  return "kernel" if cpu_kernels.available() else auto_block(n_items, k)


def _top_k(s, k, block):
  """`lax.top_k(canonical_scores(s), k)` by the form `block` names (`default_block`): the same values and ids."""
  if block == "kernel":
    return cpu_kernels.top_k(s, k)
  return jax.lax.top_k(canonical_scores(s), k) if block is None else top_k_blocked(s, k, block)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _top_k_chunks(scores_fn_args, exclude, k, chunk, block, n_chunks, tail, offset):
  """The top-k ids of users `[offset, offset + n_chunks * chunk + tail)`: `n_chunks` whole chunks under
  `lax.map`, then a remainder of `tail` users. `offset` is traced (one program per shard size)."""
  u, v, bu, bi = scores_fn_args

  def one(start, size):
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)  # noqa: E731
    s = cut(u) @ v.T + cut(bu)[:, None] + bi[None, :]
    return _top_k(jnp.where(cut(exclude), -jnp.inf, s), k, block)[1]

  parts = []
  if n_chunks:
    parts.append(jax.lax.map(lambda i: one(offset + i * chunk, chunk), jnp.arange(n_chunks)).reshape(-1, k))
  if tail:
    parts.append(one(offset + n_chunks * chunk, tail))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _host_shards(n_chunks: int, tail: int, chunk: int, threads: int) -> list[tuple[int, int, int]]:
  """`(offset, whole chunks, tail)` per host thread: the chunks split as evenly as whole chunks allow,
  the remainder with the last shard."""
  threads = max(1, min(threads, n_chunks))
  out, offset = [], 0
  for t in range(threads):
    n = n_chunks // threads + (t < n_chunks % threads)
    out.append((offset, n, tail if t == threads - 1 else 0))
    offset += n * chunk
  return out


def _cpu_threads() -> int:
  """The host threads `mf_top_k` runs its shards on: the CPUs this process may use, on the CPU backend."""
  if jax.default_backend() != "cpu":
    return 1
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def mf_top_k(params: dict, exclude_UxI: Array, k: int, *, chunk: int = 128, block: int | str | None = "auto",
             threads: int | None = None) -> Array:
  """Every user's top-k items under MF (`mf.mf_scores`), `exclude_UxI` (training items) masked, in chunks.

  One compiled program scores `chunk` users at a time (`lax.map` over the whole chunks, then the
  remainder; nothing is padded or copied), so the [users, items] score matrix is never held whole.

  Args:
    params: `mf.mf_init`'s layout (user, item, user_bias, item_bias, bias).
    exclude_UxI: [users, items] boolean, items never recommended.
    k: the list length.
    chunk: users per chunk.
    block: how each chunk's top-k is taken, every form giving the same ids: "auto" (`default_block`:
      the compiled kernel `jaxml.cpu_kernels.top_k` where it is available, else `auto_block`),
      "kernel", `top_k_blocked`'s block (an integer), or None for plain `jax.lax.top_k`.
    threads: host threads, each running the program on its own share of the whole chunks (the
      same ids: rows are independent). XLA:CPU runs each `top_k` on one thread, so on a CPU with
      several cores the shards' top-Ks run at once. None: the CPUs this process may use on the CPU
      backend, 1 elsewhere.

  Returns:
    int32 [users, k] item ids, best first (ties: lower item index first).
  """
  n_u, n_i = params["user"].shape[0], params["item"].shape[0]
  _checks.matrix("exclude_UxI", exclude_UxI)
  if np.shape(exclude_UxI) != (n_u, n_i):
    raise ValueError(f"exclude_UxI has shape {tuple(np.shape(exclude_UxI))}, the model scores ({n_u}, {n_i})")
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_i:
    raise ValueError(f"k must be an integer in [1, {n_i}] (the number of items), got {k}")
  if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
    raise ValueError(f"chunk must be a positive integer, got {chunk}")
  if block == "auto":
    block = default_block(n_i, int(k))
  if block is not None and block != "kernel" and (isinstance(block, (bool, str)) or int(block) != block
                                                  or block < 1):
    raise ValueError(f"block must be a positive integer, None, 'kernel' or 'auto', got {block!r}")
  if isinstance(threads, bool) or (threads is not None and (int(threads) != threads or threads < 1)):
    raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
  bias = params["item_bias"] + params["bias"]
  args = (params["user"], params["item"], params["user_bias"], bias)
  exclude = jnp.asarray(exclude_UxI, bool)
  chunk = int(min(chunk, n_u))
  block = block if block in (None, "kernel") else int(block)
  n_chunks, tail = divmod(n_u, chunk)
  shards = _host_shards(n_chunks, tail, chunk, _cpu_threads() if threads is None else int(threads))

  def run(shard):
    offset, n, t = shard
    return _top_k_chunks(args, exclude, int(k), chunk, block, n, t, jnp.int32(offset))

  if len(shards) == 1:
    return run(shards[0])
  # XLA:CPU runs `top_k` on one thread; programs dispatched from separate host threads run at once.
  with concurrent.futures.ThreadPoolExecutor(len(shards)) as pool:
    parts = list(pool.map(lambda sh: jax.block_until_ready(run(sh)), shards))
  return jnp.concatenate(parts, axis=0)
