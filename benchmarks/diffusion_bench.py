"""Sampler loop overhead and training throughput of `jaxml.diffusion` (CPU by default).

    python -m benchmarks.diffusion_bench [--repeats=5] [--steps=1000] [--batches=16,64,256,2500]

Runs with JAX's default XLA:CPU configuration (no XLA_FLAGS set here; the run
prints `XLA_FLAGS` and the device). Measures, each as the median of
`--repeats` timed runs after a compile run (sampler timings interleaved round by
round, so that all see the same machine load), for the 2-D score MLP (hidden 128,
depth 3) at each batch size:
- `net_evals`: `--steps` score-network evaluations in one compiled loop
  (`x <- x - h * score(x, t)`): what any `--steps`-step sampler must spend;
- `compiled`: `jaxml.diffusion.sample` (Euler-Maruyama, `--steps` steps);
- `python_loop`: the same sampler stepped from Python, `sampler_parts(...)`'s
  `step` jitted once and called once per step, as a user would write it.
Lines: `sampler_overhead_vs_net_evals` = compiled / net_evals (batch 2500 and,
suffixed, the others); `compiled_vs_python_loop_speedup` = python_loop /
compiled (batch 64 and, suffixed, the others); `python_loop_vs_net_evals` =
python_loop / net_evals, the ceiling of that speedup for any sampler that calls
the network `--steps` times (what the compiled loop could reach with zero
overhead); at batch 64, what a Python step costs besides the network
(`python_step_dispatch_us_b64`: the jitted call alone; `python_step_without_net_us_b64`:
the sampler's step with a free score function). Also the predictor-corrector sampler (two network calls per step) at
batch 64, and training steps/s on `jaxml.train` (`make_train_step(..., steps_per_call=50)` jitted with
donation, or the GAN's own step under `scan_steps`) of the 2D score MLP, the digits U-Net and the
mode-collapse study's ring-8 GAN (`train_steps_per_s`). Ends with `name: value` lines.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp

import jaxml.diffusion as jd
from jaxml.train import hostmem


def _timed(fn, repeats):
  jax.block_until_ready(fn())  # compile
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def sampler_costs(batch: int, steps: int, repeats: int, hidden: int = 128, depth: int = 3,
                  method: str = "euler_maruyama") -> dict:
  """Seconds (median over `repeats` interleaved rounds) of `net_evals`, `compiled` and `python_loop`."""
  sde = jd.VPSDE()
  cfg = jd.ScoreMLPConfig(data_dim=2, hidden=hidden, depth=depth)
  params = jd.mlp_init(jax.random.PRNGKey(0), cfg)
  score_fn = jd.score_fn_from_net(sde, lambda p, x, t: jd.mlp_apply(p, x, t, cfg), params)
  rng = jax.random.PRNGKey(1)
  evals_per_step = 2 if method == "pc" else 1

  @jax.jit
  def net_evals(x):
    def body(i, x):
      t = jnp.full((batch,), 1.0 - i / steps)
      for _ in range(evals_per_step):
        x = x - 1e-3 * score_fn(x, t)
      return x
    return jax.lax.fori_loop(0, steps, body, x)

  x0 = jax.random.normal(rng, (batch, 2))
  compiled = lambda: jd.sample(rng, sde, score_fn, (batch, 2), method=method, num_steps=steps)  # noqa: E731
  parts = jd.sampler_parts(sde, score_fn, (batch, 2), method=method, num_steps=steps)
  step = jax.jit(parts.step)
  init = jax.jit(parts.init)
  finish = jax.jit(parts.finish)

  def python_loop():
    state = init(rng)
    for i in range(steps):
      state = step(i, state)
    return finish(state)

  # Interleaved rounds, so that all three see the same load on a shared machine.
  fns = {"net_evals": lambda: net_evals(x0), "compiled": compiled, "python_loop": python_loop}
  times = {k: [] for k in fns}
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def python_step_breakdown(batch: int, steps: int, repeats: int) -> dict:
  """Microseconds per Python-stepped step that are not the network: what bounds the speedup.

  `python_step_dispatch_us`: a jitted identity on the sampler state (the call alone);
  `python_step_without_net_us`: `sampler_parts(...).step` of Euler-Maruyama with a free score
  (`-x`): dispatch plus the step's own small programs (key split, noise draw, update).
  """
  parts = jd.sampler_parts(jd.VPSDE(), lambda x, t: -x, (batch, 2), num_steps=steps)
  state = jax.jit(parts.init)(jax.random.PRNGKey(0))
  identity = jax.jit(lambda i, s: s)
  step = jax.jit(parts.step)

  def loop(fn):
    def run():
      s = state
      for i in range(steps):
        s = fn(i, s)
      return s
    return run

  return {"python_step_dispatch_us": _timed(loop(identity), repeats) / steps * 1e6,
          "python_step_without_net_us": _timed(loop(step), repeats) / steps * 1e6}


def _core_steps_per_s(step, state, k: int, repeats: int) -> float:
  """Steps/s of a jitted, donating `steps_per_call=k` step: `k` over the median seconds of one call.

  The state is threaded through the calls (donation invalidates the old one); one call compiles first.
  """
  box = [state]

  def call():
    box[0], metrics = step(box[0], None)
    return metrics

  return k / _timed(call, repeats)


def train_steps_per_s(repeats: int, k: int = 50) -> dict:
  """Training steps/s on `jaxml.train`, `k` steps per compiled call, the data drawn inside the step.

  Diffusion (Adam 1e-3, EMA 0.999 with warm-up): the 2D score MLP (128 x 3) at batch 256 and the digits
  U-Net (16 channels) at batch 64. GAN: the mode-collapse study's ring-8 GAN (G and D 128 x 3, latent 8,
  Adam 1e-3, b1 0.5) at batch 256, one model, and the study's ensemble of 3 vmapped seeds at 250 steps
  per call (steps/s of the ensemble: each step updates all three).
  """
  import optax  # pylint: disable=import-outside-toplevel

  from jaxml import train as jt  # pylint: disable=import-outside-toplevel
  from jaxml.diffusion.digits import to_model_space  # pylint: disable=import-outside-toplevel
  from jaxml.generative import gan, get_dataset  # pylint: disable=import-outside-toplevel

  out = {}
  sde = jd.VPSDE()
  mix = jd.GaussianMixture.create([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.1)
  mcfg = jd.ScoreMLPConfig(data_dim=2)
  mapply = lambda p, x, t: jd.mlp_apply(p, x, t, mcfg)  # noqa: E731
  ucfg = jd.UNetConfig(base=16)  # the experiment default
  uapply = lambda p, x, t: jd.unet_apply(p, x, t, ucfg)  # noqa: E731
  images, _ = jd.load_digits()
  data = jnp.asarray(to_model_space(images))
  cases = {
      "train_steps_per_s_2d_mlp_b256": (mapply, jd.mlp_init(jax.random.PRNGKey(0), mcfg), lambda r: mix.sample(r, 256)),
      "train_steps_per_s_digits_unet_b64": (uapply, jd.unet_init(jax.random.PRNGKey(0), ucfg),
                                             lambda r: data[jax.random.randint(r, (64,), 0, data.shape[0])]),
  }
  tx = optax.adam(1e-3)
  for name, (apply, params, draw) in cases.items():
    def loss(p, batch, rng, apply=apply, draw=draw):
      del batch
      b_rng, l_rng = jax.random.split(rng)
      return jd.dsm_loss(l_rng, sde, functools.partial(jd.precondition, sde, apply, p), draw(b_rng)), {}
    step = jax.jit(jt.make_train_step(loss, tx, ema_decay=0.999, ema_warmup=True, steps_per_call=k), donate_argnums=0)
    # Built under jit: eagerly, the EMA would share the parameters' buffers, which cannot both be donated.
    state = jax.jit(lambda p: jt.create_train_state(p, tx, jax.random.PRNGKey(1), ema=True))(params)
    out[name] = _core_steps_per_s(step, state, k, repeats)
  ring8 = get_dataset("ring8")
  gcfg = gan.GANConfig(data_dim=2, latent_dim=8, hidden=128, depth=3, learning_rate=1e-3)
  step = jax.jit(gan.make_train_step(gcfg, 256, sample_fn=ring8.sample, steps_per_call=k), donate_argnums=0)
  out["train_steps_per_s_gan_ring8_b256"] = _core_steps_per_s(step, gan.init_state(jax.random.PRNGKey(0), gcfg), k,
                                                              repeats)
  seeds, k_study = 3, 250
  init = jax.jit(jax.vmap(functools.partial(gan.init_state, cfg=gcfg)))
  ensemble = init(jax.random.split(jax.random.PRNGKey(0), seeds))
  step = jax.jit(jt.scan_steps(jax.vmap(gan.make_train_step(gcfg, 256, sample_fn=ring8.sample)), k_study),
                 donate_argnums=0)
  out["train_steps_per_s_gan_ring8_b256_3seeds"] = _core_steps_per_s(step, ensemble, k_study, repeats)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--batches", default="16,64,256,2500")
  args = ap.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  print(f"devices: {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, jax {jax.__version__}")
  ratios = {}
  cases = [(b, "euler_maruyama") for b in batches] + [(64, "pc")]
  for batch, method in cases:
    c = sampler_costs(batch, args.steps, args.repeats, method=method)
    us = {k: v / args.steps * 1e6 for k, v in c.items()}
    print(f"{method} batch {batch}: per step {us['net_evals']:.1f} us net evals, {us['compiled']:.1f} us compiled "
          f"sampler, {us['python_loop']:.1f} us python-stepped sampler")
    ratios[(batch, method)] = {"sampler_overhead_vs_net_evals": c["compiled"] / c["net_evals"],
                               "compiled_vs_python_loop_speedup": c["python_loop"] / c["compiled"],
                               "python_loop_vs_net_evals": c["python_loop"] / c["net_evals"]}
  lines = {}
  headline = {"sampler_overhead_vs_net_evals": 2500, "compiled_vs_python_loop_speedup": 64,
              "python_loop_vs_net_evals": 64}
  for name, head in headline.items():
    for (batch, method), r in ratios.items():
      if method == "euler_maruyama":
        suffix = "" if batch == head else f"_b{batch}"
      else:
        suffix = f"_{method}_b{batch}"
      lines[name + suffix] = r[name]
  for k, v in python_step_breakdown(64, args.steps, args.repeats).items():
    lines[f"{k}_b64"] = v
  lines.update(train_steps_per_s(args.repeats))
  for k, v in lines.items():
    print(f"{k}: {v:.3f}")


if __name__ == "__main__":
  hostmem.relaunch_with_huge_pages()  # before any work: replaces the process
  main()
