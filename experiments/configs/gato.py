"""Gato: a multi-task policy against single-task behaviour cloning, the CartPole twin and prompting.

    python -m experiments.gato --workdir=workdirs/gato
    python -m experiments.gato --workdir=workdirs/gato_small --config=experiments/configs/gato.py:small

Every field of `jaxml.gato.experiment.GatoExperimentConfig` is listed; the default variant equals the
dataclass's defaults.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # base seed (experts, data, models, evaluation)
  c.tasks = ("CartPole-v1", "CartPole-twin", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "Catch-bsuite",
             "Breakout-MinAtar")  # control tasks
  c.ppo_iterations = 20  # PPO iterations per PPO expert (16 envs x 500 steps each)
  c.expert_greedy = True  # PPO experts act greedily when demonstrating (False: sample their policy)
  c.num_data_episodes = 64  # expert episodes collected per task, before the 80% filter
  c.keep_fraction = 0.8  # keep episodes with at least this fraction of the expert return (Gato: 80%)
  c.dim = 64  # model width
  c.n_layers = 2  # decoder blocks
  c.n_heads = 4  # attention heads
  c.context = 128  # tokens per training sequence (and the longest evaluation window)
  c.prompt_prob = 0.25  # fraction of training sequences prefixed with another episode of the task (Gato: 25%)
  c.prompt_timesteps = 6  # prompt length in timesteps (training and evaluation)
  c.rows_per_task = 4  # sequences per task per step, for every control task, text and captions
  c.steps = 1500  # training steps of every model (multi-task and each single-task one)
  c.steps_per_call = 20  # steps per compiled call; divides steps
  c.checkpoint_every = 500  # steps between checkpoints of each model (and at the end); a multiple of steps_per_call
  c.lr = 1e-3  # AdamW peak learning rate (warm-up 5% of the steps, then cosine)
  c.text_bytes = 400_000  # bytes of the Python standard library source for the text task
  c.eval_episodes = 50  # evaluation episodes per task and model (Gato: 50)
  c.eval_history = 8  # earlier timesteps kept in the evaluation context, after the prompt
  c.eval_temperature = 1.0  # 1: sample the policy (as Gato deploys); 0: argmax over the valid action ids
  c.bootstrap = 2000  # bootstrap resamples of the mean score
  c.probe_rows = 128  # windows per condition of the prompt probe (teacher-forced twin accuracy)
  c.probe_episodes = 16  # held-out expert episodes per twin for the probe's windows (before the 80% filter)
  c.figures_dir = ""  # also copy gato_scores.png and gato_twin.png there (e.g. docs/figures)
  if variant == "small":  # under 15 minutes on 2 CPU cores
    c.steps = 300
    c.eval_episodes = 20
    c.eval_history = 4
    c.num_data_episodes = 32
    c.text_bytes = 200_000
  elif variant:
    raise ValueError(f"unknown gato config variant {variant!r}; use '' or 'small'")
  return c
