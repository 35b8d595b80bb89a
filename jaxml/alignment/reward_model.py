"""The reward model: the Llama decoder with a scalar head, scored at the last real token.

    r(x) = w . h_t,   t = max { s : mask[s] = 1 }

where `h` is the decoder's output after its final RMSNorm (`jaxml.llama.decoder`)
and `mask` marks the tokens of the prompt + response. The score is read at the
last position the mask marks, never at "the last token that is not the pad id":
when the pad id equals EOS (a common set-up) the latter would read the score
at the wrong place. Left-padded rows attend to none of their padding and
number their positions from their first real token, so the same sequence
scores the same whatever the padding side.

Parameter tree: Llama's (`jaxml.llama.init`) without the output projection,
plus `score` `[D]` (a linear head without bias, as transformers'
`LlamaForSequenceClassification` with one label).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import llama
from jaxml.alignment.losses import reward_loss

Params = dict[str, Any]


def reward_model_init(rng: jax.Array, llama_cfg: llama.LlamaConfig) -> Params:
  """Initialises a reward model.

  Args:
    rng: a PRNG key.
    llama_cfg: the decoder's config (e.g. the SFT policy's, so its weights can
      be copied in: `{**sft_params, "score": ...}` minus `output`).

  Returns:
    The Llama parameter tree without `output`, plus `score`: `[D]` float32
    drawn from N(0, 1 / (D + 1)).
  """
  k_llama, k_score = jax.random.split(rng)
  params = dict(llama.init(k_llama, llama_cfg))
  del params["output"]
  d = llama_cfg.dim
  params["score"] = jax.random.normal(k_score, (d,), jnp.float32) / np.sqrt(d + 1.0)
  return params


def from_policy(policy_params: Params, rng: jax.Array, llama_cfg: llama.LlamaConfig) -> Params:
  """A reward (or value) model that starts from a policy's decoder weights and a fresh head.

  Args:
    policy_params: Llama parameters (`output` is dropped).
    rng: key of the new head.
    llama_cfg: their config.

  Returns:
    The reward-model tree of `reward_model_init`.
  """
  llama.check_params(policy_params, llama_cfg)
  params = {k: v for k, v in policy_params.items() if k != "output"}
  params["score"] = jax.random.normal(rng, (llama_cfg.dim,), jnp.float32) / np.sqrt(llama_cfg.dim + 1.0)
  return params


def last_index(mask_BxT: jax.Array) -> jax.Array:
  """`[B]` int32: the position of each row's last 1 (0 for an all-zero row)."""
  m = jnp.asarray(mask_BxT).astype(jnp.int32)
  return jnp.max(m * jnp.arange(m.shape[1], dtype=jnp.int32)[None, :], axis=1)


def reward_model_apply(params: Params, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                       cfg: llama.LlamaConfig) -> jax.Array:
  """Scores sequences.

  Args:
    params: the tree of `reward_model_init`.
    tokens_BxT: `[B, T]` int32 token ids (prompt + response, any padding side).
    mask_BxT: `[B, T]` 0/1 (or bool) marking the real tokens; every row needs
      at least one 1 (checked where the mask is concrete).
    cfg: the decoder's config.

  Returns:
    `[B]` float32 rewards, read at each row's last masked position.

  Raises:
    ValueError: shapes differ, the params do not match `cfg`, or a row of a
      concrete mask is all zero (naming `mask_BxT` and the row).
  """
  if np.shape(tokens_BxT) != np.shape(mask_BxT) or np.ndim(tokens_BxT) != 2:
    raise ValueError(f"tokens_BxT and mask_BxT must both be [B, T]; got {np.shape(tokens_BxT)} and "
                     f"{np.shape(mask_BxT)}")
  if "score" not in params or np.shape(params["score"]) != (cfg.dim,):
    raise ValueError(f"params['score'] must have shape [{cfg.dim}] (a reward model from reward_model_init), got "
                     f"{np.shape(params['score']) if 'score' in params else 'no score entry'}")
  if not isinstance(mask_BxT, jax.core.Tracer):
    rows = np.flatnonzero(~np.asarray(mask_BxT).astype(bool).any(axis=1))
    if rows.size:
      raise ValueError(f"mask_BxT has no real token in row(s) {rows.tolist()}: nothing to score")
  if not isinstance(tokens_BxT, jax.core.Tracer):
    llama.check_tokens(tokens_BxT, cfg, what="tokens_BxT")
  x = llama.embed(params, tokens_BxT, cfg)
  h = llama.decoder(params, x, cfg, attention_mask=mask_BxT)
  idx = last_index(mask_BxT)
  h_last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0, :].astype(jnp.float32)
  return h_last @ params["score"]


def reward_model_loss(params: Params, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
                      cfg: llama.LlamaConfig, center_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The Bradley-Terry loss of a batch of preference pairs, for `jaxml.train.make_train_step`.

  Args:
    params: the reward model.
    batch: `chosen`, `chosen_mask`, `rejected`, `rejected_mask` (`[B, T]`
      each; chosen and rejected may have different T) and optionally
      `margin` (`[B]`).
    rng: unused (the loss is deterministic).
    cfg: the decoder's config.
    center_coef: see `reward_loss`.

  Returns:
    `(loss, metrics)` of `reward_loss`.
  """
  del rng
  r_c = reward_model_apply(params, batch["chosen"], batch["chosen_mask"], cfg)
  r_r = reward_model_apply(params, batch["rejected"], batch["rejected_mask"], cfg)
  return reward_loss(r_c, r_r, margin_B=batch.get("margin"), center_coef=center_coef)
