"""The training core every family uses: keys per step, several steps per call, EMA,
extras, and the promises that nothing is lost and nothing is silently wrong."""
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from jaxml import train as jt


def noisy_loss(params, batch, rng):
  """A linear regression whose targets get noise from the step's key; reports the draw."""
  noise = jax.random.normal(rng, batch["y"].shape) * 0.1
  err = batch["x"] @ params["w"] - (batch["y"] + noise)
  return jnp.mean(err ** 2) * batch["scale"], {"draw": noise[0, 0]}


def batch_fn(step, scale_at=None, scale=1.0):
  rng = np.random.default_rng([11, step])
  x = rng.normal(size=(4, 3)).astype(np.float32)
  s = np.float32(scale if scale_at is not None and step == scale_at else 1.0)
  return {"x": x, "y": x @ np.ones((3, 2), np.float32), "scale": s}


def init_fn(rng):
  return {"w": jax.random.normal(rng, (3, 2))}


@functools.lru_cache(maxsize=None)
def sgd_setup(lr=0.05, steps_per_call=1, ema_decay=None):
  tx = optax.sgd(lr)
  ema = ema_decay is not None
  abstract, shardings = jt.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), ema=ema,
                                                extras_fn=lambda r, p: {"count": jnp.zeros((), jnp.int32)})
  step = jax.jit(jt.make_train_step(noisy_loss, tx, ema_decay=ema_decay, steps_per_call=steps_per_call),
                 donate_argnums=0)
  init = lambda: jt.init_train_state(init_fn, tx, jax.random.PRNGKey(0), ema=ema,  # noqa: E731
                                     extras_fn=lambda r, p: {"count": jnp.zeros((), jnp.int32)})[0]
  return abstract, step, init


def run(workdir, num_steps, *, every=1, keep=3, scale_at=None, scale=1.0, steps_per_call=1, lr=0.05,
        allow_fresh_start=False, log_every=1):
  abstract, step, init = sgd_setup(lr, steps_per_call)
  ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=every, keep=keep, async_save=False)
  try:
    state, start = jt.restore_or_init(ckpt, abstract, init, allow_fresh_start=allow_fresh_start)
    result = jt.train(step, state, functools.partial(batch_fn, scale_at=scale_at, scale=scale), num_steps=num_steps,
                      workdir=workdir, start_step=start, steps_per_call=steps_per_call, checkpointer=ckpt,
                      log_every=log_every, tensorboard=False, plot=False, print_fn=lambda s: None)
  finally:
    ckpt.close()
  return start, result


def listing(path):
  out = []
  for dirpath, dirs, files in os.walk(path):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out.append((os.path.relpath(p, path), fh.read()))
  return out


