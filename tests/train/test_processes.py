"""Runs in separate processes: SIGTERM (preemption) and a 2-process multi-host run on localhost."""
import json
import os
import signal
import socket
import subprocess
import sys
import shutil
import tempfile
import time

import chex
import numpy as np
from absl.testing import absltest

from jaxml import train as jt
from tests.train import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 300


def worker_cmd(workdir, steps, *extra):
  return [sys.executable, "-m", "tests.train.worker", f"--workdir={workdir}", f"--steps={steps}", *extra]


def worker_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ProcessTest(chex.TestCase):

  def tmpdir(self) -> str:
    path = tempfile.mkdtemp(prefix="jaxml_proc_")
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_sigterm_saves_and_resume_continues(self):
    workdir = self.tmpdir()
    proc = subprocess.Popen(worker_cmd(workdir, 1_000_000, "--log_every=20"), cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + TIMEOUT
    try:
      for line in proc.stdout:  # wait until training is running
        lines.append(line)
        if line.startswith("step 20/"):
          break
        self.assertLess(time.time(), deadline, "worker did not start training in time:\n" + "".join(lines))
      proc.send_signal(signal.SIGTERM)
      rest, _ = proc.communicate(timeout=TIMEOUT)
    finally:
      if proc.poll() is None:
        proc.kill()
    out = "".join(lines) + rest
    self.assertEqual(proc.returncode, 0, out[-3000:])
    with open(os.path.join(workdir, "result.json")) as f:
      first = json.load(f)
    self.assertTrue(first["preempted"])
    self.assertIn(f"SIGTERM: saved a checkpoint at step {first['step']}", out)
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), every=1000)
    self.assertEqual(ckpt.latest_step(), first["step"])
    ckpt.close()

    target = first["step"] + 3
    done = subprocess.run(worker_cmd(workdir, target), cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    self.assertEqual(done.returncode, 0, done.stdout[-2000:] + done.stderr[-3000:])
    with open(os.path.join(workdir, "result.json")) as f:
      second = json.load(f)
    self.assertEqual((second["start"], second["step"], second["preempted"]), (first["step"], target, False))
    self.assertEqual(sorted(int(s) for s in second["losses"]), [first["step"] + 1, first["step"] + 2, target])

  def test_two_processes_match_one(self):
    workdir, steps = self.tmpdir(), 4
    port = free_port()
    procs = [subprocess.Popen(worker_cmd(workdir, steps, "--devices=2", "--mesh=2,2,1", "--checkpoint_every=2",
                                         f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                         f"--process_id={i}"),
                              cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
      for p in procs:
        outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for p, out in zip(procs, outs):
      self.assertEqual(p.returncode, 0, out[-3000:])
    with open(os.path.join(workdir, "result.json")) as f:
      multi = json.load(f)
    self.assertEqual(multi["step"], steps)

    # The same steps in this single process, on one device.
    _, _, _, step = common.setup((1, 1, 1))
    state, single = common.fresh_state(), []
    for i in range(steps):
      state, m = step(state, common.batch_fn(i))
      single.append(float(m["loss"]))
    multi_losses = [multi["losses"][str(i + 1)] for i in range(steps)]
    np.testing.assert_allclose(multi_losses, single, rtol=1e-5, atol=1e-6)
    self.assertLess(single[-1], single[0])


if __name__ == "__main__":
  absltest.main()
