"""Reads a PyTorch `torch.save` file (.pt / .pth / .bin) as numpy arrays, without importing torch.

Since PyTorch 1.6, `torch.save` writes a zip archive: `<name>/data.pkl` pickles the object, and each
tensor storage is a raw little-endian entry `<name>/data/<key>`. In the pickle, a storage is a
persistent id ('storage', <torch.XStorage class>, key, device, numel), and a tensor is the call
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
(`_rebuild_parameter` wraps it for an nn.Parameter). Only these globals (and OrderedDict) are resolved:
anything else in the pickle is refused, so loading never runs code from the file. The pre-1.6 format
(a bare pickle, not a zip) is refused with a message saying how to re-save it.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# torch.<Name>Storage → element dtype (the on-disk bytes are little-endian: the archive's `byteorder`).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(STORAGE_DTYPES[name]).newbyteorder("<")


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
  """The tensor view of `storage` (a flat array) at element `offset` with element `stride`s, copied."""
  if not size:  # a 0-d tensor
    return np.array(storage[offset], dtype=storage.dtype.newbyteorder("="))
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, dtype=storage.dtype.newbyteorder("="))


def _rebuild_parameter(data, *_unused):
  return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(file)
    self.archive, self.prefix, self.source = archive, prefix, source

  def find_class(self, module: str, name: str):
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"{self.source}: the pickle references {module}.{name}, which a state dict "
                                 "of tensors does not need; refusing to load it")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self.source}: unsupported persistent id {pid!r}")
    storage_type, key = pid[1], pid[2]
    raw = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(raw, dtype=storage_type.dtype)


def load(path: str | os.PathLike) -> Any:
  """The object a `torch.save` zip file holds, with every tensor as a numpy array (bfloat16 as
  ml_dtypes.bfloat16). Raises ValueError naming the file when it is not such an archive."""
  path = Path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a PyTorch zip checkpoint (torch.save since PyTorch 1.6); re-save it with "
                     "a recent torch.save, or convert it to safetensors")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path} is a zip file but not a torch.save archive (no single <name>/data.pkl)")
    prefix = pickles[0].split("/")[0]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
      raise ValueError(f"{path}: big-endian torch archives are not supported")
    with archive.open(pickles[0]) as f:
      return _Unpickler(f, archive, prefix, str(path)).load()
