"""Perceiver and Perceiver IO: digits from raw pixels, the pixel-permutation claim, a masked byte LM on the
standard library source, multi-task decoding; writes DIR/results.json, DIR/results.md and PNG curves.

    python -m experiments.perceiver --workdir=workdirs/perceiver
    python -m experiments.perceiver --workdir=workdirs/perceiver_small --config=experiments/configs/perceiver.py:small
    python -m experiments.perceiver --workdir=workdirs/perceiver_small --config=experiments/configs/perceiver.py:small \
        --mode=byte_lm        # one study: digits, permutation, byte_lm or multitask

Rerunning with the same --workdir resumes each model from its newest checkpoint (DIR/<model>/checkpoints);
exit status 143 after SIGTERM (a checkpoint was saved first).
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.perceiver.experiment:run", config="perceiver")
