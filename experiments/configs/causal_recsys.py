"""Config for `experiments/causal_recsys.py` (`jaxml.recsys.causal.experiment`).

Variants (`--config=experiments/configs/causal_recsys.py:<variant>`):
  default  3 seeds, 1,000 exposure draws, longer training.
  small    2 seeds, 200 draws: the whole experiment in a few minutes on 2 CPU cores.

Run:
  python -m experiments.causal_recsys --workdir=/tmp/crs --config=experiments/configs/causal_recsys.py:small
  python -m experiments.causal_recsys --workdir=/tmp/crs --config.ml100k_path=path/to/ml-100k.inter
"""
import glob
import os

import ml_collections

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ml100k_default() -> str:
  """The copy of ML-100K inside the peer environment's recbole wheel, when that environment exists."""
  hits = sorted(glob.glob(os.path.join(_ROOT, ".venv-peer", "lib", "python3*", "site-packages", "recbole",
                                       "dataset_example", "ml-100k", "ml-100k.inter")))
  return hits[0] if hits else ""


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = variant or "default"
  c = ml_collections.ConfigDict()
  c.sections = ("estimators", "ratings", "implicit", "coat", "ml100k", "tower")  # which parts run (all: table + figure)
  c.seeds = (0, 1, 2)  # exposure draws / init seeds of the trained models (mean ± sd over them)
  c.world_seed = 0  # the simulator's true world
  c.world_shape = (290, 300)  # simulated users x items (Coat's shape)
  c.estimator_draws = 1000  # exposure draws for the estimators' bias and spread
  c.mar_sample_per_user = 15  # MAR ratings per user for naive-Bayes propensities (5% of 300 items)
  c.mar_test_per_user = 16  # MAR test cells per user (as Coat)
  c.ml100k_path = _ml100k_default()  # ML-100K .inter file; empty = skip that section (printed)

  c.fit = ml_collections.ConfigDict()  # rating models on the simulator (full batch, Adam)
  c.fit.dim = 4  # MF factor dimension (the world's true one)
  c.fit.l2 = 1e-3  # L2 of the predictor
  c.fit.imputation_l2 = 1e-3  # L2 of DR-JL's imputation model
  c.fit.lr = 0.05  # Adam learning rate
  c.fit.steps = 400  # full-batch steps
  c.fit.dr_jl_period = 0  # 0: DR-JL's simultaneous step; n: the paper's alternation, n steps per model and phase

  c.coat_fit = ml_collections.ConfigDict()  # the same models on Coat
  c.coat_fit.dim = 4  # MF factor dimension
  c.coat_fit.l2 = 1e-3  # L2 of the predictor
  c.coat_fit.imputation_l2 = 1e-3  # L2 of DR-JL's imputation model
  c.coat_fit.lr = 0.05  # Adam learning rate
  c.coat_fit.steps = 400  # full-batch steps
  c.coat_fit.dr_jl_period = 0  # 0: DR-JL's simultaneous step; n: the paper's alternation, n steps per model and phase

  c.implicit = ml_collections.ConfigDict()  # staged click world: BPR-MF, PD/PDA, MACR, DecRS
  c.implicit.n_stages = 4  # time stages (the last is the test stage)
  c.implicit.popularity_drift = 0.4  # per-stage drift of the log-popularity
  c.implicit.density = 0.1  # mean exposure per stage
  c.implicit.dim = 8  # MF dimension of every backbone
  c.implicit.l2 = 1e-4  # L2 on the backbone (whole tables, per step)
  c.implicit.lr = 0.01  # Adam learning rate
  c.implicit.batch_size = 1024  # triples / labelled pairs per step
  c.implicit.steps = 1500  # steps per model
  c.implicit.pda_gamma = 0.1  # PDA / PD popularity exponent
  c.implicit.macr_alpha = 1e-2  # MACR item-branch weight
  c.implicit.macr_beta = 1e-3  # MACR user-branch weight
  c.implicit.macr_c = 2.0  # MACR reference matching score c at inference
  c.implicit.decrs_alpha = 0.2  # DecRS lambda_u exponent (the authors' FM default)

  c.ml100k = ml_collections.ConfigDict()  # MovieLens-100K, PDA's temporal split
  c.ml100k.n_stages = 10  # equal-size time stages; the last is the test stage
  c.ml100k.dim = 32  # MF dimension
  c.ml100k.l2 = 1e-5  # L2 on the whole tables
  c.ml100k.lr = 0.01  # Adam learning rate
  c.ml100k.batch_size = 2048  # triples per step (the authors' batch)
  c.ml100k.steps = 3000  # steps per model
  c.ml100k.pd_gamma = 0.02  # PD's exponent (the authors' setting)
  c.ml100k.pda_gamma = 0.1  # PDA's exponent

  c.tower = ml_collections.ConfigDict()  # a CTR tower on (user, item) ids, with / without IPS
  c.tower.kind = "dcnv2"  # mlp | dcnv2 | dlrm | dhen
  c.tower.embed_dim = 8  # embedding width
  c.tower.hidden = (32, 16)  # top MLP
  c.tower.cross_layers = 2  # DCN-v2 cross layers
  c.tower.lr = 0.003  # Adam learning rate
  c.tower.steps = 100  # full-batch steps (early stopping: trained to interpolation, IPS weights stop mattering)

  if variant == "default":
    pass
  elif variant == "small":  # a few minutes on 2 CPU cores
    c.seeds = (0, 1)
    c.estimator_draws = 200
    c.fit.steps = c.coat_fit.steps = 300
    c.implicit.steps = 800
    c.ml100k.steps = 1500
  else:
    raise ValueError(f"unknown causal_recsys config variant {variant!r}; use default or small")
  return c
