"""The experiment contract: every family exposes `run(config, workdir) -> dict`.

    # jaxml/<family>/experiment.py
    def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
      model_cfg = experiment.from_config(MyModelConfig, config.model)
      ...                                  # jaxml.train.train, then the figures
      return {"eval_loss": ..., "preempted": result.preempted}

    # experiments/<name>.py: the whole entrypoint
    from jaxml import experiment
    if __name__ == "__main__":
      experiment.launch("jaxml.<family>.experiment:run", config="<name>")

`launch` relaunches with huge pages on Linux (`jaxml.train.hostmem`), defines
the flags every entrypoint shares (`--config` with a `small` variant,
`--workdir`, `--mode` for configs with a `mode` field, the multi-process
flags), calls `run` and exits with status 143 (128 + SIGTERM) when the run was
preempted (`run` returned `preempted=True` after saving a checkpoint), so a
requeue wrapper can tell a preempted run from a finished one.

`from_config` is the one converter from an experiment config (a
`ConfigDict` or dict) to a model's frozen dataclass: unknown keys raise
naming them, lists become tuples, missing keys take the dataclass's default
(each default lives in one place: the dataclass).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T")

PREEMPTED_EXIT_CODE = 143   # 128 + SIGTERM: what schedulers and requeue wrappers read as "preempted"
SMALL = "small"             # the name of every config's small (CPU, minutes) variant


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


def from_config(cls: type[T], config: Any = None, **overrides: Any) -> T:
  """Builds the frozen dataclass `cls` from an experiment config.

  Args:
    cls: a dataclass type (e.g. `LlamaConfig`, `TowerConfig`).
    config: a `ml_collections.ConfigDict`, a dict or None; every key must be a
      field of `cls`.
    **overrides: fields set after `config` (e.g. derived values, nested
      dataclasses built by the caller).

  Returns:
    `cls(**fields)`; lists (at any depth) become tuples; fields absent from
    both take the dataclass's defaults.

  Raises:
    ValueError: a key is not a field of `cls` (the message names it and lists
      the valid fields).
  """
  if not dataclasses.is_dataclass(cls):
    raise TypeError(f"from_config needs a dataclass type, got {cls!r}")
  values = {} if config is None else dict(_plain(config))
  values.update(overrides)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
  return cls(**values)


def to_dict(obj: Any) -> dict:
  """A dataclass (or ConfigDict) as a plain JSON-able dict (tuples as lists)."""
  from jaxml import report
  if dataclasses.is_dataclass(obj):
    return report.to_jsonable(obj)
  return report.to_jsonable(_plain(obj))


_FIELD = re.compile(r"^\s*(?:config|c|cfg)\.([A-Za-z_][\w.]*)\s*=\s*(.+?)\s*#\s*(.+)$")


def describe_config_file(path: str) -> str:
  """The fields a config file sets, with their comments, one per line (for `--help`)."""
  try:
    with open(path) as f:
      lines = f.readlines()
  except OSError:
    return ""
  out = []
  for line in lines:
    m = _FIELD.match(line)
    if m:
      out.append(f"  --config.{m.group(1)}={m.group(2)}   {m.group(3)}")
  return "\n".join(out)


def _resolve(target: str | Callable) -> Callable:
  if callable(target):
    return target
  module, _, name = target.partition(":")
  return getattr(importlib.import_module(module), name or "run")


def launch(run: str | Callable[[Any, str], dict], *, config: str, workdir_optional: Callable[[Any], bool] | None = None,
           argv: list[str] | None = None) -> None:
  """The body of every `experiments/<name>.py` (module docstring).

  Args:
    run: `run(config, workdir) -> dict`, or "module:function" (imported after
      the flags are parsed and multi-process start-up, so `--help` is fast).
    config: the config's name: `experiments/configs/<config>.py` (variants:
      `--config=experiments/configs/<config>.py:small`).
    workdir_optional: `f(config) -> bool`, True where a run needs no
      `--workdir` (e.g. sampling from a converted checkpoint).
    argv: for tests; default `sys.argv`.
  """
  from absl import app, flags, logging
  from ml_collections import config_flags

  from jaxml.train import hostmem
  from jaxml.train.distributed import maybe_initialize_distributed

  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, "experiments", "configs", f"{config}.py")
  help_text = (f"Experiment config file (path[:variant], variant '{SMALL}' for a small CPU run); default "
               f"experiments/configs/{config}.py. Override any field with --config.<field>=value:\n"
               f"{describe_config_file(path)}")
  fv = flags.FLAGS
  config_flags.DEFINE_config_file("config", path, help_text, lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, results and figures; rerunning on the "
                      "same folder resumes.")
  flags.DEFINE_string("mode", None, "Sets config.mode (for configs that have one, e.g. train/generate).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process launch.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process launch.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process launch.")

  def main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    if not fv["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # keep library INFO logs (orbax) out of the progress lines
    cfg = fv.config
    if fv.mode is not None:
      if "mode" not in cfg:
        raise app.UsageError(f"--mode: the config {config} has no mode field")
      with cfg.unlocked():
        cfg.mode = fv.mode
    workdir = fv.workdir
    if workdir is None and not (workdir_optional and workdir_optional(cfg)):
      raise app.UsageError("--workdir is required")
    maybe_initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
    out = _resolve(run)(cfg, workdir)
    if isinstance(out, dict) and out.get("preempted"):
      sys.exit(PREEMPTED_EXIT_CODE)

  app.run(main, argv=argv)
