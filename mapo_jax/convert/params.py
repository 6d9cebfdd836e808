"""Our NNX parameters ⇄ PyTorch state dicts (diffusers and transformers naming).

Module attribute names mirror the PyTorch module names, so a parameter's key is its NNX path joined
with dots, with the leaf renamed and the layout transposed:
  kernel (kh, kw, in, out)  ⇄  weight (out, in, kh, kw)     convolutions
  kernel (in, out)          ⇄  weight (out, in)             linear layers
  scale, embedding          ⇄  weight                       norms, embeddings
Loading checks every key: all missing, unexpected and mis-shaped keys are reported in one error.
With target shardings, each device's block of a parameter is read, transposed and cast on the host
alone (weights born sharded: no device ever holds a whole sharded parameter).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class CheckpointMismatchError(ValueError):
  """A checkpoint whose keys or shapes do not match the model built from its config."""


def torch_key(path: tuple) -> str:
  *modules, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_TORCH:
    raise KeyError(f"parameter {'.'.join(map(str, path))} has no PyTorch name rule")
  return ".".join([*modules, _LEAF_TO_TORCH[leaf]])


def _layout(leaf: str, ndim: int) -> tuple[int, ...]:
  """The axis permutation from a PyTorch tensor to our parameter (`from_torch_layout`)."""
  if leaf == "kernel" and ndim == 4:
    return (2, 3, 1, 0)  # (out, in, kh, kw) → (kh, kw, in, out)
  if leaf == "kernel" and ndim == 2:
    return (1, 0)  # (out, in) → (in, out)
  return tuple(range(ndim))


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  return value.transpose(np.argsort(_layout(leaf, value.ndim)))


def from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  return value.transpose(_layout(leaf, value.ndim))


def _params(model: nnx.Module) -> dict[tuple, nnx.Param]:
  return {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}


def _host_block(tensor, key: str, leaf: str, want: tuple, dtype, fix, index: tuple | None = None) -> np.ndarray:
  """Parameter `key` (or its `index` block) in our layout and dtype, as a contiguous host array.

  Without `fix` only the block is read: `index` is mapped through the layout permutation onto the
  checkpoint tensor (a LazyTensor reads just those bytes). A layout fix needs the whole tensor.
  """
  perm = _layout(leaf, len(want))
  if fix is not None:
    value = from_torch_layout(leaf, fix(key, np.asarray(tensor), want))
    value = value if index is None else value[index]
  else:
    index = (slice(None),) * len(want) if index is None else tuple(index)
    torch_index = [None] * len(perm)
    for axis, block in zip(perm, index):
      torch_index[axis] = block
    value = np.asarray(tensor[tuple(torch_index)]).transpose(perm)
  # Cast on the host, so a float32 checkpoint of bfloat16 parameters never reaches a device as float32.
  return np.ascontiguousarray(value, dtype=dtype)


def _subtree(tree, path: tuple):
  for part in path:
    tree = tree[part]
  return tree


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, source: str,
                    ignore: Iterable[str] = (),
                    fix: Callable[[str, np.ndarray, tuple], np.ndarray] | None = None,
                    shardings: Any = None) -> None:
  """Assigns a PyTorch state dict to `model`'s parameters in place (cast to their dtype).

  `state_dict` values are numpy arrays or LazyTensors (files.open_weights); each tensor is read, laid
  out and cast on the host when its parameter is created, so the host holds one tensor at a time.
  `ignore` holds regexes of checkpoint keys that carry no parameters (e.g. position_ids buffers);
  `fix(key, value, expected_torch_shape)` may reshape legacy layouts before the shape check.

  `shardings`: None places each parameter whole on the default device. Otherwise a pure-dict tree
  of `jax.sharding.Sharding`s matching `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, or a callable
  from `model` (it may be abstract) to that tree: each parameter is then made with
  `jax.make_array_from_callback`, so a device receives only its own block, and only the blocks of
  this process's devices are read. Every key and shape is checked before any parameter is placed,
  and before any tensor data is read unless `fix` needs it (such tensors are then read twice).
  """
  ignore = [re.compile(p) for p in ignore]
  params = _params(model)
  expected = {torch_key(path): path for path in params}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - set(expected) if not any(p.fullmatch(k) for p in ignore))
  mis_shaped, plan = [], []
  for key in sorted(set(expected) & set(state_dict)):
    path = expected[key]
    var = params[path]
    want = tuple(var.shape[i] for i in np.argsort(_layout(str(path[-1]), len(var.shape))))
    tensor = state_dict[key]
    shape = tuple(tensor.shape) if fix is None else np.shape(fix(key, np.asarray(tensor), want))
    if shape != want:
      mis_shaped.append(f"{key}: checkpoint {shape}, model {want}")
      continue
    plan.append((path, var, key, tensor, want))
  if missing or unexpected or mis_shaped:
    lines = [f"{source} does not match the model built from its config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", mis_shaped)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {item}" for item in items)
    raise CheckpointMismatchError("\n".join(lines))
  if callable(shardings):
    shardings = shardings(model)
  for path, var, key, tensor, want in plan:
    read = functools.partial(_host_block, tensor, key, str(path[-1]), want, var.get_value().dtype, fix)
    if shardings is None:
      var.set_value(jnp.asarray(read()))
      continue
    blocks = {}  # a partially replicated parameter asks for the same block once per holding device

    def block(index, read=read, blocks=blocks):
      at = tuple((s.start, s.stop, s.step) for s in index)
      if at not in blocks:
        blocks[at] = read(index)
      return blocks[at]

    var.set_value(jax.make_array_from_callback(tuple(var.shape), _subtree(shardings, path), block))


def host_params(params: Any, dtype=None) -> Any:
  """`params` (a pytree of jax Arrays, however sharded) as numpy arrays on the host, one at a time.

  A process-local array is assembled from its shards on the host (no device gathers it). An array
  spanning several processes is gathered with process_allgather one parameter at a time, so every
  process must call this, with the same tree. `dtype` casts each parameter as it arrives.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      value = multihost_utils.process_allgather(x, tiled=True)
    else:
      value = np.asarray(jax.device_get(x))
    return value if dtype is None else value.astype(dtype)

  return jax.tree.map(fetch, params)


def state_dict(model: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch state dict of numpy arrays (optionally cast to `dtype`)."""
  out = {}
  for path, var in _params(model).items():
    value = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      value = value.astype(dtype)
    out[torch_key(path)] = to_torch_layout(str(path[-1]), value)
  return out
