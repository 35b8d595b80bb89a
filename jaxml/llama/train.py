"""Training and sampling for the Llama LM experiment (`experiments/llama_lm.py`).

`run(config, workdir)`: the experiment contract (`jaxml.experiment`):
`config.mode` "train" calls `train_and_evaluate`, "generate" calls
`generate_from_checkpoint`.

`train_and_evaluate(config, workdir)`: corpus -> tokenizer (trained once,
saved in `workdir`) -> token stream (cached in `workdir`) -> Llama from a
preset + overrides -> `jaxml.train.train` (checkpoints, resume, metrics, loss
plot) -> held-out loss -> greedy samples.

`generate_from_checkpoint(config, workdir, prompt)`: samples from this
workdir's newest checkpoint, or from a converted Hugging Face / Meta folder.

The experiment config (an `ml_collections.ConfigDict`, see
`experiments/configs/llama_lm.py`) is read only here; the model sees only its
`LlamaConfig`.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from jaxml import train as jt
from jaxml.llama.config import LLAMA_RULES
from jaxml.llama import config as llama_config
from jaxml.llama import data
from jaxml.llama import model
from jaxml.llama.generate import generate

TOKENIZER_PREFIX = "tokenizer"   # workdir/tokenizer.model
TOKENS_FILE = "tokens.npy"       # the tokenized corpus, reused on resume
MODEL_CONFIG_FILE = "model_config.json"


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _load_sentencepiece(path: str):
  from jaxml.llama import tokenizer as tok_lib  # noqa: PLC0415 - optional until the module lands
  return tok_lib.Tokenizer(path)


def get_tokenizer(config, workdir: str, files: list[str]) -> data.TokenizerLike:
  """The run's tokenizer: `config.tokenizer` is "sentencepiece" (trained on the
  corpus once and saved as `workdir/tokenizer.model`) or "byte".

  If `jaxml.llama.tokenizer` cannot be imported, the byte tokenizer is used and
  `workdir/tokenizer_kind.txt` records it, so a resumed run stays consistent.
  """
  kind = config.tokenizer
  kind_file = os.path.join(workdir, "tokenizer_kind.txt")
  if os.path.exists(kind_file):
    with open(kind_file) as f:
      kind = f.read().strip()
  if kind not in ("sentencepiece", "byte"):
    raise ValueError(f"config.tokenizer must be 'sentencepiece' or 'byte', got {kind!r}")
  if kind == "sentencepiece":
    try:
      from jaxml.llama import tokenizer as tok_lib  # noqa: PLC0415
    except ImportError as e:
      _log(f"tokenizer: jaxml.llama.tokenizer unavailable ({e}); falling back to the byte tokenizer")
      kind = "byte"
  if jax.process_index() == 0 and not os.path.exists(kind_file):
    with open(kind_file, "w") as f:
      f.write(kind + "\n")
  if kind == "byte":
    return data.ByteTokenizer()
  path = os.path.join(workdir, TOKENIZER_PREFIX + ".model")
  if not os.path.exists(path):
    if jax.process_index() == 0:
      t0 = time.perf_counter()
      tok_lib.train_tokenizer([pathlib.Path(f) for f in files], os.path.join(workdir, TOKENIZER_PREFIX),
                              config.vocab_size)
      _log(f"tokenizer: trained a {config.vocab_size}-piece SentencePiece model on {len(files)} files "
           f"in {time.perf_counter() - t0:.1f}s -> {path}")
    _sync("jaxml_llama_tokenizer")
  else:
    _log(f"tokenizer: reusing {path}")
  return tok_lib.Tokenizer(path)


def _workdir_tokenizer(config, workdir: str) -> data.TokenizerLike:
  kind_file = os.path.join(workdir, "tokenizer_kind.txt")
  kind = open(kind_file).read().strip() if os.path.exists(kind_file) else config.tokenizer
  if kind == "byte":
    return data.ByteTokenizer()
  return _load_sentencepiece(os.path.join(workdir, TOKENIZER_PREFIX + ".model"))


def load_tokens(workdir: str, files: list[str], tokenizer: data.TokenizerLike) -> np.ndarray:
  """The tokenized corpus, cached as `workdir/tokens.npy` (every process computes
  the same array; process 0 writes the cache atomically)."""
  path = os.path.join(workdir, TOKENS_FILE)
  if os.path.exists(path):
    return np.load(path)
  t0 = time.perf_counter()
  tokens = data.tokenize(data.read_texts(files), tokenizer)
  if jax.process_index() == 0:
    tmp = path + f".tmp{os.getpid()}.npy"
    np.save(tmp, tokens)
    os.replace(tmp, path)
  _log(f"data: {len(files)} files -> {len(tokens):,} tokens in {time.perf_counter() - t0:.1f}s")
  return tokens


def model_config(config, vocab_size: int) -> llama_config.LlamaConfig:
  """`LlamaConfig` from `config.preset` + `config.model_overrides`, with the
  tokenizer's vocabulary and a context of at least `config.seq_len`."""
  base = llama_config.preset(config.preset)
  overrides = dict(config.model_overrides.to_dict()) if config.get("model_overrides") else {}
  overrides.setdefault("vocab_size", vocab_size)
  overrides.setdefault("max_seq_len", max(base.max_seq_len, config.seq_len))
  if overrides["vocab_size"] < vocab_size:
    raise ValueError(f"model vocab_size {overrides['vocab_size']} is smaller than the tokenizer's {vocab_size}")
  return base.replace(**overrides)


