"""Shared test setup: 8 virtual CPU devices for sharding tests, LLVM level 1, float32 matmuls, a compilation cache."""
import atexit
import os
import shutil
import tempfile

# Must be set before jax initialises its backends. LLVM's optimisation level 1 instead of 3 for the
# machine code XLA:CPU emits: the suite is mostly compiling (its programs run a few steps each), and
# level 1 cut a run-heavy pair of test files from 67 to 47 s on 2 cores, the whole suite 14 min 11 s to
# 12 min 54 s on a Zen 5 machine. Only LLVM's passes change:
# the optimised HLO, its fusions and buffers, and the library dots (YNNPACK) are those of the default
# level, and no fast-math is enabled at any level; where LLVM contracts a multiply and an add into
# one FMA differently, a last bit may differ from a default-level run, which no test compares
# against. Benchmarks and experiments run at the default.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile a program another test compiled already (the same model, step or loss built again
# from its config, in this worker or the other): a persistent compilation cache, empty at the start of
# each run and shared by its processes, serves those from disk. Same executables, same results. The
# first process of a run (the xdist controller, or pytest itself without -n) creates the directory,
# hands it to the workers it starts through the environment, and removes it at exit.
_CACHE_ENV = "JAXML_TEST_COMPILE_CACHE"


def _atomic_put(self, key, value):
  """jax's cache `put`, but each entry is written under a private name and renamed into place, so a
  process reading an entry the other worker is writing sees all of it or none of it."""
  path = self.path / f"{key}{_lru._CACHE_SUFFIX}"  # pylint: disable=protected-access
  if path.exists():
    return
  tmp = self.path / f".{key}.{os.getpid()}.tmp"
  tmp.write_bytes(value)
  os.replace(tmp, path)


try:  # jax is pinned; if its cache class changes shape, each process keeps a private cache instead
  from jax._src import lru_cache as _lru  # noqa: E402
  _shared = isinstance(_lru._CACHE_SUFFIX, str) and callable(_lru.LRUCache.put)  # pylint: disable=protected-access
except (ImportError, AttributeError):
  _shared = False
if _shared:
  _lru.LRUCache.put = _atomic_put
if not _shared or _CACHE_ENV not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="jaxml-test-compile-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  if _shared:
    os.environ[_CACHE_ENV] = _cache_dir
else:
  _cache_dir = os.environ[_CACHE_ENV]
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
