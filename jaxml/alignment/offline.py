"""Offline preference training on the Llama policy: reward model, DPO family, IPO, SLiC-HF (direct, sample-and-rank).

Each method is a loss `loss(params, batch, rng) -> (loss, metrics)` for
`jaxml.train.make_train_step`; it draws its minibatch of pairs from the step's
key (indices into the data, with replacement), so a resumed run sees the
batches an uninterrupted one would. `train` runs it on the core (checkpoints,
resume, SIGTERM, NaN guard, metrics).

Data layout (`encode`, `preference_data`): every sequence is `prompt +
response`, right-padded with `pad_id` to one width `T`; `*_attention` marks the
real tokens (prompt, response and its EOS), `*_loss_mask` the response tokens.
The policy's sequence log-probs are `llama.sequence_logprobs` over the
response tokens (sums, no length normalisation, as TRL); chosen and rejected
run as one `[2B, T]` forward. Pad == EOS is safe: positions come from the
attention mask, never from the pad id.

Reference log-probs: `precompute_reference` scores every pair once with the
frozen reference and stores `ref_chosen_logps`/`ref_rejected_logps` with the
data; a DPO loss on such data never runs the reference. Without them, the
loss needs `ref_params` and scores the reference inside every step
(`stop_gradient`), as TRL does with `precompute_ref_log_probs=False`.

Losses:
  * `dpo_loss_fn`: any `jaxml.alignment.dpo_loss` type or weighted mix, any
    beta; IPO is `loss_type="ipo"` (TRL normalises its log-ratios per token;
    `length_normalise=False` passes lengths 1, the IPO paper's sequence-level
    form whose optimum is the tilted distribution's IPO analogue).
  * `slic_loss_fn`: SLiC-HF (`jaxml.alignment.slic_loss`), on pairs given
    ("direct") or built by `sample_and_rank` from m samples of the SFT policy
    per prompt ranked by a reward model; the regulariser scores SFT targets
    stored with the data.
  * `reward_loss_fn`: the Bradley-Terry reward model (`reward_model_loss`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxml import llama
from jaxml import train as jt
from jaxml.alignment.losses import dpo_loss, slic_loss
from jaxml.alignment.reward_model import reward_model_loss

Data = dict[str, np.ndarray]
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

_SIDES = ("chosen", "rejected")


def encode(prompt_P, responses_NxL, lengths_N, *, pad_id: int) -> dict[str, np.ndarray]:
  """Prompt + response rows, right-padded.

  Args:
    prompt_P: `[P]` int prompt tokens (shared by every row).
    responses_NxL: `[N, L]` int responses (anything after a row's length is ignored).
    lengths_N: `[N]` response lengths in [1, L] (EOS included when the response has one).
    pad_id: the padding id (may equal EOS).

  Returns:
    `{"tokens": [N, P + L] int32, "attention": [N, P + L] int32, "loss_mask": [N, P + L] int32,
    "lengths": [N] int32}`.
  """
  prompt = np.asarray(prompt_P, np.int32).reshape(-1)
  resp = np.asarray(responses_NxL, np.int32)
  lengths = np.asarray(lengths_N, np.int32)
  if resp.ndim != 2 or lengths.shape != (resp.shape[0],):
    raise ValueError(f"responses_NxL must be [N, L] and lengths_N [N]; got {resp.shape} and {lengths.shape}")
  if lengths.size and (lengths.min() < 1 or lengths.max() > resp.shape[1]):
    raise ValueError(f"lengths_N must lie in [1, {resp.shape[1]}], got [{lengths.min()}, {lengths.max()}]")
  n, p, width = resp.shape[0], prompt.size, resp.shape[1]
  valid = np.arange(width)[None, :] < lengths[:, None]
  tokens = np.concatenate([np.broadcast_to(prompt, (n, p)), np.where(valid, resp, pad_id)], axis=1)
  loss_mask = np.concatenate([np.zeros((n, p), np.int32), valid.astype(np.int32)], axis=1)
  attention = np.concatenate([np.ones((n, p), np.int32), valid.astype(np.int32)], axis=1)
  return {"tokens": tokens.astype(np.int32), "attention": attention, "loss_mask": loss_mask, "lengths": lengths}


def preference_data(prompt_P, chosen_NxL, chosen_lengths_N, rejected_NxL, rejected_lengths_N, *, pad_id: int,
                    targets_NxL=None, target_lengths_N=None) -> Data:
  """The pairs as flat arrays: `chosen`, `chosen_attention`, `chosen_loss_mask`, `chosen_lengths`, the same
  for `rejected`, and for SLiC's regulariser optionally `target*` (an SFT target per pair)."""
  if np.shape(chosen_NxL)[0] != np.shape(rejected_NxL)[0]:
    raise ValueError(f"chosen_NxL has {np.shape(chosen_NxL)[0]} rows but rejected_NxL {np.shape(rejected_NxL)[0]}: "
                     "chosen and rejected batches must have the same size")
  data: Data = {}
  sides = [("chosen", chosen_NxL, chosen_lengths_N), ("rejected", rejected_NxL, rejected_lengths_N)]
  if targets_NxL is not None:
    sides.append(("target", targets_NxL, target_lengths_N))
  for side, resp, lengths in sides:
    enc = encode(prompt_P, resp, lengths, pad_id=pad_id)
    data[side] = enc["tokens"]
    data[f"{side}_attention"] = enc["attention"]
    data[f"{side}_loss_mask"] = enc["loss_mask"]
    data[f"{side}_lengths"] = enc["lengths"]
  return data


def check_data(data: Data, *, needs: Sequence[str] = _SIDES) -> int:
  """Checks a pair data set before any compute; returns N. Raises ValueError naming the entry."""
  for side in needs:
    for suffix in ("", "_attention", "_loss_mask", "_lengths"):
      if side + suffix not in data:
        raise ValueError(f"data has no {side + suffix!r} entry (see preference_data)")
  n = np.shape(data["chosen"])[0]
  for side in needs:
    for suffix in ("", "_attention", "_loss_mask", "_lengths"):
      key = side + suffix
      if np.shape(data[key])[0] != n:
        raise ValueError(f"data[{key!r}] has {np.shape(data[key])[0]} rows but data['chosen'] has {n}: chosen and "
                         "rejected batches must have the same size")
    if np.shape(data[side + "_attention"]) != np.shape(data[side]):
      raise ValueError(f"data[{side + '_attention'!r}] must have the shape of data[{side!r}]")
  for key in ("ref_chosen_logps", "ref_rejected_logps"):
    if key in data:
      x = np.asarray(data[key])
      if x.shape != (n,):
        raise ValueError(f"data[{key!r}] must have shape [{n}], got {x.shape}")
      if not np.all(np.isfinite(x)):
        raise ValueError(f"data[{key!r}] has non-finite log-probs (NaN or inf) in rows "
                         f"{np.flatnonzero(~np.isfinite(x))[:5].tolist()}")
  if n < 1:
    raise ValueError("data has no pairs")
  return n


def _logps(params, cfg: llama.LlamaConfig, tokens, attention, loss_mask):
  return llama.sequence_logprobs(params, tokens, loss_mask, cfg, attention_mask_BxT=attention)


def sequence_logps(params, cfg: llama.LlamaConfig, tokens_NxT, attention_NxT, loss_mask_NxT, *,
                   batch_size: int = 512) -> np.ndarray:
  """`[N]` float32 sequence log-probs of a large set, in jitted chunks of `batch_size` (the last one padded)."""
  tokens, attention, loss_mask = (np.asarray(x) for x in (tokens_NxT, attention_NxT, loss_mask_NxT))
  llama.check_params(params, cfg)
  n = tokens.shape[0]
  fn = _jitted_logps(cfg)
  out = []
  for i in range(0, n, batch_size):
    sl = slice(i, min(i + batch_size, n))
    pad = batch_size - (sl.stop - sl.start)
    t, a, m = (np.concatenate([x[sl], np.repeat(x[sl][-1:], pad, 0)]) if pad else x[sl]
               for x in (tokens, attention, loss_mask))
    out.append(np.asarray(fn(params, t, a, m))[:sl.stop - sl.start])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


_JITTED: dict = {}


def _jitted_logps(cfg):
  if cfg not in _JITTED:
    _JITTED[cfg] = jax.jit(lambda p, t, a, m: _logps(p, cfg, t, a, m))
  return _JITTED[cfg]


def precompute_reference(data: Data, ref_params, cfg: llama.LlamaConfig, *, batch_size: int = 512) -> Data:
  """`data` plus `ref_chosen_logps` and `ref_rejected_logps` (`[N]`), scored once by the frozen reference."""
  check_data(data)
  out = dict(data)
  for side in _SIDES:
    out[f"ref_{side}_logps"] = sequence_logps(ref_params, cfg, data[side], data[f"{side}_attention"],
                                              data[f"{side}_loss_mask"], batch_size=batch_size)
  return out


def _gather(data: dict, idx, keys):
  return {k: jnp.asarray(data[k])[idx] for k in keys}


def _draw(rng, n: int, batch_size: int):
  return jax.random.randint(rng, (batch_size,), 0, n)


def _pair_logps(params, cfg, b, sides=_SIDES):
  """Policy log-probs of the given sides of a minibatch: one forward when the widths agree."""
  widths = {np.shape(b[s])[1] for s in sides}
  if len(widths) == 1:
    cat = lambda suffix: jnp.concatenate([b[s + suffix] for s in sides], axis=0)  # noqa: E731
    lp = _logps(params, cfg, cat(""), cat("_attention"), cat("_loss_mask"))
    return jnp.split(lp, len(sides))
  return [_logps(params, cfg, b[s], b[s + "_attention"], b[s + "_loss_mask"]) for s in sides]


def _check_batch_size(batch_size) -> int:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  return int(batch_size)


def dpo_loss_fn(cfg: llama.LlamaConfig, data: Data, *, batch_size: int, beta: float,
                loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
                label_smoothing: float = 0.0, length_normalise: bool = True, ref_params=None) -> LossFn:
  """A DPO-family loss on the Llama policy (module docstring).

  Args:
    cfg: the policy's config (the reference's, when `ref_params` is given: same config).
    data: `preference_data`, with `ref_*_logps` (`precompute_reference`) or without (then `ref_params`).
    batch_size: pairs per step.
    beta, loss_type, loss_weights, label_smoothing: as `jaxml.alignment.dpo_loss`.
    length_normalise: pass the completion token counts (TRL's ipo / sigmoid_norm / sft); False passes 1s.
    ref_params: the frozen reference, required when `data` has no reference log-probs.

  Returns:
    `loss(params, batch, rng)`; `batch` is unused (the minibatch is drawn from `rng`).

  Raises:
    ValueError: for bad data (chosen/rejected sizes, non-finite reference log-probs), a bad beta, loss type
      or label smoothing (the same messages as `dpo_loss`), or a missing / mismatched reference; all before
      any compute.
  """
  n = check_data(data)
  batch_size = _check_batch_size(batch_size)
  ones = np.ones((1,), np.float32)
  # Validates beta, loss_type, loss_weights and label_smoothing now, with dpo_loss's own messages.
  dpo_loss(ones, ones, ones, ones, beta=beta, loss_type=loss_type, loss_weights=loss_weights,
           label_smoothing=label_smoothing, chosen_lengths_B=ones, rejected_lengths_B=ones)
  precomputed = "ref_chosen_logps" in data and "ref_rejected_logps" in data
  if not precomputed:
    if ref_params is None:
      raise ValueError("ref_params is required: data has no precomputed reference log-probs (ref_chosen_logps, "
                       "ref_rejected_logps; see precompute_reference)")
    try:
      llama.check_params(ref_params, cfg)
    except ValueError as e:
      raise ValueError(f"ref_params do not match the policy's config: {e}") from e
  keys = [s + x for s in _SIDES for x in ("", "_attention", "_loss_mask", "_lengths")]
  if precomputed:
    keys += ["ref_chosen_logps", "ref_rejected_logps"]
  arrays = {k: np.asarray(data[k]) for k in keys}

  def loss(params, batch, rng):
    del batch
    b = _gather(arrays, _draw(rng, n, batch_size), keys)
    pc, pr = _pair_logps(params, cfg, b)
    if precomputed:
      rc, rr = b["ref_chosen_logps"], b["ref_rejected_logps"]
    else:
      rc, rr = (jax.lax.stop_gradient(x) for x in _pair_logps(ref_params, cfg, b))
    if length_normalise:
      nc, nr = b["chosen_lengths"], b["rejected_lengths"]
    else:
      nc = nr = jnp.ones((batch_size,), jnp.float32)
    return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                    label_smoothing=label_smoothing, chosen_lengths_B=nc, rejected_lengths_B=nr)

  return loss


