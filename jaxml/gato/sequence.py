"""Gato's token sequences: tasks, timesteps, episodes, prompts (Reed et al. 2022, Sec. 2.1-2.3).

A task declares its observation structure and action space (`TaskSpec`). One timestep is

    [observation tokens] [separator] [action tokens]

with the observation's fields in sorted key order (nested dictionaries by their sorted key
paths "a/b"), each tensor row-major; an image field becomes patches in raster order (one
position each, embedded by the model's ResNet block, `jaxml.gato.model`). Episodes are their
timesteps in time order. Every timestep of a task has the same length, `timestep_len(spec)`.

Each position carries (a `Tokens` record of arrays with a trailing length axis T):

    ids        [T]    int32  the token id (0 at patch positions and padding)
    patches    [T, P] f32    the normalised patch pixels at patch positions, else 0
    is_patch   [T]    bool
    local_pos  [T]    int32  the index of an observation token within its timestep's
                             observation (0, 1, ...); -1 elsewhere (separator, actions, text)
    rows, cols [T, 2] int32  a patch's row/column interval [lo, hi) in 128 position bins
    loss_mask  [T]    bool   text and action tokens only (never observations or separators)

Prompting (Sec. 2.3): a fraction of training sequences (25%) start with timesteps of another
episode of the same task, half of them its last timesteps, half a uniformly placed window.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxml.gato.tokens import TokenLayout, detokenize_continuous, image_patches, tokenize_continuous, tokenize_discrete

Array = jax.Array
POSITION_BINS = 128
KINDS = ("continuous", "discrete", "image")


@dataclasses.dataclass(frozen=True)
class Field:
  """One observation field or an action space.

  Attributes:
    kind: "continuous" (floats, one token per entry), "discrete" (integers in
      [0, num_values), one token per entry) or "image" ([H, W] or [H, W, C] pixels in
      [0, max_value], one token per patch).
    shape: the array's shape (() for a scalar).
    mu_law: continuous observations: compand before binning (False for a field known to
      lie in [-1, 1]). Continuous actions are never companded: they are normalised to
      [-1, 1] with `low`/`high` first.
    num_values: discrete: the number of values.
    low, high: continuous actions: the bounds of every entry.
    max_value: image: the pixel value that maps to 1 (e.g. 1 for 0/1 grids, 16 for the digits).
  """
  kind: str
  shape: tuple[int, ...] = ()
  mu_law: bool = True
  num_values: int = 0
  low: float = -1.0
  high: float = 1.0
  max_value: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Field.kind must be one of {KINDS}, got {self.kind!r}")
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    if self.kind == "discrete" and self.num_values < 1:
      raise ValueError(f"Field.num_values must be >= 1 for a discrete field, got {self.num_values}")
    if self.kind == "image" and len(self.shape) not in (2, 3):
      raise ValueError(f"Field.shape of an image must be [H, W] or [H, W, C], got {self.shape}")
    if not self.high > self.low:
      raise ValueError(f"Field.high ({self.high}) must exceed Field.low ({self.low})")

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task: its name, observation fields (sorted key paths) and action space.

  Build with `TaskSpec.create(name, observation={...} or Field, action=Field)`.
  """
  name: str
  fields: tuple[tuple[str, Field], ...]
  action: Field

  @staticmethod
  def create(name: str, observation: Mapping[str, Any] | Field, action: Field) -> "TaskSpec":
    fields = tuple(sorted(_flatten(observation, "observation", Field).items()))
    if action.kind == "image":
      raise ValueError("action must be a discrete or continuous Field, got an image")
    return TaskSpec(name, fields, action)

  @property
  def action_len(self) -> int:
    return self.action.size


