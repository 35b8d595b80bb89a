"""Training steps/s of the diffusion MLP and the GAN: the shared core against the private trainers it replaced.

    python -m benchmarks.core_before_after                 # 30 interleaved rounds, one pinned core
    python -m benchmarks.core_before_after --rounds=60 --old=916c837^
    python -m benchmarks.core_before_after --models=dhen_dense --rounds=20   # ctr_bench's DHEN dense step

The training core (`jaxml.train.make_train_step`, the GAN's custom step on
`jaxml.train.scan_steps`) replaced `jaxml.diffusion.train.make_trainer` and the
GAN's private `make_trainer`. This benchmark exports the package as it was at
the revision before that change (`--old`, default `916c837^`, the last one
holding both private trainers in working order) with `git archive`, imports it
beside the current one under the name `jaxml_old` (its own imports rewritten to
that name) and times the same models from both trees in this one process:
  * the 2-D score MLP (`ScoreMLPConfig(data_dim=2)`, hidden 128 x 3), DSM loss
    on the VP SDE, Adam 1e-3, EMA 0.999, batch 256, 50 steps per compiled call;
  * the ring-8 GAN (hidden 128 x 3, latent 8, Adam 1e-3 b1 0.5), batch 256,
    250 steps per call; and the current GAN step once more with its gradient
    norms replaced by zeros (`gan_ring8_no_norms`): the norms feed the loop's
    NaN guard, which the old loop did not have, so that row prices the guard;
  * with `--models=dhen_dense`: `benchmarks/ctr_bench.py`'s DHEN dense step (the step
    `mfu_dhen` times: interaction + top MLP + head on given embeddings, batch 4096,
    Adam), as that benchmark wrote it before the CTR towers moved onto the core
    (`--old_recsys`, default `2d3fe0c^`: a plain `value_and_grad` + `optax.adam(1e-3)`
    step over that revision's towers) and as it writes it now (`jaxml.train`'s step,
    `recsys.train.optimizer`), one step per call. The process then first relaunches
    itself with the huge-page malloc tunables, as `ctr_bench` does
    (`jaxml.train.hostmem`).

The process is pinned to one core before JAX starts and every measurement is
CPU time (`time.process_time`); each round times every variant once, in turn,
so that all see the same machine (separate processes of the same program spread
10-15% on a shared VM, more than the differences measured here). Needs `git`
and the repository's history. Ends with `name: value` lines
(`<model>_steps_per_cpu_s_old/_new`, medians over rounds, their ranges,
`<model>_new_over_old`, and the median of the per-round ratios with a bootstrap
95% interval, `<model>_new_over_old_per_round_median/_ci95`).
"""
from __future__ import annotations

import importlib
import io
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("old", "916c837^", "The git revision with the private trainers.")
flags.DEFINE_integer("rounds", 30, "Interleaved rounds (every variant timed once per round).")
flags.DEFINE_list("models", ["diffusion_mlp", "gan_ring8"], "Models to time: diffusion_mlp, gan_ring8, dhen_dense.")
flags.DEFINE_string("old_recsys", "2d3fe0c^", "The git revision before the CTR towers trained through the core.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_IMPORT = re.compile(r"^(\s*)(from|import) jaxml(?=[\s.])", re.MULTILINE)


def old_package(rev: str, dest: pathlib.Path, name: str = "jaxml_old"):
  """The `jaxml` package at git revision `rev`, written under `dest` as `name` and imported."""
  blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "jaxml"], capture_output=True,
                        check=True).stdout
  with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
    for member in tar.getmembers():
      if not member.isfile():
        continue
      path = dest / (name + member.name[len("jaxml"):])
      path.parent.mkdir(parents=True, exist_ok=True)
      data = tar.extractfile(member).read()
      if member.name.endswith(".py"):
        data = _IMPORT.sub(rf"\1\2 {name}", data.decode()).encode()
      path.write_bytes(data)
  sys.path.insert(0, str(dest))
  return importlib.import_module(name)


