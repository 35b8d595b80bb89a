"""Training steps/s of the diffusion MLP and the GAN: the shared core against the private trainers it replaced.

    python -m benchmarks.core_before_after                 # 4 interleaved rounds, one pinned core
    python -m benchmarks.core_before_after --rounds=6 --old=916c837^

The training core (`jaxml.train.make_train_step`, the GAN's custom step on
`jaxml.train.scan_steps`) replaced `jaxml.diffusion.train.make_trainer` and the
GAN's private `make_trainer`. This benchmark checks out the revision before
that change (`--old`, default `916c837^`, the last one holding both private
trainers in working order) into a temporary git worktree and times the same
models on both trees:
  * the 2-D score MLP (`ScoreMLPConfig(data_dim=2)`, hidden 128 x 3), DSM loss
    on the VP SDE, Adam 1e-3, EMA 0.999, batch 256, 50 steps per compiled call;
  * the ring-8 GAN (hidden 128 x 3, latent 8, Adam 1e-3 b1 0.5), batch 256,
    250 steps per call. The new step also computes both players' gradient
    norms, which the loop's NaN guard reads; the old step computed none.

With `--guard_ab=N` it instead times, in this process on one pinned core, the current GAN step with its
two gradient norms (what the loop's NaN guard reads) against the same step with the norms replaced by
zeros, N interleaved rounds (`gan_steps_per_cpu_s_with_norms` / `_without_norms`, `gan_guard_cost`).

Each measurement is its own process pinned to one core (`taskset`-style
affinity), timed by CPU time (`time.process_time`, medians of 12-40 calls);
old and new alternate round by round so that both see the same machine.
Needs `git` and the repository's history. Ends with `name: value` lines
(`<model>_steps_per_cpu_s_old/_new`, medians over rounds, and `<model>_new_over_old`).
"""
from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("old", "916c837^", "The git revision with the private trainers.")
flags.DEFINE_integer("rounds", 4, "Interleaved old/new rounds per model.")
flags.DEFINE_integer("guard_ab", 0, "Instead: this many in-process rounds of the GAN step with and without its norms.")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The measurement, run in a child process with the tree to import first on sys.path. It finds out from
# the tree's API which trainer it has (the old trees have `make_trainer`), prints one number.
_CHILD = r'''
import functools, sys, time
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np, optax
import jaxml
assert jaxml.__file__.startswith(sys.argv[1]), jaxml.__file__
model = sys.argv[2]
if model == "diffusion_mlp":
  import jaxml.diffusion as jd
  K, calls = 50, 40
  sde = jd.VPSDE()
  mix = jd.GaussianMixture.create([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.1)
  mcfg = jd.ScoreMLPConfig(data_dim=2)
  apply = lambda p, x, t: jd.mlp_apply(p, x, t, mcfg)
  params = jd.mlp_init(jax.random.PRNGKey(0), mcfg)
  draw = lambda r: mix.sample(r, 256)
  tx = optax.adam(1e-3)
  if hasattr(jd, "make_trainer"):
    loss = lambda p, r, b: jd.dsm_loss(r, sde, functools.partial(jd.precondition, sde, apply, p), b)
    trainer = jd.make_trainer(loss, draw, tx, ema_decay=0.999, chunk=K)
    run = jax.jit(trainer.run_chunk, donate_argnums=0)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(1), params)
    step = lambda s: run(s)[0]
  else:
    from jaxml import train as jt
    def loss(p, batch, rng):
      b_rng, l_rng = jax.random.split(rng)
      return jd.dsm_loss(l_rng, sde, functools.partial(jd.precondition, sde, apply, p), draw(b_rng)), {}
    fn = jax.jit(jt.make_train_step(loss, tx, ema_decay=0.999, ema_warmup=True, steps_per_call=K), donate_argnums=0)
    state = jax.jit(lambda p: jt.create_train_state(p, tx, jax.random.PRNGKey(1), ema=True))(params)
    step = lambda s: fn(s, None)[0]
else:
  from jaxml.generative import gan
  K, calls = 250, 12
  gcfg = gan.GANConfig(data_dim=2, latent_dim=8, hidden=128, depth=3, learning_rate=1e-3)
  if hasattr(gan, "make_trainer"):
    from jaxml.generative import toy
    data = toy.get_dataset("ring8")
    trainer = gan.make_trainer(gcfg, lambda r: data.sample(r, 256), 256, K)
    run = jax.jit(trainer.run_chunk, donate_argnums=0)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    step = lambda s: run(s)[0]
  else:
    from jaxml.generative import get_dataset
    data = get_dataset("ring8")
    fn = jax.jit(gan.make_train_step(gcfg, 256, sample_fn=data.sample, steps_per_call=K), donate_argnums=0)
    state = gan.init_state(jax.random.PRNGKey(0), gcfg)
    step = lambda s: fn(s, None)[0]
state = jax.block_until_ready(step(state))
times = []
for _ in range(calls):
  t = time.process_time()
  state = jax.block_until_ready(step(state))
  times.append(time.process_time() - t)
print(K / float(np.median(times)))
'''

