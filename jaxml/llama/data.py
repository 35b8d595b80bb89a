"""Text corpus -> deterministic `[B, T+1]` int32 token batches.

The default corpus is the Python standard library's own source, which every
Python install carries: a bounded, sorted (hence deterministic) subset of the
`.py` files under `sysconfig.get_paths()["stdlib"]`. Any text file, or a
folder of text files, can be used instead.

Batches are a pure function of `(seed, step)`: each row is a window of
`T + 1` consecutive tokens starting at an offset drawn from
`numpy.random.default_rng([seed, step])`. A resumed run therefore sees
exactly the batches an uninterrupted run would, and every host of a
multi-host run builds the same global batch.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Iterable, Protocol, Sequence

import numpy as np

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".yaml", ".yml", ".html")
# Parts of the stdlib tree that are not representative source text (tests,
# vendored packages, generated tables).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "encodings",
              "pydoc_data", "lib2to3", "turtledemo", "config-3", "ensurepip"}


class TokenizerLike(Protocol):
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def stdlib_dir() -> str:
  """The folder of this interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def corpus_files(path: str | None = None, *, max_bytes: int | None = 2_000_000, max_file_bytes: int = 200_000,
                 suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[str]:
  """The files of a corpus, in a deterministic order.

  path: a text file (returned alone), a folder (its text files, recursively,
        sorted by relative path), or None for the standard library (`.py` only,
        tests and vendored packages skipped).
  max_bytes: stop adding files once this many bytes are collected (None: all).
  max_file_bytes: skip single files larger than this in folders.
  """
  if path is not None and os.path.isfile(path):
    return [path]
  root = stdlib_dir() if path is None else path
  if not os.path.isdir(root):
    raise ValueError(f"corpus path {path!r} is neither a file nor a folder")
  suffixes = (".py",) if path is None else tuple(suffixes)
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not (path is None and (d in _SKIP_DIRS or d.startswith("config-"))))
    for name in filenames:
      if name.endswith(suffixes):
        full = os.path.join(dirpath, name)
        found.append((os.path.relpath(full, root), full))
  files, total = [], 0
  for _, full in sorted(found):
    size = os.path.getsize(full)
    if size == 0 or size > max_file_bytes:
      continue
    files.append(full)
    total += size
    if max_bytes is not None and total >= max_bytes:
      break
  if not files:
    raise ValueError(f"no text files found under {root!r} (suffixes {suffixes})")
  return files


def read_texts(files: Iterable[str]) -> list[str]:
  """File contents as str (UTF-8; undecodable bytes replaced)."""
  texts = []
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      texts.append(fh.read())
  return texts


class ByteTokenizer:
  """Byte-level fallback tokenizer: id = byte + 3; 0 pad, 1 BOS, 2 EOS (vocab 259)."""

  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    ids = [b + 3 for b in text.encode("utf-8")]
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def tokenize(texts: Iterable[str], tokenizer: TokenizerLike) -> np.ndarray:
  """Concatenates the documents' tokens, each starting with BOS. Returns int32 `[N]`."""
  parts = [np.asarray(tokenizer.encode(t, bos=True, eos=False), np.int32) for t in texts]
  if not parts:
    raise ValueError("no documents to tokenize")
  return np.concatenate(parts)


def split_tokens(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """The first `1 - eval_fraction` of the stream for training, the tail for evaluation."""
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  cut = int(round(len(tokens) * (1.0 - eval_fraction)))
  return tokens[:cut], tokens[cut:]


class TokenBatcher:
  """`batcher(step) -> {"tokens": int32 [batch_size, seq_len + 1]}`, a pure function of (seed, step)."""

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise TypeError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if batch_size <= 0 or seq_len <= 0:
      raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if len(tokens) < seq_len + 2:
      raise ValueError(f"corpus has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    self.tokens = tokens.astype(np.int32)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
    idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    return {"tokens": self.tokens[idx]}
