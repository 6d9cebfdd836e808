"""Our NNX parameters ⇄ PyTorch state dicts (diffusers and transformers naming).

Module attribute names mirror the PyTorch module names, so a parameter's key is its NNX path joined
with dots, with the leaf renamed and the layout transposed:
  kernel (kh, kw, in, out)  ⇄  weight (out, in, kh, kw)     convolutions
  kernel (in, out)          ⇄  weight (out, in)             linear layers
  scale, embedding          ⇄  weight                       norms, embeddings
Loading checks every key: all missing, unexpected and mis-shaped keys are reported in one error.
With target shardings, each device's block of a parameter is read, transposed and cast on the host
alone (weights born sharded: no device ever holds a whole sharded parameter).

Scanned stacks (models/layers.py `ScannedBlocks`): a parameter whose path passes through the attribute
`STACK` holds N blocks' values on a leading `LAYER_AXIS` axis; it is N checkpoint keys, `STACK` replaced by
the block index: `transformer_blocks.stack.attn1.to_q.kernel` (N, in, out) ⇄ `transformer_blocks.{i}.attn1
.to_q.weight` (out, in). State dicts list the keys in the order of the unrolled model, so files written
from a scanned model are the unrolled model's, byte for byte.
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
STACK = "stack"  # the attribute of a scanned stack that holds its stacked block (no diffusers module name)
LAYER_AXIS = "layers"  # the logical name of a stacked variable's leading (block) axis


class CheckpointMismatchError(ValueError):
  """A checkpoint whose keys or shapes do not match the model built from its config."""


def stack_position(path: tuple) -> int | None:
  """Where `STACK` sits in a variable's path (a variable of a scanned stack), or None."""
  at = [i for i, p in enumerate(path) if p == STACK]
  if len(at) > 1:
    raise ValueError(f"{'.'.join(map(str, path))}: scanned stacks inside scanned stacks are not supported")
  return at[0] if at else None


def unstacked_path(path: tuple, layer: int | None) -> tuple:
  """The variable's path in the unrolled model: `STACK` replaced by the block index `layer`."""
  at = stack_position(path)
  if at is None:
    return tuple(path)
  if layer is None:
    raise ValueError(f"{'.'.join(map(str, path))} is stacked: name one of its blocks")
  return (*path[:at], layer, *path[at + 1:])


def unrolled_order(path: tuple, layer: int | None = None) -> tuple:
  """A sort key that lists variables (and a stack's blocks) in the unrolled model's `nnx.iter_graph` order:
  attribute names sorted, list indices by number."""
  return tuple((isinstance(p, str), p) for p in unstacked_path(path, layer))


def torch_key(path: tuple, layer: int | None = None) -> str:
  """The checkpoint key of a parameter; of its block `layer` for a parameter of a scanned stack."""
  *modules, leaf = (str(p) for p in unstacked_path(path, layer))
  if leaf not in _LEAF_TO_TORCH:
    raise KeyError(f"parameter {'.'.join(map(str, path))} has no PyTorch name rule")
  return ".".join([*modules, _LEAF_TO_TORCH[leaf]])


def stacked_layers(path: tuple, var) -> int | None:
  """N for a variable of a scanned stack (its leading axis, named LAYER_AXIS), None for any other."""
  if stack_position(path) is None:
    return None
  axes = var.get_metadata().get("axes") or ()
  if not axes or axes[0] != LAYER_AXIS:
    raise ValueError(f"{'.'.join(map(str, path))} lies in a scanned stack but its leading axis is {axes[:1]}, "
                     f"not {LAYER_AXIS!r}")
  return int(var.shape[0])


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
  expected = {}  # checkpoint key -> (path, block index of a stacked parameter or None)
  for path, var in params.items():
    n = stacked_layers(path, var)
    for layer in ([None] if n is None else range(n)):
      expected[torch_key(path, layer)] = (path, layer)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - set(expected) if not any(p.fullmatch(k) for p in ignore))
  mis_shaped, plan = [], {}
  for key in sorted(set(expected) & set(state_dict)):
    path, layer = expected[key]
    shape = tuple(params[path].shape)[0 if layer is None else 1:]
    want = tuple(shape[i] for i in np.argsort(_layout(str(path[-1]), len(shape))))
    tensor = state_dict[key]
    got = tuple(tensor.shape) if fix is None else np.shape(fix(key, np.asarray(tensor), want))
    if got != want:
      mis_shaped.append(f"{key}: checkpoint {got}, model {want}")
      continue
    plan.setdefault(path, {})[layer] = (key, tensor, want)
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
  for path, layers in plan.items():
    var = params[path]
    reads = {layer: functools.partial(_host_block, tensor, key, str(path[-1]), want, var.get_value().dtype, fix)
             for layer, (key, tensor, want) in layers.items()}
    read = reads[None] if None in reads else functools.partial(_stacked_block, reads)
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


def _stacked_block(reads: Mapping[int, Callable], index: tuple | None = None) -> np.ndarray:
  """A stacked parameter (or its `index` block) from its blocks' readers: the leading index picks blocks,
  the rest is each block's index (the stacked axis is replicated, so a device usually reads all N)."""
  layers = range(len(reads))
  if index is not None:
    layers, index = layers[index[0]], tuple(index[1:])
  return np.stack([reads[layer](index) for layer in layers])


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
  """The model's parameters as a PyTorch state dict of numpy arrays (optionally cast to `dtype`); a scanned
  stack's parameters as their blocks' keys, every key in the unrolled model's order."""
  entries = []
  for path, var in _params(model).items():
    value = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      value = value.astype(dtype)
    n = stacked_layers(path, var)
    entries.extend([(path, None, value)] if n is None else [(path, i, value[i]) for i in range(n)])
  if any(layer is not None for _, layer, _ in entries):
    entries.sort(key=lambda e: unrolled_order(e[0], e[1]))
  return {torch_key(path, layer): to_torch_layout(str(path[-1]), value) for path, layer, value in entries}
