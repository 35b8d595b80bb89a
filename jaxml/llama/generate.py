"""Autoregressive generation: prefill and KV-cache decode in one compiled program.

The decode loop runs in a few segments over position ranges; each reads the
cache only up to its segment's end (a cache held as a read-only past plus the
segment's recent piece, `model.apply_split_cache`).

Follows Meta's Llama 2 `generate`: prompts of different lengths share one token
buffer; decoding starts after the shortest prompt; at a position that still
holds a prompt token the prompt token is kept (teacher forcing through the
longer prompts); a row is finished once it emits EOS at a non-prompt position.

Two forms: `generate_arrays` (arrays in, arrays out: new tokens, their
log-probabilities, lengths; one compiled program) and `generate` (lists of
token ids, each cut before its first EOS), built on it. Both raise
`NonFiniteLogitsError` when the model produced NaN or inf logits.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import nn
from jaxml.llama import model
from jaxml.llama.config import LlamaConfig


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Draws one token per row. `temperature == 0` is argmax (no randomness).

  top-k keeps the k largest logits; top-p (nucleus) sorts probabilities in
  descending order and drops every entry whose preceding cumulative mass
  already exceeds `top_p` (`cumsum - p_i > top_p`), so the most likely token
  always survives; the rest is renormalised by the categorical draw.
  """
  logits = logits_BxV.astype(jnp.float32)
  if temperature == 0.0:
    return greedy_token(logits)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    drop_sorted = (cum - probs) > top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, neg, logits)
  return _draw(rng, logits)


def penalize_repeats(logits_BxV: jax.Array, seen_BxV: jax.Array, penalty: float) -> jax.Array:
  """The CTRL repetition penalty (Keskar et al., 2019), as transformers applies it.

  Each logit of a token already in the row's sequence (`seen_BxV` true) is
  divided by `penalty` where it is positive and multiplied by it where it is
  negative, so `penalty > 1` makes every seen token less likely.

  Args:
    logits_BxV: `[B, V]` logits.
    seen_BxV: `[B, V]` bool, the tokens each row holds so far (prompt and new).
    penalty: the factor, > 0 (1 leaves the logits unchanged).

  Returns:
    `[B, V]` float32 penalised logits.
  """
  logits = logits_BxV.astype(jnp.float32)
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen_BxV, penalised, logits)


