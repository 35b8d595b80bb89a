"""scikit-learn's AUC and logloss for parity with jaxml.recsys.metrics (never imports jaxml)."""
import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def run(inputs, workdir, **kwargs):
  out = {}
  for name in sorted({k.split("__")[0] for k in inputs}):
    y, s = inputs[f"{name}__labels"], inputs[f"{name}__scores"]
    out[f"{name}__auc"] = np.asarray(roc_auc_score(y, s), np.float64)
    out[f"{name}__logloss"] = np.asarray(log_loss(y, np.clip(s, 1e-7, 1 - 1e-7), labels=[0, 1]), np.float64)
  return out
