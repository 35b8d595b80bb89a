"""The training loop every model family runs: progress lines, JSONL + TensorBoard
metrics, checkpoints, resume, SIGTERM (preemption) handling, a NaN/inf guard and
the loss plot.

Files written under `workdir` (by process 0):
  metrics.jsonl   one JSON object per logged step: step, loss and the step's
                  other metrics averaged over the logging window, steps_per_sec,
                  tokens_per_sec, elapsed seconds (carried across resumes).
                  The file is only ever appended to: a resumed or restarted run
                  first writes an `{"event": "resume" | "restart", "step": s}`
                  line, and `read_metrics` drops the records it supersedes.
  tb/             TensorBoard event files (the same scalars)
  loss.png        the loss curve, written when the loop ends
  checkpoints/    orbax step folders (see `jaxml.train.checkpoint`)

The NaN guard. Step t's loss is computed from the state before update t, so a
state is known good only once its own next loss (and gradient norm) has been
seen finite. The loop
reads each call's metrics after dispatching the next call (the host never
waits on the device in between), and on a non-finite loss sets aside every
checkpoint it wrote of a state that was not confirmed, then raises
`NonFiniteLossError` naming the newest checkpoint left: a state whose next
loss was finite, so a rerun from it trains. The state saved at the very end
(or at SIGTERM) has no next loss yet: its parameters are checked finite.
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
import jax.numpy as jnp
import numpy as np

from jaxml.train import sharding as shd
from jaxml.train.checkpoint import Checkpointer


class NonFiniteLossError(FloatingPointError):
  """A step produced a NaN or infinite loss; the states from it on are discarded.

  Attributes:
    step: the update whose loss was non-finite (1-based).
    last_good_step: the newest checkpoint left on disk, or None.
  """

  def __init__(self, message: str, step: int | None = None, last_good_step: int | None = None):
    super().__init__(message)
    self.step = step
    self.last_good_step = last_good_step


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final state.
    step: the number of updates applied.
    preempted: stopped early by SIGTERM (a checkpoint was saved first).
    history: the metric records this run logged.
  """
  state: Any
  step: int
  preempted: bool
  history: list[dict]


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


