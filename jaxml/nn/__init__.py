"""Shared layers: initialisers, norms, rotary and sinusoidal embeddings, attention, dense layers and MLPs,
cross-entropy."""
from jaxml.nn.init import ParamSpec, fan_in_normal, init_from_specs, normal_init
from jaxml.nn.layers import (KVCache, apply_rope, apply_rope_tables, attention_core, cached_attention, causal_mask,
                             cross_attention, cross_entropy, dot_product_attention, first_argmax, group_norm, keys_layout,
                             layer_norm, linear, rms_norm, rope_frequencies, rope_tables, sinusoidal_embedding,
                             split_cached_attention, swiglu, swiglu_hidden_dim, unstack, values_layout,
                             write_cache)
from jaxml.nn.flash import attention as flash_attention, blockwise_attention, fused_attention, pallas_attention
from jaxml.nn.losses import chunked_cross_entropy, chunked_token_nll
from jaxml.nn.mlp import dense, dense_init, dense_spec, mlp, mlp_init, mlp_specs
