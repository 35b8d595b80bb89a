"""Mode-collapse study: GAN vs VAE vs diffusion; writes DIR/results.json, DIR/table.md, DIR/samples.png.

    python -m experiments.mode_collapse --workdir=workdirs/mode_collapse
    python -m experiments.mode_collapse --workdir=workdirs/mode_collapse_small --config=experiments/configs/mode_collapse.py:small

Rerunning with the same --workdir resumes (finished pairs are loaded, an interrupted pair continues
from its newest checkpoint); exit status 143 after SIGTERM (a checkpoint was saved first).
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.generative.study:run", config="mode_collapse")
