"""Score-based diffusion entrypoint: 2D ring + digits; writes DIR/results.json and PNG sample grids.

    python -m experiments.diffusion --workdir=workdirs/diffusion
    python -m experiments.diffusion --workdir=workdirs/diffusion_small --config=experiments/configs/diffusion.py:small
"""
import os

from absl import app, flags
from ml_collections import config_flags

from jaxml.diffusion.experiment import run_from_config
from jaxml.train import hostmem

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "diffusion.py"), "experiment configuration",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)


def main(argv):
  del argv
  run_from_config(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
