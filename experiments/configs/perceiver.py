"""Perceiver / Perceiver IO studies (see `jaxml.perceiver.experiment`).

    python -m experiments.perceiver --workdir=workdirs/perceiver
    python -m experiments.perceiver --workdir=workdirs/perceiver_small --config=experiments/configs/perceiver.py:small

Every field of `jaxml.perceiver.experiment.PerceiverExperimentConfig` is listed (so that each can be set with
--config.<field>=...); the default variant equals the dataclass's defaults (a test keeps them equal).
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "all"  # "all", or one study: "digits", "permutation", "byte_lm", "multitask" (also --mode=...)
  c.seed = 0  # data split, permutation, init and batches
  c.eval_every = 50  # steps per compiled call; the held-out set is scored after each (the test curves)
  c.checkpoint_every = 500  # steps between checkpoints (a multiple of eval_every)
  c.weight_decay = 1e-4  # AdamW decoupled weight decay (matrices only); warm-up + cosine, clipping at norm 1
  c.warmup_steps = 50  # linear warm-up steps of every training
  c.digits_test = 360  # held-out digits (of 1797); the rest train
  c.digits_steps = 1500  # training steps of each digits model (all digits models train the same way)
  c.digits_batch = 64  # digits batch size (random training rows drawn from the step's key)
  c.digits_lr = 1e-3  # peak learning rate, digits models
  c.num_bands = 4  # Fourier bands per axis of the 8x8 grid (up to Nyquist, max resolution 8): 18 features
  c.num_latents = 32  # digits Perceiver latents
  c.d_latents = 64  # digits Perceiver latent width
  c.num_blocks = 2  # passes through the shared latent block
  c.self_attends = 2  # self-attention layers per block (weights shared across blocks)
  c.latent_heads = 4  # self-attention heads (also the ViT's heads)
  c.mlp_hidden = (288, 288)  # MLP baseline hidden widths
  c.vit_width = 64  # ViT-style baseline width
  c.vit_layers = 3  # ViT-style baseline layers
  c.vit_patch = 2  # ViT patch side (2x2 patches: 16 tokens + a class token)
  c.conv_channels = (64, 128)  # conv baseline channels (3x3 convolutions, global average pool)
  c.recon_weight = 1.0  # multitask: weight of the per-pixel MSE next to the label cross-entropy
  c.lm_seq_len = 128  # byte window length M (also the Perceiver's learned positions and decoder queries)
  c.lm_batch = 16  # byte windows per step
  c.lm_steps = 3000  # training steps of each byte LM
  c.lm_lr = 1e-3  # peak learning rate, byte LMs
  c.lm_mask_rate = 0.15  # fraction of bytes replaced by MASK (and scored)
  c.lm_corpus_bytes = 1_000_000  # stdlib source bytes read (sorted files, tests skipped)
  c.lm_eval_fraction = 0.05  # the corpus's tail held out
  c.lm_eval_windows = 64  # held-out windows scored (fixed windows and masks)
  c.lm_d_model = 64  # Perceiver IO byte embedding width (inputs and decoder queries)
  c.lm_num_latents = 64  # Perceiver IO latents (with 32 the loss left the unigram plateau far later: 2.95 vs 2.52 nats at step 2000, normal init)
  c.lm_d_latents = 128  # Perceiver IO latent width
  c.lm_self_attends = 4  # Perceiver IO latent self-attention layers
  c.lm_heads = 4  # heads of the latent self-attention, the decoder and the byte transformer
  c.lm_tf_width = 128  # byte transformer width
  c.lm_tf_layers = 4  # byte transformer layers
  # Perceiver IO byte LM init (the model is transformers'): "sinusoid" starts the input positions and decoder queries
  # at 0.02 * sinusoids of the position (neighbours alike), "normal" at independent N(0, 0.02^2) rows (transformers')
  c.lm_position_init = "sinusoid"
  c.lm_query_gain = 2.0  # Perceiver IO: cross-attention query weights (encoder, decoder) start at this x the fan-in init
  if variant == "small":  # all four studies: 5.5 min of CPU time; 17.7 min wall on 2 cores shared with other jobs (load 10-15)
    c.digits_steps = 600
    c.checkpoint_every = 600
    c.lm_steps = 1200
    c.lm_corpus_bytes = 400_000
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; expected '' or 'small'")
  return c
