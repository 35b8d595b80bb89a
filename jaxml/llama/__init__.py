"""Llama 2 decoder: config, model, generation, tokenizer, checkpoint conversion, training."""
from jaxml.llama.config import LLAMA_RULES, PRESETS, LlamaConfig, flops_per_token, param_count, preset
from jaxml.llama.model import (KVCache, apply, check_params, check_tokens, cross_entropy, decoder, embed, head, init,
                               init_cache, loss_fn, param_shapes, sequence_logprobs, stack_layers, unstack_layers,
                               apply_split_cache, join_projections, split_output_columns)
from jaxml.llama.generate import (NonFiniteLogitsError, check_sampling, decode_loop, generate, generate_arrays,
                                  greedy_token, penalize_repeats, sample_logits)
from jaxml.llama.convert import from_hf, from_meta, to_hf
from jaxml.llama.tokenizer import Tokenizer, chat_tokens, train_tokenizer
