"""Hugging Face side of `benchmarks.llama_bench`; runs in the peer environment.

Started by `benchmarks.common.PeerWorker` with the peer interpreter (torch CPU,
transformers); never imports jaxml. It answers JSON-line requests:

  {"op": "hello", "threads": n}            torch thread count, versions, the CPU
                                             capability torch's kernels dispatch to
  {"op": "build", "name", "folder", "precision"}
                                             LlamaForCausalLM loaded from the
                                             `to_hf` folder jaxml wrote (its
                                             initial parameters; eager PyTorch,
                                             default SDPA attention) +
                                             torch.optim.AdamW; precision
                                             "float32", "bf16_autocast" (float32
                                             weights, bfloat16 compute under
                                             `torch.autocast`) or "bfloat16"
                                             (weights cast, for decoding)
  {"op": "train", "name", "tokens", "steps"} seconds of each full step
                                             (forward, backward, AdamW update)
                                             and the loss of the last one
  {"op": "generate", "name", "prompts", "new_tokens", "repeats"}
                                             seconds of each greedy `generate`
  {"op": "matmul_peak", "n", "repeats"}     FLOP/s of one n x n float32 matmul
  {"op": "quit"}
"""
import sys
import time

import torch
import transformers

import peer_protocol  # benchmarks/peer_protocol.py, beside this script

_MODELS = {}


def op_build(name: str, folder: str, precision: str = "float32") -> dict:
  if precision not in ("float32", "bf16_autocast", "bfloat16"):
    raise ValueError(f"precision must be float32, bf16_autocast or bfloat16, got {precision!r}")
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
  if precision == "bfloat16":
    model = model.to(torch.bfloat16)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  _MODELS[name] = (model, opt, precision)
  return {"params": sum(p.numel() for p in model.parameters()),
          "attn_implementation": model.config._attn_implementation}


def _autocast(precision: str):
  return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast")


def op_train(name: str, tokens: list, steps: int) -> dict:
  model, opt, precision = _MODELS[name]
  model.train()
  tokens = torch.tensor(tokens, dtype=torch.long)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  vocab = model.config.vocab_size

  def loss_fn():
    with _autocast(precision):
      logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))

  out = peer_protocol.timed_steps(loss_fn, opt, steps)
  return {"times": out["times"], "cpu_times": out["cpu_times"], "loss": out["losses"][-1]}


def op_generate(name: str, prompts: list, new_tokens: int, repeats: int) -> dict:
  model, _, precision = _MODELS[name]
  model.eval()
  ids = torch.tensor(prompts, dtype=torch.long)
  times, cpu_times, out = [], [], None
  with torch.inference_mode(), _autocast(precision):
    for _ in range(repeats):
      start, cpu_start = time.perf_counter(), time.process_time()
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  return {"times": times, "cpu_times": cpu_times, "new_tokens": int(out.shape[1] - ids.shape[1])}


OPS = {"build": op_build, "train": op_train, "generate": op_generate}


def main() -> int:
  transformers.logging.set_verbosity_error()
  return peer_protocol.serve(OPS, packages=("transformers",))


if __name__ == "__main__":
  sys.exit(main())