def slic_loss_fn(cfg: llama.LlamaConfig, data: Data, *, batch_size: int, delta: float,
                 reg_weight: float) -> LossFn:
  """SLiC-HF on the Llama policy: hinge on the chosen/rejected sequence log-likelihoods plus
  `reg_weight` times the NLL of each pair's SFT target (`data["target*"]`); no reference model."""
  n = check_data(data, needs=_SIDES + ("target",))
  batch_size = _check_batch_size(batch_size)
  one = np.zeros((1,), np.float32)
  slic_loss(one, one, one, delta=delta, reg_weight=reg_weight)   # validates delta and reg_weight now
  keys = [s + x for s in _SIDES + ("target",) for x in ("", "_attention", "_loss_mask")]
  arrays = {k: np.asarray(data[k]) for k in keys}

  def loss(params, batch, rng):
    del batch
    b = _gather(arrays, _draw(rng, n, batch_size), keys)
    pos, neg, target = _pair_logps(params, cfg, b, _SIDES + ("target",))
    return slic_loss(pos, neg, target, delta=delta, reg_weight=reg_weight)

  return loss


def reward_loss_fn(cfg: llama.LlamaConfig, data: Data, *, batch_size: int, center_coef: float = 0.0) -> LossFn:
  """The reward model's Bradley-Terry loss on minibatches drawn from the step's key."""
  n = check_data(data)
  batch_size = _check_batch_size(batch_size)
  arrays = {"chosen": data["chosen"], "chosen_mask": data["chosen_attention"],
            "rejected": data["rejected"], "rejected_mask": data["rejected_attention"]}

  def loss(params, batch, rng):
    del batch
    b = _gather(arrays, _draw(rng, n, batch_size), list(arrays))
    return reward_model_loss(params, b, cfg=cfg, center_coef=center_coef)

  return loss


