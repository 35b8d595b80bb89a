"""The memory-efficient forms of the Llama step equal the default one, and the 7b recipe's step fits a chip.

The compile-only check builds the 7b recipe's train step (`benchmarks.llama_memory.step_memory`: the
recipe's optimizer, FSDP mesh and 4 x 2048 tokens per device) with 2 of its 32 layers on the suite's 8
virtual CPU devices, and bounds its per-device arguments + temporaries by what leaves room for the other
30 layers under a v5e chip's 16 GiB (`LAYER_GIB`, measured on the full recipe; BUILD_NOTES.md).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml import train as jt
from jaxml.llama import config as llama_config
from jaxml.llama import model

pytestmark = pytest.mark.xdist_group("test_llama_memory")  # one worker: the module fixture runs once

CHIP_GIB = 16.0  # TPU v5e HBM per chip
# Per-layer growth of the 7b recipe's per-device memory, from `python -m benchmarks.llama_memory
# --preset=7b` (32 layers, 64 devices: 10.03 GiB) minus `--layers=2` (64 devices: 4.86 GiB), over 30
# layers; re-measure when the step changes. It is the rematerialised block's saved input (bf16, and an
# f32 copy XLA:CPU keeps) for 8,192 tokens of width 4,096.
LAYER_GIB = (10.03 - 4.86) / 30
FULL_ARGUMENTS_GIB = 1.18  # the full recipe's per-device parameters + optimizer state on 64 devices
# The same 2-layer, 8-device step with materialised attention and logits (`--layers=2 --devices=8
# --overrides=attention_impl=cpu,loss_chunk=0`): its temporaries.
MATERIALISED_TEMPORARIES_GIB = 9.14


@pytest.fixture(scope="module")
def step_inputs():
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # random weights, norms near 1 (cheaper than compiling init)
      lambda path, s: jnp.asarray(rng.normal(size=s.shape) * 0.1 + ("norm" in jax.tree_util.keystr(path)), s.dtype),
      model.param_shapes(llama_config.preset("tiny")))
  tokens = jnp.asarray(rng.integers(0, 256, size=(2, 14)), jnp.int32)
  mask = jnp.asarray(np.arange(14)[None] < np.array([[14], [9]]), jnp.float32)  # row 1 right-padded
  return params, {"tokens": tokens, "mask": mask}


def test_blockwise_attention_and_chunked_loss_equal_the_default_step(step_inputs):
  """Loss, metrics and gradients of `loss_fn`: materialised attention and logits vs blocks of 5 and chunks of 3."""
  params, batch = step_inputs
  plain = llama_config.preset("tiny")  # unrolled layers, no remat: the CPU default path
  lean = plain.replace(scan_layers=True, remat=True, remat_policy="dots_with_no_batch_dims_saveable",
                       attention_impl="blockwise", attention_block=5, loss_chunk=3)
  grad = lambda cfg: jax.value_and_grad(lambda p: model.loss_fn(p, batch, cfg), has_aux=True)(params)  # noqa: E731
  ((loss_a, m_a), g_a), ((loss_b, m_b), g_b) = jax.jit(lambda: (grad(lean), grad(plain)))()
  assert plain.resolved_attention_impl() == "cpu"  # this backend's default: the path the other tests use
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for k in ("accuracy", "tokens", "perplexity"):
    np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-6, err_msg=k)
  assert float(m_a["tokens"]) == 13 + 8  # the mask counts (targets are tokens[:, 1:])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_config_fields_validated_and_resolved():
  cfg = llama_config.preset("7b")
  assert [cfg.resolved_attention_impl(b) for b in ("cpu", "gpu", "tpu")] == ["cpu", "cudnn", "pallas"]
  assert llama_config.preset("tiny").resolved_attention_impl("tpu") == "blockwise"  # head_dim 16: no Pallas tile
  assert cfg.replace(attention_impl="blockwise").resolved_attention_impl("tpu") == "blockwise"
  for field, value in (("attention_impl", "flash"), ("remat_policy", "save_everything"), ("loss_chunk", -1),
                       ("attention_block", 0)):
    with pytest.raises(ValueError, match=f"LlamaConfig.{field}"):
      cfg.replace(**{field: value})
  assert llama_config.BATCH_AXES == jt.BATCH_AXES


def test_7b_recipe_step_fits_a_v5e_chip():
  """2 of the 7b recipe's 32 layers on 8 devices, 4 x 2048 tokens each: room for the other 30 under 16 GiB.

  The full recipe's memory is predicted from this step's temporaries, the full recipe's arguments and
  30 more layers. Before the batch-sharding constraint this step's temporaries were 54.8 GiB per device
  (every device ran the whole global batch); with it and materialised scores and logits 9.1 GiB; with
  the blockwise attention and chunked logits of the 7b preset about 5.0 GiB.
  """
  from benchmarks import llama_memory  # noqa: PLC0415

  assert jax.device_count() >= 8, "tests/conftest.py provides 8 virtual CPU devices"
  config = llama_memory.recipe_config("7b")
  r = llama_memory.step_memory(config, n_devices=8, layers=2)
  assert (r["per_device_batch"], r["seq_len"], r["mesh"]) == (4, 2048, (1, 8, 1))
  assert r["cfg"].dim == 4096 and r["cfg"].attention_impl == "blockwise"
  predicted = r["temporaries_gib"] + FULL_ARGUMENTS_GIB + 30 * LAYER_GIB
  print(f"7b, 2 layers, 8 devices: {r['arguments_gib']:.2f} + {r['temporaries_gib']:.2f} GiB per device; "
        f"predicted for the 32-layer recipe on 64 devices: {predicted:.2f} GiB; compiled in {r['compile_s']:.0f}s")
  assert predicted < CHIP_GIB, f"the 7b recipe would need {predicted:.2f} GiB per device"
  assert r["temporaries_gib"] < 0.75 * MATERIALISED_TEMPORARIES_GIB, "the memory-linear forms saved less than 25%"
