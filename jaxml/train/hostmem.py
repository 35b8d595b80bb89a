"""Host memory on CPU: XLA's large per-call buffers, kept between calls.

XLA:CPU allocates an executable's temporary buffer (about 400 MB for a CTR
training step at batch 4096, 566 MB for the 24.6M Llama benchmark step) with
`malloc` on every call. glibc serves blocks that large with a fresh `mmap` and
returns them with `munmap`, so every call touches the whole buffer again
through page faults: ~99,000 faults per DHEN step with 4 KiB pages, 15% of its
time on a 2-core machine. Two sets of glibc tunables (glibc >= 2.35) fix it:

* `glibc.malloc.hugetlb=1`: malloc advises transparent huge pages (2 MiB),
  ~600 faults per DHEN step instead of ~99,000. But each call still maps and
  zeroes its buffer afresh, and on some virtual machines the kernel's side of
  that costs far more than the zeroing: on one 2-core VM a one-thread 24.6M
  Llama step spent 47-67 ms of system time in some steps and 840-1,060 ms in
  others (BUILD_NOTES, "Host memory").
* keeping freed memory (`KEEP_TUNABLES`): `arena_max=1` (every thread
  allocates from the main heap, so a block freed by one thread serves the next
  call on another), `mmap_max=0` (large blocks come from that heap, not from
  fresh mappings) and a trim threshold of 1 TiB (a freed block at the top of
  the heap is not handed back). After the first calls no page is faulted again:
  0 faults and ~0 system time per step; that step went from 2.0-2.4 s to
  1.66 s on one thread. The price: the process keeps its peak heap (that step's
  resident memory 0.85 -> 1.3 GB) until it exits.

The tunables are read only when a process starts, so an entrypoint calls
`relaunch_with_huge_pages()` first: it re-executes the same command line with
them set (a no-op when they are already set, on other systems, or when
`JAXML_HUGE_PAGES=0`); `JAXML_KEEP_FREED=0` sets only the huge-page tunable.

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
# Freed blocks stay in the process: one heap, no per-block mappings, no trimming (see the module docstring).
KEEP_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
OPT_OUT = "JAXML_HUGE_PAGES"  # "0" disables the relaunch
KEEP_OPT_OUT = "JAXML_KEEP_FREED"  # "0": huge pages only, freed memory returned as glibc does by default
# A GLIBC_TUNABLES naming any of these is the user's (or an earlier relaunch's) choice: left alone.
_OURS = ("glibc.malloc.hugetlb", "glibc.malloc.arena_max", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")
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
  if any(name in tunables for name in _OURS):  # already set (by us or by the user): keep theirs
    return None
  if supported is None:
    supported = sys.platform.startswith("linux") and _glibc_supports_tunable() and _thp_allowed()
  if not supported:
    return None
  ours = TUNABLE if environ.get(KEEP_OPT_OUT, "1") == "0" else f"{TUNABLE}:{KEEP_TUNABLES}"
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{ours}" if tunables else ours
  return env


def relaunch_with_huge_pages() -> None:
  """Re-executes this process's command line with the tunables of `huge_pages_env` set.

  Call it first thing in an entrypoint (`if __name__ == "__main__":`), before
  any work whose output would be lost: the process image is replaced (same pid,
  same arguments, same interpreter). Returns without doing anything when
  `huge_pages_env` says there is nothing to do.
  """
  env = huge_pages_env(os.environ)
  if env is None:
    return
  print(f"[jaxml] relaunching with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for large host "
        f"buffers, freed memory kept for the next call; {OPT_OUT}=0 turns this off, {KEEP_OPT_OUT}=0 keeps "
        "only the huge pages)", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
