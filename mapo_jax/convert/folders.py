"""Model folders (config.json + safetensors weights) ⇄ NNX models."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from mapo_jax.convert.files import NUMPY_DTYPES, open_weights, write_weights
from mapo_jax.convert.params import load_state_dict, state_dict


def model_folder(path: str | os.PathLike, subfolder: str) -> Path:
  """`path` itself when it holds config.json, else `path/subfolder` (a pipeline folder)."""
  path = Path(path)
  for folder in (path, path / subfolder):
    if (folder / "config.json").is_file():
      return folder
  raise FileNotFoundError(f"{path} holds no config.json, nor does {path / subfolder}")


def read_config(folder: Path) -> dict[str, Any]:
  return json.loads((folder / "config.json").read_text())


def with_defaults(kind: str, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """`config` over the library's `defaults`, without the `_class_name`-style metadata keys; a key the
  library does not define fails, naming it (`kind` says which config: "UNet", "VAE")."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
  if unknown:
    raise ValueError(f"{kind} config: unknown option(s) {unknown}")
  return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def load_model(folder: Path, build: Callable[[], nnx.Module], *, stem: str, variant: str | None = None,
               rename: Callable[[str], str] | None = None, ignore: Iterable[str] = (), fix=None,
               shardings=None) -> nnx.Module:
  """Builds the model abstractly (no random init) and fills it from the folder's weights, read one
  tensor at a time. `rename` maps a file's key to ours (legacy or library-specific names). `shardings`
  (see params.load_state_dict): a pure-dict tree of shardings or a callable from the abstract model to
  one; each device then receives only its own block of each parameter. Without it, parameters land
  whole on the default device. The one loader of every model (UNet, VAE, CLIP towers, reward CLIP)."""
  model = nnx.eval_shape(build)
  with open_weights(folder, stem, variant) as weights:
    if rename is not None:
      weights = {rename(k): v for k, v in weights.items()}
    load_state_dict(model, weights, source=str(folder), ignore=ignore, fix=fix, shardings=shardings)
  return model


def save_model(model: nnx.Module, out_dir: str | os.PathLike, config: Mapping[str, Any], *, stem: str,
               dtype: str | None = None) -> Path:
  """Writes config.json and the weights (cast to `dtype`: fp32, fp16 or bf16; default: as stored)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if dtype is not None and dtype not in NUMPY_DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {sorted(NUMPY_DTYPES)}")
  (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
  write_weights(out, state_dict(model, NUMPY_DTYPES[dtype] if dtype else None), stem)
  return out
