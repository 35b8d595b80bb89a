"""CPU kernels XLA:CPU lacks, called through the XLA FFI (`jax.ffi`), each equal to a plain JAX form.

`top_k(x, k)` equals `jax.lax.top_k(canonical(x), k)` (NaN as -inf, -0.0 as +0.0; higher first, ties
by lower index) on every input. On the CPU backend it runs `top_k.cc`: a lower bound on each row's
k-th score from the maxima of 2k groups, one vectorised pass that keeps the few entries at or above
it, and a sort of those (the file explains the ties); elsewhere (GPU, TPU, or a machine where the
kernel cannot be built) it runs the plain form, so the result never depends on which ran. XLA:CPU's
own `top_k` costs a few microseconds per row however short the list (BUILD_NOTES.md, "Machine D").

`attention(q, k, v, key_mask=None)` is multi-head softmax attention on `[B, T, H, K]` queries and
`[B, S, H, K]` / `[B, S, H, V]` keys and values, equal to `attention_reference` (`jaxml.nn.attention_core`)
to float32 rounding. On the CPU backend, unmasked float32 heads whose K, V and S are multiples of 16
run `attention.cc` (built where the compiler targets AVX-512; `attention_available()`): forward and
backward each one fused pass per (example, head), shared among XLA's intra-op threads, with no
head-major copies of the operands. The Perceiver runs every attention through it.

Building. The first call in a process compiles each source (`top_k.cc`, `attention.cc`) with the system C++ compiler (`$CXX`, else
`c++`, `g++`) against the FFI headers jaxlib ships (`jax.ffi.include_dir()`), `-O3 -march=native`,
into `$JAXML_KERNEL_CACHE` (default `~/.cache/jaxml/kernels`; the temporary folder where that cannot
be created), keyed by the source, the flags, the jaxlib version, the compiler and this CPU's model
and flags, so a second process loads it at once (a compile takes a few seconds). Each process writes its own temporary file and renames it into
place, so processes compiling at once do not collide. If no compiler works, `available()` is False,
a warning says why once, and `top_k` runs the plain form.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
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

from jaxml import nn

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


def _build(compiler: str, flags: tuple[str, ...] = _FLAGS, source: pathlib.Path = _SOURCE) -> pathlib.Path:
  """The compiled library for this source, flags, jaxlib, compiler and CPU: from the cache, or built now."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256("\0".join([source.read_text(), " ".join(flags), jaxlib.__version__, version,
                                  _cpu_identity(), platform.machine()]).encode()).hexdigest()[:20]
  out = _cache_dir() / f"{source.stem}-{key}.so"
  if out.exists():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError:                                    # an unwritable home: this machine's temporary folder
    out = pathlib.Path(tempfile.gettempdir()) / f"jaxml-kernels-{os.getuid()}" / out.name
    if out.exists():
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{source.stem}-", suffix=".so")
  os.close(fd)
  try:
    cmd = [compiler, *flags, "-I", jax.ffi.include_dir(), str(source), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def _register(source: pathlib.Path, targets: dict[str, str], what: str, fallback: str, check=None) -> bool:
  """Builds `source`, registers its handler symbols `{target name: symbol}` for the CPU backend; False (with
  one warning saying why) where there is no CPU backend, no compiler, or the build or load fails, and
  False where `check(lib)` is false (a build without the vectorised paths a kernel needs)."""
  try:
    if not any(d.platform == "cpu" for d in jax.devices("cpu")):
      return False
  except RuntimeError:
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn(f"jaxml.cpu_kernels: no C++ compiler ($CXX, c++, g++) found; {what} runs {fallback}")
    return False
  try:
    lib = ctypes.CDLL(str(_build(compiler, source=source)))
    if check is not None and not check(lib):
      return False
    for name, symbol in targets.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, RuntimeError, subprocess.CalledProcessError, AttributeError) as e:
    warnings.warn(f"jaxml.cpu_kernels: the {what} kernel could not be built or loaded; {what} runs {fallback} ({e})")
    return False
  return True


@functools.cache
def available() -> bool:
  """Whether `top_k` runs the compiled kernel on the CPU backend (builds and registers it on first call)."""
  return _register(_SOURCE, {_TARGET: "JaxmlTopK"}, "top_k", "jax.lax.top_k")


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


# ----------------------------------------------------------------------------- attention

_ATTENTION_SOURCE = pathlib.Path(__file__).with_name("attention.cc")
_ATTENTION_TARGETS = ("jaxml_attention_forward", "jaxml_attention_backward", "jaxml_attention_inference")


@functools.cache
def attention_available() -> bool:
  """Whether `attention` runs the compiled kernels on the CPU backend (built and registered on first call).

  False where no compiler works or the compiler does not target AVX-512 (the kernels are written for it).
  """
  symbols = ("JaxmlAttentionForward", "JaxmlAttentionBackward", "JaxmlAttentionInference")
  return _register(_ATTENTION_SOURCE, dict(zip(_ATTENTION_TARGETS, symbols)), "attention",
                   "jaxml.nn.attention_core", check=lambda lib: lib.JaxmlAttentionVectorised())


