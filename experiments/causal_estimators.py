"""Causal estimators study entrypoint. Writes DIR/results.json, DIR/table.md, DIR/estimates.png.

    python -m experiments.causal_estimators --workdir=workdirs/causal
    python -m experiments.causal_estimators --workdir=/tmp/causal --config=experiments/configs/causal_estimators.py:local
"""
import os

from absl import app, flags
from ml_collections import config_flags

from jaxml.causal.study import StudyConfig, run_study
from jaxml.train import hostmem

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "causal_estimators.py"),
                                          "study configuration", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)


def main(argv):
  del argv
  run_study(StudyConfig(**_CONFIG.value.to_dict()), _WORKDIR.value)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
