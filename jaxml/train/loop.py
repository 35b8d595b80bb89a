"""The training loop: progress lines, JSONL + TensorBoard metrics, checkpoints,
resume, SIGTERM (preemption) handling, a NaN/inf guard and the loss plot.

Files written under `workdir` (by process 0):
  metrics.jsonl   one JSON object per logged step: step, loss and the step's
                  other metrics averaged over the logging window, steps_per_sec,
                  tokens_per_sec, elapsed seconds
  tb/             TensorBoard event files (the same scalars)
  loss.png        the loss curve, written when the loop ends
  checkpoints/    orbax step folders (see `jaxml.train.checkpoint`)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from jaxml.train import sharding as shd
from jaxml.train.checkpoint import Checkpointer


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produces a NaN or infinite loss; the state of that step is discarded."""


@dataclasses.dataclass
class TrainResult:
  state: Any                 # the final state (last good one)
  step: int                  # number of updates applied
  preempted: bool            # stopped early by SIGTERM (a checkpoint was saved)
  history: list[dict]        # the logged metric records of this run


def _is_main() -> bool:
  return jax.process_index() == 0


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Preemption:
  """Records SIGTERM instead of dying; the loop polls `requested`."""

  def __init__(self):
    self.requested = False
    self._previous = None

  @contextlib.contextmanager
  def installed(self) -> Iterator["_Preemption"]:
    if threading.current_thread() is not threading.main_thread():
      yield self  # signals can only be handled on the main thread
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
    self.requested = True

  def any_requested(self) -> bool:
    """True if any process received SIGTERM (an all-gather under multi-host)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


class MetricsWriter:
  """Appends records to `metrics.jsonl` and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not _is_main():
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      # Drop records past the resume point (written after the last checkpoint
      # of an interrupted run), so the file reads as one clean run.
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

  def write(self, record: dict) -> None:
    if not _is_main():
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` (empty if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss(workdir: str, path: str | None = None, title: str = "training loss") -> str | None:
  """Writes the loss curve from `metrics.jsonl` to a PNG (default `workdir/loss.png`)."""
  records = [r for r in read_metrics(workdir) if "loss" in r]
  if not records or not _is_main():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  path = path or os.path.join(workdir, "loss.png")
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def train(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, batch_fn: Callable[[int], Any], *,
          num_steps: int, workdir: str, start_step: int | None = None, batch_sharding: Any = None,
          checkpointer: Checkpointer | None = None, log_every: int = 10, tokens_per_step: int | None = None,
          tensorboard: bool = True, plot: bool = True, print_fn: Callable[[str], None] = print) -> TrainResult:
  """Runs `step_fn` from `start_step` (default `int(state.step)`) up to `num_steps`.

  step_fn:         compiled `(state, batch) -> (state, metrics)`; may donate `state`
  batch_fn(step):  the global host batch for that step (deterministic in step,
                   so a resumed run sees exactly the batches it would have)
  batch_sharding:  a NamedSharding to place batches with (`shd.global_batch`);
                   None: passed to `step_fn` as numpy
  checkpointer:    saves every `checkpointer.every` steps and at the end
  tokens_per_step: for tokens/s (e.g. batch * seq_len)

  Every step's loss is checked; a NaN/inf raises `NonFiniteLossError` before
  anything is saved, so the newest checkpoint on disk is the last good one.
  SIGTERM makes the loop save the current state, wait for the write, and
  return with `preempted=True`.
  """
  step = int(state.step) if start_step is None else int(start_step)
  if log_every <= 0:
    raise ValueError(f"log_every must be positive, got {log_every}")
  writer = MetricsWriter(workdir, resume_step=step, tensorboard=tensorboard)
  history: list[dict] = []
  window: list[dict] = []
  preempted = False
  first_step = step
  t_start = t_window = time.perf_counter()
  steps_in_window = 0
  preemption = _Preemption()
  try:
    with preemption.installed():
      while step < num_steps:
        batch = batch_fn(step)
        if batch_sharding is not None:
          batch = shd.global_batch(batch, batch_sharding)
        new_state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          raise NonFiniteLossError(
              f"loss is {loss} at step {step + 1} (metrics: "
              f"{ {k: float(v) for k, v in metrics.items()} }); stopping. The state of this step is "
              f"discarded; the newest checkpoint"
              f"{' in ' + checkpointer.directory if checkpointer else ''} is the last good one"
              f"{' (step %s)' % checkpointer.latest_step() if checkpointer else ''}. "
              "Lower the learning rate, check the data, or enable clipping.")
        state = new_state
        step += 1
        steps_in_window += 1
        if step == first_step + 1:
          # The first call includes compilation: report it, and start the
          # throughput clock after it.
          if _is_main():
            print_fn(f"step {step}: first step (compile + run) took {time.perf_counter() - t_start:.1f}s")
          t_window, steps_in_window = time.perf_counter(), 0
        window.append({k: float(v) for k, v in metrics.items()})
        if checkpointer is not None:
          checkpointer.save(step, state)
        if step % log_every == 0 or step == num_steps:
          now = time.perf_counter()
          sps = steps_in_window / (now - t_window) if steps_in_window else None  # None: only the compile step
          record = {"step": step}
          for k in window[0]:
            record[k] = float(np.mean([w[k] for w in window]))
          if sps is not None:
            record["steps_per_sec"] = sps
            if tokens_per_step:
              record["tokens_per_sec"] = sps * tokens_per_step
          record["elapsed_sec"] = now - t_start
          writer.write(record)
          history.append(record)
          if _is_main():
            line = f"step {step}/{num_steps}  loss {record['loss']:.4f}"
            if sps is not None:
              line += f"  {sps:.2f} steps/s"
              if tokens_per_step:
                line += f"  {record['tokens_per_sec']:.0f} tokens/s"
              line += f"  ETA {_fmt_eta((num_steps - step) / sps)}"
            print_fn(line)
          window, steps_in_window, t_window = [], 0, time.perf_counter()
        if preemption.any_requested():
          preempted = True
          if checkpointer is not None:
            checkpointer.save(step, state, force=True)
            checkpointer.wait()
          if _is_main():
            print_fn(f"SIGTERM: saved a checkpoint at step {step}; exiting cleanly")
          break
      else:
        if checkpointer is not None:
          checkpointer.save(step, state, force=True)
  finally:
    if checkpointer is not None:
      checkpointer.wait()  # finish the last good save even when raising
    writer.close()
  if plot and step > first_step:
    plot_loss(workdir)
  return TrainResult(state=state, step=step, preempted=preempted, history=history)