def sample_and_rank(responses_PxMxL, lengths_PxM, scores_PxM) -> tuple[np.ndarray, ...]:
  """SLiC-HF's sample-and-rank pairs: per prompt, the best-scored of m samples against each of the others.

  (The paper ranks m samples of the SFT policy per input with a reward or
  ranking model and calibrates the likelihood towards the better ones; this
  pairs the top one with each of the other m - 1. Ties keep the first.)

  Returns:
    `(chosen_NxL, chosen_lengths_N, rejected_NxL, rejected_lengths_N)` with N = P (m - 1).
  """
  resp = np.asarray(responses_PxMxL)
  lengths, scores = np.asarray(lengths_PxM), np.asarray(scores_PxM)
  if resp.ndim != 3 or lengths.shape != resp.shape[:2] or scores.shape != resp.shape[:2]:
    raise ValueError(f"responses_PxMxL must be [P, m, L] with lengths_PxM and scores_PxM [P, m]; got {resp.shape}, "
                     f"{lengths.shape}, {scores.shape}")
  p, m = scores.shape
  if m < 2:
    raise ValueError(f"sample_and_rank needs m >= 2 samples per prompt, got {m}")
  best = np.argmax(scores, axis=1)
  others = np.stack([np.delete(np.arange(m), b) for b in best])             # [P, m - 1]
  rows = np.repeat(np.arange(p), m - 1)
  pos, neg = np.repeat(best, m - 1), others.reshape(-1)
  return resp[rows, pos], lengths[rows, pos], resp[rows, neg], lengths[rows, neg]