def diffusion_mlp(pkg):
  """`(call, steps_per_call)` for the 2-D score MLP of package `pkg` (old: `make_trainer`; new: the core)."""
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  jd = importlib.import_module(pkg.__name__ + ".diffusion")
  k = 50
  sde = jd.VPSDE()
  mix = jd.GaussianMixture.create([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.1)
  mcfg = jd.ScoreMLPConfig(data_dim=2)
  apply = lambda p, x, t: jd.mlp_apply(p, x, t, mcfg)
  params = jd.mlp_init(jax.random.PRNGKey(0), mcfg)
  draw = lambda r: mix.sample(r, 256)
  tx = optax.adam(1e-3)
  if hasattr(jd, "make_trainer"):
    loss = lambda p, r, b: jd.dsm_loss(r, sde, functools.partial(jd.precondition, sde, apply, p), b)
    trainer = jd.make_trainer(loss, draw, tx, ema_decay=0.999, chunk=k)
    run = jax.jit(trainer.run_chunk)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(1), params)
    return (lambda: run(state)[0]), k
  jt = importlib.import_module(pkg.__name__ + ".train")

  def new_loss(p, batch, rng):
    del batch
    b_rng, l_rng = jax.random.split(rng)
    return jd.dsm_loss(l_rng, sde, functools.partial(jd.precondition, sde, apply, p), draw(b_rng)), {}

  fn = jax.jit(jt.make_train_step(new_loss, tx, ema_decay=0.999, ema_warmup=True, steps_per_call=k))
  state = jax.jit(lambda p: jt.create_train_state(p, tx, jax.random.PRNGKey(1), ema=True))(params)
  return (lambda: fn(state, None)[0]), k


def gan_ring8(pkg, *, norms: bool = True):
  """`(call, steps_per_call)` for the ring-8 GAN of package `pkg`; `norms=False`: the new step without its norms."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  gan = importlib.import_module(pkg.__name__ + ".generative.gan")
  k = 250
  gcfg = gan.GANConfig(data_dim=2, latent_dim=8, hidden=128, depth=3, learning_rate=1e-3)
  if hasattr(gan, "make_trainer"):
    toy = importlib.import_module(pkg.__name__ + ".generative.toy")
    data = toy.get_dataset("ring8")
    trainer = gan.make_trainer(gcfg, lambda r: data.sample(r, 256), 256, k)
    run = jax.jit(trainer.run_chunk)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    return (lambda: run(state)[0]), k
  generative = importlib.import_module(pkg.__name__ + ".generative")
  data = generative.get_dataset("ring8")
  jt = gan.jt

  class _NoNorms:  # `jaxml.train` as the GAN step sees it, with `global_norm` returning 0
    def __getattr__(self, name):
      return getattr(jt, name)

    @staticmethod
    def global_norm(tree):
      del tree
      return jnp.zeros((), jnp.float32)

  fn = jax.jit(gan.make_train_step(gcfg, 256, sample_fn=data.sample, steps_per_call=k))
  state = gan.init_state(jax.random.PRNGKey(0), gcfg)
  gan.jt = jt if norms else _NoNorms()   # read when the step is traced, in the call below
  try:
    jax.block_until_ready(fn(state, None))
  finally:
    gan.jt = jt
  return (lambda: fn(state, None)[0]), k


def dhen_dense(pkg):
  """`(call, 1)`: `ctr_bench`'s DHEN dense step from package `pkg`, as that benchmark wrote it with `pkg`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  rs = importlib.import_module(pkg.__name__ + ".recsys")
  fc = rs.FeatureConfig(n_dense=13, vocab_sizes=(10_000,) * 26, embed_dim=16, dense_hidden=(64,))
  cfg = rs.TowerConfig(features=fc, kind="dhen", hidden=(1024, 512, 256), dhen_modules=("attention", "linear"),
                       dhen_rows=(None, 16), dhen_layers=2, attention_heads=2)
  b = 4096
  x0 = jax.random.normal(jax.random.PRNGKey(1), (b, fc.n_slots, fc.embed_dim))
  y = (jax.random.uniform(jax.random.PRNGKey(2), (b,)) < 0.25).astype(jnp.float32)
  dense = {k: v for k, v in rs.towers.init(jax.random.PRNGKey(0), cfg).items() if k != "features"}

  def loss(p, x):
    h = rs.modules.mlp(p["top"], rs.towers.interact(p, x, cfg))
    return rs.losses.logloss_from_logits(rs.modules.linear(p["out"], h)[:, 0], y)

  if hasattr(rs.train, "make_step"):  # before the core: the benchmark's own step
    opt = optax.adam(1e-3)

    def step(state, x):
      p, o = state
      value, g = jax.value_and_grad(loss)(p, x)
      u, o = opt.update(g, o, p)
      return (optax.apply_updates(p, u), o), value

    box = [(dense, opt.init(dense))]
  else:
    jt = importlib.import_module(pkg.__name__ + ".train")
    tx, _ = rs.train.optimizer(rs.train.TrainConfig())
    step = jt.make_train_step(lambda p, x, rng: (loss(p, x), {}), tx)
    box = [jt.init_train_state(lambda r: dense, tx, jax.random.PRNGKey(0))[0]]
  fn = jax.jit(step, donate_argnums=0)

  def call():
    box[0], out = fn(box[0], x0)
    return out

  return call, 1


