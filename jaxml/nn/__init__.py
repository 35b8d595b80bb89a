"""Shared layers: norms, rotary embeddings, attention, MLPs."""
from jaxml.nn.layers import (KVCache, apply_rope, apply_rope_tables, cached_attention, split_cached_attention, rope_tables, causal_mask, cross_attention, dot_product_attention, first_argmax, layer_norm,
                             linear, normal_init, rms_norm, rope_frequencies, swiglu, swiglu_hidden_dim, keys_layout, values_layout, write_cache)
