"""Causal estimators as pure JAX functions and numpyro models.

IV / 2SLS with linearmodels' diagnostics (`iv2sls`), Bayesian IV (`bayesian_iv`),
backdoor and frontdoor adjustment with numpyro posteriors, invariant causal
prediction (`icp`), and structural causal models for ground truth (`scm`).
"""
from jaxml.causal import scm
from jaxml.causal._bayes import PosteriorSummary
from jaxml.causal._common import TestStatistic
from jaxml.causal import adjustment
from jaxml.causal.adjustment import (EffectEstimate, backdoor, backdoor_posterior, cells_model, frontdoor,
                                     frontdoor_posterior)
from jaxml.causal.bayes_iv import BayesIVResult, bayes_iv_model, bayesian_iv
from jaxml.causal.datasets import load_mroz
from jaxml.causal import icp as icp_module
from jaxml.causal.icp import ICPResult, icp
from jaxml.causal.iv import (AndersonRubin, FirstStage, IVResults, WeakInstrumentWarning, iv2sls,
                             data_matrix, iv2sls_arrays, iv_moments, wald_ratio)

__all__ = [
    "AndersonRubin", "BayesIVResult", "EffectEstimate", "FirstStage", "ICPResult", "IVResults",
    "PosteriorSummary", "TestStatistic", "WeakInstrumentWarning", "backdoor",
    "backdoor_posterior", "bayes_iv_model", "bayesian_iv", "cells_model", "frontdoor",
    "frontdoor_posterior", "data_matrix", "icp", "iv2sls", "iv2sls_arrays", "iv_moments", "load_mroz", "scm",
    "wald_ratio",
]