def _draw(rng: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """One draw per row from `softmax(logits)`, by inverting the cumulative distribution.

  Token `i` is drawn when `u` falls in `[F_{i-1}, F_i)`, where `F` is the running sum of
  `exp(logits - max)` and `u` is uniform on `[0, F_V)`: one uniform per row, where
  `jax.random.categorical` (Gumbel-max) draws one per vocabulary entry (on CPU, in a compiled
  loop: about 6 ms per draw at batch 8 and 32,000 ids, against 0.1 ms for this form).
  Entries of probability 0 (masked by top-k/top-p) are never drawn.
  The float32 running sum is exact to a relative error of about `V * 2**-24` at worst.
  """
  logits = logits_BxV.astype(jnp.float32)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  cdf = jnp.cumsum(weights, axis=-1)
  u = jax.random.uniform(rng, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
  idx = jnp.sum((cdf <= u).astype(jnp.int32), axis=-1)
  return jnp.minimum(idx, logits.shape[-1] - 1).astype(jnp.int32)


def greedy_token(logits_BxV: jax.Array) -> jax.Array:
  """`argmax` over the vocabulary (first index on ties): `nn.first_argmax`, whose two plain
  reductions XLA:CPU runs several times faster than `jnp.argmax`; at one decode step per
  token that shows."""
  return nn.first_argmax(logits_BxV)


# Small vocabularies: the output product runs as column chunks on CPU (`model.split_output_columns`).
_CPU_SPLIT_VOCAB = 2048


def _one_cpu_thread() -> bool:
  """Whether XLA:CPU runs this process's programs on one thread (it sizes its pool from the CPU
  affinity mask when the backend starts)."""
  try:
    return len(os.sched_getaffinity(0)) == 1
  except AttributeError:  # no affinity mask on this OS
    return os.cpu_count() == 1


# Decode-loop segments (see `_segment_ends`): at most this many, each at least this long.
_SEGMENTS, _SEGMENT_MIN_LEN = 4, 32


def _segment_ends(start: int, end: int, segments: int, min_len: int) -> list[int]:
  """Ends of the decode loop's segments over positions `[start, end)`.

  The step at position `p` of a segment `[a, e)` reads the cache slots
  `[0, e)` (see `model.apply_split_cache`), not the whole buffer; four
  segments read about a third less than one, at the price of compiling the
  step once per segment and of joining the past and recent pieces between
  segments (one copy of the cache each time; at the last join the old past,
  the recent piece and the joined cache are alive together, about twice the
  cache). Loops shorter than `2 * min_len` run as one segment.
  """
  n = max(1, min(segments, (end - start) // min_len))
  return [start + (end - start) * (i + 1) // n for i in range(n)]


class NonFiniteLogitsError(FloatingPointError):
  """The model produced NaN or inf logits while generating (e.g. NaN or inf parameters)."""


@functools.partial(jax.jit, static_argnames=("cfg", "min_prompt_len", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "segments", "with_logprobs",
                                             "repetition_penalty", "penalize_prompt", "join"))
def decode_loop(params, tokens_BxS, lengths_B, rng, *, cfg: LlamaConfig, min_prompt_len: int,
                max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                eos_id: int | None = None, segments: tuple[int, int] | None = None, with_logprobs: bool = True,
                repetition_penalty: float | None = None, penalize_prompt: bool = True, join: bool | None = None):
  """The compiled prefill + decode loop of `generate_arrays`, traceable under a caller's `jax.jit`.

  It fills `tokens_BxS` after each row's prompt; no host checks and no
  error on non-finite logits (it returns where they occurred instead), so a
  compiled program such as a PPO step can generate inside itself.
  `check_sampling` validates the static arguments.

  Args:
    params: model parameters.
    tokens_BxS: `[B, S]` int32 buffer, row `i`'s prompt in its first
      `lengths_B[i]` slots (right-padded; the rest is overwritten), `S` =
      longest prompt + `max_new_tokens` <= `cfg.max_seq_len`.
    lengths_B: `[B]` int32 prompt lengths, each >= `min_prompt_len`.
    rng: PRNG key (unused when greedy).
    cfg: the model config.
    min_prompt_len: static, the shortest prompt length (prefilled at once).
    max_new_tokens: static, `N`.
    temperature, top_k, top_p, eos_id: as in `generate_arrays`.
    segments: `(count, min_len)` of the decode loop's segments; None: the
      module's defaults.
    with_logprobs: False skips the log-probabilities (zeros are returned),
      saving a log-sum-exp over the vocabulary per step.
    repetition_penalty, penalize_prompt: as in `generate_arrays`.
    join: run the projections joined (`model.join_projections`: the same
      products, fewer of them); None: on XLA:CPU when it runs on one thread,
      where that is faster (on two it is slower; see BUILD_NOTES).

  Returns:
    `(tokens_BxN, logprobs_BxN, lengths_B, bad_B)`: each row's `N` new
    tokens and their log-probabilities (see `generate_arrays`), the number of
    new tokens up to and including EOS, and the first buffer position whose
    logits (used to pick a new token) were not finite, or -1.
  """
  segments = (_SEGMENTS, _SEGMENT_MIN_LEN) if segments is None else segments
  B, S = tokens_BxS.shape
  N = max_new_tokens
  prompt_mask_BxS = jnp.arange(S, dtype=jnp.int32)[None, :] < lengths_B[:, None]
  if not cfg.scan_layers:
    params = model.unstack_layers(params)  # sliced once, not at every step of the loop
  if jax.default_backend() == "cpu" and cfg.vocab_size <= _CPU_SPLIT_VOCAB:
    params = model.split_output_columns(params, 256)
  if join if join is not None else (jax.default_backend() == "cpu" and _one_cpu_thread()):
    params = model.join_projections(params)  # joined once, outside the loop
  # Prefill the shortest prompt length into the past cache, then decode in segments:
  # each segment writes a fresh recent piece, which joins the past when it ends.
  past = model.init_cache(cfg, B, min_prompt_len)
  logits, past = model.apply(params, tokens_BxS[:, :min_prompt_len], cfg, cache=past, cache_index=0)
  last_logits = logits[:, -1, :]
  done = jnp.zeros((B,), bool)
  logprobs_BxS = jnp.zeros((B, S), jnp.float32)
  bad_B = jnp.full((B,), -1, jnp.int32)
  rows_B = jnp.arange(B)
  penalise = repetition_penalty is not None and repetition_penalty != 1.0
  # The tokens the repetition penalty applies to: each row's prompt (unless penalize_prompt is False)
  # and its new tokens so far.
  seen = jnp.zeros((B, cfg.vocab_size if penalise else 1), bool)
  if penalise and penalize_prompt:
    seen = seen.at[rows_B[:, None], tokens_BxS[:, :min_prompt_len]].set(True)

  def cond(end, carry):
    cur = carry[0]
    done = carry[5]
    return (cur < end) & ~jnp.all(done)

  def body(past, end, carry):
    cur, tokens, logprobs, recent, last_logits, done, bad, rng, seen = carry
    rng, step_rng = jax.random.split(rng)
    draw_logits = penalize_repeats(last_logits, seen, repetition_penalty) if penalise else last_logits
    nxt = sample_logits(step_rng, draw_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    in_prompt = jax.lax.dynamic_index_in_dim(prompt_mask_BxS, cur, axis=1, keepdims=False)
    given = jax.lax.dynamic_index_in_dim(tokens, cur, axis=1, keepdims=False)
    nxt = jnp.where(in_prompt, given, nxt)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, cur, axis=1)
    if penalise:
      mark = True if penalize_prompt else ~in_prompt
      seen = seen.at[rows_B, nxt].set(seen[rows_B, nxt] | mark)
    # The log-probability of the new token under softmax(logits / temperature) (plain softmax when greedy),
    # and whether the logits that picked it were finite; only for rows still generating.
    new = ~in_prompt & ~done
    if with_logprobs:
      scaled = last_logits.astype(jnp.float32)
      if temperature != 0.0:
        scaled = scaled / temperature
      picked = jnp.take_along_axis(scaled, nxt[:, None], axis=-1, mode="clip")[:, 0]
      logp = picked - jax.nn.logsumexp(scaled, axis=-1)
      logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, jnp.where(new, logp, 0.0), cur, axis=1)
    # max propagates NaN and +inf: one reduction (the one greedy sampling computes anyway, so XLA
    # shares it) flags a row with any NaN or +inf logit, or with all logits -inf.
    finite = jnp.isfinite(jnp.max(last_logits, axis=-1))
    bad = jnp.where(new & ~finite & (bad < 0), cur, bad)
    if eos_id is not None:
      done = done | (~in_prompt & (nxt == eos_id))
    logits, recent = model.apply_split_cache(params, nxt[:, None], cfg, past, recent, cur)
    return cur + 1, tokens, logprobs, recent, logits[:, -1, :], done, bad, rng, seen

  cur = jnp.int32(min_prompt_len)
  start = min_prompt_len
  for end in _segment_ends(min_prompt_len, S, *segments):
    recent = model.init_cache(cfg, B, end - start)
    carry = (cur, tokens_BxS, logprobs_BxS, recent, last_logits, done, bad_B, rng, seen)
    cur, tokens_BxS, logprobs_BxS, recent, last_logits, done, bad_B, rng, seen = jax.lax.while_loop(
        functools.partial(cond, end), functools.partial(body, past, end), carry)
    past = past.append(recent)
    start = end
  # Each row's N new tokens start after its prompt; past a row's first EOS: EOS ids, log-probability 0.
  idx_BxN = lengths_B[:, None] + jnp.arange(N, dtype=jnp.int32)[None, :]
  new_BxN = jnp.take_along_axis(tokens_BxS, idx_BxN, axis=1)
  logp_BxN = jnp.take_along_axis(logprobs_BxS, idx_BxN, axis=1)
  if eos_id is None:
    return new_BxN, logp_BxN, jnp.full((B,), N, jnp.int32), bad_B
  is_eos = (new_BxN == eos_id).astype(jnp.int32)
  after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
  new_BxN = jnp.where(after_eos, jnp.int32(eos_id), new_BxN)
  logp_BxN = jnp.where(after_eos, 0.0, logp_BxN)
  return new_BxN, logp_BxN, (N - after_eos.sum(axis=1)).astype(jnp.int32), bad_B


def check_sampling(cfg: LlamaConfig, max_new_tokens, temperature, top_k, top_p, eos_id, rng, *,
                   repetition_penalty=None) -> None:
  """Raises `ValueError` naming the argument when a generation setting is invalid for `cfg`."""
  if repetition_penalty is not None and not (isinstance(repetition_penalty, (int, float, np.floating))
                                             and np.isfinite(repetition_penalty) and repetition_penalty > 0):
    raise ValueError(f"repetition_penalty must be a finite number > 0 or None, got {repetition_penalty!r}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng key")
  if top_k is not None and not 0 < top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size={cfg.vocab_size}], got {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if eos_id is not None and not (isinstance(eos_id, (int, np.integer)) and 0 <= eos_id < cfg.vocab_size):
    raise ValueError(f"eos_id must be an int in [0, vocab_size={cfg.vocab_size}) or None, got {eos_id!r}")


def _prompt_arrays(cfg: LlamaConfig, prompt_tokens: Any, prompt_lengths: Any, what: str):
  """Validated `([B, P] int32 prompts, [B] int32 lengths)` as NumPy; slots past a row's length are zeroed."""
  if not hasattr(prompt_tokens, "dtype"):
    prompt_tokens = np.asarray(prompt_tokens)
  if not np.issubdtype(prompt_tokens.dtype, np.integer):
    raise TypeError(f"{what} must be an integer array, got dtype {prompt_tokens.dtype}")
  if np.ndim(prompt_tokens) != 2 or 0 in np.shape(prompt_tokens):
    raise ValueError(f"{what} must have shape [batch, prompt_length] with both > 0, got shape "
                     f"{np.shape(prompt_tokens)}")
  B, P = np.shape(prompt_tokens)
  if prompt_lengths is None:
    lengths = np.full((B,), P, np.int32)
  else:
    lengths = np.asarray(prompt_lengths)
    if not np.issubdtype(lengths.dtype, np.integer) or lengths.shape != (B,):
      raise ValueError(f"prompt_lengths must be [batch={B}] integers, got {lengths.dtype} of shape {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > P:
      raise ValueError(f"prompt_lengths must be in [1, {P}] (the width of {what}), got min {lengths.min()}, "
                       f"max {lengths.max()}")
    lengths = lengths.astype(np.int32)
  tokens = np.asarray(prompt_tokens).astype(np.int32)
  tokens = np.where(np.arange(P)[None, :] < lengths[:, None], tokens, 0)  # padding ids are never read
  model.check_tokens(tokens, cfg, what=what, max_len=P)
  return tokens, lengths


@functools.cache
def _unused_key() -> jax.Array:
  """The key greedy calls pass (`check_sampling` requires one when sampling): made once, not per call
  (building a key eagerly costs about half a millisecond, a few decode steps of a small model)."""
  return jax.random.PRNGKey(0)


def _run(params, cfg: LlamaConfig, tokens_BxP: np.ndarray, lengths_B: np.ndarray, max_new_tokens: int, *,
         temperature, top_k, top_p, eos_id, rng, with_logprobs: bool = True, repetition_penalty=None,
         penalize_prompt: bool = True):
  """Checks the lengths against the context, runs the compiled loop, raises on non-finite logits."""
  longest = int(lengths_B.max())
  total = longest + max_new_tokens
  if longest > cfg.max_seq_len:
    raise ValueError(f"a prompt of length {longest} is longer than the context max_seq_len={cfg.max_seq_len}")
  if total > cfg.max_seq_len:
    raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                     f"max_seq_len={cfg.max_seq_len}; lower max_new_tokens")
  model.check_params(params, cfg)
  buf = np.zeros((tokens_BxP.shape[0], total), np.int32)
  buf[:, :longest] = tokens_BxP[:, :longest]
  rng = _unused_key() if rng is None else rng
  new, logp, n, bad = decode_loop(
      params, buf, lengths_B, rng, cfg=cfg, min_prompt_len=int(lengths_B.min()),
      max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=top_k,
      top_p=None if top_p is None else float(top_p), eos_id=None if eos_id is None else int(eos_id),
      segments=(_SEGMENTS, _SEGMENT_MIN_LEN), with_logprobs=with_logprobs,
      repetition_penalty=None if repetition_penalty is None else float(repetition_penalty),
      penalize_prompt=bool(penalize_prompt))
  bad = np.asarray(bad)
  if (bad >= 0).any():
    rows = np.flatnonzero(bad >= 0)
    i = rows[np.argmin(bad[rows] - lengths_B[rows])]
    raise NonFiniteLogitsError(
        f"non-finite logits at step {int(bad[i] - lengths_B[i])} of row {int(i)} ({len(rows)} of {len(bad)} rows "
        f"affected; step k picks new token k): the model produced NaN or inf, check params for NaN/inf values")
  return new, logp, n


def generate_arrays(params: model.Params, cfg: LlamaConfig, prompt_tokens_BxP: Any, prompt_lengths_B: Any,
                    max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, rng: jax.Array | None = None,
                    repetition_penalty: float | None = None, penalize_prompt: bool = True):
  """Generates `max_new_tokens` after each prompt; arrays in, arrays out.

  One compiled program (prefill + the decode loop, see the module docstring),
  compiled once per shape and sampling setting. Log-probabilities are those of
  the softmax the sampler draws from before truncation: `log_softmax(logits /
  temperature)` at each new token (the plain `log_softmax(logits)` when
  greedy, `temperature == 0`); `top_k`/`top_p` and the repetition penalty
  change the draw but not this distribution. A host function (it validates its inputs and reads one flag
  back); not for use under a caller's `jax.jit`.

  Args:
    params: model parameters (see `jaxml.llama.model`).
    cfg: the model config.
    prompt_tokens_BxP: `[B, P]` integer prompts, row `i` in its first
      `prompt_lengths_B[i]` slots (what follows is ignored).
    prompt_lengths_B: `[B]` integer prompt lengths in `[1, P]`; None: every
      row is `P` tokens long.
    max_new_tokens: tokens to generate per prompt (`N`, > 0); the longest
      prompt plus `N` must fit in `cfg.max_seq_len`.
    temperature: 0 for greedy decoding; otherwise the softmax temperature.
    top_k, top_p: optional truncation of the sampling distribution.
    eos_id: a row stops after emitting this id (kept in the output); None
      never stops.
    rng: PRNG key, required when temperature > 0.
    repetition_penalty: None (off) or the CTRL penalty factor (`penalize_repeats`)
      applied, before temperature and truncation, to every token the row holds
      so far (its prompt and its new tokens), as transformers'
      `repetition_penalty` does; greedy decoding takes the argmax of the
      penalised logits.
    penalize_prompt: False penalises only the row's new tokens (MOSS-RLHF's
      rollouts), not its prompt.

  Returns:
    `(tokens_BxN, logprobs_BxN, lengths_B)`: `[B, N]` int32 new tokens,
    `[B, N]` float32 their log-probabilities, `[B]` int32 the number of new
    tokens up to and including the first EOS (`N` without one). Past a row's
    first EOS, tokens are `eos_id` and log-probabilities 0.

  Raises:
    NonFiniteLogitsError: (a `FloatingPointError`) if logits used to pick a
      new token were NaN or inf; the message names the first such step.
    ValueError, TypeError: for bad arguments, before any compute.
  """
  check_sampling(cfg, max_new_tokens, temperature, top_k, top_p, eos_id, rng, repetition_penalty=repetition_penalty)
  tokens, lengths = _prompt_arrays(cfg, prompt_tokens_BxP, prompt_lengths_B, "prompt_tokens_BxP")
  return _run(params, cfg, tokens, lengths, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              eos_id=eos_id, rng=rng, repetition_penalty=repetition_penalty, penalize_prompt=penalize_prompt)


def generate(params: model.Params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]] | Any, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, rng: jax.Array | None = None, pad_id: int = 0,
             prompt_lengths: Any = None, repetition_penalty: float | None = None,
             penalize_prompt: bool = True) -> list[list[int]]:
  """Generates up to `max_new_tokens` after each prompt; the list form of `generate_arrays`.

  Args:
    params: model parameters (see `jaxml.llama.model`).
    cfg: the model config.
    prompts: a batch of token-id lists (lengths may differ), or a `[B, P]`
      integer array (NumPy or JAX) of prompts.
    max_new_tokens: tokens to generate per prompt (> 0).
    temperature: 0 for greedy decoding; otherwise softmax temperature
      (Meta's chat default is 0.6 with top_p 0.9).
    top_k, top_p: optional truncation of the sampling distribution.
    eos_id: stop a row at this id (excluded from the output); None never stops.
    rng: PRNG key, required when temperature > 0.
    pad_id: kept for compatibility: slots after short prompts are never read.
    prompt_lengths: with an array of prompts, optional `[B]` integer lengths
      (default: every row is full length); not with lists.
    repetition_penalty, penalize_prompt: as in `generate_arrays`.

  Returns:
    For each prompt, the list of new token ids (Python ints), cut before the
    first EOS.

  Raises:
    NonFiniteLogitsError: (a `FloatingPointError`) if the model produced NaN
      or inf logits.
    ValueError, TypeError: for bad arguments, before any compute.
  """
  del pad_id  # the buffer's padding is zeros, never attended to
  check_sampling(cfg, max_new_tokens, temperature, top_k, top_p, eos_id, rng, repetition_penalty=repetition_penalty)
  if hasattr(prompts, "shape") and hasattr(prompts, "dtype"):
    tokens, lengths = _prompt_arrays(cfg, prompts, prompt_lengths, "prompts")
  else:
    if prompt_lengths is not None:
      raise ValueError("prompt_lengths goes with a [batch, length] array of prompts, not with lists")
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    for i, p in enumerate(prompts):
      if any(not isinstance(t, (int, np.integer)) for t in p):
        raise TypeError(f"prompt {i} must contain integer token ids")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.max() > cfg.max_seq_len:
      raise ValueError(f"a prompt of length {lengths.max()} is longer than the context "
                       f"max_seq_len={cfg.max_seq_len}")
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    tokens, lengths = _prompt_arrays(cfg, tokens, lengths, "prompts")
  new, _, n = _run(params, cfg, tokens, lengths, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_id, rng=rng, with_logprobs=False, repetition_penalty=repetition_penalty,
                   penalize_prompt=penalize_prompt)
  new, n = np.asarray(new), np.asarray(n)
  results = []
  for row, k in zip(new, n):
    out = row[:k].tolist()
    if eos_id is not None and out and out[-1] == eos_id:
      out.pop()
    results.append(out)
  return results
