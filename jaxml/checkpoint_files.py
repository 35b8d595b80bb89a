"""Reading checkpoint folders without the frameworks that wrote them (shared by the converters).

  read_json(path)                 a JSON file, with errors that name it
  hf_weight_files(root)           a Hugging Face folder's weight files: model.safetensors, a sharded
                                  index, or pytorch_model*.bin
  read_hf_weights(files)          {name: numpy array} from those files (duplicates across shards raise)
  load_torch_state_dict(path)     a `torch.save`d state dict (zip format) read without torch
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np

PathLike = str | os.PathLike


def read_json(p: pathlib.Path) -> dict:
  if not p.exists():
    raise FileNotFoundError(f"{p.name} not found in {p.parent}")
  try:
    return json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p} is not valid JSON: {e}") from e


def hf_weight_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The weight files of a HF folder: safetensors (single or sharded), else pytorch_model*.bin."""
  for single, index_name in (("model.safetensors", "model.safetensors.index.json"),
                             ("pytorch_model.bin", "pytorch_model.bin.index.json")):
    index = root / index_name
    if index.exists():
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map")
      names = sorted(set(weight_map.values()))
      missing = [n for n in names if not (root / n).exists()]
      if missing:
        raise FileNotFoundError(f"{root}: shard(s) listed in {index.name} are missing: {missing}")
      return [root / n for n in names]
    if (root / single).exists():
      return [root / single]
  found = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".bin"))
  if found:
    raise FileNotFoundError(f"{root}: found {found} but neither model.safetensors, pytorch_model.bin nor an index")
  raise FileNotFoundError(f"{root}: no model.safetensors (or sharded index) found")


def read_hf_weights(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    if f.suffix == ".bin":
      part = load_torch_state_dict(f)
    else:
      try:
        part = load_file(str(f))
      except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt files
        raise ValueError(f"cannot read {f}: corrupted or not a safetensors file ({e})") from e
    dup = set(part) & set(tensors)
    if dup:
      raise ValueError(f"{f}: tensor(s) {sorted(dup)[:5]} also appear in another shard")
    tensors.update(part)
  return tensors


# ----------------------------------------------------------------------------- torch .pth without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
  """Stands in for `torch.FloatStorage` etc. inside the pickle: carries the numpy dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
  """numpy version of `torch._utils._rebuild_tensor_v2`: a strided view of the storage, copied."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if offset < 0 or last >= storage.size:
    raise ValueError(f"tensor (offset {offset}, size {size}, stride {stride}) overruns its storage of "
                     f"{storage.size} elements")
  contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
  if all(st == c for n, st, c in zip(size, stride, contiguous) if n > 1):  # plain C order: no copy
    return storage[offset:offset + int(np.prod(size))].reshape(size)
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_unused):
  """`torch._utils._rebuild_tensor_v3`: as v2, with the dtype given explicitly (untyped storage)."""
  if storage.dtype != np.dtype(dtype):
    storage = storage.view(np.uint8).view(dtype)
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *_unused):
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into numpy arrays, admitting only known globals."""

  def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
    super().__init__(fh)
    self._archive, self._prefix, self._source = archive, prefix, source
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      import collections
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_tensor_v3":
      return _rebuild_tensor_v3
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if module == "torch" and name == "UntypedStorage":
      return _StorageType(np.uint8)
    raise pickle.UnpicklingError(f"{self._source}: refusing to unpickle global {module}.{name} "
                                 "(only tensors and dicts are read)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._source}: unknown storage type {storage_type!r}")
    key = str(key)
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError as e:
        raise ValueError(f"{self._source}: storage {name} missing from the archive (partial file?)") from e
      dt = storage_type.dtype
      if len(raw) % dt.itemsize:
        raise ValueError(f"{self._source}: storage {name} has {len(raw)} bytes, not a multiple of {dt.itemsize}")
      arr = np.frombuffer(raw, dtype=dt)
      if self._byteorder != sys.byteorder:
        arr = arr.byteswap()
      self._storages[key] = arr
    arr = self._storages[key]
    if storage_type.dtype != np.uint8 and arr.size != int(numel):
      raise ValueError(f"{self._source}: storage {key} holds {arr.size} elements, the pickle expects {numel}")
    return arr


def load_torch_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip format) into numpy arrays, without torch.

  bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays. Raises ValueError
  for a file that is not a torch zip checkpoint (legacy pre-1.6 pickles
  included) or that is truncated.
  """
  p = pathlib.Path(path)
  try:
    archive = zipfile.ZipFile(p)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"cannot read {p}: not a torch zip checkpoint or corrupted ({e})") from e
  with archive:
    pkls = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"cannot read {p}: expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    names = set(archive.namelist())
    byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    try:
      with archive.open(pkls[0]) as fh:
        obj = _TorchUnpickler(fh, archive, prefix, byteorder, str(p)).load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
      raise ValueError(f"cannot read {p}: corrupted checkpoint ({e})") from e
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f"{p}: expected a flat state dict of tensors")
  return dict(obj)
