"""Causal estimators study entrypoint. Writes DIR/results.json, DIR/table.md, DIR/estimates.png.

    python -m experiments.causal_estimators --workdir=workdirs/causal
    python -m experiments.causal_estimators --workdir=/tmp/causal --config=experiments/configs/causal_estimators.py:small
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.causal.study:run", config="causal_estimators")
