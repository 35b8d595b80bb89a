"""A CTR simulator whose click probabilities are known, so the oracle metrics are known.

The true logit of an example is

    z = bias + sum_f w_f[c_f]                                  (first order)
        + s2 * sum_{f < g} <v_f[c_f], v_g[c_g]>                 (second-order crosses)
        + s3 * sum_{(f, g, h) in T} u_f[c_f] u_g[c_g] u_h[c_h]   (third-order crosses)
        + a . x + s_d * x_0 * x_1                               (dense, with one dense cross)

and the label is Bernoulli(sigmoid(z)). Categorical ids follow a Zipf law per
field. Examples come in groups ("queries") of `group_size`: field 0 (the query id)
and dense feature 0 (the query context) are shared within a group, so a rank
loss within groups compares candidates of one query. `bias` is solved so the mean click rate is
`base_rate` (class imbalance). Scoring the labels with the true probabilities
gives the oracle AUC and logloss.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxml.recsys.config import FeatureConfig


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
  n_dense: int = 4
  vocab_sizes: tuple[int, ...] = (200, 100, 100, 50, 50, 20, 20, 10)
  group_size: int = 8
  base_rate: float = 0.1
  latent_dim: int = 4
  first_order: float = 0.35
  second_order: float = 0.5
  third_order: float = 0.5
  n_triples: int = 3
  dense_scale: float = 0.4
  zipf: float = 1.1
  seed: int = 0


class CTRSimulator:
  """Holds the true parameters; `sample(n, seed)` draws examples."""

  def __init__(self, cfg: SimulatorConfig = SimulatorConfig()):
    if not 0.0 < cfg.base_rate < 1.0:
      raise ValueError(f"base_rate must be in (0, 1), got {cfg.base_rate}")
    if len(cfg.vocab_sizes) < 3:
      raise ValueError("the simulator needs at least 3 categorical fields for third-order crosses")
    self.cfg = cfg
    rng = np.random.default_rng(cfg.seed)
    nf = len(cfg.vocab_sizes)
    self.w = [cfg.first_order * rng.standard_normal(v) for v in cfg.vocab_sizes]
    self.v = [rng.standard_normal((v, cfg.latent_dim)) / np.sqrt(cfg.latent_dim) for v in cfg.vocab_sizes]
    self.u = [rng.standard_normal(v) for v in cfg.vocab_sizes]
    triples = set()
    while len(triples) < min(cfg.n_triples, nf * (nf - 1) * (nf - 2) // 6):
      triples.add(tuple(sorted(rng.choice(nf, 3, replace=False).tolist())))
    self.triples = sorted(triples)
    self.a = cfg.dense_scale * rng.standard_normal(cfg.n_dense)
    self.probs = []
    for v in cfg.vocab_sizes:
      p = 1.0 / np.arange(1, v + 1) ** cfg.zipf
      self.probs.append(p / p.sum())
    self._pair_scale = cfg.second_order / np.sqrt(max(nf * (nf - 1) / 2, 1))
    self.bias = 0.0
    z = self._logits(self._draw_features(np.random.default_rng(cfg.seed + 1), 20000))
    lo, hi = -20.0, 20.0
    for _ in range(60):  # bisection on the bias so that the mean click rate is base_rate
      mid = (lo + hi) / 2
      if np.mean(_sigmoid(z + mid)) > cfg.base_rate:
        hi = mid
      else:
        lo = mid
    self.bias = (lo + hi) / 2

  def feature_config(self, embed_dim: int = 16, bucket_factor: int = 16, **kw) -> FeatureConfig:
    """A FeatureConfig that reads this simulator's batches (`bucket_factor` x vocab hash buckets,
    so that collisions, which no model can undo, stay rare)."""
    return FeatureConfig(n_dense=self.cfg.n_dense, vocab_sizes=tuple(bucket_factor * v + 1 for v in self.cfg.vocab_sizes),
                         embed_dim=embed_dim, **kw)

  def _draw_features(self, rng, n):
    cfg = self.cfg
    n_groups = -(-n // cfg.group_size)
    group = np.repeat(np.arange(n_groups), cfg.group_size)[:n]
    cat = np.stack([rng.choice(v, size=n, p=p) for v, p in zip(cfg.vocab_sizes, self.probs)], axis=1)
    cat[:, 0] = rng.choice(cfg.vocab_sizes[0], size=n_groups, p=self.probs[0])[group]  # the query field
    dense = rng.standard_normal((n, cfg.n_dense))
    if cfg.n_dense:
      dense[:, 0] = rng.standard_normal(n_groups)[group]  # the query context
    return cat, dense, group

  def _logits(self, feats):
    cat, dense = feats[:2]
    cfg = self.cfg
    nf = len(cfg.vocab_sizes)
    z = self.bias + sum(self.w[f][cat[:, f]] for f in range(nf))
    vs = np.stack([self.v[f][cat[:, f]] for f in range(nf)], axis=1)  # [n, F, k]
    s = vs.sum(1)
    pair = 0.5 * (np.square(s).sum(-1) - np.square(vs).sum((1, 2)))  # sum_{f<g} <v_f, v_g>
    z = z + self._pair_scale * pair
    for f, g, h in self.triples:
      z = z + cfg.third_order * self.u[f][cat[:, f]] * self.u[g][cat[:, g]] * self.u[h][cat[:, h]]
    if cfg.n_dense:
      z = z + dense @ self.a
    if cfg.n_dense >= 2:
      z = z + cfg.dense_scale * dense[:, 0] * dense[:, 1]
    return z

  def sample(self, n: int, seed: int) -> dict:
    """`n` examples: dense [n, n_dense] f32, cat [n, n_cat] int32 raw ids, group [n] int32,
    label [n] f32, prob [n] f32 (the true click probability)."""
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([self.cfg.seed, seed])
    cat, dense, group = self._draw_features(rng, n)
    p = _sigmoid(self._logits((cat, dense)))
    label = (rng.random(n) < p).astype(np.float32)
    return {"dense": dense.astype(np.float32), "cat": cat.astype(np.int32), "group": group.astype(np.int32),
            "label": label, "prob": p.astype(np.float32)}


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))
