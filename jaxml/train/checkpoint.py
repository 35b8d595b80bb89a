"""Orbax checkpoints: keep-N, save every k steps, resume from the newest good step.

A step directory that fails to restore (truncated or missing files, a write cut
short) is reported, moved aside to `<dir>/corrupt/<step>`, and the next older
step is tried, so a crash during a save never blocks a restart.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


class Checkpointer:
  """A thin, typed wrapper over `orbax.checkpoint.CheckpointManager`.

  directory:  where step folders go (created if missing)
  every:      save when `step % every == 0` (`save(..., force=True)` ignores it)
  keep:       number of newest steps kept on disk
  async_save: write in a background thread; `wait()` blocks until done
  """

  def __init__(self, directory: str, *, every: int = 100, keep: int = 3, async_save: bool = True):
    if every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint every and keep must be positive, got every={every}, keep={keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = every
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                                 enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` at `step` if due (or `force`). Returns whether a save started."""
    if not (force or step % self.every == 0) or step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _quarantine(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      dst_root = os.path.join(self.directory, "corrupt")
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxml_ckpt_quarantine_{step}")
    self._manager.reload()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | tuple[None, None]:
    """Restores the newest step that reads back cleanly into `abstract_state`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding`
    set (or concrete arrays): arrays come back in those layouts. Returns
    `(state, step)`, or `(None, None)` when no usable checkpoint exists.
    """
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable.
        _log(f"checkpoint: step {step} in {self.directory} is corrupt or partial "
             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             f"moved to corrupt/{step}, trying the previous step")
        self._quarantine(step)
        continue
      return state, step
    return None, None


def restore_or_init(checkpointer: Checkpointer | None, abstract_state: Any,
                    init: Callable[[], Any]) -> tuple[Any, int]:
  """Resumes from the newest good checkpoint, else calls `init()`.

  `abstract_state`: ShapeDtypeStructs with shardings (`abstract_train_state`),
  the restore target, so nothing is allocated twice. Returns `(state, step)`.
  """
  if checkpointer is not None:
    restored, step = checkpointer.restore_latest(abstract_state)
    if restored is not None:
      _log(f"checkpoint: resumed from step {step} in {checkpointer.directory}")
      return restored, step
  return init(), 0