def _flatten(tree: Any, what: str, leaf_type: type | None = None, prefix: str = "") -> dict[str, Any]:
  """`{"a/b": leaf}` over a nested mapping (a bare leaf is the path "")."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      if not isinstance(k, str) or not k or "/" in k:
        raise ValueError(f"{what} keys must be non-empty strings without '/', got {k!r}")
      out.update(_flatten(v, what, leaf_type, f"{prefix}{k}/"))
    if not out:
      raise ValueError(f"{what} must not be empty")
    return out
  if leaf_type is not None and not isinstance(tree, leaf_type):
    raise TypeError(f"{what} leaves must be {leaf_type.__name__}, got {type(tree).__name__} at {prefix[:-1]!r}")
  return {prefix[:-1]: tree}


def _image_grid(field: Field, patch_size: int) -> tuple[int, int]:
  h, w = field.shape[:2]
  if h % patch_size or w % patch_size:
    raise ValueError(f"image field of shape {field.shape} is not divisible by patch_size={patch_size}")
  return h // patch_size, w // patch_size


def observation_len(spec: TaskSpec, patch_size: int) -> int:
  """The number of observation tokens of one timestep."""
  n = 0
  for _, f in spec.fields:
    if f.kind == "image":
      gh, gw = _image_grid(f, patch_size)
      n += gh * gw
    else:
      n += f.size
  return n


def timestep_len(spec: TaskSpec, patch_size: int) -> int:
  """Tokens per timestep: observation, separator, action."""
  return observation_len(spec, patch_size) + 1 + spec.action_len


class Tokens(NamedTuple):
  """Per-position arrays of a sequence (module docstring); any leading batch axes."""
  ids: Array
  patches: Array
  is_patch: Array
  local_pos: Array
  rows: Array
  cols: Array
  loss_mask: Array

  @property
  def length(self) -> int:
    return self.ids.shape[-1]


def empty_tokens(length: int, patch_dim: int, xp=np) -> Tokens:
  """Padding: id 0, no patch, no local position, not in the loss."""
  return Tokens(ids=xp.zeros((length,), np.int32), patches=xp.zeros((length, patch_dim), np.float32),
                is_patch=xp.zeros((length,), bool), local_pos=xp.full((length,), -1, np.int32),
                rows=xp.zeros((length, 2), np.int32), cols=xp.zeros((length, 2), np.int32),
                loss_mask=xp.zeros((length,), bool))


def concat(parts: list[Tokens], xp=np) -> Tokens:
  """Concatenates records along the length axis."""
  return Tokens(*(xp.concatenate([getattr(p, f) for p in parts], axis=len(np.shape(parts[0].ids)) - 1)
                  for f in Tokens._fields))


def _plain_tokens(ids, patch_dim: int, *, local: bool, loss: bool) -> Tokens:
  n = ids.shape[0]
  return Tokens(ids=ids.astype(jnp.int32), patches=jnp.zeros((n, patch_dim), jnp.float32),
                is_patch=jnp.zeros((n,), bool),
                local_pos=jnp.arange(n, dtype=jnp.int32) if local else jnp.full((n,), -1, jnp.int32),
                rows=jnp.zeros((n, 2), jnp.int32), cols=jnp.zeros((n, 2), jnp.int32),
                loss_mask=jnp.full((n,), loss, bool))


def _patch_bins(n: int) -> np.ndarray:
  """`[n, 2]` intervals [lo, hi) of n equal parts of [0, 1) in POSITION_BINS bins."""
  i = np.arange(n)
  lo = np.floor(i / n * POSITION_BINS).astype(np.int32)
  hi = np.maximum(np.floor((i + 1) / n * POSITION_BINS).astype(np.int32), lo + 1)
  return np.stack([lo, hi], -1)


def image_tokens(image_HxWxC: Array, field: Field, *, patch_size: int, channels: int) -> Tokens:
  """One image's patch positions (raster order), pixels scaled by `field.max_value` and zero-padded to
  `channels` channels (the model's patch width is `patch_size**2 * channels`)."""
  x = jnp.asarray(image_HxWxC, jnp.float32).reshape(field.shape[0], field.shape[1], -1) / field.max_value
  c = x.shape[-1]
  if c > channels:
    raise ValueError(f"image field has {c} channels, more than the model's image_channels={channels}")
  gh, gw = _image_grid(field, patch_size)
  p = image_patches(x[None], patch_size)[0].reshape(gh * gw, patch_size, patch_size, c)
  p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, channels - c))).reshape(gh * gw, -1)
  n = gh * gw
  rows = np.repeat(_patch_bins(gh), gw, axis=0)
  cols = np.tile(_patch_bins(gw), (gh, 1))
  return Tokens(ids=jnp.zeros((n,), jnp.int32), patches=p, is_patch=jnp.ones((n,), bool),
                local_pos=jnp.zeros((n,), jnp.int32), rows=jnp.asarray(rows), cols=jnp.asarray(cols),
                loss_mask=jnp.zeros((n,), bool))


