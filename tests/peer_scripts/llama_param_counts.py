"""Counts LlamaForCausalLM parameters for the published Llama 2 shapes (meta device, no memory)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {  # hidden, layers, heads, kv heads, intermediate (the released config.json files)
    "7b": (4096, 32, 32, 32, 11008),
    "13b": (5120, 40, 40, 40, 13824),
    "70b": (8192, 80, 64, 8, 28672),
}


def run(inputs, workdir):
  out = {}
  for name, (d, n_layers, heads, kv, ffn) in SHAPES.items():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=ffn, tie_word_embeddings=False)
    with torch.device("meta"):
      m = LlamaForCausalLM(cfg)
    out[name] = int(sum(p.numel() for p in m.parameters()))
  return out
