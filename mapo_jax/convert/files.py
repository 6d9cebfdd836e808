"""Reading and writing PyTorch-layout weight files (safetensors) as diffusers/transformers lay them out.

A model folder holds `config.json` and either one `{stem}.safetensors` or shards listed in
`{stem}.safetensors.index.json`; the fp16 variant inserts `.fp16` (`{stem}.fp16.safetensors`,
`{stem}.safetensors.index.fp16.json` with shards `{stem}.fp16-0000k-of-0000n.safetensors`).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

DIFFUSERS_STEM = "diffusion_pytorch_model"
TRANSFORMERS_STEM = "model"


def _candidates(stem: str, variant: str | None) -> tuple[str, str]:
  if variant:
    return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"
  return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def find_weights(folder: str | os.PathLike, stem: str, variant: str | None = None) -> list[Path]:
  """The safetensors files of a model folder; without `variant`, falls back to the fp16 variant."""
  folder = Path(folder)
  for var in ([variant] if variant else [None, "fp16"]):
    single, index = _candidates(stem, var)
    if (folder / single).is_file():
      return [folder / single]
    if (folder / index).is_file():
      weight_map = json.loads((folder / index).read_text())["weight_map"]
      return [folder / name for name in sorted(set(weight_map.values()))]
  present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
  raise FileNotFoundError(f"no {stem!r} safetensors weights (variant={variant}) in {folder}; found: {present}")


class LazyTensor:
  """One tensor of an open safetensors file: its shape now, its data (or any block of it) when indexed.

  `tensor[index]` reads only that block from the memory-mapped file; `np.asarray(tensor)` reads it all.
  """

  def __init__(self, handle, key: str):
    self._handle, self.key = handle, key
    self.shape = tuple(handle.get_slice(key).get_shape())

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    return self._handle.get_slice(self.key)[index]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    value = self._handle.get_tensor(self.key)
    return value if dtype is None else value.astype(dtype)

  def __repr__(self) -> str:
    return f"LazyTensor({self.key!r}, shape={self.shape})"


@contextlib.contextmanager
def open_weights(folder: str | os.PathLike, stem: str,
                 variant: str | None = None) -> Iterator[dict[str, LazyTensor]]:
  """The tensors of a model folder as LazyTensors, readable while the context is open."""
  with contextlib.ExitStack() as files:
    tensors = {}
    for path in find_weights(folder, stem, variant):
      handle = files.enter_context(safe_open(path, framework="numpy"))
      tensors.update((key, LazyTensor(handle, key)) for key in handle.keys())
    yield tensors


def read_weights(folder: str | os.PathLike, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of a model folder as numpy arrays (bfloat16 as ml_dtypes.bfloat16)."""
  with open_weights(folder, stem, variant) as tensors:
    return {key: np.asarray(tensor) for key, tensor in tensors.items()}


def write_weights(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], stem: str,
                  max_shard_bytes: int = 10 * 2**30) -> None:
  """Writes tensors as one file, or as shards plus an index once they exceed `max_shard_bytes`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  shards, current, size = [], {}, 0
  for key, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = value
    size += value.nbytes
  shards.append(current)
  metadata = {"format": "pt"}  # torch loaders (diffusers, transformers) expect this tag
  if len(shards) == 1:
    save_file(shards[0], folder / f"{stem}.safetensors", metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, folder / name, metadata=metadata)
    weight_map.update({key: name for key in shard})
  total = sum(v.nbytes for v in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


EXPORT_DTYPES = ("fp32", "fp16", "bf16")  # weight dtypes export writes (config.export_dtype, --dtype)
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16,
                "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
