"""transformers side of `benchmarks.perceiver_bench`; runs in the peer environment.

Started by `benchmarks.common.PeerWorker` with the peer interpreter (torch CPU,
transformers); never imports jaxml. It answers JSON-line requests:

  {"op": "hello", "threads": n}             torch thread count, versions
  {"op": "load", "folder"}                  PerceiverForMaskedLM.from_pretrained (float32, eager
                                            attention, dropout 0) + torch.optim.AdamW; loading problems
  {"op": "loss", "inputs", "labels"}        the masked-LM loss of the loaded weights (labels -100: not scored)
  {"op": "train", "inputs", "labels", "steps"}  seconds of each full step (forward with labels,
                                            backward, AdamW update) and the losses
  {"op": "forward", "inputs", "repeats"}    seconds of each inference forward (eval mode, no grad)
  {"op": "flops", "inputs", "labels"}       FLOPs of one training step counted by torch's FlopCounterMode
  {"op": "matmul_peak", "n", "repeats"}     FLOP/s of one n x n float32 matmul
  {"op": "matmul", "m", "k", "n", "repeats"}  median seconds of one [m, k] @ [k, n] float32 product
  {"op": "quit"}
"""
import sys
import time

import torch
import transformers

import peer_protocol  # benchmarks/peer_protocol.py (this folder is on sys.path): the shared JSON-line loop

_STATE = {}


def op_load(folder: str) -> dict:
  model, info = transformers.PerceiverForMaskedLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  # The defaults of torch.optim.AdamW, as the jaxml side uses them.
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  _STATE.update(model=model, opt=opt)
  return {"params": sum(p.numel() for p in model.parameters()),
          "problems": {k: sorted(map(str, v)) for k, v in info.items() if v}}


def _tensors(inputs, labels=None):
  x = torch.tensor(inputs, dtype=torch.long)
  y = None if labels is None else torch.tensor(labels, dtype=torch.long)
  return x, y


def op_loss(inputs: list, labels: list) -> dict:
  model = _STATE["model"]
  model.train()
  x, y = _tensors(inputs, labels)
  with torch.no_grad():
    out = model(inputs=x, attention_mask=torch.ones_like(x), labels=y)
  return {"loss": float(out.loss)}


def op_train(inputs: list, labels: list, steps: int) -> dict:
  model, opt = _STATE["model"], _STATE["opt"]
  model.train()
  x, y = _tensors(inputs, labels)
  mask = torch.ones_like(x)
  return peer_protocol.timed_steps(lambda: model(inputs=x, attention_mask=mask, labels=y).loss, opt, steps)


def op_forward(inputs: list, repeats: int) -> dict:
  model = _STATE["model"]
  model.eval()
  x, _ = _tensors(inputs)
  mask = torch.ones_like(x)
  times = []
  with torch.inference_mode():
    for _ in range(repeats):
      start = time.perf_counter()
      model(inputs=x, attention_mask=mask)
      times.append(time.perf_counter() - start)
  return {"times": times}


def op_flops(inputs: list, labels: list) -> dict:
  from torch.utils.flop_counter import FlopCounterMode
  model = _STATE["model"]
  x, y = _tensors(inputs, labels)
  counter = FlopCounterMode(display=False)
  with counter:
    model(inputs=x, attention_mask=torch.ones_like(x), labels=y).loss.backward()
  model.zero_grad(set_to_none=True)
  return {"flops": float(counter.get_total_flops())}


def op_matmul(m: int, k: int, n: int, repeats: int = 50) -> dict:
  """Median seconds of one float32 `[m, k] @ [k, n]` product."""
  return {"seconds": peer_protocol.matmul_seconds(m, k, n, repeats)}


OPS = {"load": op_load, "loss": op_loss, "train": op_train, "forward": op_forward, "flops": op_flops,
       "matmul": op_matmul}


def main() -> int:
  transformers.logging.set_verbosity_error()
  return peer_protocol.serve(OPS, packages=("transformers",))


if __name__ == "__main__":
  sys.exit(main())
