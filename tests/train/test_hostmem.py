"""`jaxml.train.hostmem`: the relaunch environment, the relaunch itself, and its effect
(page faults of an XLA program with a large temporary buffer)."""
import os
import pathlib
import subprocess
import sys

import pytest

from jaxml.train import hostmem

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUPPORTED = (sys.platform.startswith("linux") and hostmem._glibc_supports_tunable()  # pylint: disable=protected-access
             and hostmem._thp_allowed())  # pylint: disable=protected-access


def test_env_adds_tunable():
  env = hostmem.huge_pages_env({"PATH": "/bin"}, supported=True)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.hugetlb=1:{hostmem.KEEP_TUNABLES}"}
  assert "glibc.malloc.mmap_max=0" in hostmem.KEEP_TUNABLES


def test_keep_freed_opt_out_sets_huge_pages_only():
  env = hostmem.huge_pages_env({"JAXML_KEEP_FREED": "0"}, supported=True)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_env_keeps_other_tunables():
  env = hostmem.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=8"}, supported=True)
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1:{hostmem.KEEP_TUNABLES}"


@pytest.mark.parametrize("environ", [
    {"JAXML_HUGE_PAGES": "0"},  # opted out
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # already relaunched: no loop
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice wins
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},  # likewise for any tunable the relaunch would set
])
def test_env_nothing_to_do(environ):
  assert hostmem.huge_pages_env(environ, supported=True) is None


def test_env_unsupported_system():
  assert hostmem.huge_pages_env({}, supported=False) is None


def _run(code: str, env: dict) -> str:
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return out.stdout


@pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages")
def test_relaunch_sets_tunable_and_keeps_arguments():
  code = ("import os, sys; from jaxml.train import hostmem; print('start', os.getpid(), flush=True); "
          "hostmem.relaunch_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], os.getpid())")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXML_HUGE_PAGES")}
  lines = _run(code, env).split("\n")
  # "start" twice: the process ran again from the top, with the same pid.
  (s1, pid1), (s2, pid2), (tunables, pid3) = (line.split() for line in lines[:3])
  assert s1 == s2 == "start" and pid1 == pid2 == pid3, lines
  assert tunables == f"glibc.malloc.hugetlb=1:{hostmem.KEEP_TUNABLES}"


_FAULTS = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) * jnp.cos(x @ x.T)))  # two [2048, 2048] temporaries
x = jnp.ones((2048, 2048), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages")
def test_huge_pages_cut_page_faults():
  """The reason for the module: with 4 KiB pages every call faults its temporaries in
  again (~16 MiB each here, 4,096 faults); with the tunable, a few 2 MiB faults."""
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  plain = float(_run(_FAULTS, base))
  huge = float(_run(_FAULTS, dict(base, GLIBC_TUNABLES=hostmem.TUNABLE)))
  assert plain > 4000, plain  # at least one 16 MiB temporary re-faulted per call
  assert huge < plain / 10, (plain, huge)


@pytest.mark.skipif(not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages")
def test_kept_memory_is_not_faulted_again():
  """With freed blocks kept in the heap (what the relaunch sets), repeated calls reuse the
  temporaries: no fresh mapping, almost no faults (measured ~6 per call against ~500 with
  huge pages alone and ~8,300 with neither)."""
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  huge = float(_run(_FAULTS, dict(base, GLIBC_TUNABLES=hostmem.TUNABLE)))
  kept = float(_run(_FAULTS, dict(base, GLIBC_TUNABLES=f"{hostmem.TUNABLE}:{hostmem.KEEP_TUNABLES}")))
  assert kept < 64, (huge, kept)  # 16 MiB temporaries re-faulted would be 8+ huge pages or 4,096 small ones
  assert kept < huge / 4, (huge, kept)
