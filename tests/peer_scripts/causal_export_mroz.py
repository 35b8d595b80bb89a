"""Writes linearmodels' copy of the Mroz (1987) data to a CSV (run once, in the peer env).

    .venv-peer/bin/python tests/peer_scripts/causal_export_mroz.py jaxml/causal/data/mroz.csv

It can also run through tests/peer.py (`peer.run("causal_export_mroz", path=...)`).
The columns and rows are those of `linearmodels.datasets.mroz.load()`; missing
wages (women not in the labour force) are written as empty fields.
"""
import sys


def run(inputs, workdir, path):
  del inputs, workdir
  from linearmodels.datasets import mroz
  frame = mroz.load()
  frame.to_csv(path, index=False)
  return {"rows": int(frame.shape[0]), "columns": list(map(str, frame.columns))}


if __name__ == "__main__":
  print(run({}, "", sys.argv[1]))
