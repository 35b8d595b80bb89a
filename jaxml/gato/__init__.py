"""Gato: one tokenized transformer policy for control, images and text (Reed et al. 2022, arXiv 2205.06175).

`tokens`: `TokenLayout` (explicit, collision-free id ranges; `TokenLayout()` is the paper's),
mu-law companding, continuous/discrete tokenizers, image patches.
`sequence`: task specs (`TaskSpec`, `Field`), timesteps/episodes/text/captions as `Tokens` records,
training sequences with prompts.
`model`: `GatoConfig` (tiny to the paper's 79M/364M/1.18B), the embeddings (shared table, local
positions, a ResNet-v2 patch block with row/column bins) fed to `jaxml.llama.model.decoder`, `loss_fn`.
`policy`: `act` (KV-cached action sampling over valid ids) and `evaluate` (whole episodes of a batch of
gymnax environments in one `lax.while_loop`).
`experts`: PPO on `jaxml.rl` and `jaxml.train`, scripted experts, demonstration filtering, scores.
"""
from jaxml.gato import tokens  # noqa: F401
from jaxml.gato.tokens import (NUM_BINS, TokenLayout, detokenize_continuous, image_patches, mu_law_decode,  # noqa: F401
                               mu_law_encode, tokenize_continuous, tokenize_discrete)
