"""TRL side of `benchmarks.alignment_bench`: one DPO training step in torch CPU; runs in the peer environment.

Written against trl 1.16.0 and transformers 5.24.0 (pinned in the peer environment); never
imports jaxml. Started by `benchmarks.common.PeerWorker`; answers JSON-line requests:

  {"op": "hello", "threads": n}              torch thread count and versions
  {"op": "build", "hf_dir", "lr", "beta"}    `LlamaForCausalLM.from_pretrained(hf_dir)` (float32,
                                             eager PyTorch, default SDPA attention) patched with
                                             TRL's fused LM head exactly as `DPOTrainer.__init__`
                                             does (`add_fused_lm_head`, outputs log_probs, entropy,
                                             mean_logits, is_top1), + `torch.optim.AdamW`
  {"op": "step", "input_ids", "attention_mask", "completion_mask", "ref_chosen_logps",
   "ref_rejected_logps", "steps"}            seconds and loss of each full step
  {"op": "quit"}

One step is what `DPOTrainer` runs per batch without the `Trainer` loop around it: the loss
from `DPOTrainer._compute_loss` (called unbound on a stand-in `self` carrying the attributes
the method reads; the concatenated [chosen; rejected] batch in one forward, sigmoid loss,
reference log-probs precomputed: `precompute_ref_logps=True`), `loss.backward()`, an AdamW
step and `zero_grad`.
"""
import collections
import sys
import types

import torch
import transformers
import trl
from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

import peer_protocol  # benchmarks/peer_protocol.py, beside this script

_STATE = {}


def _stand_in(model, beta):
  accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
  return types.SimpleNamespace(
      model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
      f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, beta=beta, loss_types=["sigmoid"],
      loss_weights=[1.0], label_smoothing=0.0, use_weighting=False,
      args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
      _total_train_tokens=0, _tp_size=1)


def op_build(hf_dir: str, lr: float, beta: float) -> dict:
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
  add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  _STATE.update(model=model, opt=opt, stand_in=_stand_in(model, beta))
  return {"params": sum(p.numel() for p in model.parameters()),
          "attn_implementation": model.config._attn_implementation}


def op_step(input_ids, attention_mask, completion_mask, ref_chosen_logps, ref_rejected_logps, steps: int) -> dict:
  model, opt, stand_in = _STATE["model"], _STATE["opt"], _STATE["stand_in"]
  batch = {"input_ids": torch.tensor(input_ids, dtype=torch.long),
           "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
           "completion_mask": torch.tensor(completion_mask, dtype=torch.long),
           "ref_chosen_logps": torch.tensor(ref_chosen_logps, dtype=torch.float32),
           "ref_rejected_logps": torch.tensor(ref_rejected_logps, dtype=torch.float32)}
  return peer_protocol.timed_steps(lambda: DPOTrainer._compute_loss(stand_in, model, batch, return_outputs=False),
                                   opt, steps)


OPS = {"build": op_build, "step": op_step}


def main() -> int:
  transformers.logging.set_verbosity_error()
  return peer_protocol.serve(OPS, packages=("transformers", "trl"))


if __name__ == "__main__":
  sys.exit(main())