def _optimizer(config):
  return jt.make_optimizer(config.lr, total_steps=config.steps, warmup_steps=config.warmup,
                           final_lr_ratio=config.final_lr_ratio, b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay, clip_norm=config.clip_norm or None)


def _setup(config, workdir: str, cfg: llama_config.LlamaConfig):
  mesh = jt.make_mesh(*config.mesh)
  tx, schedule = _optimizer(config)
  init_fn = functools.partial(model.init, cfg=cfg)
  rng = jax.random.PRNGKey(config.seed)
  abstract, shardings = jt.abstract_train_state(init_fn, tx, rng, mesh, LLAMA_RULES)
  ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every, keep=config.keep,
                         async_save=config.get("async_checkpoint", True))
  return mesh, tx, schedule, init_fn, rng, abstract, shardings, ckpt


def _decode_samples(params, cfg, tokenizer, prompts, config) -> list[str]:
  ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
  max_new = min(config.sample_new_tokens, cfg.max_seq_len - max(len(i) for i in ids))
  if max_new <= 0:
    raise ValueError(f"the prompt is too long for the context ({cfg.max_seq_len} tokens)")
  temperature = float(config.sample_temperature)
  outs = generate(params, cfg, ids, max_new, temperature=temperature,
                  top_k=config.get("sample_top_k") or None, top_p=config.get("sample_top_p") or None,
                  eos_id=tokenizer.eos_id, rng=jax.random.PRNGKey(config.seed + 17) if temperature > 0 else None)
  return [p + tokenizer.decode(o) for p, o in zip(prompts, outs)]


def _single_device(tree):
  """Gathers (possibly sharded) arrays onto one device for sampling."""
  return jax.device_put(tree, jax.devices()[0]) if jax.process_count() == 1 else tree


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `workdir`. Returns a summary dict:
  `first_loss`, `last_loss`, `eval_loss`, `step`, `preempted`, `samples`, `params`, `model_config`."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  files = data.corpus_files(config.corpus or None, max_bytes=config.corpus_max_bytes or None)
  tokenizer = get_tokenizer(config, workdir, files)
  tokens = load_tokens(workdir, files, tokenizer)
  train_tokens, eval_tokens = data.split_tokens(tokens, config.eval_fraction)
  cfg = model_config(config, tokenizer.vocab_size)
  # A changed model on an existing workdir raises here, naming the fields, before anything is touched.
  jt.check_run_config(os.path.join(workdir, "checkpoints"), cfg.to_dict(), fields="model config",
                      defaults=llama_config.LlamaConfig().to_dict())  # fields added since a run began resume at their defaults
  if jax.process_index() == 0:
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  _log(f"model: {llama_config.param_count(cfg):,} params ({cfg.n_layers} layers, dim {cfg.dim}, "
       f"{cfg.n_heads} heads / {cfg.kv_heads} kv heads, ffn {cfg.hidden_dim}, vocab {cfg.vocab_size})")

  mesh, tx, schedule, init_fn, rng, abstract, shardings, ckpt = _setup(config, workdir, cfg)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch % n_batch_shards:
    raise ValueError(f"config.batch={config.batch} must be divisible by data*fsdp={n_batch_shards} "
                     f"(mesh {dict(mesh.shape)})")
  if config.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.seq_len={config.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  _log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} device(s), {jax.process_count()} process(es)")
  state, start = jt.restore_or_init(ckpt, abstract,
                                    lambda: jt.init_train_state(init_fn, tx, rng, mesh, LLAMA_RULES)[0],
                                    allow_fresh_start=config.get("allow_fresh_start", False))
  loss = lambda params, batch, rng=None: model.loss_fn(params, batch, cfg)  # noqa: E731 - no randomness
  step_fn = jt.jit_train_step(jt.make_train_step(loss, tx, schedule=schedule), shardings, jt.batch_sharding(mesh))
  batches = data.TokenBatcher(train_tokens, config.batch, config.seq_len, seed=config.seed)
  try:
    result = jt.train(step_fn, state, batches, num_steps=config.steps, workdir=workdir, start_step=start,
                      batch_sharding=jt.batch_sharding(mesh), checkpointer=ckpt, log_every=config.log_every,
                      tokens_per_step=config.batch * config.seq_len)
  finally:
    ckpt.close()
  summary: dict[str, Any] = {"step": result.step, "preempted": result.preempted, "model_config": cfg,
                             "params": result.state.params, "samples": [], "eval_loss": None}
  records = jt.read_metrics(workdir)
  if records:
    summary["first_loss"], summary["last_loss"] = records[0]["loss"], records[-1]["loss"]
  if result.preempted:
    return summary

  if len(eval_tokens) >= config.seq_len + 2 and config.eval_batches > 0:
    eval_batches = data.TokenBatcher(eval_tokens, config.batch, config.seq_len, seed=config.seed + 1)
    eval_loss = jax.jit(lambda p, b: loss(p, b)[0], in_shardings=(shardings.params, jt.batch_sharding(mesh)))
    values = [float(eval_loss(result.state.params, jt.global_batch(eval_batches(i), jt.batch_sharding(mesh))))
              for i in range(config.eval_batches)]
    summary["eval_loss"] = float(np.mean(values))
    _log(f"eval: held-out loss {summary['eval_loss']:.4f} ({config.eval_batches} batches)")
  if config.sample_prompts and jax.process_count() == 1:
    summary["samples"] = _decode_samples(_single_device(result.state.params), cfg, tokenizer,
                                         list(config.sample_prompts), config)
    for s in summary["samples"]:
      _log("sample: " + "-" * 60 + "\n" + s)
  _log(f"done: step {result.step}; metrics in {os.path.join(workdir, 'metrics.jsonl')}, "
       f"plot in {os.path.join(workdir, 'loss.png')}")
  return summary


