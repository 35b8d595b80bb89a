"""Exports scikit-learn's 8x8 digits to `digits.npz` beside this file (run once).

    python jaxml/diffusion/data/export_digits.py      # needs scikit-learn (e.g. the peer venv)

Writes `images` (uint8 [1797, 8, 8], grey levels 0..16) and `labels` (uint8 [1797]).
The images are the UCI optical-digits set that ships inside scikit-learn
(`sklearn.datasets.load_digits`); only numpy and scikit-learn are imported here.
"""
import os

import numpy as np


def main():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  images = np.asarray(digits.images, np.float64)
  if images.shape[1:] != (8, 8) or images.min() < 0 or images.max() > 16:
    raise ValueError(f"unexpected digits array: shape {images.shape}, range [{images.min()}, {images.max()}]")
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
  np.savez_compressed(out, images=images.astype(np.uint8), labels=np.asarray(digits.target, np.uint8))
  print(f"wrote {out}: {images.shape[0]} images")


if __name__ == "__main__":
  main()
