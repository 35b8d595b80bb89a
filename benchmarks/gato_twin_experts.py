"""How often the CartPole experts repeat their previous action: the shortcut open to a policy on the twins.

    python -m benchmarks.gato_twin_experts            # about a minute on 2 cores

The Gato study's CartPole twin has CartPole's observations with the two actions swapped, so a policy cannot
tell the pair apart from a state; but if the expert alternates its action regularly, "the opposite of the
previous action token" predicts either twin's actions without knowing which twin it is. This trains the
study's PPO expert (`experiments/configs/gato.py:small`, the study's seed), collects and filters its episodes
as the study does, greedy and sampling, and prints `P(a_t == a_{t-1})` over the kept episodes of each twin.
Ends with `name: value` lines (`<task>_repeat_rate_<greedy|sampled>`, `<task>_expert_return_<...>`).
"""
from __future__ import annotations

import dataclasses
import tempfile

from absl import app
import numpy as np

from experiments.configs.gato import get_config
from jaxml.gato import experiment
from jaxml.train import hostmem


def main(argv):
  del argv
  base = experiment.GatoExperimentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in get_config("small").to_dict().items()})
  res = {}
  for greedy in (True, False):
    cfg = dataclasses.replace(base, tasks=("CartPole-v1", "CartPole-twin"), expert_greedy=greedy)
    with tempfile.TemporaryDirectory() as work:
      experts = experiment._experts(cfg, work, log=lambda s: None)  # pylint: disable=protected-access
    tag = "greedy" if greedy else "sampled"
    for name, e in experts.items():
      eps = e["episodes"]
      acts, lengths = np.asarray(eps.actions), np.asarray(eps.lengths)
      repeats = [np.mean(acts[i, 1:n] == acts[i, :n - 1]) for i, n in enumerate(lengths)]
      key = name.replace("-", "_")
      res[f"{key}_repeat_rate_{tag}"] = float(np.mean(repeats))
      res[f"{key}_expert_return_{tag}"] = e["expert_return"]
      res[f"{key}_kept_episodes_{tag}"] = e["kept"]
  for k, v in res.items():
    print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()
  app.run(main)