def check_observation(spec: TaskSpec, observation: Any, *, what: str = "observation", batch_dims: int = 0) -> None:
  """Raises ValueError/TypeError (naming `what`) unless `observation` has the task's structure and shapes,
  and (concrete values) continuous entries are finite and discrete ones in range."""
  try:
    flat = _flatten(observation, what) if isinstance(observation, Mapping) else {"": observation}
  except TypeError as e:
    raise TypeError(str(e)) from None
  want = dict(spec.fields)
  if set(flat) != set(want):
    raise ValueError(f"{what} has keys {sorted(flat)}, task {spec.name!r} expects {sorted(want)}")
  for path, f in spec.fields:
    v = flat[path]
    shape = tuple(np.shape(v))
    if len(shape) < batch_dims or shape[batch_dims:] != f.shape:
      raise ValueError(f"{what}[{path!r}] has shape {shape}, task {spec.name!r} expects {f.shape}"
                       + (f" after {batch_dims} leading axes" if batch_dims else ""))
    if isinstance(v, jax.core.Tracer):
      continue
    a = np.asarray(v)
    if f.kind == "continuous" and not np.all(np.isfinite(a)):
      raise ValueError(f"{what}[{path!r}] has non-finite values")
    if f.kind == "discrete" and a.size and (a.min() < 0 or a.max() >= f.num_values
                                            or not np.issubdtype(a.dtype, np.integer)):
      raise ValueError(f"{what}[{path!r}] must be integers in [0, {f.num_values})")


def check_action(spec: TaskSpec, action: Any, *, what: str = "action", batch_dims: int = 0) -> None:
  """Raises unless `action` lies in the task's action space (concrete values)."""
  f = spec.action
  shape = tuple(np.shape(action))
  if len(shape) < batch_dims or shape[batch_dims:] != f.shape:
    raise ValueError(f"{what} has shape {shape}, task {spec.name!r} expects {f.shape}")
  if isinstance(action, jax.core.Tracer):
    return
  a = np.asarray(action)
  if f.kind == "discrete":
    if not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() >= f.num_values)):
      raise ValueError(f"{what} must be integers in [0, {f.num_values}) for task {spec.name!r}")
  elif not np.all(np.isfinite(a)) or (a.size and (a.min() < f.low or a.max() > f.high)):
    raise ValueError(f"{what} must be finite and within [{f.low}, {f.high}] for task {spec.name!r}")


def check_layout(layout: TokenLayout, spec: TaskSpec | None = None) -> None:
  """Raises unless `layout`'s ranges are disjoint and contiguous, and hold the task's discrete values."""
  if not isinstance(layout, TokenLayout):
    raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
  spans = sorted(layout.ranges().values())
  for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
    if b0 < a1:
      raise ValueError(f"layout ranges overlap: [{a0}, {a1}) and [{b0}, {b1})")
  if spec is not None:
    need = [f.num_values for _, f in spec.fields + (("action", spec.action),) if f.kind == "discrete"]
    if need and max(need) > layout.discrete_vocab:
      raise ValueError(f"layout.discrete_vocab={layout.discrete_vocab} cannot hold task {spec.name!r}'s "
                       f"{max(need)} discrete values")


def observation_tokens(spec: TaskSpec, layout: TokenLayout, observation: Any, *, patch_size: int,
                       channels: int) -> Tokens:
  """One timestep's observation tokens (jit-able; no value checks, see `check_observation`)."""
  flat = _flatten(observation, "observation") if isinstance(observation, Mapping) else {"": observation}
  parts = []
  for path, f in spec.fields:
    v = flat[path]
    if f.kind == "image":
      parts.append(image_tokens(v, f, patch_size=patch_size, channels=channels))
      continue
    v = jnp.reshape(jnp.asarray(v), (-1,))
    ids = tokenize_continuous(v, layout, mu_law=f.mu_law) if f.kind == "continuous" \
        else tokenize_discrete(v.astype(jnp.int32), layout)
    parts.append(_plain_tokens(ids, patch_size * patch_size * channels, local=True, loss=False))
  out = concat(parts, jnp)
  return out._replace(local_pos=jnp.arange(out.length, dtype=jnp.int32))


