"""Streaming reader for Criteo-format TSV files.

A line is `label \\t I1..I13 \\t C1..C26`: a 0/1 label, 13 integer counts and 26
categorical values written as hex strings; any feature field may be empty
(missing). `read(path, ...)` streams batches in file order:

    reader = criteo.read("day_0.tsv", batch_size=4096)
    for batch in reader:      # dense [B, 13] f32, dense_missing [B, 13] bool,
      ...                     # cat [B, 26] int32 (-1 = missing), label [B] f32
    reader.n_malformed, reader.errors   # count and (path, line, reason) of bad lines

Integer features become `sign(x) log(1 + |x|)` (0 when missing); hex categories
become their value's low 31 bits (hashed later by `features.hash_ids`).
Malformed lines (wrong column count, non-numeric integers, labels outside
{0, 1}, bad hex) are logged as `path:line: reason`, counted and skipped, or
raise with `on_error="raise"`.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
from typing import Iterator, Sequence

import numpy as np

N_INT, N_CAT = 13, 26
log = logging.getLogger(__name__)


class MalformedLineError(ValueError):
  pass


class CriteoReader:
  """Iterable over batches of one or more Criteo-format files (see module docstring)."""

  def __init__(self, paths: Sequence[str], batch_size: int, drop_remainder: bool, on_error: str,
               max_logged: int, n_int: int, n_cat: int):
    self.paths, self.batch_size, self.drop_remainder = list(paths), batch_size, drop_remainder
    self.on_error, self.max_logged, self.n_int, self.n_cat = on_error, max_logged, n_int, n_cat
    self.n_lines = 0
    self.n_malformed = 0
    self.errors: list[tuple[str, int, str]] = []

  def _bad(self, path: str, lineno: int, reason: str) -> None:
    self.n_malformed += 1
    msg = f"{path}:{lineno}: malformed Criteo line: {reason}"
    if self.on_error == "raise":
      raise MalformedLineError(msg)
    if len(self.errors) < self.max_logged:
      self.errors.append((path, lineno, reason))
      log.warning(msg)

  def _parse(self, line: str) -> tuple[float, list[float], list[bool], list[int]] | str:
    cols = line.rstrip("\r\n").split("\t")
    want = 1 + self.n_int + self.n_cat
    if len(cols) != want:
      return f"expected {want} tab-separated columns, got {len(cols)}"
    if cols[0] not in ("0", "1"):
      return f"label must be 0 or 1, got {cols[0]!r}"
    dense, missing = [], []
    for j, s in enumerate(cols[1:1 + self.n_int]):
      if s == "":
        dense.append(0.0)
        missing.append(True)
        continue
      try:
        x = int(s)
      except ValueError:
        return f"integer feature I{j + 1} is not an integer: {s!r}"
      dense.append(math.copysign(math.log1p(abs(x)), x))
      missing.append(False)
    cat = []
    for j, s in enumerate(cols[1 + self.n_int:]):
      if s == "":
        cat.append(-1)
        continue
      try:
        cat.append(int(s, 16) & 0x7FFFFFFF)
      except ValueError:
        return f"categorical feature C{j + 1} is not hexadecimal: {s!r}"
    return float(cols[0]), dense, missing, cat

  def _empty(self):
    return [], [], [], []

  def _emit(self, buf):
    labels, dense, missing, cat = buf
    return {"label": np.asarray(labels, np.float32),
            "dense": np.asarray(dense, np.float32).reshape(-1, self.n_int),
            "dense_missing": np.asarray(missing, bool).reshape(-1, self.n_int),
            "cat": np.asarray(cat, np.int32).reshape(-1, self.n_cat)}

  def __iter__(self) -> Iterator[dict]:
    buf = self._empty()
    for path in self.paths:
      opener = gzip.open if str(path).endswith(".gz") else open
      with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
          if not line.strip():
            self._bad(path, lineno, "empty line")
            continue
          self.n_lines += 1
          parsed = self._parse(line)
          if isinstance(parsed, str):
            self._bad(path, lineno, parsed)
            continue
          for part, value in zip(buf, parsed):
            if isinstance(value, list):
              part.extend(value)
            else:
              part.append(value)
          if len(buf[0]) == self.batch_size:
            yield self._emit(buf)
            buf = self._empty()
    if buf[0] and not self.drop_remainder:
      yield self._emit(buf)


def read(path: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int = 4096, *, drop_remainder: bool = False,
         on_error: str = "skip", max_logged: int = 100, n_int: int = N_INT, n_cat: int = N_CAT) -> CriteoReader:
  """Streams batches from Criteo-format file(s) (`.gz` read transparently).

  on_error: "skip" (log `path:line: reason`, count in `n_malformed`, keep
  going) or "raise" (`MalformedLineError` at the first bad line).
  """
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if not paths:
    raise ValueError("path: no file given")
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"path: {p} does not exist")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if on_error not in ("skip", "raise"):
    raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
  return CriteoReader([os.fspath(p) for p in paths], batch_size, drop_remainder, on_error, max_logged, n_int, n_cat)


def feature_config_kwargs(buckets: int | Sequence[int] = 100_000) -> dict:
  """FeatureConfig keywords for Criteo (13 dense, 26 hashed fields of `buckets` rows each)."""
  sizes = (buckets,) * N_CAT if isinstance(buckets, int) else tuple(buckets)
  return {"n_dense": N_INT, "vocab_sizes": sizes}
