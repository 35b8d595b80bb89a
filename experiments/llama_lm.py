"""Train a small Llama 2 on text, or sample from a checkpoint.

  python -m experiments.llama_lm --workdir=/tmp/llama_lm
  python -m experiments.llama_lm --workdir=/tmp/llama_lm --mode=generate --config.prompt="def "
  python -m experiments.llama_lm --workdir=/tmp/llama_lm --config=experiments/configs/llama_lm.py:small
  python -m experiments.llama_lm --mode=generate --config.checkpoint_format=hf --config.checkpoint_path=DIR

Multi-process: pass --coordinator_address/--num_processes/--process_id (or the
JAXML_* environment variables); TPU VM, SLURM and Open MPI launches are detected.
Exit status 143 after SIGTERM (a checkpoint was saved first).
"""
from jaxml import experiment

if __name__ == "__main__":
  experiment.launch("jaxml.llama.train:run", config="llama_lm",
                    workdir_optional=lambda c: c.mode == "generate" and c.checkpoint_format != "own")