def attention_reference(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxV: Array,
                        key_mask_BxS: Array | None = None) -> Array:
  """`attention`'s plain form on `jaxml.nn.attention_core` (hand-written backward), `[B, T, H, V]`."""
  K = q_BxTxHxK.shape[-1]
  q = jnp.swapaxes(q_BxTxHxK * jnp.asarray(1.0 / math.sqrt(K), q_BxTxHxK.dtype), 1, 2)  # [B, H, T, K]
  k = jnp.swapaxes(k_BxSxHxK, 1, 2)  # [B, H, S, K]
  mask = None if key_mask_BxS is None else key_mask_BxS[:, None, None, :]
  out = jnp.swapaxes(nn.attention_core(q, k, jnp.transpose(v_BxSxHxV, (0, 2, 3, 1)), mask), 1, 2)  # [B, T, H, V]
  if key_mask_BxS is not None:
    out = jnp.where(jnp.any(key_mask_BxS, axis=-1)[:, None, None, None], out, 0.0).astype(out.dtype)
  return out


_REFERENCE_ONLY = [False]


@contextlib.contextmanager
def reference_attention():
  """Within it, `attention` traces its plain form everywhere (for A/B timings, or XLA's FLOP counts, which
  do not see inside the kernels). Only tracing inside it counts: a jitted function already traced for the
  same shapes keeps the form it was traced with."""
  before, _REFERENCE_ONLY[0] = _REFERENCE_ONLY[0], True
  try:
    yield
  finally:
    _REFERENCE_ONLY[0] = before


def attention_kernel_takes(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, key_mask_BxS=None) -> bool:
  """Whether `attention` runs the compiled kernels for these operands (shapes and dtypes are static)."""
  if _REFERENCE_ONLY[0]:
    return False
  shapes = [jnp.shape(a) for a in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxV)]
  if key_mask_BxS is not None or any(len(s) != 4 for s in shapes):
    return False
  if any(jnp.result_type(a) != jnp.float32 for a in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxV)):
    return False
  (B, T, H, K), (_, S, _, _), (_, _, _, V) = shapes
  if min(B, T, H) < 1 or K % 16 or V % 16 or S % 16 or not K or not S or not V:
    return False
  return attention_available()


def attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxV: Array, key_mask_BxS: Array | None = None) -> Array:
  """Multi-head softmax attention `softmax(q k^T / sqrt(K)) v` per (example, head), `[B, T, H, V]`.

  Args:
    q_BxTxHxK: queries `[B, T, H, K]`.
    k_BxSxHxK: keys `[B, S, H, K]`.
    v_BxSxHxV: values `[B, S, H, V]`; their width may differ from the queries'.
    key_mask_BxS: optional bool `[B, S]`, True for real keys: masked keys get probability 0, and an
      example with no real key gets zero output.

  On the CPU backend, unmasked float32 operands with K, V and S multiples of 16 run `attention.cc`
  (forward and backward, each one fused pass per (example, head) on the intra-op threads; the
  probabilities are kept for the backward pass, as autodiff keeps them); everything else, and every
  other backend, runs `attention_reference` (`jaxml.nn.attention_core`). The two agree to float32
  rounding (`tests/test_cpu_kernels.py`). On two threads the kernels made the Perceiver masked-LM
  step 9% faster; on one thread it was unchanged (BUILD_NOTES.md).
  """
  if not attention_kernel_takes(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, key_mask_BxS):
    return attention_reference(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, key_mask_BxS)
  return jax.lax.platform_dependent(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, cpu=_fused_attention,
                                    default=attention_reference)


def _attention_forward(q, k, v):
  (B, T, H, _), S, V = q.shape, k.shape[1], v.shape[-1]
  out, probs = jax.ffi.ffi_call(_ATTENTION_TARGETS[0], (jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                                                        jax.ShapeDtypeStruct((B, H, T, S), jnp.float32)),
                                vmap_method="sequential")(q, k, v)
  return out, (q, k, v, probs, out)


@jax.custom_vjp
def _fused_attention(q, k, v):  # outside autodiff: no probabilities written
  (B, T, H, _), V = q.shape, v.shape[-1]
  return jax.ffi.ffi_call(_ATTENTION_TARGETS[2], jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                          vmap_method="sequential")(q, k, v)


def _attention_backward(res, dout):
  q, k, v, probs, out = res
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
  return tuple(jax.ffi.ffi_call(_ATTENTION_TARGETS[1], shapes, vmap_method="sequential")(
      q, k, v, probs, out, dout.astype(jnp.float32)))


_fused_attention.defvjp(_attention_forward, _attention_backward)
