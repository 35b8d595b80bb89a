"""SentencePiece tokenizer for Llama 2, training a small one, and the Llama 2 chat template.

    tok = Tokenizer("tokenizer.model")        # Meta's file, or one from train_tokenizer
    ids = tok.encode("Hello", bos=True)       # [1, ...]
    tok.decode(ids)
    path = train_tokenizer(texts, "workdir/tok", vocab_size=512)
    prompt = chat_tokens(tok, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"}])

Ids follow Meta's tokenizer: unk 0, BOS 1, EOS 2, no pad piece (`pad_id` is
-1, as in Meta's code).
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm


class Tokenizer:
  """A SentencePiece model with Meta's `encode(text, bos, eos)` interface."""

  def __init__(self, model_path: str | os.PathLike):
    path = pathlib.Path(model_path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer model not found: {path}")
    self.model_path = str(path)
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(str(path))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path} is not a SentencePiece model ({e})") from e

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    """-1 for Meta's tokenizer (no pad piece); callers pick a filler id themselves."""
    return self.sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self.sp.unk_id()

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text`, with BOS prepended / EOS appended on request."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = list(self.sp.EncodeAsIds(text))
    if bos:
      ids = [self.bos_id] + ids
    if eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of a 1-D sequence of ids; control pieces (BOS/EOS) decode to nothing."""
    arr = np.asarray(ids)
    if arr.size == 0:
      return ""
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
      raise TypeError(f"ids must be a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= self.vocab_size:
      raise ValueError(f"ids outside the vocabulary [0, {self.vocab_size}): min {arr.min()}, max {arr.max()}")
    return self.sp.DecodeIds(arr.tolist())

  def id_to_piece(self, i: int) -> str:
    return self.sp.IdToPiece(int(i))


def _lines(texts_or_files: Iterable[str | os.PathLike]) -> Iterable[str]:
  for item in texts_or_files:
    if isinstance(item, os.PathLike):
      p = pathlib.Path(item)
      if not p.is_file():
        raise FileNotFoundError(f"training file not found: {p}")
      text = p.read_text(encoding="utf-8", errors="replace")
    elif isinstance(item, str):
      text = item
    else:
      raise TypeError(f"texts_or_files items must be str (text) or os.PathLike (file), got {type(item).__name__}")
    for line in text.splitlines():
      if line.strip():
        yield line


def train_tokenizer(texts_or_files: Iterable[str | os.PathLike], model_prefix: str | os.PathLike, vocab_size: int, *,
                    model_type: str = "bpe", byte_fallback: bool = True, max_sentence_length: int = 4192,
                    num_threads: int = 1, character_coverage: float = 1.0) -> str:
  """Trains a Llama-style SentencePiece model and returns the path of `<model_prefix>.model`.

  `texts_or_files`: strings are training text, `os.PathLike` items (e.g.
  `pathlib.Path`) are UTF-8 files; every non-blank line is one sentence.
  Settings follow Llama's tokenizer: BPE, byte fallback (no unknown
  characters; needs `vocab_size >= 259 + a few`), split digits, identity
  normalisation, whitespace kept, unk/BOS/EOS = 0/1/2, no pad piece.
  Deterministic: input is used in order (no sampling or shuffling) and one
  thread by default, so the same input gives the same model. Lines longer than
  `max_sentence_length` bytes are skipped by SentencePiece.
  """
  if vocab_size <= 3:
    raise ValueError(f"vocab_size must exceed the 3 control pieces, got {vocab_size}")
  if byte_fallback and vocab_size < 3 + 256 + 1:
    raise ValueError(f"vocab_size {vocab_size} too small for byte_fallback (256 byte pieces + 3 control pieces)")
  prefix = pathlib.Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  lines = list(_lines(texts_or_files))
  if not lines:
    raise ValueError("train_tokenizer: no non-empty lines of text to train on")
  try:
    with open(os.devnull, "w") as quiet:
      spm.SentencePieceTrainer.Train(
          sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
          byte_fallback=byte_fallback, split_digits=True, normalization_rule_name="identity",
          add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
          unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=character_coverage,
          input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads,
          max_sentence_length=max_sentence_length, logstream=quiet)
  except RuntimeError as e:
    raise ValueError(f"train_tokenizer(vocab_size={vocab_size}) failed: {e}") from e
  return str(prefix) + ".model"


# ----------------------------------------------------------------------------- Llama 2 chat

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def chat_tokens(tokenizer: Tokenizer, dialog: Sequence[dict]) -> list[int]:
  """Token ids of a Llama 2 chat prompt for `dialog`, ready for the model to answer.

  `dialog` is a list of `{"role", "content"}` messages: an optional leading
  "system" message, then "user" and "assistant" strictly alternating,
  starting and ending with "user". The format (Meta's Llama 2 chat):

  - the system text becomes `"<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n"`,
    prepended to the first user message;
  - every completed (user, assistant) pair is
    `BOS + encode("[INST] {user} [/INST] {assistant} ") + EOS`
    (user/assistant text stripped of surrounding whitespace);
  - the final user message is `BOS + encode("[INST] {user} [/INST]")`, no EOS.

  Raises ValueError for a bad role order, an empty dialog, a message without
  role/content, or content that contains the template's own tags.
  """
  if not isinstance(dialog, (list, tuple)) or not dialog:
    raise ValueError("dialog must be a non-empty list of {'role', 'content'} messages")
  for i, msg in enumerate(dialog):
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
      raise ValueError(f"dialog[{i}] must be a dict with 'role' and 'content'")
    if not isinstance(msg["content"], str):
      raise TypeError(f"dialog[{i}]['content'] must be a str")
    if any(tag in msg["content"] for tag in _SPECIAL_TAGS):
      raise ValueError(f"dialog[{i}] content contains a reserved chat tag {_SPECIAL_TAGS}")
  messages = list(dialog)
  if messages[0]["role"] == "system":
    if len(messages) < 2:
      raise ValueError("dialog has a system message but no user message")
    if messages[1]["role"] != "user":
      raise ValueError(f"dialog[1] must be 'user' after the system message, got {messages[1]['role']!r}")
    merged = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
    messages = [{"role": "user", "content": merged}] + messages[2:]
    offset = 1
  else:
    offset = 0
  for j, msg in enumerate(messages):
    want = "user" if j % 2 == 0 else "assistant"
    if msg["role"] != want:
      raise ValueError(f"dialog[{j + offset}] has role {msg['role']!r}, expected {want!r} (after an optional "
                       "system message, roles alternate user/assistant starting with user)")
  if messages[-1]["role"] != "user":
    raise ValueError("the last message of the dialog must be from 'user'")
  tokens: list[int] = []
  for user, answer in zip(messages[0::2], messages[1::2]):
    text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
    tokens += tokenizer.encode(text, bos=True, eos=True)
  tokens += tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
  return tokens
