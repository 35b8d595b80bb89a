"""Score-based diffusion: 2D ring + digits; writes DIR/results.json and PNG sample grids.

    python -m experiments.diffusion --workdir=workdirs/diffusion
    python -m experiments.diffusion --workdir=workdirs/diffusion_small --config=experiments/configs/diffusion.py:small

Rerunning with the same --workdir resumes each training from its newest checkpoint (DIR/2d/checkpoints,
DIR/digits/checkpoints); exit status 143 after SIGTERM (a checkpoint was saved first).
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.diffusion.experiment:run", config="diffusion")
