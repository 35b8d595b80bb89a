"""CTR towers: train one tower or produce the comparison table.

  python -m experiments.ctr --config=experiments/configs/ctr.py --workdir=/tmp/ctr --mode=compare
"""
from absl import app, flags
from ml_collections import config_flags

from jaxml.recsys import experiment
from jaxml.train import hostmem

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config (experiments/configs/ctr.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "where metrics.json / comparison.md are written")
flags.DEFINE_enum("mode", "train", ["train", "compare"], "train one tower, or run the comparison table")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if FLAGS.mode == "compare":
    experiment.compare(FLAGS.config, FLAGS.workdir)
  else:
    experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
