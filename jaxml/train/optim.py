"""Optimizer factory: AdamW with linear warmup + cosine decay and global-norm clipping.

Learning-rate schedule, with peak `lr`, `w` warmup steps, `n` total steps and
floor `lr_min = final_lr_ratio * lr`:

    lr(t) = lr * t / w                                              for t < w
    lr(t) = lr_min + (lr - lr_min) * (1 + cos(pi * min(t - w, n - w) / (n - w))) / 2
                                                                    for t >= w

Update per step (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"):
clip the gradient to global norm `clip_norm`, Adam moments with `(b1, b2, eps)`,
then `theta -= lr(t) * (adam_update + weight_decay * theta)` where the decay
term applies only to leaves selected by `decay_mask` (matrices; not norm
weights, not vectors or scalars).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax


def warmup_cosine_schedule(lr: float, warmup_steps: int, total_steps: int,
                           final_lr_ratio: float = 0.1) -> optax.Schedule:
  """The schedule in the module docstring (step count -> learning rate)."""
  if lr < 0:
    raise ValueError(f"lr must be non-negative, got {lr}")
  if warmup_steps < 0 or total_steps <= 0:
    raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}")
  if warmup_steps >= total_steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})")
  if not 0.0 <= final_lr_ratio <= 1.0:
    raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=lr * final_lr_ratio)


_NO_DECAY = re.compile(r"(^|/)[^/]*norm[^/]*$|(^|/)(bias|scale|b)$")


def path_str(path) -> str:
  """'a/b/0/c' for a pytree key path (dict keys, attribute names, indices)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: rank >= 2 and not a norm/bias/scale.

  Names are matched on the last path component, so stacked per-layer norm
  weights (`layers/attention_norm`, shape `[L, D]`) are excluded as well.
  """
  def keep(path, leaf):
    return len(getattr(leaf, "shape", ())) >= 2 and not _NO_DECAY.search(path_str(path))
  return jax.tree_util.tree_map_with_path(keep, params)


OPTIMIZERS = ("adamw", "adam", "adagrad", "sgd")
SCHEDULES = ("cosine", "constant")


def make_optimizer(lr: float, *, total_steps: int, warmup_steps: int = 0, final_lr_ratio: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0, mask: Callable[[Any], Any] | None = decay_mask,
                   kind: str = "adamw", schedule: str = "cosine") -> tuple[optax.GradientTransformation,
                                                                           optax.Schedule]:
  """The one optimizer factory of every family.

  Args:
    lr: the peak learning rate.
    total_steps: the run's length (the cosine decays over it).
    warmup_steps: linear warm-up steps (both schedules).
    final_lr_ratio: the cosine's floor as a fraction of `lr`.
    b1, b2, eps: Adam's moments (adamw, adam).
    weight_decay: decoupled decay (adamw only), on the leaves `mask` selects.
    clip_norm: global-norm clipping, or None.
    mask: `mask(params) -> bool tree` of leaves that get weight decay (None: all).
    kind: "adamw" (the module docstring), "adam", "adagrad" or "sgd".
    schedule: "cosine" (warm-up then cosine) or "constant" (warm-up then `lr`).

  Returns:
    `(tx, schedule_fn)`.
  """
  if kind not in OPTIMIZERS:
    raise ValueError(f"optimizer kind must be one of {OPTIMIZERS}, got {kind!r}")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if schedule == "cosine":
    schedule_fn = warmup_cosine_schedule(lr, warmup_steps, total_steps, final_lr_ratio)
  else:
    if lr < 0 or warmup_steps < 0:
      raise ValueError(f"need lr >= 0 and warmup_steps >= 0, got {lr}, {warmup_steps}")
    schedule_fn = (optax.constant_schedule(lr) if warmup_steps == 0 else
                   optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                        [warmup_steps]))
  parts = []
  if clip_norm is not None:
    if clip_norm <= 0:
      raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    parts.append(optax.clip_by_global_norm(clip_norm))
  if kind == "adamw":
    parts.append(optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
  elif kind == "adam":
    parts.append(optax.adam(schedule_fn, b1=b1, b2=b2, eps=eps))
  elif kind == "adagrad":
    parts.append(optax.adagrad(schedule_fn))
  else:
    parts.append(optax.sgd(schedule_fn))
  return optax.chain(*parts), schedule_fn
