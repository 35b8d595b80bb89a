"""Autoregressive generation: prefill and KV-cache decode in one compiled program.

The decode loop runs in a few segments over position ranges; each reads the
cache only up to its segment's end (a cache held as a read-only past plus the
segment's recent piece, `model.apply_split_cache`).

Follows Meta's Llama 2 `generate`: prompts of different lengths share one token
buffer; decoding starts after the shortest prompt; at a position that still
holds a prompt token the prompt token is kept (teacher forcing through the
longer prompts); a row is finished once it emits EOS at a non-prompt position;
the output of each row is cut before its first EOS.
"""
from __future__ import annotations

import functools
from typing import Sequence

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
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def greedy_token(logits_BxV: jax.Array) -> jax.Array:
  """`argmax` over the vocabulary (first index on ties): `nn.first_argmax`, whose two plain
  reductions XLA:CPU runs several times faster than `jnp.argmax`; at one decode step per
  token that shows."""
  return nn.first_argmax(logits_BxV)


# Small vocabularies: the output product runs as column chunks on CPU (`model.split_output_columns`).
_CPU_SPLIT_VOCAB = 2048


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


@functools.partial(jax.jit, static_argnames=("cfg", "min_prompt_len", "temperature", "top_k", "top_p", "eos_id",
                                             "segments"))
def _generate_buffer(params, tokens_BxN, prompt_mask_BxN, rng, *, cfg: LlamaConfig, min_prompt_len: int,
                     temperature: float, top_k: int | None, top_p: float | None, eos_id: int | None,
                     segments: tuple[int, int]):
  """Fills `tokens_BxN` after the prompts; returns the filled buffer."""
  B, N = tokens_BxN.shape
  if not cfg.scan_layers:
    params = model.unstack_layers(params)  # sliced once, not at every step of the loop
  if jax.default_backend() == "cpu" and cfg.vocab_size <= _CPU_SPLIT_VOCAB:
    params = model.split_output_columns(params, 256)
  # Prefill the shortest prompt length into the past cache, then decode in segments:
  # each segment writes a fresh recent piece, which joins the past when it ends.
  past = model.init_cache(cfg, B, min_prompt_len)
  logits, past = model.apply(params, tokens_BxN[:, :min_prompt_len], cfg, cache=past, cache_index=0)
  last_logits = logits[:, -1, :]
  done = jnp.zeros((B,), bool)

  def cond(end, carry):
    cur, _, _, _, done, _ = carry
    return (cur < end) & ~jnp.all(done)

  def body(past, end, carry):
    cur, tokens, recent, last_logits, done, rng = carry
    rng, step_rng = jax.random.split(rng)
    nxt = sample_logits(step_rng, last_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    in_prompt = jax.lax.dynamic_index_in_dim(prompt_mask_BxN, cur, axis=1, keepdims=False)
    given = jax.lax.dynamic_index_in_dim(tokens, cur, axis=1, keepdims=False)
    nxt = jnp.where(in_prompt, given, nxt)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, cur, axis=1)
    if eos_id is not None:
      done = done | (~in_prompt & (nxt == eos_id))
    logits, recent = model.apply_split_cache(params, nxt[:, None], cfg, past, recent, cur)
    return cur + 1, tokens, recent, logits[:, -1, :], done, rng

  cur = jnp.int32(min_prompt_len)
  start = min_prompt_len
  for end in _segment_ends(min_prompt_len, N, *segments):
    recent = model.init_cache(cfg, B, end - start)
    carry = (cur, tokens_BxN, recent, last_logits, done, rng)
    cur, tokens_BxN, recent, last_logits, done, rng = jax.lax.while_loop(
        functools.partial(cond, end), functools.partial(body, past, end), carry)
    past = past.append(recent)
    start = end
  return tokens_BxN


def generate(params: model.Params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, rng: jax.Array | None = None, pad_id: int = 0) -> list[list[int]]:
  """Generates up to `max_new_tokens` after each prompt.

  Args:
    params: model parameters (see `jaxml.llama.model`).
    cfg: the model config.
    prompts: a batch of token-id lists, lengths may differ.
    max_new_tokens: tokens to generate per prompt (> 0).
    temperature: 0 for greedy decoding; otherwise softmax temperature
      (Meta's chat default is 0.6 with top_p 0.9).
    top_k, top_p: optional truncation of the sampling distribution.
    eos_id: stop a row at this id (excluded from the output); None never stops.
    rng: PRNG key, required when temperature > 0.
    pad_id: filler for buffer slots after short prompts (never attended to).

  Returns:
    For each prompt, the list of new token ids, cut before the first EOS.
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng key")
  if top_k is not None and not 0 < top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size={cfg.vocab_size}], got {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  for i, p in enumerate(prompts):
    if any(not isinstance(t, (int, np.integer)) for t in p):
      raise TypeError(f"prompt {i} must contain integer token ids")
  lengths = [len(p) for p in prompts]
  total = max(lengths) + max_new_tokens
  if max(lengths) > cfg.max_seq_len:
    raise ValueError(f"a prompt of length {max(lengths)} is longer than the context max_seq_len={cfg.max_seq_len}")
  if total > cfg.max_seq_len:
    raise ValueError(f"longest prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                     f"max_seq_len={cfg.max_seq_len}; lower max_new_tokens")
  buf = np.full((len(prompts), total), pad_id, np.int32)
  mask = np.zeros((len(prompts), total), bool)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
    mask[i, :len(p)] = True
  model.check_tokens(buf, cfg, what="prompts")
  model.check_params(params, cfg)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out = _generate_buffer(params, jnp.asarray(buf), jnp.asarray(mask), rng, cfg=cfg, min_prompt_len=min(lengths),
                         temperature=float(temperature), top_k=top_k, top_p=None if top_p is None else float(top_p),
                         eos_id=eos_id, segments=(_SEGMENTS, _SEGMENT_MIN_LEN))
  out = np.asarray(out)
  results = []
  for i, n in enumerate(lengths):
    new = out[i, n:n + max_new_tokens].tolist()
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id)]
    results.append(new)
  return results
