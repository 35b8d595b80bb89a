"""Perceiver and Perceiver IO: latent-bottleneck encoders, query decoders, transformers weight import."""
from jaxml.perceiver.config import (BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE, CLS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID,
                                    DecoderConfig, PerceiverConfig)
from jaxml.perceiver.positions import fourier_channels, fourier_features, linear_positions
from jaxml.perceiver.model import (apply, check_byte_ids, check_params, check_positions, cross_attend, decode,
                                   decoder_queries, embed_bytes, embedding_logits, encode, gather_scored,
                                   ids_to_text, init, latent_transformer, loss_fn, param_count, param_shapes,
                                   param_specs, pixel_features, preprocess, text_to_ids)
from jaxml.perceiver.convert import config_from_hf, config_to_hf, from_hf, to_hf
