"""TRL's DPO-family and reward-model losses, values and gradients (never imports jaxml).

Written against trl 1.16.0 (pinned in requirements/peer.txt). The losses live
inside trainer methods there, so this script calls them unbound on stand-in
objects instead of building trainers:

- `trl.DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)`
  with `self` a `types.SimpleNamespace` holding the attributes the method
  reads (beta, loss_types, loss_weights, label_smoothing, args.discopop_tau,
  precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
  use_weighting=False, an accelerator whose gather is the identity, ...).
  `model` is a stand-in returning per-token log-probs built from the given
  sequence log-probs: `logp_i` on row i's first completion token, 0 on its
  other tokens, so they sum to `logp_i` exactly and the token-mean NLL of the
  sft loss is `-sum_i logp_i / sum_i n_i`. The reference log-probs enter
  precomputed (`inputs["ref_chosen_logps"]`, `["ref_rejected_logps"]`).
- `trl.RewardTrainer.compute_loss(self, model, inputs)` with a stand-in
  model whose `logits` are the given chosen and rejected scores.

Everything runs in float64; gradients are with respect to the four sequence
log-probs (or the two scores) through torch autograd. The trainers' own
metrics are read back from the stand-in's `_metrics`.

Inputs: for each DPO case `<name>__policy_chosen`, `__policy_rejected`,
`__ref_chosen`, `__ref_rejected` (`[B]`) and `__completion_mask` (`[2B, T]`,
chosen rows first, the first column 0 as a prompt token); for each reward
case `<name>__chosen`, `<name>__rejected` and optionally `<name>__margin`.
kwargs: `dpo_cases` / `reward_cases`, lists of dicts with "name" and the
trainer settings.
"""
import collections
import types

import numpy as np
import torch
import trl
from trl import DPOTrainer, RewardTrainer

torch.set_default_dtype(torch.float64)


def _accelerator():
  return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _metrics():
  return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


class _TokenLogpModel:
  """Returns per-token log-probs that sum, over each row's completion tokens, to the row's given log-prob.

  The whole log-prob sits on the row's first completion token and the other
  tokens get 0, so the sum is exact (equal inputs stay equal).
  """

  def __init__(self, logps_2B, shift_mask_2BxT):
    first = (shift_mask_2BxT.cumsum(dim=1) == 1) & (shift_mask_2BxT > 0)
    self.log_probs = logps_2B[:, None] * first
    self.shape = shift_mask_2BxT.shape

  def __call__(self, **kwargs):
    zeros = torch.zeros(self.shape)
    return types.SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros,
                                 is_top1=torch.zeros(self.shape, dtype=torch.bool))


def _dpo_stand_in(case):
  return types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
      ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
      beta=case.get("beta", 0.1), loss_types=list(case["loss_type"]),
      loss_weights=case.get("loss_weights") or [1.0] * len(case["loss_type"]),
      label_smoothing=case.get("label_smoothing", 0.0), use_weighting=False,
      args=types.SimpleNamespace(discopop_tau=case.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
      _metrics=_metrics(), _total_train_tokens=0, _tp_size=1)


def _dpo_case(inputs, case):
  name = case["name"]
  leaves = {k: torch.tensor(inputs[f"{name}__{k}"], dtype=torch.float64, requires_grad=True)
            for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")}
  completion_mask = torch.tensor(inputs[f"{name}__completion_mask"], dtype=torch.int64)
  shift_mask = completion_mask[:, 1:].to(torch.float64)
  model = _TokenLogpModel(torch.cat([leaves["policy_chosen"], leaves["policy_rejected"]]), shift_mask)
  batch = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
           "completion_mask": completion_mask, "ref_chosen_logps": leaves["ref_chosen"],
           "ref_rejected_logps": leaves["ref_rejected"]}
  stand_in = _dpo_stand_in(case)
  loss = DPOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
  grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
  out = {f"{name}__loss": np.asarray(loss.detach().numpy(), np.float64)}
  for key, g in zip(leaves, grads):
    out[f"{name}__grad_{key}"] = np.zeros(leaves[key].shape) if g is None else g.numpy()
  for key, values in stand_in._metrics["train"].items():
    if key.startswith(("rewards/", "logps/")):
      out[f"{name}__metric__{key}"] = np.asarray(values[-1], np.float64)
  return out


def _reward_case(inputs, case):
  name = case["name"]
  chosen = torch.tensor(inputs[f"{name}__chosen"], dtype=torch.float64, requires_grad=True)
  rejected = torch.tensor(inputs[f"{name}__rejected"], dtype=torch.float64, requires_grad=True)
  scores = torch.cat([chosen, rejected])[:, None]

  def model(**kwargs):
    return types.SimpleNamespace(logits=scores)

  batch = {"input_ids": torch.zeros(2 * len(chosen), 1, dtype=torch.int64),
           "attention_mask": torch.ones(2 * len(chosen), 1, dtype=torch.int64)}
  if f"{name}__margin" in inputs:
    batch["margin"] = torch.tensor(inputs[f"{name}__margin"], dtype=torch.float64)
  stand_in = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), accelerator=_accelerator(),
      args=types.SimpleNamespace(center_rewards_coefficient=case.get("center_rewards_coefficient")),
      _metrics=_metrics(), _total_train_tokens=0, _tp_size=1)
  loss = RewardTrainer.compute_loss(stand_in, model, batch)
  g_chosen, g_rejected = torch.autograd.grad(loss, [chosen, rejected])
  out = {f"{name}__loss": np.asarray(loss.detach().numpy(), np.float64),
         f"{name}__grad_chosen": g_chosen.numpy(), f"{name}__grad_rejected": g_rejected.numpy()}
  for key in ("accuracy", "margin"):
    out[f"{name}__metric__{key}"] = np.asarray(stand_in._metrics["train"][key][-1], np.float64)
  return out


def run(inputs, workdir, dpo_cases=(), reward_cases=()):
  out = {"trl_version": trl.__version__}
  for case in dpo_cases:
    out.update(_dpo_case(inputs, case))
  for case in reward_cases:
    out.update(_reward_case(inputs, case))
  return out
