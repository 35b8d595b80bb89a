"""CTR towers: train one tower over seeds, or produce the comparison table.

  python -m experiments.ctr --workdir=/tmp/ctr --mode=compare
  python -m experiments.ctr --workdir=/tmp/ctr_small --config=experiments/configs/ctr.py:small --mode=train
  python -m experiments.ctr --workdir=/tmp/ctr_dhen --config.model.kind=dhen --config.data.criteo_train=train.tsv

Rerunning on the same workdir resumes. Exit status 143 after SIGTERM (a checkpoint was saved first).
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.recsys.experiment:run", config="ctr")
