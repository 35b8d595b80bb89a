"""Per-device memory of the Llama recipes' train step, as XLA compiles it (no arrays allocated).

  .venv/bin/python -m benchmarks.llama_memory --preset=7b
  .venv/bin/python -m benchmarks.llama_memory --preset=7b --layers=2 --devices=8   # a reduced compile

For a recipe of `experiments/configs/llama_lm.py` (its preset, overrides,
optimizer, global batch, sequence length and mesh), the train step that
`jaxml.llama.train` runs is lowered for abstract state
(`jt.abstract_train_state`) on virtual CPU devices
(`--xla_force_host_platform_device_count`) and compiled;
`compiled.memory_analysis()` gives the per-device argument bytes (parameters,
optimizer state, batch) and temporaries (activations, gradients, gathered
weights). No parameter is ever materialised, so a 70b step compiles on a
laptop; compile time grows with the device count and the layer count (the
layers run under `lax.scan`, so little).

`--devices` below the recipe's device count keeps the per-device batch (the
global batch shrinks with the mesh); `--layers` replaces the preset's layer
count. XLA:CPU's schedule and its float normalisation (bfloat16 elementwise
work done in float32) differ from the TPU compiler's. A recipe's "auto"
attention (the Pallas kernel on TPU, cuDNN on GPU) compiles here as
"blockwise", the pure-JAX form whose memory is, like the kernels', linear in
the sequence (`--overrides=attention_impl=cpu` shows the materialised
scores). These are the figures
XLA gives here, an upper-bound-like guide to the slice a recipe needs, not a
TPU measurement. There is no peer: nothing else compiles these recipes.

Ends with `name: value` lines.
"""
from __future__ import annotations

import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "7b", "A recipe variant of experiments/configs/llama_lm.py (7b, 13b, 70b).")
flags.DEFINE_integer("devices", 0, "Virtual devices (0: the recipe's own, RECIPE_DEVICES); fsdp takes them all.")
flags.DEFINE_integer("layers", 0, "Layers (0: the preset's).")
flags.DEFINE_string("overrides", "", "LlamaConfig fields replacing the recipe's, e.g. "
                    "'attention_impl=cpu,loss_chunk=0'.")
flags.DEFINE_bool("top_buffers", False, "Also print the ten largest buffers of the compiled program.")

# The slice each recipe of experiments/configs/llama_lm.py is written for (devices of its mesh).
RECIPE_DEVICES = {"7b": 64, "13b": 128, "70b": 512}
GiB = 2**30


def recipe_config(preset: str):
  """The experiment config of `experiments/configs/llama_lm.py:<preset>`."""
  from experiments.configs import llama_lm  # noqa: PLC0415

  return llama_lm.get_config(preset)


