"""Shared tiny-Llama training setup for the jaxml.train tests (compiled once per mesh)."""
from __future__ import annotations

import functools

import jax
import numpy as np

from jaxml import llama
from jaxml import train as jt
from jaxml.llama.config import LLAMA_RULES

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16)
SEQ_LEN, BATCH, TOTAL_STEPS = 8, 8, 50


def init_fn(rng):
  return llama.init(rng, CFG)


def loss_fn(params, batch, rng=None):
  return llama.loss_fn(params, batch, CFG)


@functools.lru_cache(maxsize=None)
def optimizer():
  return jt.make_optimizer(3e-2, total_steps=TOTAL_STEPS, warmup_steps=2)


def batch_fn(step: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic in (seed, step): a learnable pattern (t_{i+1} = t_i + 1 mod 64) from a random start."""
  rng = np.random.default_rng([seed, step])
  start = rng.integers(0, CFG.vocab_size, size=(BATCH, 1))
  return {"tokens": ((start + np.arange(SEQ_LEN + 1)) % CFG.vocab_size).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def setup(mesh_shape: tuple[int, int, int] = (1, 1, 1), donate: bool = True):
  """(mesh, abstract_state, shardings, jitted step) for a mesh over the first prod(mesh_shape) devices."""
  n = int(np.prod(mesh_shape))
  mesh = jt.make_mesh(*mesh_shape, devices=jax.devices()[:n])
  tx, schedule = optimizer()
  abstract, shardings = jt.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh, LLAMA_RULES)
  step = jt.jit_train_step(jt.make_train_step(loss_fn, tx, schedule=schedule), shardings, jt.batch_sharding(mesh),
                           donate=donate)
  return mesh, abstract, shardings, step


@functools.lru_cache(maxsize=None)
def _initial_host_state(seed: int):
  mesh, _, _, _ = setup((1, 1, 1))
  tx, _ = optimizer()
  state, _ = jt.init_train_state(init_fn, tx, jax.random.PRNGKey(seed), mesh, LLAMA_RULES)
  return jax.device_get(state)


def fresh_state(mesh_shape=(1, 1, 1), seed: int = 0):
  """The initial state laid out for `mesh_shape` (one init compile per process, then device_put)."""
  _, _, shardings, _ = setup(tuple(mesh_shape))
  return jax.device_put(_initial_host_state(seed), shardings)