def measure(variants: dict, rounds: int, min_cpu_s: float = 0.25) -> dict[str, list[float]]:
  """Steps per CPU-second of each `name: (call, steps_per_call)`, `rounds` interleaved rounds.

  Each round times every variant once, in turn: enough calls of it to fill `min_cpu_s` of CPU time.
  """
  import jax  # pylint: disable=import-outside-toplevel
  calls = {}
  for name, (call, k) in variants.items():
    jax.block_until_ready(call())   # compile and warm
    t = time.process_time()
    jax.block_until_ready(call())
    calls[name] = max(1, round(min_cpu_s / max(time.process_time() - t, 1e-6)))
  rates = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (call, k) in variants.items():
      t = time.process_time()
      for _ in range(calls[name]):
        jax.block_until_ready(call())
      rates[name].append(k * calls[name] / (time.process_time() - t))
  return rates


def bootstrap_median_interval(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
  """The 2.5% and 97.5% quantiles of the median of `values` resampled with replacement."""
  import random  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed)
  medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
  return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main(argv):
  del argv
  cpu = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {cpu})   # before JAX's CPU backend starts its threads
  import jaxml  # pylint: disable=import-outside-toplevel
  unknown = set(FLAGS.models) - {"diffusion_mlp", "gan_ring8", "dhen_dense"}
  if unknown:
    raise app.UsageError(f"unknown --models {sorted(unknown)}")
  with tempfile.TemporaryDirectory() as tmp:
    variants = {}
    if {"diffusion_mlp", "gan_ring8"} & set(FLAGS.models):
      old = old_package(FLAGS.old, pathlib.Path(tmp) / "core")
      if "diffusion_mlp" in FLAGS.models:
        variants.update(diffusion_mlp_old=diffusion_mlp(old), diffusion_mlp_new=diffusion_mlp(jaxml))
      if "gan_ring8" in FLAGS.models:
        variants.update(gan_ring8_old=gan_ring8(old), gan_ring8_new=gan_ring8(jaxml),
                        gan_ring8_no_norms=gan_ring8(jaxml, norms=False))
    if "dhen_dense" in FLAGS.models:
      old = old_package(FLAGS.old_recsys, pathlib.Path(tmp) / "recsys", name="jaxml_old_recsys")
      variants.update(dhen_dense_old=dhen_dense(old), dhen_dense_new=dhen_dense(jaxml))
    rates = measure(variants, FLAGS.rounds)
  results = {}
  for name, r in rates.items():
    model, side = name.rsplit("_", 1) if not name.endswith("no_norms") else ("gan_ring8", "no_norms")
    results[f"{model}_steps_per_cpu_s_{side}"] = statistics.median(r)
    results[f"{model}_steps_per_cpu_s_{side}_range"] = f"{min(r):.4g}-{max(r):.4g}"
  for model in [m for m in ("diffusion_mlp", "gan_ring8", "dhen_dense") if m in FLAGS.models]:
    results[f"{model}_new_over_old"] = (results[f"{model}_steps_per_cpu_s_new"]
                                        / results[f"{model}_steps_per_cpu_s_old"])
    # the ratio within each round: its median, with a bootstrap 95% interval of that median
    per_round = [n / o for n, o in zip(rates[f"{model}_new"], rates[f"{model}_old"])]
    low, high = bootstrap_median_interval(per_round)
    results[f"{model}_new_over_old_per_round_median"] = statistics.median(per_round)
    results[f"{model}_new_over_old_per_round_ci95"] = f"{low:.3f}-{high:.3f}"
  if "gan_ring8" in FLAGS.models:
    results["gan_ring8_guard_cost"] = 1 - (results["gan_ring8_steps_per_cpu_s_new"]
                                           / results["gan_ring8_steps_per_cpu_s_no_norms"])
  print(f"old: {FLAGS.old} (recsys: {FLAGS.old_recsys}); cpu {cpu}; rounds {FLAGS.rounds}")
  for k, v in results.items():
    print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
  if "dhen_dense" in " ".join(sys.argv):  # the DHEN step's large temporaries: allocate as ctr_bench does
    sys.path.insert(0, str(ROOT))
    from jaxml.train import hostmem  # pylint: disable=import-outside-toplevel
    hostmem.relaunch_with_huge_pages()
  app.run(main)