MODELS = ("diffusion_mlp", "gan_ring8")


def _measure(tree: pathlib.Path, model: str, cpu: int) -> float:
  env = dict(os.environ, PYTHONPATH="")
  out = subprocess.run([sys.executable, "-c", _CHILD, str(tree), model], capture_output=True, text=True, env=env,
                       preexec_fn=lambda: os.sched_setaffinity(0, {cpu}), check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{model} on {tree} failed:\n{out.stderr[-3000:]}")
  return float(out.stdout.strip().splitlines()[-1])


def guard_ab(rounds: int) -> dict[str, float]:
  """The GAN step (250 steps per call) with and without its gradient norms, interleaved in one process."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxml import train as jt  # pylint: disable=import-outside-toplevel
  from jaxml.generative import gan, get_dataset  # pylint: disable=import-outside-toplevel

  class _NoNorms:  # `jaxml.train` as the GAN step sees it, with `global_norm` returning 0
    def __getattr__(self, name):
      return getattr(jt, name)

    @staticmethod
    def global_norm(tree):
      del tree
      return jnp.zeros((), jnp.float32)

  data = get_dataset("ring8")
  gcfg = gan.GANConfig(data_dim=2, latent_dim=8, hidden=128, depth=3, learning_rate=1e-3)
  k = 250
  state = gan.init_state(jax.random.PRNGKey(0), gcfg)
  steps = {}
  for name, core in (("with_norms", jt), ("without_norms", _NoNorms())):
    gan.jt = core   # read when the step is traced, in the first call below
    try:
      steps[name] = jax.jit(gan.make_train_step(gcfg, 256, sample_fn=data.sample, steps_per_call=k))
      jax.block_until_ready(steps[name](state, None))
    finally:
      gan.jt = jt
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      t = time.process_time()
      jax.block_until_ready(step(state, None))
      times[name].append(time.process_time() - t)
  out = {f"gan_steps_per_cpu_s_{n}": k / statistics.median(t) for n, t in times.items()}
  out["gan_guard_cost"] = 1 - out["gan_steps_per_cpu_s_with_norms"] / out["gan_steps_per_cpu_s_without_norms"]
  return out


def main(argv):
  del argv
  cpu = sorted(os.sched_getaffinity(0))[0]
  if FLAGS.guard_ab:
    os.sched_setaffinity(0, {cpu})   # before JAX's CPU backend starts
    for k, v in guard_ab(FLAGS.guard_ab).items():
      print(f"{k}: {v:.4g}")
    return
  with tempfile.TemporaryDirectory() as tmp:
    old = pathlib.Path(tmp) / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), FLAGS.old], check=True,
                   capture_output=True)
    try:
      results = {}
      for model in MODELS:
        rates = {"old": [], "new": []}
        for r in range(FLAGS.rounds):
          for side, tree in (("old", old), ("new", ROOT)):
            rates[side].append(_measure(tree, model, cpu))
          print(f"[round {r + 1}] {model}: old {rates['old'][-1]:.0f}, new {rates['new'][-1]:.0f} steps per CPU-second",
                flush=True)
        for side in ("old", "new"):
          results[f"{model}_steps_per_cpu_s_{side}"] = statistics.median(rates[side])
          results[f"{model}_steps_per_cpu_s_{side}_range"] = f"{min(rates[side]):.0f}-{max(rates[side]):.0f}"
        results[f"{model}_new_over_old"] = (results[f"{model}_steps_per_cpu_s_new"]
                                            / results[f"{model}_steps_per_cpu_s_old"])
    finally:
      subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False,
                     capture_output=True)
  print(f"old: {FLAGS.old}; cpu {cpu}; rounds {FLAGS.rounds}")
  for k, v in results.items():
    print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
  app.run(main)
