"""What experiments write for a reader: JSON results, markdown tables, figures.

    report.save_json(results, os.path.join(workdir, "results.json"))
    table = report.markdown_table(["model", "AUC"], [["MLP", 0.845], ["DCN-v2", 0.847]], digits=4)
    with report.figure(os.path.join(workdir, "samples.png"), figsize=(6, 3)) as fig:
      fig.add_subplot(1, 2, 1).scatter(x[:, 0], x[:, 1], s=1)

Figures use matplotlib's Agg backend (no display needed) and are closed after
saving; only process 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np


def _is_main() -> bool:
  import jax
  return jax.process_index() == 0


def to_jsonable(value: Any) -> Any:
  """`value` with NumPy/JAX scalars and arrays as Python numbers and lists, tuples as lists,
  dataclasses as dicts, non-finite floats kept (JSON's NaN/Infinity)."""
  import dataclasses
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist") and hasattr(value, "dtype"):
    return to_jsonable(np.asarray(value).tolist())
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.bool_,)):
    return bool(value)
  return value


def save_json(obj: Any, path: str) -> str:
  """Writes `obj` (through `to_jsonable`) to `path` atomically. Returns the path."""
  if _is_main():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(to_jsonable(obj), f, indent=2)
    os.replace(tmp, path)
  return path


def load_json(path: str) -> Any:
  """The object stored by `save_json`."""
  with open(path) as f:
    return json.load(f)


def _cell(value: Any, digits: int) -> str:
  if value is None:
    return ""
  if isinstance(value, (float, np.floating)):
    return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"
  return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 3) -> str:
  """A GitHub markdown table.

  Args:
    header: column names.
    rows: one sequence per row, as long as `header`; floats are printed with
      `digits` decimals, None as an empty cell, strings as they are.
    digits: decimals for floats.

  Returns:
    The table as a string (header, separator, rows; a trailing newline).
  """
  for i, r in enumerate(rows):
    if len(r) != len(header):
      raise ValueError(f"row {i} has {len(r)} cells, the header {len(header)}")
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_cell(v, digits) for v in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def save_text(text: str, path: str) -> str:
  """Writes `text` to `path` (process 0). Returns the path."""
  if _is_main():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  return path


@contextlib.contextmanager
def figure(path: str, *, figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 100) -> Iterator[Any]:
  """A matplotlib Figure (Agg backend) saved to `path` and closed when the block ends.

  Args:
    path: the PNG to write.
    figsize: inches.
    dpi: resolution.

  Yields:
    The `matplotlib.figure.Figure`; add axes with `fig.add_subplot` or `fig.subplots`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = plt.figure(figsize=figsize)
  try:
    yield fig
    if _is_main():
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      fig.tight_layout()
      fig.savefig(path, dpi=dpi)
  finally:
    plt.close(fig)
