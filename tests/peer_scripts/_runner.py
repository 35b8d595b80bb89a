"""Entry point executed by the peer interpreter (see tests/peer.py)."""
import importlib.util
import json
import pathlib
import sys

import numpy as np


def main():
  script, workdir = sys.argv[1], pathlib.Path(sys.argv[2])
  spec = importlib.util.spec_from_file_location(script, pathlib.Path(__file__).parent / f"{script}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  inputs = dict(np.load(workdir / "_in.npz", allow_pickle=False))
  kwargs = json.loads((workdir / "_args.json").read_text())
  result = module.run(inputs, str(workdir), **kwargs)
  arrays = {k: np.asarray(v) for k, v in result.items() if isinstance(v, np.ndarray)}
  meta = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
  np.savez(workdir / "_out.npz", **arrays)
  (workdir / "_out.json").write_text(json.dumps(meta))


if __name__ == "__main__":
  sys.exit(main())
