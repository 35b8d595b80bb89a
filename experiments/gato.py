"""Gato: one multi-task policy (control, images, text) vs single-task behaviour cloning; writes DIR/results.json,
DIR/results.md and DIR/gato_*.png.

    python -m experiments.gato --workdir=workdirs/gato
    python -m experiments.gato --workdir=workdirs/gato_small --config=experiments/configs/gato.py:small
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.gato.experiment:run", config="gato")
