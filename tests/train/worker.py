"""A tiny Llama training run in its own process, for the SIGTERM and multi-process tests.

  python -m tests.train.worker --workdir=DIR --steps=N [--coordinator=127.0.0.1:PORT
      --num_processes=2 --process_id=I] [--devices=2] [--mesh=2,2,1]

Writes DIR/result.json (process 0): the per-step losses of this run, the final step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def run(workdir: str, steps: int, mesh_shape=(1, 1, 1), *, checkpoint_every: int = 1000, log_every: int = 1,
        devices=None, print_fn=print) -> dict:
  import jax

  from jaxml import train as jt
  from jaxml.llama.config import LLAMA_RULES
  from tests.train import common

  devices = jax.devices() if devices is None else devices
  mesh = jt.make_mesh(*mesh_shape, devices=devices)
  tx, schedule = common.optimizer()
  rng = jax.random.PRNGKey(0)
  abstract, shardings = jt.abstract_train_state(common.init_fn, tx, rng, mesh, LLAMA_RULES)
  ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=checkpoint_every, keep=2)
  state, start = jt.restore_or_init(
      ckpt, abstract, lambda: jt.init_train_state(common.init_fn, tx, rng, mesh, LLAMA_RULES)[0])
  step_fn = jt.jit_train_step(jt.make_train_step(common.loss_fn, tx, schedule=schedule), shardings,
                              jt.batch_sharding(mesh))
  try:
    result = jt.train(step_fn, state, common.batch_fn, num_steps=steps, workdir=workdir, start_step=start,
                      batch_sharding=jt.batch_sharding(mesh), checkpointer=ckpt, log_every=log_every,
                      tokens_per_step=common.BATCH * common.SEQ_LEN, tensorboard=False, plot=False,
                      print_fn=print_fn)
  finally:
    ckpt.close()
  out = {"start": start, "step": result.step, "preempted": result.preempted,
         "losses": {r["step"]: r["loss"] for r in result.history}}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(out, f)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--checkpoint_every", type=int, default=1000)
  p.add_argument("--log_every", type=int, default=1)
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--mesh", default="-1,1,1")
  p.add_argument("--coordinator", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  a = p.parse_args(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
  from jaxml.train import maybe_initialize_distributed
  maybe_initialize_distributed(a.coordinator, a.num_processes, a.process_id)
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  run(a.workdir, a.steps, tuple(int(x) for x in a.mesh.split(",")), checkpoint_every=a.checkpoint_every,
      log_every=a.log_every, print_fn=lambda s: print(s, flush=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