class CoreTest(chex.TestCase):

  def tmpdir(self):
    path = tempfile.mkdtemp(prefix="jaxml_core_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_step_key_differs_per_step_and_runs_repeat_bitwise(self):
    _, a = run(self.tmpdir(), 4)
    _, b = run(self.tmpdir(), 4)
    chex.assert_trees_all_equal(jax.device_get(a.state), jax.device_get(b.state))
    draws = [r["draw"] for r in a.history]
    self.assertLen(set(draws), 4)   # a fresh draw at every step
    self.assertEqual(draws, [r["draw"] for r in b.history])
    # The key of step t is fold_in(rng, t): recompute the first draw by hand.
    state = sgd_setup()[2]()
    key = jax.random.fold_in(state.rng, 0)
    expected = float(jax.random.normal(key, (4, 2))[0, 0] * 0.1)
    self.assertAlmostEqual(draws[0], expected, places=6)

  def test_steps_per_call_equals_single_steps(self):
    _, one = run(self.tmpdir(), 6, every=3)
    _, three = run(self.tmpdir(), 6, every=3, steps_per_call=3)
    chex.assert_trees_all_close(jax.device_get(three.state.params), jax.device_get(one.state.params), rtol=1e-6)
    self.assertEqual(int(three.state.step), 6)
    # log_every=1 rounds up to one record per call: the mean of its three steps.
    losses = np.asarray([r["loss"] for r in one.history]).reshape(2, 3).mean(1)
    np.testing.assert_allclose([r["loss"] for r in three.history], losses, rtol=1e-5)
    self.assertEqual([r["step"] for r in three.history], [3, 6])

  def test_ema_equals_closed_form(self):
    decay = 0.9
    _, step, init = sgd_setup(0.05, 1, decay)
    state = init()
    params_seen = []
    for t in range(5):
      state, _ = step(state, batch_fn(t))
      params_seen.append(np.asarray(state.params["w"]))
    # ema_T = d^T w_0 + sum_t (1 - d) d^(T-t) w_t, with w_0 the initial parameters.
    w0 = np.asarray(init().params["w"])
    expected = decay ** 5 * w0 + sum((1 - decay) * decay ** (5 - t) * w for t, w in enumerate(params_seen, 1))
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), expected, rtol=1e-5)
    d = jt.ema_decay_at(0.999, jnp.asarray(0), True)
    self.assertAlmostEqual(float(d), 0.1, places=6)   # the warm-up starts at (1 + 0) / (10 + 0)

  def test_extras_and_ema_survive_a_checkpoint_round_trip(self):
    workdir = self.tmpdir()
    abstract, step, init = sgd_setup(0.05, 1, 0.9)
    state = init()
    state, _ = step(state, batch_fn(0))
    state = state._replace(extras={"count": jnp.asarray(7, jnp.int32)})
    ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=1, async_save=False)
    ckpt.save(1, state)
    ckpt.wait()
    restored, at = ckpt.restore_latest(abstract)
    ckpt.close()
    self.assertEqual(at, 1)
    self.assertEqual(int(restored.extras["count"]), 7)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))

  # --- nothing lost, nothing silently wrong ---

  def test_last_good_checkpoint_is_a_state_whose_next_step_was_finite(self):
    # Update 3 sees a 1e30-scaled loss: finite (~1e30), but its gradient norm overflows.
    # States from step 2 on are not known good: checkpoint 2 is set aside (not deleted).
    workdir = self.tmpdir()
    with self.assertRaises(jt.NonFiniteLossError) as cm:
      run(workdir, 8, scale_at=2, scale=1e30)
    self.assertEqual(cm.exception.step, 3)
    self.assertEqual(cm.exception.last_good_step, 1)
    self.assertIn("grad_norm is inf at step 3", str(cm.exception))
    self.assertIn("last good one (step 1", str(cm.exception))
    ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=1)
    self.assertEqual(ckpt.all_steps(), [1])
    ckpt.close()
    self.assertEqual(os.listdir(os.path.join(workdir, "ckpt", "nonfinite")), ["2"])
    # A rerun with sane data resumes from step 1 and finishes with finite parameters.
    start, again = run(workdir, 8)
    self.assertEqual((start, again.step), (1, 8))
    self.assertTrue(np.all(np.isfinite(np.asarray(again.state.params["w"]))))

  def test_keep_one_never_prunes_the_last_good_checkpoint(self):
    # With keep=1, saving an unconfirmed state must not delete the confirmed one before it.
    workdir = self.tmpdir()
    with self.assertRaises(jt.NonFiniteLossError) as cm:
      run(workdir, 8, keep=1, scale_at=2, scale=1e30)
    self.assertEqual(cm.exception.last_good_step, 1)
    ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=1)
    self.assertEqual(ckpt.all_steps(), [1])
    ckpt.close()
    _, done = run(workdir, 6, keep=1)         # a clean run keeps only its newest checkpoint
    ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=1)
    self.assertEqual(ckpt.all_steps(), [1, 6])   # step 1 came from the earlier run: never deleted
    ckpt.close()
    self.assertEqual(done.step, 6)

  def test_no_good_checkpoint_left_when_the_first_update_poisons(self):
    workdir = self.tmpdir()
    with self.assertRaisesRegex(jt.NonFiniteLossError, "no good checkpoint remains"):
      run(workdir, 5, scale_at=0, scale=1e30)
    start, again = run(workdir, 5)
    self.assertEqual((start, again.step), (0, 5))

  def test_changed_shapes_raise_naming_the_leaf_and_touch_nothing(self):
    workdir = self.tmpdir()
    run(workdir, 3)
    before = listing(workdir)
    tx = optax.sgd(0.05)
    wide, _ = jt.abstract_train_state(lambda r: {"w": jax.random.normal(r, (3, 4))}, tx, jax.random.PRNGKey(0),
                                      extras_fn=lambda r, p: {"count": jnp.zeros((), jnp.int32)})
    ckpt = jt.Checkpointer(os.path.join(workdir, "ckpt"), every=1)
    with self.assertRaisesRegex(jt.CheckpointMismatchError, r"params/w: stored float32\[3, 2\], expected float32\[3, 4\]"):
      jt.restore_or_init(ckpt, wide, lambda: None)
    ckpt.close()
    self.assertEqual(listing(workdir), before)

  def test_changed_run_config_raises_naming_fields(self):
    workdir = self.tmpdir()
    jt.check_run_config(workdir, {"n_layers": 2, "dim": 32, "mults": (1, 2)})
    jt.check_run_config(workdir, {"n_layers": 2, "dim": 32, "mults": [1, 2]})  # lists == tuples
    before = listing(workdir)
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"dim: recorded 32, now 64.*n_layers: recorded 2, now 3"):
      jt.check_run_config(workdir, {"n_layers": 3, "dim": 64, "mults": (1, 2)})
    self.assertEqual(listing(workdir), before)

  def test_fields_added_at_their_defaults_resume(self):
    # A run recorded before `loss_chunk` existed resumes when it is at its default, and raises otherwise.
    workdir = self.tmpdir()
    jt.check_run_config(workdir, {"dim": 32, "sub": {"a": 1}})
    defaults = {"dim": 16, "loss_chunk": 0, "sub": {"a": 0, "b": "x"}}
    jt.check_run_config(workdir, {"dim": 32, "loss_chunk": 0, "sub": {"a": 1, "b": "x"}}, defaults=defaults)
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"loss_chunk \(new: 512\)"):
      jt.check_run_config(workdir, {"dim": 32, "loss_chunk": 512, "sub": {"a": 1, "b": "x"}}, defaults=defaults)
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"loss_chunk \(new: 0\)"):
      jt.check_run_config(workdir, {"dim": 32, "loss_chunk": 0, "sub": {"a": 1}})  # no defaults given

  def test_fit_resumes_to_the_uninterrupted_result_and_checks_its_record(self):
    # fit's recipe (checkpoints, record, restore, the built step, the loop): 4 updates, then 4 more from the
    # workdir's checkpoint, equal 8 in one go bitwise; without a workdir nothing is left on disk.
    tx = optax.sgd(0.05)
    rng = jax.random.PRNGKey(0)
    go = lambda workdir, n: jt.fit(noisy_loss, init_fn, tx, rng, num_steps=n, batch_fn=batch_fn,  # noqa: E731
                                   workdir=workdir, record={"lr": 0.05}, checkpoint_every=2, steps_per_call=2,
                                   ema_decay=0.9, print_fn=lambda s: None)
    whole, parts = self.tmpdir(), self.tmpdir()
    one = go(whole, 8).state
    self.assertEqual(int(go(parts, 4).state.step), 4)
    resumed = go(parts, 8).state
    chex.assert_trees_all_equal((one.params, one.ema_params), (resumed.params, resumed.ema_params))
    self.assertEqual(int(resumed.step), 8)
    with self.assertRaisesRegex(jt.ConfigMismatchError, r"lr: recorded 0.05, now 0.1"):
      jt.fit(noisy_loss, init_fn, tx, rng, num_steps=8, batch_fn=batch_fn, workdir=parts, record={"lr": 0.1})
    before = set(os.listdir(tempfile.gettempdir()))
    plain = jt.fit(noisy_loss, init_fn, tx, rng, num_steps=8, batch_fn=batch_fn, steps_per_call=2, ema_decay=0.9,
                   print_fn=lambda s: None).state
    chex.assert_trees_all_equal(plain.params, one.params)
    self.assertEqual({n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("jaxml_fit_")}, set())
    with self.assertRaisesRegex(ValueError, "exactly one of loss_fn and step"):
      jt.fit(None, init_fn, tx, rng, num_steps=2)

  def test_set_aside_folders_never_overwrite(self):
    workdir = self.tmpdir()
    for _ in range(2):
      run(workdir, 4)
      latest = os.path.join(workdir, "ckpt", "4")
      for dirpath, _, files in os.walk(latest):
        for f in files:
          open(os.path.join(dirpath, f), "w").close()
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        start, _ = run(workdir, 3)   # falls back to step 3, sets 4 aside; nothing left to do
      self.assertEqual(start, 3)
      lines = [l for l in err.getvalue().splitlines() if "step 4" in l]
      self.assertLen(lines, 1)                      # one line per set-aside step
      self.assertLess(len(err.getvalue()), 800)     # no storage spec, no tracebacks
      self.assertNotIn("Event loop is closed", err.getvalue())
      shutil.rmtree(os.path.join(workdir, "ckpt", "3"))
      shutil.rmtree(os.path.join(workdir, "ckpt", "2"))
    aside = sorted(os.listdir(os.path.join(workdir, "ckpt", "corrupt")))
    self.assertLen(aside, 2)
    self.assertEqual(aside[0], "4")
    self.assertTrue(aside[1].startswith("4-"))

  def test_unrestorable_checkpoints_refuse_a_silent_fresh_start(self):
    workdir = self.tmpdir()
    run(workdir, 2)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      history = f.read()
    for dirpath, _, files in os.walk(os.path.join(workdir, "ckpt")):
      for f in files:
        if "ckpt" in dirpath and f != "run_config.json":
          open(os.path.join(dirpath, f), "w").close()
    before = listing(workdir)
    with self.assertRaisesRegex(jt.NoUsableCheckpointError, "none of the checkpoints"):
      run(workdir, 4)
    self.assertEqual(listing(workdir), before)
    start, result = run(workdir, 4, allow_fresh_start=True)
    self.assertEqual((start, result.step), (0, 4))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      text = f.read()
    self.assertTrue(text.startswith(history))                      # nothing truncated
    raw = jt.read_metrics(workdir, raw=True)
    self.assertIn({"event": "restart", "step": 0}, [{k: r[k] for k in ("event", "step")} for r in raw if "event" in r])
    self.assertEqual([r["step"] for r in jt.read_metrics(workdir)], [1, 2, 3, 4])
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "ckpt", "corrupt"))), ["1", "2"])

  def test_resume_carries_elapsed_time_and_starts_the_window_there(self):
    workdir, full_dir = self.tmpdir(), self.tmpdir()
    _, full = run(full_dir, 6, log_every=2)
    run(workdir, 3, log_every=2)                  # logs 2 and 3 (the end), checkpoint at 3
    _, resumed = run(workdir, 6, log_every=2)
    records = jt.read_metrics(workdir)
    self.assertEqual([r["step"] for r in records], [2, 3, 4, 6])
    at3, at4 = records[1], records[2]
    self.assertGreater(at4["elapsed_sec"], at3["elapsed_sec"])
    # The first window after the resume holds step 4 only: its loss is step 4's loss.
    single = self.tmpdir()
    _, each = run(single, 6, log_every=1)
    np.testing.assert_allclose(at4["loss"], each.history[3]["loss"], rtol=1e-6)
    chex.assert_trees_all_equal(jax.device_get(resumed.state.params), jax.device_get(full.state.params))

  def test_preempted_entrypoint_exits_143(self):
    script = textwrap.dedent("""
        import sys
        from jaxml import experiment
        def run(config, workdir):
          print("ran", config.mode, workdir)
          return {"preempted": config.mode == "train"}
        experiment.launch(run, config="llama_lm", argv=sys.argv)
    """)
    env = dict(os.environ, JAXML_HUGE_PAGES="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for mode, code in (("train", 143), ("generate", 0)):
      proc = subprocess.run([sys.executable, "-c", script, "--workdir=/nonexistent", f"--mode={mode}"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
      self.assertEqual(proc.returncode, code, proc.stderr[-2000:])
      self.assertIn(f"ran {mode} /nonexistent", proc.stdout)


if __name__ == "__main__":
  absltest.main()
