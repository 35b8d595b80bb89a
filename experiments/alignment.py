"""Alignment on a task with a known answer: SFT Llama on a Markov language, reward model, DPO/IPO/SLiC-HF (and
PPO/GRPO with --config.run_online=True) as points of true reward vs KL on the exact frontier.

    python -m experiments.alignment --workdir=workdirs/alignment
    python -m experiments.alignment --workdir=workdirs/alignment_small --config=experiments/configs/alignment.py:small

Writes DIR/results.json, DIR/results.md (the tables), DIR/frontier.png and DIR/overoptimisation.png; rerunning
with the same --workdir resumes each training from its newest checkpoint; exit status 143 after SIGTERM.
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.alignment.experiment:run", config="alignment")
