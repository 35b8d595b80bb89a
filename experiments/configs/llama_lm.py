"""Config for `experiments/llama_lm.py`: a small Llama 2 trained on text.

Variants (`--config=experiments/configs/llama_lm.py:<variant>`):
  default  CPU demo: ~1M params (4 layers, dim 128, GQA 4/2 heads, 1024-piece
           SentencePiece vocab) on ~2 MB of the Python standard library source,
           400 steps of 16 x 128 tokens; a few minutes on 2 cores.
  small    seconds; for tests and smoke runs.
  7b       Llama 2 7B shapes for a TPU v5e-64 slice (FSDP over all chips).
  13b      Llama 2 13B shapes for a TPU v5e-128 slice.
  70b      Llama 2 70B shapes for a TPU v5e-512 slice.
  Each large recipe names its slice (`target_slice`) and the per-device memory XLA reports for its train
  step (`expected_device_gib`: arguments + temporaries, compiled for virtual CPU devices by
  `python -m benchmarks.llama_memory --preset=<variant>`; see BUILD_NOTES.md). A v5e chip has 16 GiB of HBM.

Run:
  python -m experiments.llama_lm --workdir=/tmp/llama_lm
  python -m experiments.llama_lm --workdir=/tmp/llama_lm --mode=generate --config.prompt="def main("
  python -m experiments.llama_lm --workdir=/tmp/l7b --config=experiments/configs/llama_lm.py:7b \
      --config.corpus=/data/text
Any field can be overridden on the command line, e.g. `--config.steps=100`.
"""
import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = variant or "default"
  c = ml_collections.ConfigDict()
  c.mode = "train"                   # "train" (resumes if workdir has checkpoints) or "generate" (sample)
  c.prompt = ""                      # --mode=generate: the prompt ("" = sample_prompts)
  c.allow_fresh_start = False        # start over when the workdir's checkpoints exist but none restores
  # --- data
  c.corpus = ""                      # a text file or a folder of text files; "" = the Python stdlib source
  c.corpus_max_bytes = 2_000_000     # read files (sorted) until this many bytes; bounds tokenizing time
  c.eval_fraction = 0.02             # tail of the token stream held out for the final eval loss
  c.tokenizer = "sentencepiece"      # "sentencepiece" (trained on the corpus, saved in workdir) or "byte"
  c.vocab_size = 1024                # SentencePiece vocabulary size (the model's vocab follows the tokenizer)
  # --- model
  c.preset = "small"                 # a jaxml.llama.PRESETS name: tiny, small, 7b, 13b, 70b
  c.model_overrides = ml_collections.ConfigDict({  # LlamaConfig fields replacing the preset's
      "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2})
  c.seq_len = 128                    # training context T (batches are [batch, T+1] tokens)
  # --- optimisation
  c.batch = 16                       # global batch size (sequences per step), split over data*fsdp
  c.steps = 400                      # total optimizer steps
  c.lr = 3e-3                        # peak learning rate (AdamW)
  c.warmup = 30                      # linear warmup steps from 0 to lr
  c.final_lr_ratio = 0.1             # cosine decays to lr * final_lr_ratio at `steps`
  c.b1 = 0.9                         # Adam first-moment decay
  c.b2 = 0.95                        # Adam second-moment decay
  c.weight_decay = 0.1               # decoupled weight decay on matrices (not norms)
  c.clip_norm = 1.0                  # global gradient-norm clip; 0 disables
  c.seed = 0                         # init and data order; same seed + step = same batch
  # --- parallelism
  c.mesh = (-1, 1, 1)                # (data, fsdp, tensor) mesh sizes; -1 = all remaining devices
  c.target_slice = "cpu"             # what the recipe is sized for (documentation; nothing reads it to run)
  c.expected_device_gib = 0.0        # per-device arguments + temporaries XLA reports (0: not measured)
  # --- checkpoints and logging
  c.checkpoint_every = 100           # save every this many steps (and at the end / on SIGTERM)
  c.keep = 3                         # this run's newest checkpoints kept (earlier runs' are never deleted)
  c.async_checkpoint = True          # write checkpoints in a background thread
  c.log_every = 20                   # progress line + metrics.jsonl/TensorBoard record every this many steps
  c.eval_batches = 4                 # held-out batches for the final eval loss (0 skips)
  # --- sampling (end of training, and --mode=generate)
  c.sample_prompts = ("import os\n", "def __init__(self", "class Test")  # continuations printed after training
  c.sample_new_tokens = 48           # new tokens per sample
  c.sample_temperature = 0.0         # 0 = greedy; > 0 samples
  c.sample_top_k = 0                 # 0 = off
  c.sample_top_p = 0.0               # 0 = off (e.g. 0.9 with temperature 0.6, Meta's default)
  c.checkpoint_format = "own"        # --mode=generate source: "own" (workdir), "hf" or "meta" (checkpoint_path)
  c.checkpoint_path = ""             # HF folder (config.json + safetensors) or Meta folder (params.json + .pth)

  if variant == "default":
    pass
  elif variant == "small":
    c.corpus_max_bytes = 150_000
    c.vocab_size = 512                # must cover every distinct character (byte fallback + coverage 1.0)
    c.preset = "tiny"
    c.model_overrides = ml_collections.ConfigDict({"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1})
    c.seq_len = 32
    c.batch = 8                       # divisible by up to 8 devices (the test suite's virtual CPUs)
    c.steps = 20
    c.lr = 1e-2
    c.warmup = 2
    c.checkpoint_every = 10
    c.keep = 2
    c.log_every = 5
    c.eval_batches = 1
    c.sample_prompts = ("def ",)
    c.sample_new_tokens = 8
  elif variant in ("7b", "13b", "70b"):
    c.corpus_max_bytes = 0            # 0: no limit (set c.corpus to a large text folder)
    c.vocab_size = 32000
    c.preset = variant                # bfloat16 compute, remat, backend attention kernel, chunked logits
    c.model_overrides = ml_collections.ConfigDict({"max_seq_len": 4096})
    c.seq_len = 2048
    c.steps = 10_000
    c.warmup = 2000
    c.weight_decay = 0.1
    c.mesh = (1, -1, 1)               # FSDP over every chip
    c.checkpoint_every = 500
    c.keep = 3
    c.log_every = 10
    c.eval_batches = 8
    c.sample_new_tokens = 128
    if variant == "7b":
      c.batch = 256                   # 4 x 2048 tokens per chip on 64 chips (0.5M tokens per step)
      c.lr = 3e-4
      c.target_slice = "v5e-64"
      c.expected_device_gib = 10.0
    elif variant == "13b":
      c.batch = 512                   # 4 x 2048 tokens per chip on 128 chips (1M tokens per step)
      c.lr = 3e-4
      c.target_slice = "v5e-128"
      c.expected_device_gib = 13.5
    else:
      c.batch = 512                   # 1 x 2048 tokens per chip on 512 chips (1M tokens per step)
      c.lr = 1.5e-4
      c.target_slice = "v5e-512"
      c.expected_device_gib = 13.4
  else:
    raise ValueError(f"unknown llama_lm config variant {variant!r}; use default, small, 7b, 13b or 70b")
  return c
