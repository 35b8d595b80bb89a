"""Runs reference ("peer") packages in their own virtual environment.

Parity tests compare jaxml with the packages researchers already trust
(transformers, linearmodels, dowhy, causalicp, scikit-learn, ...). Those live in
`.venv-peer` (created by `make test`, see requirements/peer.txt) so the core
install never pulls torch. A test calls

    out = peer.run("hf_llama", {"tokens": tokens}, n_layers=2)

which executes `tests/peer_scripts/hf_llama.py` with the peer interpreter: its
`run(inputs: dict[str, np.ndarray], workdir: str, **kwargs) -> dict` gets the
arrays and keyword arguments (JSON-serialisable) and returns a dict of arrays
or JSON-serialisable values. Peer scripts never import jaxml.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = pathlib.Path(__file__).resolve().parent / "peer_scripts"


def python() -> str:
  """The peer interpreter: $JAXML_PEER_PYTHON or .venv-peer/bin/python."""
  exe = os.environ.get("JAXML_PEER_PYTHON", str(ROOT / ".venv-peer" / "bin" / "python"))
  if not pathlib.Path(exe).exists():
    raise RuntimeError(f"peer environment not found ({exe}); create it with `make peer` (part of `make test`)")
  return exe


def run(script: str, inputs: dict[str, np.ndarray] | None = None, *, workdir: str | None = None,
        timeout: float = 900, **kwargs) -> dict:
  """Runs `peer_scripts/<script>.py:run(inputs, workdir, **kwargs)` in the peer env."""
  own_tmp = workdir is None
  tmp = tempfile.mkdtemp(prefix=f"peer_{script}_") if own_tmp else workdir
  tmp_p = pathlib.Path(tmp)
  tmp_p.mkdir(parents=True, exist_ok=True)
  np.savez(tmp_p / "_in.npz", **{k: np.asarray(v) for k, v in (inputs or {}).items()})
  (tmp_p / "_args.json").write_text(json.dumps(kwargs))
  cmd = [python(), str(SCRIPTS / "_runner.py"), script, str(tmp_p)]
  env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  if proc.returncode:
    raise RuntimeError(f"peer script {script} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  out = dict(np.load(tmp_p / "_out.npz", allow_pickle=False))
  meta = json.loads((tmp_p / "_out.json").read_text())
  out.update(meta)
  return out
