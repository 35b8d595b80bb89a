"""Orbax checkpoints that never lose work: save every k steps, resume from the newest good step.

What a checkpoint folder promises (`<dir>/<step>/`):
  * A run deletes only checkpoints it wrote itself: `keep` bounds the number
    of this run's checkpoints on disk; those of earlier runs stay until the
    user removes them.
  * A step folder that fails to read back (truncated, a write cut short) is
    set aside to `<dir>/corrupt/<step>` (a fresh name if that exists: nothing
    set aside is ever overwritten) and the next older step is tried, but only
    when an older step does restore. When none restores the restore raises
    `NoUsableCheckpointError` and touches nothing, unless the caller allows a
    fresh start.
  * A checkpoint whose shapes or dtypes differ from the state being restored
    (a changed model config) is not corruption: `CheckpointMismatchError`
    names the leaves and nothing is moved.
  * `run_config.json` records the configuration a workdir's checkpoints were
    written with (`check_run_config`); a rerun with a different one raises
    `ConfigMismatchError` naming the fields, before anything is restored.
  * The training loop sets aside to `<dir>/nonfinite/<step>` a checkpoint it
    wrote whose state turned out to give a NaN/inf loss (`set_aside`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxml.train.optim import path_str

RUN_CONFIG_FILE = "run_config.json"


class CheckpointMismatchError(ValueError):
  """A checkpoint's stored shapes/dtypes differ from the state it is restored into."""


