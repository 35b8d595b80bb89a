"""Score-based diffusion: SDEs (VP, sub-VP, VE) and DDPM, losses, samplers, likelihood, score networks.

    import jaxml.diffusion as jd
    sde = jd.VPSDE()
    x = jd.sample(rng, sde, score_fn, (512, 2), method="pc")
    logp = jd.log_likelihood(rng, sde, score_fn, x)   # nats per sample

Training runs on `jaxml.train` (a DSM loss, `make_train_step(..., ema_decay=0.999, ema_warmup=True)`);
`jaxml.diffusion.experiment.run(config, workdir)` is the 2-D + digits experiment.
"""
from jaxml.diffusion.sde import SDE, DDPMSchedule, VESDE, VPSDE, check_time, get_sde, subVPSDE
from jaxml.diffusion.mixture import GaussianMixture, mixture_log_prob, mixture_score, mixture_score_fn
from jaxml.diffusion.losses import ddpm_eps_loss, dsm_loss
from jaxml.diffusion.sampling import METHODS, SamplerParts, sample, sampler_parts
from jaxml.diffusion.likelihood import bits_per_dim, dequantize, log_likelihood
from jaxml.diffusion.nets import (ScoreMLPConfig, UNetConfig, mlp_apply, mlp_init, precondition, score_fn_from_net,
                                  time_embedding, unet_apply, unet_init)
from jaxml.diffusion.digits import load_digits
