"""MovieLens-style interaction files (RecBole's atomic `.inter` format) and a temporal split into stages.

The format (RecBole's "atomic files"; MovieLens-100K ships in the recbole wheel as
`recbole/dataset_example/ml-100k/ml-100k.inter`): tab-separated, a typed header
`user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float`, one interaction a line.
jaxml reads it with NumPy alone (no recbole import).

The temporal split follows PDA's protocol (Zhang et al., SIGIR 2021): interactions sorted by time
are cut into `n_stages` stages of equal size; the first `n_stages - 1` are training (each keeps
its stage, for PDA's per-stage popularity), the last is the test stage, kept for users and items
seen in training and without the pairs already in training.
"""
from __future__ import annotations

import numpy as np


def read_inter(path: str) -> dict:
  """Reads an atomic `.inter` file.

  Returns:
    `{"users", "items": int64 [n] ids 0..U-1 / 0..I-1 in order of first appearance,
    "ratings": float64 [n] (NaN without a rating column), "timestamps": float64 [n],
    "n_users", "n_items", "user_tokens", "item_tokens"}`.
  """
  with open(path) as f:
    header = f.readline().rstrip("\n").split("\t")
    names = [h.split(":")[0] for h in header]
    for need in ("user_id", "item_id", "timestamp"):
      if need not in names:
        raise ValueError(f"{path}: the header {header} lacks {need!r} (an atomic .inter file: "
                         "user_id:token, item_id:token, [rating:float,] timestamp:float)")
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  if not rows:
    raise ValueError(f"{path} holds no interaction")
  cols = {n: [r[k] for r in rows] for k, n in enumerate(names)}
  u_tok, users = np.unique(np.asarray(cols["user_id"]), return_inverse=True)
  i_tok, items = np.unique(np.asarray(cols["item_id"]), return_inverse=True)
  ratings = np.asarray(cols["rating"], np.float64) if "rating" in cols else np.full(len(rows), np.nan)
  return {"users": users.astype(np.int64), "items": items.astype(np.int64), "ratings": ratings,
          "timestamps": np.asarray(cols["timestamp"], np.float64), "n_users": int(u_tok.size),
          "n_items": int(i_tok.size), "user_tokens": u_tok, "item_tokens": i_tok}


def temporal_split(data: dict, n_stages: int = 10) -> dict:
  """PDA's temporal split (module docstring).

  Args:
    data: from `read_inter`.
    n_stages: stages of equal size; the last one is the test stage.

  Returns:
    `{"train_users", "train_items", "train_stages": int [n_train], "test_UxI": bool [U, I] (the
    test stage's new pairs), "train_UxI": bool [U, I], "counts_SxI": int [n_stages - 1, I]
    interactions per training stage, "n_users", "n_items"}`.
  """
  if n_stages < 2:
    raise ValueError(f"n_stages must be >= 2 (training stages and a test stage), got {n_stages}")
  order = np.argsort(data["timestamps"], kind="stable")
  n = order.size
  stage = np.empty(n, np.int64)
  stage[order] = np.minimum(np.arange(n) * n_stages // n, n_stages - 1)
  u, i = data["users"], data["items"]
  nu, ni = data["n_users"], data["n_items"]
  tr = stage < n_stages - 1
  train = np.zeros((nu, ni), bool)
  train[u[tr], i[tr]] = True
  test = np.zeros((nu, ni), bool)
  test[u[~tr], i[~tr]] = True
  test &= ~train
  test[~train.any(1)] = False                     # users unseen in training
  test[:, ~train.any(0)] = False                  # items unseen in training
  counts = np.zeros((n_stages - 1, ni), np.int64)
  np.add.at(counts, (stage[tr], i[tr]), 1)
  return {"train_users": u[tr], "train_items": i[tr], "train_stages": stage[tr], "test_UxI": test,
          "train_UxI": train, "counts_SxI": counts, "n_users": nu, "n_items": ni}