def _read_lines(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut short by a crash: skip it, keep the rest
  return out


def _effective(records: list[dict]) -> list[dict]:
  kept: list[dict] = []
  for r in records:
    if "event" in r:
      kept = [k for k in kept if k["step"] <= r["step"]]
    else:
      kept.append(r)
  return kept


def read_metrics(workdir: str, *, raw: bool = False) -> list[dict]:
  """The records of `workdir/metrics.jsonl`.

  Args:
    workdir: the run's folder.
    raw: return every line as written, resume/restart markers included.

  Returns:
    The records of the run as it stands: a record logged after the
    checkpoint a later run resumed from is superseded by that run's own.
  """
  records = _read_lines(os.path.join(workdir, "metrics.jsonl"))
  return records if raw else _effective(records)


class MetricsWriter:
  """Appends records to `metrics.jsonl` and TensorBoard; only process 0 writes.

  Args:
    workdir: the run's folder.
    resume_step: the step this run starts from; when the file already has
      records, a marker line `{"event": "resume"|"restart", "step": ...}` is
      appended first (nothing is ever truncated).
    tensorboard: also write TensorBoard events under `workdir/tb`.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self.elapsed_offset = 0.0
    if not _is_main():
      return
    os.makedirs(workdir, exist_ok=True)
    previous = read_metrics(workdir)
    if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
      event = "resume" if resume_step else "restart"
      self._append({"event": event, "step": int(resume_step), "time": time.time()})
      kept = [r for r in previous if r["step"] <= resume_step]
      if resume_step and kept:
        self.elapsed_offset = float(kept[-1].get("elapsed_sec", 0.0))
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

  def _append(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write(self, record: dict) -> None:
    """Appends one record (a dict with an int `step` and float values)."""
    if not _is_main():
      return
    self._append(record)
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def plot_loss(workdir: str, path: str | None = None, title: str = "training loss",
              ylabel: str = "loss") -> str | None:
  """Writes the loss curve from `metrics.jsonl` to a PNG (default `workdir/loss.png`).

  Returns:
    The path written, or None when there is nothing to plot.
  """
  records = [r for r in read_metrics(workdir) if "loss" in r]
  if not records or not _is_main():
    return None
  from jaxml import report
  path = path or os.path.join(workdir, "loss.png")
  with report.figure(path, figsize=(6, 4)) as fig:
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  return path


def _state_step(state: Any) -> int:
  """The step of a state; a vmapped ensemble (a vector of steps) counts by its first entry."""
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _per_step(metrics: dict, k: int) -> list[dict[str, float]]:
  """Host metrics of one call -> k dicts of floats (means over any axes beyond the step axis)."""
  out = [dict() for _ in range(k)]
  for name, value in metrics.items():
    a = np.asarray(value, np.float64)
    a = a.reshape(k, -1) if k > 1 else a.reshape(1, -1)
    for i in range(k):
      row = a[i]
      out[i][name] = float(np.mean(row))   # any NaN/inf entry makes the mean non-finite
  return out


def train(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, batch_fn: Callable[[int], Any] | None, *,
          num_steps: int, workdir: str, start_step: int | None = None, steps_per_call: int = 1,
          batch_sharding: Any = None, checkpointer: Checkpointer | None = None, log_every: int = 10,
          tokens_per_step: int | None = None, tensorboard: bool = True, plot: bool = True,
          plot_title: str = "training loss", finite_keys: tuple[str, ...] = ("loss", "grad_norm"),
          print_fn: Callable[[str], None] = print) -> TrainResult:
  """Runs `step_fn` from `start_step` up to `num_steps` updates.

  Args:
    step_fn: compiled `(state, batch) -> (state, metrics)` (the built step or
      a family's own); may donate `state`; `metrics["loss"]` is required
      (any shape: a vmapped ensemble's losses are averaged for the log and
      all checked). With `steps_per_call = k`, one call applies k updates and
      every metric has a leading `[k]` axis.
    state: the state to start from.
    batch_fn: `batch_fn(step)` is the global host batch of update `step + 1`
      (deterministic in step, so a resumed run sees the batches it would have
      seen); with k > 1 the loop stacks k of them on a new leading axis.
      None: the step gets None (it draws its data from its key).
    num_steps: the total number of updates (the run stops there).
    workdir: where metrics, TensorBoard events and the plot go.
    start_step: default `state.step` (a vector of steps counts by its first).
    steps_per_call: k updates per call; `num_steps`, `start_step` and
      `checkpointer.every` must be multiples of k.
    batch_sharding: a NamedSharding (or tree of them) to place batches with
      (`shd.global_batch`); None: batches go to `step_fn` as numpy.
    checkpointer: saves every `checkpointer.every` steps and at the end.
    log_every: steps per logged record (rounded up to a multiple of k).
    tokens_per_step: for tokens/s (e.g. batch * seq_len).
    tensorboard, plot: write TensorBoard events / `loss.png`.
    plot_title: the plot's title.
    finite_keys: the metrics that must be finite for a step's input state to
      count as good (those the step reports; "loss" is required). A state
      whose next loss is finite but whose gradient is not would poison the
      next update: with lr 1e30 the parameters after one update are ~1e29,
      the loss from them ~1e31 (finite), their gradient infinite.
    print_fn: where progress lines go (process 0 only).

  Returns:
    A `TrainResult`. SIGTERM makes the loop save the current state, wait for
    the write and return with `preempted=True` (entrypoints then exit with
    status 143).

  Raises:
    NonFiniteLossError: a NaN/inf loss (module docstring: what stays on disk).
  """
  k = int(steps_per_call)
  step = _state_step(state) if start_step is None else int(start_step)
  if log_every <= 0:
    raise ValueError(f"log_every must be positive, got {log_every}")
  if k < 1:
    raise ValueError(f"steps_per_call must be positive, got {steps_per_call}")
  for name, value in (("num_steps", num_steps), ("start step", step),
                      ("checkpointer.every", checkpointer.every if checkpointer else k)):
    if value % k:
      raise ValueError(f"{name}={value} must be a multiple of steps_per_call={k}")
  log_every = -(-log_every // k) * k

  def make_batch(s):
    if batch_fn is None:
      batch = None
    elif k == 1:
      batch = batch_fn(s)
    else:
      parts = [batch_fn(s + i) for i in range(k)]
      batch = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *parts)
    if batch is not None and batch_sharding is not None:
      batch = shd.global_batch(batch, batch_sharding)
    return batch

  writer = MetricsWriter(workdir, resume_step=step, tensorboard=tensorboard)
  history: list[dict] = []
  window: list[dict] = []
  preempted = False
  first_step = step
  t_start = t_window = time.perf_counter()
  window_steps = 0
  compile_reported = False
  pending: tuple[int, Any] | None = None     # (step before the call, the call's device metrics)
  unconfirmed: list[int] = []                # checkpoints this run wrote whose next loss is unseen
  preemption = _Preemption()

  def fail(bad_update: int, values: dict) -> None:
    """Sets aside every unconfirmed checkpoint of a state at or after the bad one, then raises."""
    bad_state = bad_update - 1   # the state whose loss was non-finite
    if checkpointer is not None:
      checkpointer.wait()
      for s in list(unconfirmed):
        if s >= bad_state:
          checkpointer.set_aside(s, f"its state gave a non-finite loss at step {bad_update}")
          unconfirmed.remove(s)
    last = checkpointer.latest_step() if checkpointer is not None else None
    where = f" in {checkpointer.directory}" if checkpointer is not None else ""
    if last is not None:
      tail = (f"the newest checkpoint{where} is the last good one (step {last}: its next loss and gradient were finite); "
              "a rerun resumes from it")
    elif checkpointer is not None:
      tail = f"no good checkpoint remains{where}; a rerun starts from step 0"
    else:
      tail = "nothing was saved (no checkpointer)"
    shown = {n: v for n, v in values.items()}
    what = ", ".join(f"{key} is {values.get(key)}" for key in finite_keys
                     if key in values and not math.isfinite(values[key]))
    raise NonFiniteLossError(
        f"{what} at step {bad_update} (metrics: {shown}); stopping. States from step "
        f"{bad_state} on are discarded; {tail}. Lower the learning rate, check the data, or enable clipping.",
        step=bad_update, last_good_step=last)

  def process(entry) -> None:
    """Reads one call's metrics: NaN guard, confirmation of checkpoints, logging."""
    nonlocal window, window_steps, t_window, compile_reported
    s0, device_metrics = entry
    host = jax.device_get(device_metrics)
    rows = _per_step(host, k)
    for i, row in enumerate(rows):
      if any(not math.isfinite(row.get(key, 0.0 if key != "loss" else float("nan"))) for key in finite_keys):
        fail(s0 + i + 1, row)
    confirmed_upto = s0 + k - 1   # states s0 .. s0+k-1 had their next loss seen finite
    for s in list(unconfirmed):
      if s <= confirmed_upto:
        unconfirmed.remove(s)
        checkpointer.confirm(s)
    now = time.perf_counter()
    if not compile_reported:
      compile_reported = True
      if _is_main():
        print_fn(f"step {s0 + k}: first call (compile + run) took {now - t_start:.1f}s")
      t_window, window_steps = now, 0
      window.extend(rows)
    else:
      window.extend(rows)
      window_steps += k
    end = s0 + k
    if end % log_every == 0 or end == num_steps:
      sps = window_steps / (now - t_window) if window_steps else None
      record: dict[str, Any] = {"step": end}
      for name in window[0]:
        record[name] = float(np.mean([w[name] for w in window]))
      if sps is not None:
        record["steps_per_sec"] = sps
        if tokens_per_step:
          record["tokens_per_sec"] = sps * tokens_per_step
      record["elapsed_sec"] = writer.elapsed_offset + (now - t_start)
      writer.write(record)
      history.append(record)
      if _is_main():
        line = f"step {end}/{num_steps}  loss {record['loss']:.4f}"
        if sps is not None:
          line += f"  {sps:.2f} steps/s"
          if tokens_per_step:
            line += f"  {record['tokens_per_sec']:.0f} tokens/s"
          line += f"  ETA {_fmt_eta((num_steps - end) / sps)}"
        print_fn(line)
      window, window_steps, t_window = [], 0, time.perf_counter()

  def save_final(s: int, st: Any) -> None:
    """The end (or SIGTERM) state: no next loss exists, so finite parameters are the criterion."""
    if checkpointer is None or s == first_step:
      return
    if s in checkpointer.all_steps():
      if s in unconfirmed and bool(_all_finite(st.params)):
        unconfirmed.remove(s)
        checkpointer.confirm(s)   # as good as a final state can be known; lets `keep` prune older ones
      return
    if not bool(_all_finite(st.params)):
      raise NonFiniteLossError(f"the parameters at step {s} are not finite; not saving them. The newest "
                               f"checkpoint in {checkpointer.directory} (step {checkpointer.latest_step()}) "
                               "is the last good one.", step=s, last_good_step=checkpointer.latest_step())
    checkpointer.save(s, st, force=True)

  try:
    with preemption.installed():
      while step < num_steps:
        batch = make_batch(step)
        state, metrics = step_fn(state, batch)
        call_start, step = step, step + k
        if pending is not None:
          process(pending)
          pending = None
        due = checkpointer is not None and checkpointer.due(step)
        if due:
          # The metrics of this call come with the state it produced: read them
          # first, so a checkpoint is never written after a known-bad loss.
          process((call_start, metrics))
          checkpointer.save(step, state, confirmed=False)
          unconfirmed.append(step)
        else:
          pending = (call_start, metrics)
        if preemption.any_requested():
          if pending is not None:
            process(pending)
            pending = None
          preempted = True
          save_final(step, state)
          if checkpointer is not None:
            checkpointer.wait()
          if _is_main():
            print_fn(f"SIGTERM: saved a checkpoint at step {step}; exiting (status 143 from the entrypoints)")
          break
      if pending is not None:
        process(pending)
        pending = None
      if not preempted:
        save_final(step, state)
  finally:
    if checkpointer is not None:
      checkpointer.wait()  # finish the last good save even when raising
    writer.close()
  if plot and step > first_step:
    plot_loss(workdir, title=plot_title)
  return TrainResult(state=state, step=step, preempted=preempted, history=history)
