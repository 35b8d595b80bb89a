"""RecBole's and scikit-learn's ranking metrics for parity with jaxml.recsys.causal.metrics (never imports jaxml).

RecBole 1.2.1 is installed in the peer environment without its dependencies
(`pip install --no-deps recbole==1.2.1`: it pulls ray, tensorboard, thop, ...).
Its metric module needs only numpy, scikit-learn, torch and two of its own
files, but `recbole/utils/__init__.py` imports tensorboard, so this script
loads RecBole's own `utils/enum_type.py`, `evaluator/utils.py`,
`evaluator/base_metric.py` and `evaluator/metrics.py` as modules and runs
their code unchanged. One shim: RecBole's NDCG uses `np.float`, removed in
numpy 1.24; it is set to the builtin `float` (what `np.float` aliased).

The pipeline is RecBole's full-sort evaluation: training items scored -inf
(`Trainer._full_sort_batch_eval`), `torch.topk`, the positives gathered at the
top-K indices with each user's positive count (`Collector.eval_batch_collect`),
then `Recall/NDCG/Hit.metric_info` and the mean over users
(`TopkMetric.topk_result`, here unrounded).
"""
import importlib.metadata
import importlib.util
import pathlib
import sys
import types

import numpy as np
import torch
from sklearn.metrics import ndcg_score


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def recbole_metric_classes():
  """RecBole's Recall, NDCG and Hit classes, or None when recbole is not installed."""
  spec = importlib.util.find_spec("recbole")
  if spec is None:
    return None
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  for pkg, path in (("recbole", root), ("recbole.evaluator", root / "evaluator")):
    shell = types.ModuleType(pkg)     # namespace shells: their __init__ files import the whole library
    shell.__path__ = [str(path)]
    sys.modules.setdefault(pkg, shell)
  enum_type = _load("recbole.utils.enum_type", root / "utils" / "enum_type.py")
  utils = types.ModuleType("recbole.utils")
  utils.EvaluatorType = enum_type.EvaluatorType
  sys.modules["recbole.utils"] = utils
  _load("recbole.evaluator.utils", root / "evaluator" / "utils.py")
  _load("recbole.evaluator.base_metric", root / "evaluator" / "base_metric.py")
  metrics = _load("recbole.evaluator.metrics", root / "evaluator" / "metrics.py")
  if not hasattr(np, "float"):
    np.float = float
  return metrics


def _recbole(metrics, scores, relevant, exclude, ks):
  scores_t = torch.from_numpy(scores.astype(np.float32))
  scores_t[torch.from_numpy(exclude)] = -np.inf
  pos = torch.from_numpy(relevant & ~exclude)
  keep = pos.sum(1) > 0                       # RecBole evaluates only users with test items
  scores_t, pos = scores_t[keep], pos[keep]
  _, top = torch.topk(scores_t, max(ks), dim=-1)
  pos_index = torch.gather(pos, 1, top).numpy()
  pos_len = pos.sum(1).numpy()
  config = {"metric_decimal_place": 12, "topk": list(ks)}
  out = {}
  for name, cls in (("recall", metrics.Recall), ("ndcg", metrics.NDCG), ("hit", metrics.Hit)):
    metric = cls(config)
    per_user = metric.metric_info(pos_index) if name == "hit" else metric.metric_info(pos_index, pos_len)
    mean = per_user.mean(axis=0)
    for k in ks:
      out[f"{name}@{k}"] = np.asarray(mean[k - 1], np.float64)
  return out


def run(inputs, workdir, **kwargs):
  ks = kwargs["ks"]
  scores = inputs["scores"]
  relevant = inputs["relevant"].astype(bool)
  exclude = inputs["exclude"].astype(bool)
  out = {}
  # scikit-learn: excluded items get the lowest score and no relevance; users without relevant items dropped.
  rel = relevant & ~exclude
  keep = rel.any(1)
  low = np.where(exclude, scores.min() - 1.0, scores)[keep]
  for k in ks:
    out[f"sklearn_ndcg@{k}"] = np.asarray(ndcg_score(rel[keep].astype(np.float64), low, k=k), np.float64)
  metrics = recbole_metric_classes()
  out["recbole_available"] = metrics is not None
  if metrics is not None:
    out["recbole_version"] = importlib.metadata.version("recbole")
    out.update(_recbole(metrics, scores, relevant, exclude, ks))
  return out
