"""Peer side of the Llama checkpoint parity tests (runs in .venv-peer, never imports jaxml).

One call builds everything the tests compare against, so torch/transformers
start once:

- `hf`: random tiny `LlamaForCausalLM`s (float32, seeded), saved with
  `save_pretrained` (safetensors, the only format transformers 5 writes;
  optionally sharded), their logits
  on `inputs["tokens"]`, and greedy `generate` outputs per prompt (no padding).
  With `seq_batches`: for each padded batch `inputs["seq_<side>_{tokens,
  attention,loss}"]`, the per-row sum over the loss mask of
  `log_softmax(logits)[t - 1, tokens[t]]`, from one forward pass given the
  attention mask and `position_ids = clip(cumsum(attention) - 1, 0)`.
- `meta`: a random Meta-layout checkpoint (`params.json` + two
  `consolidated.NN.pth` model-parallel shards) and the Hugging Face model
  transformers' Meta converter would make from the unsharded weights, with its
  logits.
- `torch_file`: a `.pth` state dict with awkward tensors (bfloat16, float16,
  int64, a transposed view, two views sharing a storage) and the values the
  reader must recover; and one tiny HF model saved twice, as safetensors and
  as a legacy `pytorch_model.bin` (torch.save of its state dict).
"""
import json
import os
import types

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _randomise(model, seed):
  """Overwrites every parameter with seeded values big enough to give O(1) logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1:  # RMSNorm weights: around one
        p.copy_(1.0 + 0.1 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      else:  # linear (out, in)
        p.copy_(noise / np.sqrt(p.shape[1]))


def _hf_config(c):
  return LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["dim"], intermediate_size=c["intermediate_size"],
                     num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                     num_key_value_heads=c["n_kv_heads"], max_position_embeddings=c.get("max_seq_len", 64),
                     rms_norm_eps=c.get("norm_eps", 1e-5), rope_theta=c.get("rope_theta", 10000.0),
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1,
                     eos_token_id=2, attn_implementation="eager")


def _logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _greedy(model, prompt, max_new_tokens, eos_id, repetition_penalty=None):
  """HF greedy decoding of one prompt; new tokens, cut before the first EOS."""
  ids = torch.as_tensor([prompt], dtype=torch.long)
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         pad_token_id=0 if eos_id is None else eos_id, top_p=None, top_k=None, temperature=None,
                         repetition_penalty=repetition_penalty)
  new = out[0, len(prompt):].tolist()
  if eos_id is not None and eos_id in new:
    new = new[:new.index(eos_id)]
  return new


def _sequence_logprobs(model, inputs, side):
  """Sums of next-token log-probs over the loss mask of one padded batch (float32 logits, float64 sums)."""
  tokens = torch.as_tensor(inputs[f"seq_{side}_tokens"], dtype=torch.long)
  attention = torch.as_tensor(inputs[f"seq_{side}_attention"], dtype=torch.long)
  loss = torch.as_tensor(inputs[f"seq_{side}_loss"], dtype=torch.float64)
  position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    logits = model(input_ids=tokens, attention_mask=attention, position_ids=position_ids).logits.float()
  logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
  return (logp.double() * loss[:, 1:]).sum(-1).numpy()


def _hf_models(inputs, workdir, configs, prompts, max_new_tokens, result, seq_batches=(), repetition_penalty=None):
  for c in configs:
    torch.manual_seed(c["seed"])
    model = LlamaForCausalLM(_hf_config(c)).eval()
    _randomise(model, c["seed"])
    folder = os.path.join(workdir, c["name"])
    kw = {"max_shard_size": c["max_shard_size"]} if c.get("max_shard_size") else {}
    model.save_pretrained(folder, **kw)
    result[f"{c['name']}/folder"] = folder
    result[f"{c['name']}/logits"] = _logits(model, inputs["tokens"])
    for side in seq_batches:
      result[f"{c['name']}/seq_{side}"] = _sequence_logprobs(model, inputs, side)
    if c.get("generate"):
      # Without EOS, then with an EOS id the model really emits (the 4th greedy token
      # of the first prompt), so the stop-at-EOS path is exercised too.
      free = [_greedy(model, p, max_new_tokens, None) for p in prompts]
      eos = int(free[0][3])
      stopped = [_greedy(model, p, max_new_tokens, eos) for p in prompts]
      result[f"{c['name']}/gen_free"] = free
      result[f"{c['name']}/gen_eos"] = stopped
      result[f"{c['name']}/eos_id"] = eos
      if repetition_penalty is not None:  # transformers' repetition penalty (CTRL's)
        result[f"{c['name']}/gen_penalty"] = [_greedy(model, p, max_new_tokens, None, repetition_penalty)
                                              for p in prompts]


def _permute_meta_to_hf(w, n_heads):
  """transformers' own Meta -> HF q/k row permutation.

  transformers 5 ships it as `core_model_loading.PermuteForRope` (the logic of
  the former `convert_llama_weights_to_hf.permute`: view the rows of each head
  as `[Dh/2, 2]`, transpose to `[2, Dh/2]`). Its head count comes from the
  config's `num_attention_heads`, so a namespace with the right count (the kv
  head count for wk) is passed.
  """
  from transformers.core_model_loading import PermuteForRope
  return PermuteForRope()._permute_for_rope(w.clone(), types.SimpleNamespace(num_attention_heads=n_heads))


def _meta(inputs, workdir, c, result):
  """Random Meta checkpoint in 2 model-parallel shards + the HF model converted from it."""
  dim, L, H, K, V = c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["vocab_size"]
  Dh = dim // H
  hidden = int(2 * 4 * dim / 3)
  if c.get("ffn_dim_multiplier") is not None:
    hidden = int(c["ffn_dim_multiplier"] * hidden)
  hidden = c["multiple_of"] * ((hidden + c["multiple_of"] - 1) // c["multiple_of"])
  gen = torch.Generator().manual_seed(c["seed"])

  def lin(out, inp):
    return torch.randn(out, inp, generator=gen) / np.sqrt(inp)

  def norm():
    return 1.0 + 0.1 * torch.randn(dim, generator=gen)

  full = {"tok_embeddings.weight": torch.randn(V, dim, generator=gen), "norm.weight": norm(),
          "output.weight": lin(V, dim), "rope.freqs": torch.zeros(Dh // 2)}
  for i in range(L):
    p = f"layers.{i}."
    full[p + "attention.wq.weight"] = lin(H * Dh, dim)
    full[p + "attention.wk.weight"] = lin(K * Dh, dim)
    full[p + "attention.wv.weight"] = lin(K * Dh, dim)
    full[p + "attention.wo.weight"] = lin(dim, H * Dh)
    full[p + "feed_forward.w1.weight"] = lin(hidden, dim)
    full[p + "feed_forward.w2.weight"] = lin(dim, hidden)
    full[p + "feed_forward.w3.weight"] = lin(hidden, dim)
    full[p + "attention_norm.weight"] = norm()
    full[p + "ffn_norm.weight"] = norm()

  # Model-parallel split as in Meta's fairscale layers.
  n_shards = c["n_shards"]
  column = ("wq", "wk", "wv", "w1", "w3", "output")
  row = ("wo", "w2", "tok_embeddings")
  shards = [{} for _ in range(n_shards)]
  for key, t in full.items():
    short = key.split(".")[-2]
    if short in column or short in row:
      pieces = torch.chunk(t, n_shards, dim=0 if short in column else 1)
    else:
      pieces = [t] * n_shards
    for s, piece in zip(shards, pieces):
      s[key] = piece.clone().to(torch.bfloat16 if c.get("bf16") else torch.float32)
  folder = os.path.join(workdir, c["name"])
  os.makedirs(folder, exist_ok=True)
  for j, s in enumerate(shards):
    torch.save(s, os.path.join(folder, f"consolidated.{j:02d}.pth"))
  params = {"dim": dim, "n_layers": L, "n_heads": H, "n_kv_heads": K, "multiple_of": c["multiple_of"],
            "ffn_dim_multiplier": c.get("ffn_dim_multiplier"), "norm_eps": c["norm_eps"], "vocab_size": -1,
            "rope_theta": c.get("rope_theta", 10000.0)}
  with open(os.path.join(folder, "params.json"), "w") as f:
    json.dump(params, f)

  # The HF model transformers' converter makes from the same (unsharded) weights.
  hf_cfg = _hf_config({"vocab_size": V, "dim": dim, "intermediate_size": hidden, "n_layers": L, "n_heads": H,
                       "n_kv_heads": K, "norm_eps": c["norm_eps"], "rope_theta": c.get("rope_theta", 10000.0)})
  model = LlamaForCausalLM(hf_cfg).eval()
  dt = torch.bfloat16 if c.get("bf16") else torch.float32
  conv = {"model.embed_tokens.weight": full["tok_embeddings.weight"], "model.norm.weight": full["norm.weight"],
          "lm_head.weight": full["output.weight"]}
  names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
           "ffn_norm": "post_attention_layernorm"}
  for i in range(L):
    for meta_name, hf_name in names.items():
      t = full[f"layers.{i}.{meta_name}.weight"]
      if meta_name == "attention.wq":
        t = _permute_meta_to_hf(t, H)
      elif meta_name == "attention.wk":
        t = _permute_meta_to_hf(t, K)
      conv[f"model.layers.{i}.{hf_name}.weight"] = t
  conv = {k: v.to(dt).float() for k, v in conv.items()}  # the values the shards really hold
  missing, unexpected = model.load_state_dict(conv, strict=False)
  if missing or unexpected:
    raise RuntimeError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
  result[f"{c['name']}/folder"] = folder
  result[f"{c['name']}/logits"] = _logits(model, inputs["tokens"])


def _torch_file(workdir, result):
  """A state dict exercising the .pth reader: dtypes, views, shared storage, an OrderedDict."""
  gen = torch.Generator().manual_seed(7)
  base = torch.randn(4, 6, generator=gen)
  shared = torch.arange(20, dtype=torch.float32)
  sd = {
      "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
      "f16": torch.randn(2, 3, generator=gen).to(torch.float16),
      "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
      "transposed": base.t(),  # non-contiguous strides
      "shared_a": shared[2:8].view(2, 3),  # views of one storage, with an offset
      "shared_b": shared[10:],
      "scalar": torch.tensor(3.5),
  }
  path = os.path.join(workdir, "reader.pth")
  torch.save(sd, path)
  result["torch_file/path"] = path
  for k, v in sd.items():
    result[f"torch_file/{k}"] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy().copy()
    result[f"torch_file/{k}/dtype"] = str(v.dtype).replace("torch.", "")
  c = {"vocab_size": 40, "dim": 32, "intermediate_size": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2}
  model = LlamaForCausalLM(_hf_config(c))
  _randomise(model, 5)
  st_dir, bin_dir = os.path.join(workdir, "hf_st"), os.path.join(workdir, "hf_bin")
  model.save_pretrained(st_dir)
  os.makedirs(bin_dir)
  model.config.to_json_file(os.path.join(bin_dir, "config.json"))
  torch.save(model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
  result["torch_file/hf_st"], result["torch_file/hf_bin"] = st_dir, bin_dir


def run(inputs, workdir, hf_configs=(), prompts=(), max_new_tokens=8, meta=None, torch_file=False, seq_batches=(),
        repetition_penalty=None):
  torch.manual_seed(0)
  result = {}
  _hf_models(inputs, workdir, hf_configs, prompts, max_new_tokens, result, seq_batches, repetition_penalty)
  if meta is not None:
    _meta(inputs, workdir, meta, result)
  if torch_file:
    _torch_file(workdir, result)
  result["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
  return result