def action_ids(spec: TaskSpec, layout: TokenLayout, action: Any) -> Array:
  """`[action_len]` int32 ids of an action (continuous: normalised to [-1, 1], no companding)."""
  f = spec.action
  a = jnp.reshape(jnp.asarray(action), (-1,))
  if f.kind == "discrete":
    return tokenize_discrete(a.astype(jnp.int32), layout)
  y = (a.astype(jnp.float32) - f.low) / (f.high - f.low) * 2.0 - 1.0
  return tokenize_continuous(y, layout, mu_law=False)


def action_from_ids(spec: TaskSpec, layout: TokenLayout, ids: Array) -> Array:
  """The inverse of `action_ids` (bin centres for continuous actions); `[*spec.action.shape]`."""
  f = spec.action
  ids = jnp.asarray(ids, jnp.int32)
  if f.kind == "discrete":
    return (ids - layout.discrete_start).reshape(f.shape)
  y = detokenize_continuous(ids, layout, mu_law=False)
  return ((y + 1.0) / 2.0 * (f.high - f.low) + f.low).reshape(f.shape)


def valid_action_ids(spec: TaskSpec, layout: TokenLayout) -> np.ndarray:
  """`[vocab_size]` bool: the ids an action token of this task may take."""
  ok = np.zeros(layout.vocab_size, bool)
  if spec.action.kind == "discrete":
    ok[layout.discrete_start:layout.discrete_start + spec.action.num_values] = True
  else:
    ok[layout.continuous_start:layout.discrete_start] = True
  return ok


def separator_tokens(layout: TokenLayout, patch_dim: int) -> Tokens:
  return _plain_tokens(jnp.full((1,), layout.separator, jnp.int32), patch_dim, local=False, loss=False)


def timestep_tokens(spec: TaskSpec, layout: TokenLayout, observation: Any, action: Any, *, patch_size: int,
                    channels: int) -> Tokens:
  """`[timestep_len]`: observation, separator, action (loss on the action only). Jit-able."""
  pd = patch_size * patch_size * channels
  obs = observation_tokens(spec, layout, observation, patch_size=patch_size, channels=channels)
  act = _plain_tokens(action_ids(spec, layout, action), pd, local=False, loss=True)
  return concat([obs, separator_tokens(layout, pd), act], jnp)


def episode_tokens(spec: TaskSpec, layout: TokenLayout, observations: Any, actions: Any, *, patch_size: int,
                   channels: int) -> Tokens:
  """A whole episode, timesteps in time order: `[N * timestep_len]` (NumPy arrays).

  Args:
    spec: the task.
    layout: the vocabulary layout.
    observations: the task's observation structure with a leading time axis N.
    actions: `[N, *action.shape]`.
    patch_size, channels: the model's patch side and image channels.

  Raises:
    ValueError/TypeError: naming `observations`/`actions`/`layout` (structure, shapes, non-finite
      values, actions outside the space, overlapping layout ranges), before any compute.
  """
  check_layout(layout, spec)
  check_observation(spec, observations, what="observations", batch_dims=1)
  check_action(spec, actions, what="actions", batch_dims=1)
  n_obs = np.shape(jax.tree.leaves(observations)[0])[0]
  if np.shape(actions)[0] != n_obs:
    raise ValueError(f"actions has {np.shape(actions)[0]} timesteps, observations {n_obs}")
  fn = jax.jit(jax.vmap(lambda o, a: timestep_tokens(spec, layout, o, a, patch_size=patch_size, channels=channels)))
  out = fn(jax.tree.map(jnp.asarray, observations), jnp.asarray(actions))
  return Tokens(*(np.asarray(x).reshape(-1, *np.shape(x)[2:]) for x in out))


def text_tokens(ids: Any, layout: TokenLayout, patch_dim: int) -> Tokens:
  """Text ids (in [0, layout.text_vocab)), all in the loss, no local positions."""
  a = np.asarray(ids)
  if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0
                                                                    or a.max() >= layout.text_vocab)):
    raise ValueError(f"ids must be a 1-D integer array in [0, {layout.text_vocab})")
  return Tokens(*(np.asarray(x) for x in _plain_tokens(jnp.asarray(a), patch_dim, local=False, loss=True)))


