"""Causal recommendation: debiasing logged (missing-not-at-random) feedback.

Modules:
  estimators  naive / IPS / SNIPS / DR risk of a predictor from logged data; replay_lists (off-policy list evaluation)
  propensity  naive Bayes (MAR sample), logistic (features), popularity propensities
  simulator   a ratings world with known truth: ratings, propensities, MAR splits, stages
  mf          matrix factorisation and the MF-IPS loss for `jaxml.train`
  popularity  PDA / PD (popularity-aware BPR, PD and PDA inference) and MACR on any backbone score
  objectives  loss_fns for jaxml.train: DR-JL, PDA, MACR, DecRS (+ its KL-based inference mix), BCE
  towers_adapter  the CTR towers (DCN-v2, DLRM, DHEN, MLP) as backbones; the (SN)IPS tower loss
  movielens   RecBole-format .inter files and PDA's temporal split
  experiment  `run(config, workdir)` of experiments/causal_recsys.py
  metrics     Recall/NDCG/HR@K over full rankings (ranks counted for the users with test items); MSE/MAE/AUC
  data        the Coat data set (shipped with the package)

References (more in each module): Schnabel et al., "Recommendations as Treatments: Debiasing Learning
and Evaluation" (ICML 2016); Wang et al., "Doubly Robust Joint Learning for
Recommendation on Data Missing Not at Random" (ICML 2019).
"""
from jaxml.recsys.causal import (data, estimators, metrics, mf, movielens, objectives, popularity,  # noqa: F401
                                 propensity, simulator, towers_adapter)
from jaxml.recsys.causal.objectives import (bce_loss, decrs_apply, decrs_init, decrs_lambda, decrs_loss,  # noqa: F401
                                            decrs_mix, decrs_scores, dr_jl_init, dr_jl_loss, dr_jl_optimizer,
                                            macr_init, macr_scores, make_dr_jl_alternating_step,
                                            macr_train_loss, pda_loss)
from jaxml.recsys.causal.popularity import (macr_loss, macr_score, pd_inference, pda_bpr_loss,  # noqa: F401
                                            pda_inference, pda_score, stage_popularity)
from jaxml.recsys.causal.data import load_coat  # noqa: F401
from jaxml.recsys.causal.estimators import (dr_bias, dr_risk, ips_risk, naive_risk, replay_lists,  # noqa: F401
                                            snips_risk)
from jaxml.recsys.causal.metrics import (hit_rate_at_k, masked_auc, masked_mae, masked_mse,  # noqa: F401
                                         mf_ranking_metrics, ndcg_at_k, ranking_metrics, ranking_metrics_from_sets,
                                         recall_at_k, relevant_sets)
from jaxml.recsys.causal.mf import ips_weights, mf_apply, mf_init, mf_ips_loss, mf_scores, observed_batch  # noqa: F401
from jaxml.recsys.causal.propensity import (logistic_propensity, logistic_propensity_fit,  # noqa: F401
                                            naive_bayes_propensity, popularity_propensity, rating_propensities)
from jaxml.recsys.causal.simulator import (RatingSimConfig, RatingSimulator, confounded_config,  # noqa: F401
                                           schnabel_config)
