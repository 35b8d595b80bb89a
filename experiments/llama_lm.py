"""Train a small Llama 2 on text, or sample from a checkpoint.

  python -m experiments.llama_lm --workdir=/tmp/llama_lm
  python -m experiments.llama_lm --workdir=/tmp/llama_lm --mode=generate --prompt="def "
  python -m experiments.llama_lm --workdir=/tmp/llama_lm --config=experiments/configs/llama_lm.py:local

Multi-process: pass --coordinator_address/--num_processes/--process_id (or the
JAXML_* environment variables); TPU VM, SLURM and Open MPI launches are detected.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from jaxml.train import hostmem
from jaxml.train.distributed import maybe_initialize_distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, tokenizer and plots.", required=True)
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "llama_lm.py"),
                                "Experiment config file (path[:variant]).",
                                lock_config=True)
flags.DEFINE_enum("mode", "train", ["train", "generate"], "Train (resumes if workdir has checkpoints) or sample.")
flags.DEFINE_string("prompt", None, "Prompt for --mode=generate (default: the config's sample_prompts).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process launch.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process launch.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep library INFO logs (orbax) out of the progress lines
  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from jaxml.llama import train as llama_train  # after distributed init: importing is device-free anyway

  if FLAGS.mode == "train":
    llama_train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    llama_train.generate_from_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.prompt)


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  app.run(main)
