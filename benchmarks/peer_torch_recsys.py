"""PyTorch (CPU) and RecBole side of `benchmarks.causal_recsys_bench`; runs in the peer environment.

Started by `benchmarks.common.PeerWorker`; never imports jaxml. JSON-line requests:

  {"op": "hello", "threads": n}                       torch thread count, versions
  {"op": "mf_ips_train", "n_users", "n_items", "dim", "batch", "steps", "seed"}
      seconds of each MF-IPS step: eager PyTorch, the loss `mean(w (r_hat - r)^2) + l2 |params|^2`,
      torch.optim.Adam; the batch is drawn once (as the jaxml side's fixed batch)
  {"op": "full_rank", "n_users", "n_items", "dim", "k", "chunk", "density", "seed"}
      seconds of one full-ranking pass: scores U V^T + biases per chunk of users, training items
      set to -inf (`masked_fill`), `torch.topk`
  {"op": "recbole_build", "data_path", "batch", "dim"}
      RecBole 1.2.1's BPR on ml-100k, temporal 90/10 split ("TO", RS [0.9, 0, 0.1], full sort)
  {"op": "recbole_round"}
      seconds of one training epoch (`Trainer._train_epoch`) and of one full-sort evaluation
      (`Trainer.evaluate`, Recall@20 and NDCG@20), with the metrics
  {"op": "quit"}

RecBole runs with two shims, both outside what is timed: NumPy 2 removed `np.float_`,
`np.complex_` and `np.unicode_`, which RecBole's `Config` aliases (restored here as float64,
complex128, str_); and `torch.utils.tensorboard` (imported by `recbole.utils` at import time) is
replaced by a no-op writer, so the tensorboard package is not needed.
"""
import os
import sys
import time
import types

import numpy as np
import torch

import peer_protocol  # benchmarks/peer_protocol.py, beside this script


def op_mf_ips_train(n_users: int, n_items: int, dim: int, batch: int, steps: int, seed: int = 0,
                    l2: float = 1e-4) -> dict:
  g = torch.Generator().manual_seed(seed)
  params = [torch.nn.Parameter(0.1 * torch.randn(n_users, dim, generator=g)),
            torch.nn.Parameter(0.1 * torch.randn(n_items, dim, generator=g)),
            torch.nn.Parameter(torch.zeros(n_users)), torch.nn.Parameter(torch.zeros(n_items)),
            torch.nn.Parameter(torch.zeros(()))]
  opt = torch.optim.Adam(params, lr=1e-2)
  users = torch.randint(0, n_users, (batch,), generator=g)
  items = torch.randint(0, n_items, (batch,), generator=g)
  ratings = torch.randint(1, 6, (batch,), generator=g).float()
  weights = torch.rand(batch, generator=g) + 0.5
  times, loss = [], None
  for _ in range(steps + 1):
    t = time.perf_counter()
    u, v, bu, bi, b = params
    pred = (u[users] * v[items]).sum(-1) + bu[users] + bi[items] + b
    loss = torch.mean(weights * (pred - ratings) ** 2) + l2 * sum((p ** 2).sum() for p in params[:4])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t)
  return {"seconds": times[1:], "loss": float(loss)}


def op_full_rank(n_users: int, n_items: int, dim: int, k: int, chunk: int, density: float, seed: int = 0,
                 repeats: int = 3) -> dict:
  g = torch.Generator().manual_seed(seed)
  u, v = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
  bu, bi = torch.randn(n_users, generator=g), torch.randn(n_items, generator=g)
  train = torch.rand(n_users, n_items, generator=g) < density
  times, checksum = [], 0.0
  with torch.no_grad():
    for _ in range(repeats + 1):
      t = time.perf_counter()
      total = 0
      for s in range(0, n_users, chunk):
        scores = u[s:s + chunk] @ v.T + bu[s:s + chunk, None] + bi[None, :]
        scores = scores.masked_fill(train[s:s + chunk], float("-inf"))
        top = torch.topk(scores, k, dim=1).indices
        total += int(top[:, 0].sum())
      times.append(time.perf_counter() - t)
      checksum = total
  return {"seconds": times[1:], "checksum": checksum}


def _recbole():
  for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, old):
      setattr(np, old, new)
  stub = types.ModuleType("torch.utils.tensorboard")

  class SummaryWriter:  # a no-op writer: logging is not what is timed
    def __init__(self, *a, **k):
      pass

    def add_scalar(self, *a, **k):
      pass

    def add_hparams(self, *a, **k):
      pass

    def close(self):
      pass

  stub.SummaryWriter = SummaryWriter
  sys.modules.setdefault("torch.utils.tensorboard", stub)
  import recbole  # noqa: F401
  from recbole.config import Config
  from recbole.data import create_dataset, data_preparation
  from recbole.model.general_recommender import BPR
  from recbole.trainer import Trainer
  return Config, create_dataset, data_preparation, BPR, Trainer


_RECBOLE = {}


def op_recbole_build(data_path: str = "", batch: int = 2048, dim: int = 64, seed: int = 0) -> dict:
  import recbole
  Config, create_dataset, data_preparation, BPR, Trainer = _recbole()
  root = data_path or os.path.join(os.path.dirname(recbole.__file__), "dataset_example")
  cfg = Config(model="BPR", dataset="ml-100k", config_dict={
      "data_path": root, "epochs": 1, "train_batch_size": batch, "eval_batch_size": 4096, "embedding_size": dim,
      "eval_args": {"split": {"RS": [0.9, 0.0, 0.1]}, "order": "TO", "group_by": None, "mode": "full"},
      "metrics": ["Recall", "NDCG"], "topk": [20], "valid_metric": "NDCG@20", "device": "cpu", "use_gpu": False,
      "show_progress": False, "checkpoint_dir": os.path.join("/tmp", f"recbole_ckpt_{os.getpid()}"),
      "log_wandb": False, "state": "ERROR", "seed": seed, "reproducibility": True, "worker": 0,
      "learning_rate": 1e-3})
  ds = create_dataset(cfg)
  train, _, test = data_preparation(cfg, ds)
  trainer = Trainer(cfg, BPR(cfg, train.dataset))
  _RECBOLE.update(trainer=trainer, train=train, test=test, epoch=0)
  return {"train_interactions": int(len(train.dataset)), "n_users": int(ds.user_num), "n_items": int(ds.item_num)}


def op_recbole_round() -> dict:
  """One training epoch (`Trainer._train_epoch`) and one full-sort evaluation (`Trainer.evaluate`)."""
  r = _RECBOLE
  t = time.perf_counter()
  r["trainer"]._train_epoch(r["train"], r["epoch"])
  train_s = time.perf_counter() - t
  r["epoch"] += 1
  t = time.perf_counter()
  result = r["trainer"].evaluate(r["test"], load_best_model=False)
  eval_s = time.perf_counter() - t
  return {"train_seconds": train_s, "eval_seconds": eval_s, "metrics": {k: float(v) for k, v in result.items()}}


OPS = {"mf_ips_train": op_mf_ips_train, "full_rank": op_full_rank,
       "recbole_build": op_recbole_build, "recbole_round": op_recbole_round}


if __name__ == "__main__":
  sys.exit(peer_protocol.serve(OPS))
