"""Score-based diffusion on 2D ring data and on the 8x8 digits.

    python -m experiments.diffusion --workdir=workdirs/diffusion
    python -m experiments.diffusion --workdir=workdirs/diffusion_small --config=experiments/configs/diffusion.py:small

Every field of `jaxml.diffusion.experiment.DiffusionExperimentConfig` is listed (so that each can be set with
--config.<field>=...); the default variant equals the dataclass's defaults (a test keeps them equal).
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.sde = "vp"  # vp, subvp or ve (score SDE paper defaults)
  c.seed = 0  # base seed
  c.samplers = ("euler_maruyama", "reverse_diffusion", "pc", "ode")  # 2D samplers compared
  c.sampler_steps = 500  # reverse-time steps (RK4 steps for "ode")
  c.ema_decay = 0.999  # EMA of the parameters (with the TF warm-up (1 + t) / (10 + t)); the samplers use it
  c.allow_fresh_start = False  # start a training over when its checkpoints exist but none restores
  c.ring_std = 0.1  # std of each of the 8 ring modes (radius 2)
  c.hidden = 128  # score MLP width
  c.depth = 3  # score MLP hidden layers
  c.steps_2d = 4000  # DSM training steps, 2D
  c.batch_2d = 256  # batch size, 2D
  c.lr_2d = 1e-3  # Adam learning rate, 2D (gradients clipped to norm 1)
  c.steps_per_call_2d = 100  # 2D steps per compiled call (lax.scan); divides steps_2d and checkpoint_every_2d
  c.checkpoint_every_2d = 2000  # steps between 2D checkpoints (DIR/2d/checkpoints)
  c.num_samples_2d = 2000  # samples drawn per sampler
  c.num_eval_ll = 256  # held-out points for the ODE likelihood (exact trace)
  c.ll_steps = 100  # RK4 steps of the likelihood ODE
  c.run_digits = True  # also train the U-Net on the digits
  c.unet_base = 16  # U-Net channels at 8x8 (conv backward is slow on XLA:CPU; raise on GPU)
  c.steps_digits = 500  # DSM training steps, digits (CPU smoke scale; use 20k+ on an accelerator)
  c.batch_digits = 64  # batch size, digits
  c.lr_digits = 1e-3  # Adam learning rate, digits (gradients clipped to norm 1)
  c.steps_per_call_digits = 10  # digits steps per compiled call; divides steps_digits and checkpoint_every_digits
  c.checkpoint_every_digits = 100  # steps between digits checkpoints (DIR/digits/checkpoints)
  c.num_samples_digits = 64  # digits drawn per sampler (8x8 grid)
  c.digits_samplers = ("euler_maruyama", "pc")  # digits samplers
  c.digits_sampler_steps = 200  # reverse-time steps for digits
  c.num_eval_bpd = 64  # held-out digits for bits/dim (Hutchinson trace)
  c.bpd_steps = 50  # RK4 steps of the bits/dim ODE
  if variant == "small":  # seconds: smoke runs and tests
    c.samplers = ("euler_maruyama", "ode")
    c.sampler_steps = 20
    c.hidden = 32
    c.depth = 2
    c.steps_2d = 50
    c.steps_per_call_2d = 10
    c.num_samples_2d = 200
    c.num_eval_ll = 8
    c.ll_steps = 10
    c.unet_base = 8
    c.steps_digits = 20
    c.batch_digits = 16
    c.num_samples_digits = 16
    c.digits_samplers = ("euler_maruyama",)
    c.digits_sampler_steps = 10
    c.num_eval_bpd = 4
    c.bpd_steps = 5
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; expected '' or 'small'")
  return c