def seed_ensemble(loss: LossFn, tx, seeds: int) -> tuple[LossFn, Any]:
  """`seeds` independent trainings as one: the loss and optimizer of a stacked `[S, ...]` parameter tree.

  Seed s draws its minibatches from `fold_in(rng, s)`; the ensemble's loss is the SUM of the seeds'
  losses, so its gradient with respect to seed s's parameters is that seed's own gradient, and the
  optimizer runs per seed (`vmap` of `tx`: each seed has its own Adam moments and its own global-norm
  clipping). A seed's trajectory is therefore that of a single run with its key. Metrics are seed means
  (`loss_mean` the mean loss).
  """
  import optax  # noqa: PLC0415 - only the ensemble needs it here

  def ens_loss(params_S, batch, rng):
    keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(jnp.arange(seeds, dtype=jnp.uint32))
    losses, metrics = jax.vmap(loss, in_axes=(0, None, 0))(params_S, batch, keys)
    out = {k: jnp.mean(v) for k, v in metrics.items()}
    out["loss_mean"] = jnp.mean(losses)
    return jnp.sum(losses), out

  def update(grads, state, params=None):
    if params is None:
      return jax.vmap(lambda g, st: tx.update(g, st))(grads, state)
    return jax.vmap(tx.update)(grads, state, params)

  return ens_loss, optax.GradientTransformation(jax.vmap(tx.init), update)