class ConfigMismatchError(ValueError):
  """A workdir's recorded configuration differs from the one given now."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none restores; a fresh start would silently discard them."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _short(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  first = text[0] if text else ""
  return f"{type(e).__name__}: {first[:160]}"


class _Quiet:
  """Silences orbax's and asyncio's log records while probing a step that may be broken."""

  _NAMES = ("absl", "orbax", "asyncio", "jax")

  def __enter__(self):
    self._levels = {n: logging.getLogger(n).level for n in self._NAMES}
    for n in self._NAMES:
      logging.getLogger(n).setLevel(logging.CRITICAL)
    return self

  def __exit__(self, *exc):
    for n, level in self._levels.items():
      logging.getLogger(n).setLevel(level)
    return False


def _unique(path: str) -> str:
  if not os.path.exists(path):
    return path
  stamp = time.strftime("%Y%m%d-%H%M%S")
  candidate, i = f"{path}-{stamp}", 1
  while os.path.exists(candidate):
    candidate, i = f"{path}-{stamp}-{i}", i + 1
  return candidate


def _diff(recorded: Any, given: Any, prefix: str = "", defaults: Any = None) -> list[str]:
  if isinstance(recorded, dict) and isinstance(given, dict):
    defaults = defaults if isinstance(defaults, dict) else {}
    out = []
    for k in sorted(set(recorded) | set(given), key=str):
      name = f"{prefix}{k}"
      if k not in recorded and k in defaults and defaults[k] == given[k]:
        continue  # a field added since the run was recorded, at its default: the recorded run had its behaviour
      if k not in recorded:
        out.append(f"{name} (new: {given[k]!r})")
      elif k not in given:
        out.append(f"{name} (recorded {recorded[k]!r}, now absent)")
      else:
        out += _diff(recorded[k], given[k], name + ".", defaults.get(k))
    return out
  if recorded != given:
    return [f"{prefix[:-1] if prefix.endswith('.') else prefix}: recorded {recorded!r}, now {given!r}"]
  return []


def _jsonable(config: Any) -> Any:
  return json.loads(json.dumps(config, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def check_run_config(directory: str, config: dict, *, fields: str = "config", defaults: dict | None = None) -> None:
  """Records `config` in `directory/run_config.json`, or checks it against the record.

  Args:
    directory: the checkpoint folder (created if missing).
    config: a JSON-serialisable dict of what must not change across resumes
      (the model's config; lists and tuples compare equal).
    fields: what to call the config in the error message.
    defaults: the config's default values (e.g. `to_dict` of the config class
      built with no arguments). A field missing from the record is accepted
      when its value here equals its default: a field added to the class since
      the run was recorded, whose default keeps the old behaviour (the record
      is left as it was). Without `defaults` every new field is a difference.

  Raises:
    ConfigMismatchError: the recorded config differs; the message names every
      differing field. Nothing on disk is touched.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, RUN_CONFIG_FILE)
  given = _jsonable(config)
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    problems = _diff(recorded, given, defaults=None if defaults is None else _jsonable(defaults))
    if problems:
      raise ConfigMismatchError(
          f"the {fields} differs from the one {directory!r} was trained with: " + "; ".join(problems) +
          ". Nothing was changed on disk: use a new workdir, or restore the recorded values.")
    return
  if jax.process_index() == 0:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(given, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  _sync("jaxml_run_config")


class Checkpointer:
  """Saves and restores `TrainState`s with orbax (module docstring for the guarantees).

  Args:
    directory: where step folders go (created if missing).
    every: save when `step % every == 0` (`save(..., force=True)` ignores it).
    keep: the number of this run's newest checkpoints kept on disk.
    async_save: write in a background thread; `wait()` blocks until done.
  """

  def __init__(self, directory: str, *, every: int = 100, keep: int = 3, async_save: bool = True):
    if every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint every and keep must be positive, got every={every}, keep={keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = every
    self.keep = keep
    self._options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=1,
                                                 enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._written: list[int] = []   # steps this run saved, oldest first
    self._pending: set[int] = set()  # of those, the ones not yet confirmed good (never pruned)

  def all_steps(self) -> list[int]:
    """The step folders on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step on disk, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  @property
  def written(self) -> list[int]:
    """The steps this Checkpointer saved (and has not set aside), oldest first."""
    return list(self._written)

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save without `force`."""
    return step % self.every == 0 and step not in self._manager.all_steps()

  def save(self, step: int, state: Any, *, force: bool = False, confirmed: bool = True) -> bool:
    """Saves `state` at `step` if due (or `force`), then prunes this run's old checkpoints.

    Args:
      step: the step number (the folder's name).
      state: the pytree to save.
      force: save even when `step` is not a multiple of `every`.
      confirmed: False for a state not yet known good (the training loop confirms it with
        `confirm` once its next loss has been seen); pruning keeps the `keep` newest
        confirmed checkpoints and never removes an unconfirmed one, so a last good state
        survives whatever `keep` is.

    Returns:
      Whether a save started.
    """
    if not (force or step % self.every == 0) or step in self._manager.all_steps():
      return False
    started = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if started:
      self._written.append(step)
      if not confirmed:
        self._pending.add(step)
      self._prune()
    return started

  def confirm(self, step: int) -> None:
    """Marks this run's checkpoint at `step` as a good state (see `save`), then prunes."""
    if step in self._pending:
      self._pending.discard(step)
      self._prune()

  def _prune(self) -> None:
    good = [s for s in self._written if s not in self._pending]
    for old in good[:max(len(good) - self.keep, 0)]:
      self._written.remove(old)
      self._manager.wait_until_finished()
      self._manager.delete(old)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _move_aside(self, step: int, folder: str) -> str:
    src = os.path.join(self.directory, str(step))
    dst = _unique(os.path.join(self.directory, folder, str(step)))
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    _sync(f"jaxml_ckpt_aside_{folder}_{step}")
    self._manager.reload()
    return dst

  def set_aside(self, step: int, reason: str) -> str:
    """Moves this run's checkpoint at `step` to `nonfinite/<step>` (a fresh name). Returns the new path."""
    if step not in self._written:
      raise ValueError(f"step {step} was not written by this run; refusing to move it")
    self._manager.wait_until_finished()
    self._written.remove(step)
    self._pending.discard(step)
    dst = self._move_aside(step, "nonfinite")
    _log(f"checkpoint: step {step} set aside to {os.path.relpath(dst, self.directory)} ({reason})")
    return dst

  def _check_shapes(self, step: int, target: Any) -> None:
    """Raises CheckpointMismatchError if the stored tree's shapes/dtypes differ from `target`."""
    meta = self._manager.item_metadata(step)
    stored = getattr(meta, "tree", meta)
    if stored is None:
      return
    want = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]:
      if hasattr(leaf, "shape"):
        have[path_str(p)] = leaf
    problems = []
    for name, leaf in want.items():
      got = have.get(name)
      if got is None:
        problems.append(f"{name}: not in the checkpoint")
      elif tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
        problems.append(f"{name}: stored {np.dtype(got.dtype).name}{list(got.shape)}, "
                        f"expected {np.dtype(leaf.dtype).name}{list(leaf.shape)}")
    problems += [f"{name}: in the checkpoint, not in the state" for name in have if name not in want]
    if problems:
      shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the state being restored (a changed "
          f"model or optimizer config?): " + "; ".join(shown) + ". Nothing was moved or deleted.")

  def restore_latest(self, abstract_state: Any, *, allow_fresh_start: bool = False) -> tuple[Any, int] | tuple[None, None]:
    """Restores the newest step that reads back cleanly into `abstract_state`.

    Args:
      abstract_state: a tree of `jax.ShapeDtypeStruct` with `.sharding` set
        (or concrete arrays): arrays come back in those layouts.
      allow_fresh_start: when checkpoints exist but none restores, set them
        all aside and return `(None, None)` instead of raising.

    Returns:
      `(state, step)`, or `(None, None)` when there is no checkpoint.

    Raises:
      CheckpointMismatchError: a readable checkpoint has other shapes/dtypes.
      NoUsableCheckpointError: checkpoints exist, none restores, and
        `allow_fresh_start` is False; nothing was moved.
    """
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    broken: list[tuple[int, str]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      with _Quiet():
        try:
          self._manager.item_metadata(step)
          metadata_ok = True
        except Exception:  # noqa: BLE001 - unreadable metadata: the step is broken
          metadata_ok = False
      if metadata_ok:
        self._check_shapes(step, target)   # a mismatch raises, touching nothing
      with _Quiet():
        try:
          state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable.
          if "tree structures do not match" in str(e):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} has another tree structure than the state being "
                f"restored (a changed model or optimizer config?): {_short(e)}. Nothing was moved or "
                "deleted.") from e
          broken.append((step, _short(e)))
          continue
      for b, why in broken:
        dst = self._move_aside(b, "corrupt")
        _log(f"checkpoint: step {b} is unreadable ({why}); set aside to {os.path.relpath(dst, self.directory)}")
      return state, step
    if broken:
      listing = ", ".join(f"{b} ({why})" for b, why in broken)
      if not allow_fresh_start:
        raise NoUsableCheckpointError(
            f"none of the checkpoints in {self.directory} restores: {listing}. Nothing was moved. Starting "
            "over would discard them: fix or remove them, or allow a fresh start explicitly "
            "(--config.allow_fresh_start=True in the experiments).")
      for b, why in broken:
        dst = self._move_aside(b, "corrupt")
        _log(f"checkpoint: step {b} is unreadable ({why}); set aside to {os.path.relpath(dst, self.directory)}")
    return None, None


def restore_or_init(checkpointer: Checkpointer | None, abstract_state: Any, init: Callable[[], Any], *,
                    allow_fresh_start: bool = False) -> tuple[Any, int]:
  """Resumes from the newest good checkpoint, else calls `init()`.

  Args:
    checkpointer: where to look (None: always `init()`).
    abstract_state: ShapeDtypeStructs with shardings (`abstract_train_state`),
      the restore target, so nothing is allocated twice.
    init: `init() -> state`, for a fresh start.
    allow_fresh_start: see `Checkpointer.restore_latest`.

  Returns:
    `(state, step)`.
  """
  if checkpointer is not None:
    restored, step = checkpointer.restore_latest(abstract_state, allow_fresh_start=allow_fresh_start)
    if restored is not None:
      _log(f"checkpoint: resumed from step {step} in {checkpointer.directory}")
      return restored, step
  return init(), 0
