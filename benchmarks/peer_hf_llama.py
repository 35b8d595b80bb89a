"""Hugging Face side of `benchmarks.llama_bench`; runs in the peer environment.

Started by `benchmarks.common.PeerWorker` with the peer interpreter (torch CPU,
transformers); never imports jaxml. It answers JSON-line requests:

  {"op": "hello", "threads": n}            torch thread count, versions
  {"op": "build", "name", "config", "seed"}  LlamaForCausalLM (float32, eager
                                             PyTorch, default SDPA attention)
                                             + torch.optim.AdamW
  {"op": "train", "name", "tokens", "steps"} seconds of each full step
                                             (forward, backward, AdamW update)
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


def _hf_config(c: dict) -> transformers.LlamaConfig:
  """The HF config with the shapes of a jaxml `LlamaConfig` (see `llama_bench.hf_config_dict`)."""
  return transformers.LlamaConfig(
      vocab_size=c["vocab_size"], hidden_size=c["dim"], intermediate_size=c["hidden_dim"],
      num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
      rms_norm_eps=c["norm_eps"], rope_theta=c["rope_theta"], max_position_embeddings=c["max_seq_len"],
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, pad_token_id=0, bos_token_id=None,
      eos_token_id=None)


def op_build(name: str, config: dict, seed: int = 0) -> dict:
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(_hf_config(config)).float()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  _MODELS[name] = (model, opt, config)
  return {"params": sum(p.numel() for p in model.parameters()),
          "attn_implementation": model.config._attn_implementation}


def op_train(name: str, tokens: list, steps: int) -> dict:
  model, opt, config = _MODELS[name]
  model.train()
  tokens = torch.tensor(tokens, dtype=torch.long)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  times, loss = [], None
  for _ in range(steps):
    start = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config["vocab_size"]), targets.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
  return {"times": times, "loss": float(loss)}


def op_generate(name: str, prompts: list, new_tokens: int, repeats: int) -> dict:
  model, _, _ = _MODELS[name]
  model.eval()
  ids = torch.tensor(prompts, dtype=torch.long)
  times, out = [], None
  with torch.inference_mode():
    for _ in range(repeats):
      start = time.perf_counter()
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
      times.append(time.perf_counter() - start)
  return {"times": times, "new_tokens": int(out.shape[1] - ids.shape[1])}


OPS = {"build": op_build, "train": op_train, "generate": op_generate}


def main() -> int:
  transformers.logging.set_verbosity_error()
  return peer_protocol.serve(OPS, packages=("transformers",))


if __name__ == "__main__":
  sys.exit(main())