def train(name: str, workdir: str, init_params, loss: LossFn, *, lr: float, steps: int, steps_per_call: int,
          checkpoint_every: int, seed: int, record: dict, clip_norm: float | None = 1.0,
          allow_fresh_start: bool = False, log: Callable[[str], None] = print, seeds: int = 1) -> jt.TrainResult:
  """Trains (or resumes) `init_params` on `loss` with Adam in `workdir/name/` through `jaxml.train`.

  Args:
    name: the training's folder.
    workdir: the experiment's folder.
    init_params: the starting parameters (e.g. the SFT policy), or `init(rng) -> params`.
    loss: `loss(params, batch, rng)`, drawing its data from `rng`.
    lr, steps, steps_per_call, checkpoint_every: Adam's constant rate; updates; per compiled call; between
      checkpoints (multiples of `steps_per_call`).
    seed: the state's key (minibatch draws).
    record: what the checkpoints must agree with (`jt.check_run_config`; a change raises naming fields).
    clip_norm: global gradient clipping (None: off).
    allow_fresh_start: start over when checkpoints exist but none restores.
    log: progress lines.
    seeds: independent trainings run together (`seed_ensemble`): the state's parameters are
      `[seeds, ...]`, every seed starting from `init_params` (1: a plain single run).

  Returns:
    The loop's `TrainResult`.
  """
  init_fn = init_params if callable(init_params) else (lambda rng: init_params)
  tx, _ = jt.make_optimizer(lr, total_steps=steps, kind="adam", schedule="constant", clip_norm=clip_norm)
  if int(seeds) != seeds or seeds < 1:
    raise ValueError(f"seeds must be a positive int, got {seeds}")
  if seeds > 1:
    single_init = init_fn
    loss, tx = seed_ensemble(loss, tx, int(seeds))
    init_fn = lambda rng: jax.vmap(lambda k: single_init(k))(  # noqa: E731
        jax.random.split(rng, int(seeds)))
    record = {**record, "seeds": int(seeds)}
  return jt.fit(loss, init_fn, tx, jax.random.PRNGKey(seed), num_steps=steps, workdir=os.path.join(workdir, name),
                record=record, record_name=f"{name} training config", checkpoint_every=checkpoint_every, keep=2,
                steps_per_call=steps_per_call, allow_fresh_start=allow_fresh_start,
                log_every=max(steps // 5, steps_per_call), plot_title=f"{name} loss",
                print_fn=lambda s: log(f"{name}: {s}"))