def step_memory(config, *, n_devices: int, layers: int = 0, overrides: dict | None = None,
                top_buffers: int = 0) -> dict:
  """Compiles the recipe's train step on `n_devices` (the current backend's devices) and reports its memory.

  The mesh is the recipe's (`config.mesh`, -1 = the remaining devices) over
  the first `n_devices` devices; the global batch is the recipe's per-device
  batch times the batch-axis size of that mesh.

  Returns:
    A dict: `arguments_gib`, `temporaries_gib`, `outputs_gib`, `total_gib`
    (arguments + temporaries: outputs alias the donated state), `compile_s`,
    `per_device_batch`, `global_batch`, `seq_len`, `mesh`, `model_flops_per_step`
    (at the recipe's global batch), `params`, `cfg` (the LlamaConfig), and
    `top` (the largest buffers, when asked).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from jaxml import train as jt  # noqa: PLC0415
  from jaxml.llama import config as llama_config  # noqa: PLC0415
  from jaxml.llama import model  # noqa: PLC0415
  from jaxml.llama import train as llama_train  # noqa: PLC0415

  cfg = llama_train.model_config(config, config.vocab_size)
  if layers:
    cfg = cfg.replace(n_layers=layers)
  if cfg.attention_impl == "auto":
    cfg = cfg.replace(attention_impl="blockwise")  # the kernels' stand-in here (module docstring)
  if overrides:
    cfg = cfg.replace(**overrides)
  devices = jax.devices()[:n_devices]
  if len(devices) < n_devices:
    raise ValueError(f"n_devices={n_devices}, but only {len(devices)} devices exist (set XLA_FLAGS first)")
  mesh = jt.make_mesh(*config.mesh, devices=devices)
  recipe = mesh_sizes(config.mesh, recipe_devices(config))
  per_device = config.batch // (recipe[0] * recipe[1])
  if per_device * recipe[0] * recipe[1] != config.batch:
    raise ValueError(f"the recipe's batch {config.batch} does not split over its {recipe[0] * recipe[1]} batch shards")
  global_batch = per_device * mesh.shape["data"] * mesh.shape["fsdp"]
  tx, schedule = llama_train._optimizer(config)  # noqa: SLF001 - the recipe's own optimizer
  init_fn = lambda rng: model.init(rng, cfg)  # noqa: E731
  abstract, shardings = jt.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh, llama_config.LLAMA_RULES)
  loss = lambda params, batch, rng=None: model.loss_fn(params, batch, cfg)  # noqa: E731
  step = jt.jit_train_step(jt.make_train_step(loss, tx, schedule=schedule), shardings, jt.batch_sharding(mesh))
  batch = {"tokens": jax.ShapeDtypeStruct((global_batch, config.seq_len + 1), jnp.int32,
                                          sharding=jt.batch_sharding(mesh))}
  start = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - start
  ma = compiled.memory_analysis()
  out = {
      "arguments_gib": ma.argument_size_in_bytes / GiB, "temporaries_gib": ma.temp_size_in_bytes / GiB,
      "outputs_gib": ma.output_size_in_bytes / GiB,
      "total_gib": (ma.argument_size_in_bytes + ma.temp_size_in_bytes) / GiB, "compile_s": compile_s,
      "per_device_batch": per_device, "global_batch": global_batch, "seq_len": config.seq_len,
      "mesh": tuple(mesh.shape.values()), "params": llama_config.param_count(cfg), "cfg": cfg,
      "model_flops_per_step": llama_config.flops_per_token(cfg, config.seq_len) * config.batch * config.seq_len,
  }
  if top_buffers:
    out["top"] = largest_buffers(compiled.as_text(), top_buffers)
  return out


def recipe_devices(config) -> int:
  """The device count the recipe is written for (`RECIPE_DEVICES`; 1 for the CPU variants)."""
  return RECIPE_DEVICES.get(config.preset, 1)


def mesh_sizes(mesh: tuple[int, int, int], n_devices: int) -> tuple[int, int, int]:
  """`(data, fsdp, tensor)` with a -1 resolved for `n_devices`."""
  known = 1
  for s in mesh:
    known *= s if s != -1 else 1
  return tuple(n_devices // known if s == -1 else s for s in mesh)


_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1, "s8": 1, "u8": 1}


def largest_buffers(hlo_text: str, n: int) -> list[tuple[float, str, str]]:
  """The `n` largest array values defined in a compiled HLO text: `(MiB, shape, op name)`."""
  import re  # noqa: PLC0415

  found = []
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]", line)
    if not m or "parameter(" in line or m.group(1) not in _BYTES:
      continue
    size = _BYTES[m.group(1)]
    for d in filter(None, m.group(2).split(",")):
      size *= int(d)
    name = re.search(r'op_name="([^"]*)"', line)
    found.append((size / 2**20, f"{m.group(1)}[{m.group(2)}]", name.group(1)[-80:] if name else ""))
  found.sort(reverse=True)
  return found[:n]


def _parse_overrides(text: str) -> dict:
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, _, value = item.partition("=")
    if not _:
      raise ValueError(f"--overrides: expected key=value, got {item!r}")
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        continue
    out[key] = {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value
  return out


def main(argv):
  del argv
  config = recipe_config(FLAGS.preset)
  n = FLAGS.devices or recipe_devices(config)
  # Before the first use of jax's backends (nothing above touched them).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  r = step_memory(config, n_devices=n, layers=FLAGS.layers, overrides=_parse_overrides(FLAGS.overrides),
                  top_buffers=10 if FLAGS.top_buffers else 0)
  cfg = r["cfg"]
  print(f"recipe {FLAGS.preset}: {r['params'] / 1e9:.2f}B params ({cfg.n_layers} layers compiled), mesh "
        f"(data, fsdp, tensor) = {r['mesh']}, {r['per_device_batch']} x {r['seq_len']} tokens per device, "
        f"attention {getattr(cfg, 'attention_impl', 'cpu')}, loss_chunk {getattr(cfg, 'loss_chunk', 0)}, "
        f"remat {cfg.remat} ({getattr(cfg, 'remat_policy', 'nothing_saveable')})")
  for size, shape, name in r.get("top", []):
    print(f"  {size:9.1f} MiB  {shape:32s} {name}")
  print(f"preset: {FLAGS.preset}")
  print(f"devices: {n}")
  print(f"layers: {cfg.n_layers}")
  print(f"per_device_tokens: {r['per_device_batch'] * r['seq_len']}")
  print(f"arguments_gib: {r['arguments_gib']:.2f}")
  print(f"temporaries_gib: {r['temporaries_gib']:.2f}")
  print(f"per_device_total_gib: {r['total_gib']:.2f}")
  print(f"model_tflops_per_step: {r['model_flops_per_step'] / 1e12:.1f}")
  print(f"compile_s: {r['compile_s']:.0f}")


if __name__ == "__main__":
  app.run(main)
