"""CPU kernels XLA:CPU lacks, called through the XLA FFI (`jax.ffi`), each equal to a plain JAX form.

`top_k(x, k)` equals `jax.lax.top_k(canonical(x), k)` (NaN as -inf, -0.0 as +0.0; higher first, ties
by lower index) on every input. On the CPU backend it runs `top_k.cc`: a lower bound on each row's
k-th score from the maxima of 2k groups, one vectorised pass that keeps the few entries at or above
it, and a sort of those (the file explains the ties); elsewhere (GPU, TPU, or a machine where the
kernel cannot be built) it runs the plain form, so the result never depends on which ran. XLA:CPU's
own `top_k` costs a few microseconds per row however short the list (BUILD_NOTES.md, "Machine D").

Building. The first call in a process compiles `top_k.cc` with the system C++ compiler (`$CXX`, else
`c++`, `g++`) against the FFI headers jaxlib ships (`jax.ffi.include_dir()`), `-O3 -march=native`,
into `$JAXML_KERNEL_CACHE` (default `~/.cache/jaxml/kernels`; the temporary folder where that cannot
be created), keyed by the source, the flags, the jaxlib version, the compiler and this CPU's model
and flags, so a second process loads it at once (a compile takes a few seconds). Each process writes its own temporary file and renames it into
place, so processes compiling at once do not collide. If no compiler works, `available()` is False,
a warning says why once, and `top_k` runs the plain form.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

_SOURCE = pathlib.Path(__file__).with_name("top_k.cc")
_TARGET = "jaxml_top_k"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def canonical(x: Array) -> Array:
  """float32 `x` with NaN -> -inf and -0.0 -> +0.0: the scores `top_k` ranks."""
  s = jnp.asarray(x, jnp.float32)
  return jnp.where(jnp.isnan(s), -jnp.inf, jnp.where(s == 0, 0.0, s))


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_identity() -> str:
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("vendor_id", "cpu family", "model",
                                                                               "flags")]
  return "\n".join(sorted(set(keep)))


def _cache_dir() -> pathlib.Path:
  env = os.environ.get("JAXML_KERNEL_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jaxml" / "kernels"


def _build(compiler: str, flags: tuple[str, ...] = _FLAGS) -> pathlib.Path:
  """The compiled library for this source, flags, jaxlib, compiler and CPU: from the cache, or built now."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(flags), jaxlib.__version__, version,
                                  _cpu_identity(), platform.machine()]).encode()).hexdigest()[:20]
  out = _cache_dir() / f"top_k-{key}.so"
  if out.exists():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError:                                    # an unwritable home: this machine's temporary folder
    out = pathlib.Path(tempfile.gettempdir()) / f"jaxml-kernels-{os.getuid()}" / out.name
    if out.exists():
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".top_k-", suffix=".so")
  os.close(fd)
  try:
    cmd = [compiler, *flags, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@functools.cache
def available() -> bool:
  """Whether `top_k` runs the compiled kernel on the CPU backend (builds and registers it on first call)."""
  try:
    if not any(d.platform == "cpu" for d in jax.devices("cpu")):
      return False
  except RuntimeError:
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn("jaxml.cpu_kernels: no C++ compiler ($CXX, c++, g++) found; top_k runs jax.lax.top_k")
    return False
  try:
    lib = ctypes.CDLL(str(_build(compiler)))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JaxmlTopK), platform="cpu")
  except (OSError, RuntimeError, subprocess.CalledProcessError, AttributeError) as e:
    warnings.warn(f"jaxml.cpu_kernels: the top_k kernel could not be built or loaded; top_k runs "
                  f"jax.lax.top_k ({e})")
    return False
  return True


def _check_k(n: int, k) -> int:
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
    raise ValueError(f"k must be an integer in [1, {n}] (the last axis' length), got {k}")
  return int(k)


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """`jax.lax.top_k(canonical(x), k)`: the k best of every row of `x` [..., n], best first.

  Returns (float32 values [..., k] (canonical), int32 ids [..., k]). Runs under jit, vmap and grad-free
  transformations; the compiled kernel on the CPU backend when `available()`, the plain form otherwise.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0:
    raise ValueError("x must have at least one axis (the rows' items), got a scalar")
  k = _check_k(x.shape[-1], k)
  plain = lambda s: tuple(jax.lax.top_k(canonical(s), k))  # noqa: E731
  if not available():
    return plain(x)
  shape = x.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(_TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32)),
                          vmap_method="broadcast_all")
  return tuple(jax.lax.platform_dependent(x, cpu=lambda s: tuple(call(s)), default=plain))
