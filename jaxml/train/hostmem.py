"""Host memory on CPU: transparent huge pages for XLA's large buffers.

XLA:CPU allocates an executable's temporary buffer (about 400 MB for a CTR
training step at batch 4096) with `malloc` on every call. glibc serves blocks
that large with a fresh `mmap` and returns them with `munmap`, so every call
touches the whole buffer again through 4 KiB page faults: ~99,000 faults per
DHEN step, 15% of its time on a 2-core machine (the small Llama training step
of `benchmarks/llama_bench.py` gained 13% tokens/s). glibc >= 2.35 has a tunable,
`glibc.malloc.hugetlb=1`, that makes malloc advise transparent huge pages
(2 MiB) for such blocks: ~600 faults per DHEN step (`tests/train/test_hostmem.py`
counts them for a smaller program). The tunable is read only
when a process starts, so an entrypoint calls `relaunch_with_huge_pages()`
first: it re-executes the same command line with the tunable set (a no-op when
it is already set, on other systems, or when `JAXML_HUGE_PAGES=0`).

The kernel must allow transparent huge pages (`enabled` = `always` or
`madvise` in /sys/kernel/mm/transparent_hugepage/); with `never` nothing is
done. Accelerator runs are unaffected either way (the setting only concerns
host `malloc`).
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXML_HUGE_PAGES"  # "0" disables the relaunch
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_supports_tunable() -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return False
  major, minor = (int(v) for v in version.split(".")[:2])
  return (major, minor) >= (2, 35)


def _thp_allowed(path: str = THP_ENABLED) -> bool:
  try:
    with open(path, encoding="ascii") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def huge_pages_env(environ: Mapping[str, str], *, supported: bool | None = None) -> dict[str, str] | None:
  """The environment to relaunch with, or None when there is nothing to do.

  `supported` overrides the system check (glibc >= 2.35 on Linux with
  transparent huge pages allowed); tests pass it to exercise the logic alone.
  """
  if environ.get(OPT_OUT, "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:  # already set (by us or by the user): keep theirs
    return None
  if supported is None:
    supported = sys.platform.startswith("linux") and _glibc_supports_tunable() and _thp_allowed()
  if not supported:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  return env


def relaunch_with_huge_pages() -> None:
  """Re-executes this process's command line with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

  Call it first thing in an entrypoint (`if __name__ == "__main__":`), before
  any work whose output would be lost: the process image is replaced (same pid,
  same arguments, same interpreter). Returns without doing anything when
  `huge_pages_env` says there is nothing to do.
  """
  env = huge_pages_env(os.environ)
  if env is None:
    return
  print(f"[jaxml] relaunching with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for large host "
        f"buffers; {OPT_OUT}=0 turns this off)", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
