"""Our NNX parameters ⇄ PyTorch state dicts (diffusers and transformers naming).

Module attribute names mirror the PyTorch module names, so a parameter's key is its NNX path joined
with dots, with the leaf renamed and the layout transposed:
  kernel (kh, kw, in, out)  ⇄  weight (out, in, kh, kw)     convolutions
  kernel (in, out)          ⇄  weight (out, in)             linear layers
  scale, embedding          ⇄  weight                       norms, embeddings
Loading checks every key: all missing, unexpected and mis-shaped keys are reported in one error.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class CheckpointMismatchError(ValueError):
  """A checkpoint whose keys or shapes do not match the model built from its config."""


def torch_key(path: tuple) -> str:
  *modules, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_TORCH:
    raise KeyError(f"parameter {'.'.join(map(str, path))} has no PyTorch name rule")
  return ".".join([*modules, _LEAF_TO_TORCH[leaf]])


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def _params(model: nnx.Module) -> dict[tuple, nnx.Param]:
  return {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str,
                    ignore: Iterable[str] = (),
                    fix: Callable[[str, np.ndarray, tuple], np.ndarray] | None = None) -> None:
  """Assigns a PyTorch state dict to `model`'s parameters in place (cast to their dtype).

  `ignore` holds regexes of checkpoint keys that carry no parameters (e.g. position_ids buffers);
  `fix(key, value, expected_torch_shape)` may reshape legacy layouts before the shape check.
  """
  ignore = [re.compile(p) for p in ignore]
  params = _params(model)
  expected = {torch_key(path): path for path in params}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - set(expected) if not any(p.fullmatch(k) for p in ignore))
  mis_shaped, updates = [], []
  for key in sorted(set(expected) & set(state_dict)):
    path = expected[key]
    var = params[path]
    want = tuple(to_torch_layout(str(path[-1]), np.empty(var.shape, np.bool_)).shape)
    value = np.asarray(state_dict[key])
    if fix is not None:
      value = fix(key, value, want)
    if tuple(value.shape) != want:
      mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)}, model {want}")
      continue
    updates.append((var, from_torch_layout(str(path[-1]), value)))
  if missing or unexpected or mis_shaped:
    lines = [f"{source} does not match the model built from its config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", mis_shaped)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {item}" for item in items)
    raise CheckpointMismatchError("\n".join(lines))
  for var, value in updates:
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


def state_dict(model: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch state dict of numpy arrays (optionally cast to `dtype`)."""
  out = {}
  for path, var in _params(model).items():
    value = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      value = value.astype(dtype)
    out[torch_key(path)] = to_torch_layout(str(path[-1]), value)
  return out
