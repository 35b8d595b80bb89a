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
through `top_k_blocked` or plain `top_k` on canonical scores, which return
the same values and ids in the same order. `top_k_blocked` splits each row
into blocks of `block` items, takes the top K blocks by their maximum (ties:
lower block first), and runs `top_k` over those K * block candidates kept in
item order. Exact because, under the order extended by the index, an item in
the overall top K lies in a top-K block: a block outside them has K blocks
ahead of it whose maxima all beat the item. (The float maximum agrees with
that order only without NaN and signed zeros: hence the canonical scores.)
On XLA:CPU, `top_k` over a 10,000-item row costs about as much as the
64-wide score product itself, and two `top_k`s over a few hundred items cost
far less (benchmarks/causal_recsys_bench.py).

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
  """hits [U, K] (1 where rank j holds a relevant item) and |R(u)| [U]; `top_k_blocked` (= `lax.top_k`)."""
  s = scores.astype(jnp.float32)
  rel = relevant.astype(bool)
  if exclude is not None:
    ex = exclude.astype(bool)
    s = jnp.where(ex, -jnp.inf, s)
    rel = rel & ~ex
  _, top = _top_k(s, k, auto_block(s.shape[1], k))
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


def canonical_scores(scores: Array) -> Array:
  """NaN -> -inf (never ranked ahead of a real score), -0.0 -> +0.0 (equal to +0.0, ranked by index)."""
  s = jnp.asarray(scores, jnp.float32)
  return jnp.where(jnp.isnan(s), -jnp.inf, jnp.where(s == 0, 0.0, s))


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


def _top_k(s, k, block):
  return jax.lax.top_k(canonical_scores(s), k) if block is None else top_k_blocked(s, k, block)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _top_k_chunks(scores_fn_args, exclude, k, chunk, block):
  u, v, bu, bi = scores_fn_args
  n_u = u.shape[0]
  n_full, tail = divmod(n_u, chunk)

  def one(start, size):
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)  # noqa: E731
    s = cut(u) @ v.T + cut(bu)[:, None] + bi[None, :]
    return _top_k(jnp.where(cut(exclude), -jnp.inf, s), k, block)[1]

  parts = []
  if n_full:
    parts.append(jax.lax.map(lambda i: one(i * chunk, chunk), jnp.arange(n_full)).reshape(-1, k))
  if tail:
    parts.append(one(n_full * chunk, tail))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def mf_top_k(params: dict, exclude_UxI: Array, k: int, *, chunk: int = 128, block: int | str | None = "auto") -> Array:
  """Every user's top-k items under MF (`mf.mf_scores`), `exclude_UxI` (training items) masked, in chunks.

  One compiled program scores `chunk` users at a time (`lax.map` over the whole chunks, then the
  remainder; nothing is padded or copied), so the [users, items] score matrix is never held whole.

  Args:
    params: `mf.mf_init`'s layout (user, item, user_bias, item_bias, bias).
    exclude_UxI: [users, items] boolean, items never recommended.
    k: the list length.
    chunk: users per chunk.
    block: `top_k_blocked`'s block (the same result, faster on CPU for long rows), None for
      `jax.lax.top_k`, or "auto" (`auto_block`).

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
    block = auto_block(n_i, int(k))
  if block is not None and (isinstance(block, (bool, str)) or int(block) != block or block < 1):
    raise ValueError(f"block must be a positive integer, None or 'auto', got {block!r}")
  bias = params["item_bias"] + params["bias"]
  args = (params["user"], params["item"], params["user_bias"], bias)
  return _top_k_chunks(args, jnp.asarray(exclude_UxI, bool), int(k), int(min(chunk, n_u)),
                       None if block is None else int(block))
