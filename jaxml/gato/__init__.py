"""Gato: one tokenized transformer policy for control, images and text (first layer: tokenization).

`tokens`: `TokenLayout` (explicit, collision-free id ranges; `TokenLayout()` is the paper's),
mu-law companding, continuous/discrete tokenizers, image patches.
"""
from jaxml.gato import tokens  # noqa: F401
from jaxml.gato.tokens import (NUM_BINS, TokenLayout, detokenize_continuous, image_patches, mu_law_decode,  # noqa: F401
                               mu_law_encode, tokenize_continuous, tokenize_discrete)
