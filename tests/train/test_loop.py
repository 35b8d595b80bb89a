"""The loop: bitwise resume, NaN guard, corrupted-checkpoint fallback, metrics/TensorBoard/PNG files."""
import contextlib
import functools
import io
import json
import os
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxml import train as jt
from tests.train import common


def linear_loss(params, batch, rng=None):
  err = batch["x"] @ params["w"] - batch["y"]
  loss = jnp.mean(err ** 2) * batch["scale"]
  return loss, {"mse": loss}


def linear_batch(step, nan_from=None):
  rng = np.random.default_rng([7, step])
  x = rng.normal(size=(4, 3)).astype(np.float32)
  scale = np.float32(np.nan if nan_from is not None and step >= nan_from else 1.0)
  return {"x": x, "y": x @ np.ones((3, 2), np.float32), "scale": scale}


@functools.lru_cache(maxsize=None)
def linear_setup():
  tx, schedule = jt.make_optimizer(0.05, total_steps=100, warmup_steps=0)
  init_fn = lambda r: {"w": jax.random.normal(r, (3, 2))}  # noqa: E731
  mesh = jt.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  abstract, shardings = jt.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh)
  step = jt.jit_train_step(jt.make_train_step(linear_loss, tx, schedule=schedule), shardings,
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  init = lambda: jt.init_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh)[0]  # noqa: E731
  return abstract, step, init


def run_linear(workdir, num_steps, *, every=2, keep=3, nan_from=None):
  abstract, step, init = linear_setup()
  ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=every, keep=keep, async_save=False)
  try:
    state, start = jt.restore_or_init(ckpt, abstract, init)
    result = jt.train(step, state, functools.partial(linear_batch, nan_from=nan_from), num_steps=num_steps,
                      workdir=workdir, start_step=start, checkpointer=ckpt, log_every=1, tensorboard=False,
                      plot=False, print_fn=lambda s: None)
  finally:
    ckpt.close()
  return start, result


def run_llama(workdir, num_steps, *, every=3, log_every=1, tensorboard=False, plot=False):
  mesh, abstract, _, step = common.setup((1, 1, 1))
  ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=every, keep=2)
  try:
    state, start = jt.restore_or_init(ckpt, abstract, common.fresh_state)
    result = jt.train(step, state, common.batch_fn, num_steps=num_steps, workdir=workdir, start_step=start,
                      batch_sharding=jt.batch_sharding(mesh), checkpointer=ckpt, log_every=log_every,
                      tokens_per_step=common.BATCH * common.SEQ_LEN, tensorboard=tensorboard, plot=plot,
                      print_fn=lambda s: None)
  finally:
    ckpt.close()
  return start, result


class LoopTest(chex.TestCase, parameterized.TestCase):

  def tmpdir(self) -> str:
    path = tempfile.mkdtemp(prefix="jaxml_loop_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_resume_is_bitwise_identical(self):
    root = self.tmpdir()
    _, full = run_llama(os.path.join(root, "full"), 6)
    first_start, first = run_llama(os.path.join(root, "split"), 3)  # a run stopped after step 3
    start, resumed = run_llama(os.path.join(root, "split"), 6)     # restarted on the same workdir
    self.assertEqual((first_start, first.step, start, resumed.step), (0, 3, 3, 6))
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(full.state))
    steps = [r["step"] for r in jt.read_metrics(os.path.join(root, "split"))]
    self.assertEqual(steps, [1, 2, 3, 4, 5, 6])

  def test_nan_loss_raises_and_keeps_last_good_checkpoint(self):
    root = self.tmpdir()
    _, clean = run_linear(os.path.join(root, "clean"), 4)
    with self.assertRaisesRegex(jt.NonFiniteLossError, r"loss is nan.* at step 6.*last good one \(step 4"):
      run_linear(os.path.join(root, "bad"), 10, nan_from=5)
    ckpt = jt.Checkpointer(os.path.join(root, "bad", "ckpt"), every=2)
    self.assertEqual(ckpt.all_steps(), [2, 4])
    restored, step = ckpt.restore_latest(linear_setup()[0])
    ckpt.close()
    self.assertEqual(step, 4)
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(clean.state.params))

  @parameterized.parameters("truncated", "unfinished")
  def test_corrupt_latest_checkpoint_falls_back(self, damage):
    root = self.tmpdir()
    _, at4 = run_linear(root, 4)
    at4_params = jax.device_get(at4.state.params)
    run_linear(root, 6)
    latest = os.path.join(root, "ckpt", "6")
    if damage == "truncated":
      for dirpath, _, files in os.walk(latest):
        for f in files:
          open(os.path.join(dirpath, f), "w").close()
    else:  # a save cut short: orbax's temporary folder, never finalised
      shutil.move(latest, latest + ".orbax-checkpoint-tmp-1234")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      ckpt = jt.Checkpointer(os.path.join(root, "ckpt"), every=2)
      restored, step = ckpt.restore_latest(linear_setup()[0])
      ckpt.close()
    self.assertEqual(step, 4)
    chex.assert_trees_all_equal(jax.device_get(restored.params), at4_params)
    if damage == "truncated":
      self.assertIn("step 6", err.getvalue())
      self.assertIn("corrupt", err.getvalue())
      self.assertTrue(os.path.isdir(os.path.join(root, "ckpt", "corrupt", "6")))
    start, again = run_linear(root, 6)  # the restarted run redoes steps 5-6 and saves step 6 again
    self.assertEqual((start, again.step), (4, 6))
    self.assertIn(6, jt.Checkpointer(os.path.join(root, "ckpt"), every=2).all_steps())

  def test_metrics_tensorboard_and_plot_written(self):
    workdir = self.tmpdir()
    _, result = run_llama(workdir, 6, every=100, log_every=3, tensorboard=True, plot=True)
    # The same steps run by hand give the losses the records average.
    _, _, _, step = common.setup((1, 1, 1))
    state, losses = common.fresh_state(), []
    for i in range(6):
      state, m = step(state, common.batch_fn(i))
      losses.append(float(m["loss"]))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r["step"] for r in records], [3, 6])
    np.testing.assert_allclose([r["loss"] for r in records], [np.mean(losses[:3]), np.mean(losses[3:])], rtol=1e-6)
    for key in ("steps_per_sec", "tokens_per_sec", "grad_norm", "lr", "accuracy"):
      self.assertIn(key, records[-1])
    self.assertEqual(records, result.history)
    events = [f for f in os.listdir(os.path.join(workdir, "tb")) if f.startswith("events.out.tfevents")]
    self.assertLen(events, 1)
    self.assertGreater(os.path.getsize(os.path.join(workdir, "tb", events[0])), 100)
    with open(os.path.join(workdir, "loss.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
  absltest.main()
