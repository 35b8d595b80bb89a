"""Peer side of the export test: Hugging Face loads folders written by jaxml's `to_hf`.

For each folder, `LlamaForCausalLM.from_pretrained` (float32 compute, eager
attention) must load every tensor with no missing or unexpected keys; returns
its logits on `inputs["tokens"]` and the loading report. Never imports jaxml.
"""
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM


def run(inputs, workdir, folders=()):
  result = {}
  tokens = torch.as_tensor(inputs["tokens"], dtype=torch.long)
  for i, folder in enumerate(folders):
    model, info = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                   output_loading_info=True)
    model.eval()
    with torch.no_grad():
      result[f"{i}/logits"] = model(tokens).logits.float().numpy()
    result[f"{i}/problems"] = {k: sorted(map(str, v)) for k, v in info.items() if v}
    with safe_open(f"{folder}/model.safetensors", framework="pt") as f:
      result[f"{i}/stored_dtypes"] = sorted({str(f.get_tensor(k).dtype) for k in f.keys()})
  return result
