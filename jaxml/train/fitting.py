"""`fit`: one model trained (or resumed) in one call, the recipe every family repeats.

The calls of WORKSPACE.md's "Where a new model goes" in one place: a `Checkpointer` in
`workdir/checkpoints`, `check_run_config` against the record of what the checkpoints depend
on, shape-first `restore_or_init`, the built step (`make_train_step`, optionally wrapped for a
family's per-call work such as a held-out evaluation), then `train`. Without a workdir the
loop writes into a temporary folder that is deleted afterwards and nothing is checkpointed:
for the many sub-minute fits of a study, where resuming mid-fit buys nothing.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import jax
import optax

from jaxml.train import checkpoint as ckpt_lib
from jaxml.train import loop, state as state_lib, step as step_lib


def fit(loss_fn: Callable | None, init_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
        rng: jax.Array, *, num_steps: int, batch_fn: Callable[[int], Any] | None = None, workdir: str | None = None,
        record: dict | None = None, defaults: dict | None = None, checkpoint_every: int | None = None,
        keep: int = 3, steps_per_call: int = 1, ema_decay: float | None = None, ema_warmup: bool = False,
        schedule: Callable | None = None, step: Callable | None = None,
        wrap_step: Callable[[Callable], Callable] | None = None, allow_fresh_start: bool = False,
        record_name: str = "training config", **train_kwargs) -> loop.TrainResult:
  """Trains `init_fn(rng)` on `loss_fn` with `tx` for `num_steps` updates, resuming from `workdir`'s checkpoints.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)` for `make_train_step`
      (None when `step` is given).
    init_fn: `init_fn(rng) -> params`.
    tx: the optimizer.
    rng: the state's key (init and the per-step keys).
    num_steps: total updates (a multiple of `steps_per_call`).
    batch_fn: `batch_fn(step)`, deterministic in the step; None: the loss draws
      its data from its key.
    workdir: where metrics, the plot and `checkpoints/` go; None: a temporary
      folder and no checkpoints.
    record: what the checkpoints must agree with (`check_run_config`; a change
      raises naming the fields); `defaults` as there.
    checkpoint_every: steps between checkpoints (default: only at the end).
    keep: this run's confirmed checkpoints kept.
    steps_per_call: k updates per compiled call.
    ema_decay, ema_warmup, schedule: as `make_train_step` (an EMA of the
      parameters lives in `state.ema_params`).
    step: an already compiled step to use instead of building one from
      `loss_fn` (e.g. one shared across fits of the same loss).
    wrap_step: `wrap_step(step) -> step`, applied to the built step before
      `jax.jit` (a family's work after each call, e.g. held-out metrics).
    allow_fresh_start: see `restore_or_init`.
    record_name: what to call the record in a mismatch error.
    **train_kwargs: passed to `train` (log_every, plot_title, print_fn,
      tensorboard, plot, finite_keys, tokens_per_step).

  Returns:
    The loop's `TrainResult`.
  """
  if (loss_fn is None) == (step is None):
    raise ValueError("fit needs exactly one of loss_fn and step")
  ema = ema_decay is not None
  if step is None:
    built = step_lib.make_train_step(loss_fn, tx, schedule=schedule, ema_decay=ema_decay, ema_warmup=ema_warmup,
                                     steps_per_call=steps_per_call)
    step = jax.jit(built if wrap_step is None else wrap_step(built), donate_argnums=0)
  fresh = lambda: state_lib.init_train_state(init_fn, tx, rng, ema=ema)[0]  # noqa: E731
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix="jaxml_fit_") as tmp:
      return loop.train(step, fresh(), batch_fn, num_steps=num_steps, workdir=tmp, steps_per_call=steps_per_call,
                        **{"tensorboard": False, "plot": False, **train_kwargs})
  every = checkpoint_every or num_steps
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=every, keep=keep)
  try:
    if record is not None:
      ckpt_lib.check_run_config(checkpointer.directory, record, fields=record_name, defaults=defaults)
    abstract, _ = state_lib.abstract_train_state(init_fn, tx, rng, ema=ema)
    state, start = ckpt_lib.restore_or_init(checkpointer, abstract, fresh, allow_fresh_start=allow_fresh_start)
    return loop.train(step, state, batch_fn, num_steps=num_steps, workdir=workdir, start_step=start,
                      steps_per_call=steps_per_call, checkpointer=checkpointer, **train_kwargs)
  finally:
    checkpointer.close()
