"""Peer side of the Perceiver parity tests (runs in .venv-peer, never imports jaxml).

`run(inputs, workdir, build=..., load=..., texts=...)`:

- `build`: specs `{"name", "arch": "masked_lm" | "fourier", "seed", "config": {...}}`.
  Each becomes a transformers `PerceiverForMaskedLM` / `PerceiverForImageClassificationFourier`
  (float32, eager attention, every parameter overwritten with seeded noise so that logits are
  O(1)), saved with `save_pretrained` under `workdir/<name>`, and run on
  `inputs["<name>/inputs"]` (byte ids `[B, M]`, or images `[B, H, W, C]` channels last, which are
  transposed here to torch's `[B, C, H, W]`) with `attention_mask = inputs["<name>/mask"]` when
  given. Returns `<name>/folder` and `<name>/logits`.
- `load`: folders (written by jaxml's `to_hf`) loaded with `from_pretrained`; for folder i,
  `load<i>/logits` on `inputs["load<i>/inputs"]` (and `load<i>/mask`) and `load<i>/problems`
  (missing / unexpected / mismatched keys reported by transformers).
- `texts`: `PerceiverTokenizer()(text).input_ids` for each, and the special token ids.
"""
import os

import numpy as np
import torch
from transformers import (PerceiverConfig, PerceiverForImageClassificationFourier, PerceiverForMaskedLM,
                          PerceiverTokenizer)

_CLASSES = {"masked_lm": PerceiverForMaskedLM, "fourier": PerceiverForImageClassificationFourier}


def _randomise(model, seed):
  """Seeded noise in every parameter: norms near one, linear weights fan-in scaled, the rest N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if "layernorm" in name and name.endswith(".weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:  # biases
        p.copy_(0.1 * noise)
      elif name.endswith(".weight") and ("embeddings.weight" not in name):  # torch Linear (out, in)
        p.copy_(noise / np.sqrt(p.shape[1]))
      else:  # latents, learned positions / queries, the byte embedding
        p.copy_(noise)


def _forward(model, x, mask, arch):
  x = torch.as_tensor(x)
  if arch == "fourier":
    x = x.float().permute(0, 3, 1, 2)  # channels last -> torch's [B, C, H, W]
  else:
    x = x.long()
  kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask).float()}
  with torch.no_grad():
    return model(inputs=x, **kw).logits.float().numpy()


def run(inputs, workdir, build=(), load=(), texts=()):
  torch.set_num_threads(1)
  result = {}
  for spec in build:
    name, arch = spec["name"], spec["arch"]
    torch.manual_seed(spec["seed"])
    config = PerceiverConfig(attention_probs_dropout_prob=0.0, attn_implementation="eager", **spec["config"])
    model = _CLASSES[arch](config).eval()
    _randomise(model, spec["seed"])
    folder = os.path.join(workdir, name)
    model.save_pretrained(folder)
    result[f"{name}/folder"] = folder
    result[f"{name}/logits"] = _forward(model, inputs[f"{name}/inputs"], inputs.get(f"{name}/mask"), arch)
  for i, spec in enumerate(load):
    folder, arch = spec["folder"], spec["arch"]
    model, info = _CLASSES[arch].from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                 output_loading_info=True)
    model.eval()
    result[f"load{i}/logits"] = _forward(model, inputs[f"load{i}/inputs"], inputs.get(f"load{i}/mask"), arch)
    result[f"load{i}/problems"] = {k: sorted(map(str, v)) for k, v in info.items() if v}
  if texts:
    tok = PerceiverTokenizer()
    result["texts/ids"] = [tok(t).input_ids for t in texts]
    result["texts/special"] = {k: getattr(tok, f"{k}_token_id") for k in ("pad", "bos", "eos", "mask", "cls", "sep")}
  return result