def caption_tokens(image: Any, caption_ids: Any, field: Field, layout: TokenLayout, *, patch_size: int,
                   channels: int) -> Tokens:
  """An image's patches (observation tokens) then its caption's text ids (in the loss)."""
  img = image_tokens(image, field, patch_size=patch_size, channels=channels)
  img = img._replace(local_pos=jnp.arange(img.length, dtype=jnp.int32))
  return concat([Tokens(*(np.asarray(x) for x in img)),
                 text_tokens(caption_ids, layout, patch_size * patch_size * channels)])


def _window(tokens: Tokens, start: int, length: int) -> Tokens:
  return Tokens(*(x[start:start + length] for x in tokens))


def pad_to(tokens: Tokens, length: int) -> Tokens:
  """Right-pads with `empty_tokens` (causal attention: padding never affects earlier positions)."""
  n = tokens.length
  if n > length:
    raise ValueError(f"tokens of length {n} do not fit in {length}")
  return concat([tokens, empty_tokens(length - n, tokens.patches.shape[-1])]) if n < length else tokens


def prompt_window(rng: np.random.Generator, episode: Tokens, step_len: int, timesteps: int, *,
                  from_end: bool) -> Tokens:
  """`timesteps` consecutive timesteps of `episode`: its last ones, or a uniformly placed window."""
  n = episode.length // step_len
  k = min(timesteps, n)
  start = n - k if from_end else int(rng.integers(0, n - k + 1))
  return _window(episode, start * step_len, k * step_len)


def training_sequence(rng: np.random.Generator, episode: Tokens, *, step_len: int, context: int,
                      prompt: Tokens | None = None, prompt_timesteps: int = 0, prompt_from_end: bool = True) -> Tokens:
  """A `[context]` training sequence: an optional prompt window, then consecutive timesteps of `episode`
  from a uniform start, right-padded.

  Raises:
    ValueError: naming `context` when it cannot hold the prompt plus one timestep, or `episode` when
      its length is not a whole number of `step_len` timesteps.
  """
  if episode.length % step_len or episode.length == 0:
    raise ValueError(f"episode length {episode.length} is not a positive multiple of step_len={step_len}")
  p = prompt_timesteps * step_len if prompt is not None else 0
  if context < p + step_len:
    raise ValueError(f"context={context} is too short for the prompt ({p} tokens) plus one timestep ({step_len})")
  parts = []
  if prompt is not None:
    parts.append(prompt_window(rng, prompt, step_len, prompt_timesteps, from_end=prompt_from_end))
  room = (context - sum(x.length for x in parts)) // step_len
  n = episode.length // step_len
  start = int(rng.integers(0, max(n - room, 0) + 1))
  parts.append(_window(episode, start * step_len, min(room, n - start) * step_len))
  return pad_to(concat(parts), context)


def sample_control_batch(rng: np.random.Generator, episodes: list[Tokens], *, step_len: int, context: int,
                         batch: int, prompt_prob: float = 0.25, prompt_timesteps: int = 0) -> Tokens:
  """`[batch, context]` sequences from one task's episodes; with probability `prompt_prob` a sequence is
  prefixed by `prompt_timesteps` timesteps of another episode of the task (half from its end, half
  uniform)."""
  if not 0.0 <= prompt_prob <= 1.0:
    raise ValueError(f"prompt_prob must lie in [0, 1], got {prompt_prob}")
  if not episodes:
    raise ValueError("episodes must not be empty")
  rows = []
  for _ in range(batch):
    i = int(rng.integers(len(episodes)))
    prompt = None
    if prompt_timesteps and rng.random() < prompt_prob:
      j = int(rng.integers(len(episodes) - 1)) if len(episodes) > 1 else 0
      prompt = episodes[j + (j >= i and len(episodes) > 1)]
    rows.append(training_sequence(rng, episodes[i], step_len=step_len, context=context, prompt=prompt,
                                  prompt_timesteps=prompt_timesteps, prompt_from_end=bool(rng.random() < 0.5)))
  return stack(rows)


def stack(rows: list[Tokens]) -> Tokens:
  return Tokens(*(np.stack([getattr(r, f) for r in rows]) for f in Tokens._fields))