def _find_tokenizer(folder: str) -> str | None:
  for candidate in (os.path.join(folder, "tokenizer.model"), os.path.join(os.path.dirname(folder), "tokenizer.model")):
    if os.path.exists(candidate):
      return candidate
  return None


def load_for_sampling(config, workdir: str) -> tuple[llama_config.LlamaConfig, Any, data.TokenizerLike]:
  """`(LlamaConfig, params, tokenizer)` from `config.checkpoint_format`:
  "own" (this workdir's newest good checkpoint), "hf" or "meta" (`config.checkpoint_path`)."""
  fmt = config.checkpoint_format
  if fmt in ("hf", "meta"):
    from jaxml.llama import convert  # noqa: PLC0415
    path = config.checkpoint_path
    if not path:
      raise ValueError(f"checkpoint_format={fmt!r} needs config.checkpoint_path (a folder)")
    cfg, params = (convert.from_hf if fmt == "hf" else convert.from_meta)(path)
    tok_path = _find_tokenizer(os.path.abspath(path))
    if tok_path is None:
      raise ValueError(f"no tokenizer.model in {path!r} or its parent folder")
    return cfg, params, _load_sentencepiece(tok_path)
  if fmt != "own":
    raise ValueError(f"checkpoint_format must be 'own', 'hf' or 'meta', got {fmt!r}")
  if not workdir:
    raise ValueError("checkpoint_format='own' samples from a workdir: pass --workdir")
  workdir = os.path.abspath(workdir)
  cfg_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise ValueError(f"{workdir!r} has no {MODEL_CONFIG_FILE}: train there first (--mode=train)")
  with open(cfg_path) as f:
    cfg = llama_config.LlamaConfig(**json.load(f))
  tokenizer = _workdir_tokenizer(config, workdir)
  *_, abstract, _, ckpt = _setup(config, workdir, cfg)
  try:
    state, step = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  if state is None:
    raise ValueError(f"no usable checkpoint in {os.path.join(workdir, 'checkpoints')!r}")
  _log(f"loaded step {step} from {workdir}")
  return cfg, state.params, tokenizer


def generate_from_checkpoint(config, workdir: str, prompt: str | None = None) -> list[str]:
  """Samples a continuation of `prompt` (default: `config.sample_prompts`) and prints it."""
  cfg, params, tokenizer = load_for_sampling(config, workdir)
  prompts = [prompt] if prompt else list(config.sample_prompts)
  outs = _decode_samples(_single_device(params), cfg, tokenizer, prompts, config)
  for s in outs:
    _log(s)
  return outs


def run(config, workdir: str | None) -> dict[str, Any]:
  """The experiment contract: `config.mode` "train" (default) or "generate".

  Returns:
    The summary of `train_and_evaluate` (with `preempted`), or
    `{"samples": [...]}` for generate.
  """
  mode = config.get("mode", "train")
  if mode == "train":
    if not workdir:
      raise ValueError("training needs a workdir")
    return train_and_evaluate(config, workdir)
  if mode == "generate":
    return {"samples": generate_from_checkpoint(config, workdir, config.get("prompt") or None)}
  raise ValueError(f"config.mode must be 'train' or 'generate', got {mode!r}")
