"""Sampler loop overhead and training throughput of `jaxml.diffusion` (CPU by default).

    python -m benchmarks.diffusion_bench [--repeats=5] [--steps=1000]

Measures, each as the median of `--repeats` timed runs after a compile run
(sampler timings interleaved round by round so all see the same machine load):
- `sampler_overhead_vs_net_evals`: a compiled `--steps`-step Euler-Maruyama
  sampler divided by `--steps` score-network evaluations in one compiled loop
  (`x <- x - h * score(x, t)`): what the sampler adds beyond the network;
- `compiled_vs_python_loop_speedup`: the same sampler stepped from Python
  (one jitted step per call, as a loop outside jit would) divided by the compiled
  loop, at a small batch (64) where per-step dispatch matters, and at 2500;
- training steps/s of the 2D score MLP and of the digits U-Net (scanned steps).
Ends with `name: value` lines.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

import jaxml.diffusion as jd


def _timed(fn, repeats):
  jax.block_until_ready(fn())  # compile
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def sampler_costs(batch: int, steps: int, repeats: int, hidden: int = 128, depth: int = 3) -> dict:
  sde = jd.VPSDE()
  cfg = jd.ScoreMLPConfig(data_dim=2, hidden=hidden, depth=depth)
  params = jd.mlp_init(jax.random.PRNGKey(0), cfg)
  score_fn = jd.score_fn_from_net(sde, lambda p, x, t: jd.mlp_apply(p, x, t, cfg), params)
  rng = jax.random.PRNGKey(1)

  @jax.jit
  def net_evals(x):
    def body(i, x):
      t = jnp.full((batch,), 1.0 - i / steps)
      return x - 1e-3 * score_fn(x, t)
    return jax.lax.fori_loop(0, steps, body, x)

  x0 = jax.random.normal(rng, (batch, 2))
  compiled = lambda: jd.sample(rng, sde, score_fn, (batch, 2), method="euler_maruyama", num_steps=steps)  # noqa: E731
  parts = jd.sampler_parts(sde, score_fn, (batch, 2), method="euler_maruyama", num_steps=steps)
  step = jax.jit(parts.step)
  init = jax.jit(parts.init)
  finish = jax.jit(parts.finish)

  def python_loop():
    state = init(rng)
    for i in range(steps):
      state = step(i, state)
    return finish(state)

  # Interleaved rounds, so that all three see the same load on a shared machine.
  fns = {"net_evals_s": lambda: net_evals(x0), "compiled_s": compiled, "python_loop_s": python_loop}
  times = {k: [] for k in fns}
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def train_steps_per_s(repeats: int) -> dict:
  out = {}
  sde = jd.VPSDE()
  mix = jd.GaussianMixture.create([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.1)
  mcfg = jd.ScoreMLPConfig(data_dim=2)
  mapply = lambda p, x, t: jd.mlp_apply(p, x, t, mcfg)  # noqa: E731
  ucfg = jd.UNetConfig(base=16)  # the experiment default
  uapply = lambda p, x, t: jd.unet_apply(p, x, t, ucfg)  # noqa: E731
  images, _ = jd.load_digits()
  from jaxml.diffusion.digits import to_model_space  # pylint: disable=import-outside-toplevel
  data = jnp.asarray(to_model_space(images))
  import optax  # pylint: disable=import-outside-toplevel
  cases = {
      "train_steps_per_s_2d_mlp_b256": (mapply, jd.mlp_init(jax.random.PRNGKey(0), mcfg), lambda r: mix.sample(r, 256)),
      "train_steps_per_s_digits_unet_b64": (uapply, jd.unet_init(jax.random.PRNGKey(0), ucfg),
                                             lambda r: data[jax.random.randint(r, (64,), 0, data.shape[0])]),
  }
  chunk = 50
  for name, (apply, params, batch_fn) in cases.items():
    loss = lambda p, r, b, apply=apply: jd.dsm_loss(r, sde, functools.partial(jd.precondition, sde, apply, p), b)  # noqa: E731
    trainer = jd.make_trainer(loss, batch_fn, optax.adam(1e-3), chunk=chunk)
    run = jax.jit(trainer.run_chunk)
    state = trainer.init(jax.random.PRNGKey(1), params)
    out[name] = chunk / _timed(lambda: run(state), repeats)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=1000)
  args = ap.parse_args()
  print(f"devices: {jax.devices()}")
  lines = {}
  for batch in (64, 2500):
    c = sampler_costs(batch, args.steps, args.repeats)
    print(f"batch {batch}: {args.steps} net evals {c['net_evals_s'] * 1e3:.1f} ms, compiled sampler "
          f"{c['compiled_s'] * 1e3:.1f} ms, python-stepped sampler {c['python_loop_s'] * 1e3:.1f} ms")
    suffix = "" if batch == 64 else f"_b{batch}"
    lines[f"sampler_overhead_vs_net_evals{suffix}"] = c["compiled_s"] / c["net_evals_s"]
    lines[f"compiled_vs_python_loop_speedup{suffix}"] = c["python_loop_s"] / c["compiled_s"]
  lines.update(train_steps_per_s(args.repeats))
  for k, v in lines.items():
    print(f"{k}: {v:.3f}")


if __name__ == "__main__":
  main()
