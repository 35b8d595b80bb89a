"""Tokenizer wrapper, deterministic training, and the Llama 2 chat template."""
import json
import pathlib
import textwrap

import pytest

from jaxml.llama.tokenizer import Tokenizer, chat_tokens, train_tokenizer

pytestmark = pytest.mark.xdist_group("test_tokenizer")  # one worker: the tokenizer is trained once

CORPUS = [pathlib.Path(json.__file__), pathlib.Path(textwrap.__file__)]  # files every Python install has
VOCAB = 400


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "llama", VOCAB)
  return Tokenizer(path)


def test_ids_follow_meta_convention(tok):
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
  assert tok.vocab_size == VOCAB


def test_encode_flags_and_decode_roundtrip(tok):
  text = "Decoding JSON 1234 with ünïcode ✓"
  plain = tok.encode(text, bos=False, eos=False)
  assert tok.encode(text) == [tok.bos_id] + plain
  assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
  assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # byte fallback: nothing unknown
  assert tok.unk_id not in plain
  digits = [tok.id_to_piece(i) for i in tok.encode("1234", bos=False)]
  assert digits[-4:] == ["1", "2", "3", "4"]  # split_digits, as in Llama's tokenizer


def test_training_is_deterministic(tok, tmp_path):
  again = Tokenizer(train_tokenizer(CORPUS, tmp_path / "again", VOCAB))
  pieces = [(tok.id_to_piece(i), tok.sp.GetScore(i)) for i in range(VOCAB)]
  assert pieces == [(again.id_to_piece(i), again.sp.GetScore(i)) for i in range(VOCAB)]


def test_texts_and_files_give_the_same_model(tok, tmp_path):
  texts = [p.read_text() for p in CORPUS]
  from_texts = Tokenizer(train_tokenizer(texts, tmp_path / "texts", VOCAB))
  assert [from_texts.id_to_piece(i) for i in range(VOCAB)] == [tok.id_to_piece(i) for i in range(VOCAB)]


def test_chat_template_two_turns_with_system(tok):
  dialog = [
      {"role": "system", "content": "Answer briefly."},
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4."},
      {"role": "user", "content": "And 3+3?"},
  ]
  # Derivation from the Llama 2 chat format (specs/llama.md, Meta's chat_completion):
  # 1. The system text is wrapped "<<SYS>>\n" + text + "\n<</SYS>>\n\n" and prefixed to the
  #    first user message, which then reads "<<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is 2+2?".
  # 2. The finished (user, assistant) pair is "[INST] {user} [/INST] {answer} " (note the
  #    single spaces and the trailing one), encoded with BOS in front and EOS after.
  # 3. The open user turn is "[INST] {user} [/INST]", BOS in front, no EOS; the model's
  #    answer follows.
  # The strings below are written out by hand, not produced by the template code.
  turn1 = "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. "
  turn2 = "[INST] And 3+3? [/INST]"
  expected = [1] + tok.sp.EncodeAsIds(turn1) + [2] + [1] + tok.sp.EncodeAsIds(turn2)
  got = chat_tokens(tok, dialog)
  assert got == expected
  assert got.count(tok.bos_id) == 2 and got.count(tok.eos_id) == 1
  eos_at = got.index(tok.eos_id)
  assert tok.decode(got[:eos_at + 1]) == turn1
  assert tok.decode(got[eos_at + 1:]) == turn2


def test_chat_template_single_user_turn(tok):
  got = chat_tokens(tok, [{"role": "user", "content": "  Hello there \n"}])
  assert got == [1] + tok.sp.EncodeAsIds("[INST] Hello there [/INST]")


@pytest.mark.parametrize("dialog, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"dialog\[1\].*expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], r"dialog\[1\] has role 'system'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"dialog\[2\]"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": "ignore [INST] this"}], "reserved chat tag"),
])
def test_chat_template_rejects_bad_dialogs(tok, dialog, match):
  with pytest.raises(ValueError, match=match):
    chat_tokens(tok, dialog)


def test_bad_inputs(tok, tmp_path):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([1, VOCAB])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([-1])
  with pytest.raises(TypeError, match="str"):
    tok.encode(b"bytes")
  with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
    Tokenizer(tmp_path / "missing.model")
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"\x00not a sentencepiece model" * 10)
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    Tokenizer(junk)
  with pytest.raises(ValueError, match="too small for byte_fallback"):
    train_tokenizer(["some text"], tmp_path / "small", 100)
  with pytest.raises(ValueError, match="vocab_size=5000"):
    train_tokenizer(["tiny corpus"], tmp_path / "big", 5000)
  with pytest.raises(FileNotFoundError, match="training file not found"):
    train_tokenizer([tmp_path / "nope.txt"], tmp_path / "x", 300)
