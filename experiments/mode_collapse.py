"""Mode-collapse study entrypoint. Writes DIR/results.json, DIR/table.md, DIR/samples.png.

    python -m experiments.mode_collapse --workdir=workdirs/mode_collapse
    python -m experiments.mode_collapse --workdir=workdirs/mode_collapse_small --config=experiments/configs/mode_collapse.py:small
"""
import os

from absl import app, flags
from ml_collections import config_flags

from jaxml.generative.study import run_from_config
from jaxml.train import hostmem

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "mode_collapse.py"),
                                          "study configuration", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)


def main(argv):
  del argv
  run_from_config(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
