"""Causal recommendation: risk estimators, MF-IPS / DR-JL / PDA / MACR / DecRS, Coat, ML-100K, a debiased CTR tower.

    python -m experiments.causal_recsys --workdir=/tmp/crs
    python -m experiments.causal_recsys --workdir=/tmp/crs --config=experiments/configs/causal_recsys.py:small

Writes DIR/results.json, DIR/results.md and DIR/summary.png.
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.recsys.causal.experiment:run", config="causal_recsys")
