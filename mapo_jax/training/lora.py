"""LoRA: low-rank adapters on the denoiser's linear layers, and the LoRA files diffusers and kohya's tools read.

An adapted `Linear` (or 1x1 `Conv2d`, per pixel) computes y = x W + b + s · (x A) B with A (in, r),
B (r, out) and s = alpha / r (LoRA, Hu et al. 2021, arXiv 2106.09685, eq. 3; PEFT's
`scaling = lora_alpha / r`). A is drawn as PEFT's default (`init_lora_weights=True`: kaiming-uniform with
a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and B is zero, so a fresh adapter leaves the model's output
exactly as it was. A and B are `LoRAParam`s, their own variable type: the train state takes
`trainable=LoRAParam` and everything else stays frozen.

Modules are named by their path in the model joined with dots, which is the diffusers module name
(`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0`). `targets` select modules as PEFT's
`target_modules` list does: a name matches a target equal to it or ending in "." + target.

File formats (docs/lora.md):
  diffusers  `unet.<module>.lora_A.weight` (r, in) and `unet.<module>.lora_B.weight` (out, r): PEFT's
             state dict as diffusers' `save_lora_weights` writes it. It carries no alpha; diffusers then
             takes alpha = r (scale 1) unless the file's `lora_adapter_metadata` says otherwise, so we
             write s·B as lora_B and read metadata alphas when present.
  kohya      `lora_unet_<module with "." → "_">.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and
             `.alpha` (a scalar): the scale is alpha / r per module.
  Adapters of 1x1 convolutions hold A and B as (r, in, 1, 1) and (out, r, 1, 1) in both formats.

Scanned stacks (models/layers.py `ScannedBlocks`, config.scan_blocks): a layer inside a stack is N layers with
one stacked (N, in, out) kernel, named `...transformer_blocks.stack.attn1.to_q` here. Its adapter is stacked
too, A (N, in, r) and B (N, r, out), and everything outside the model sees the N per-block names
(`...transformer_blocks.{i}.attn1.to_q`, mapo_jax.convert's rule): target matching, the random draws of fresh
adapters, dropout keys and both file formats, so a scanned model's adapters and files are the unrolled
model's. A stack is adapted whole: targets (or a file) that select only some of its blocks are an error.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mapo_jax.convert.params import LAYER_AXIS, STACK, unrolled_order
from mapo_jax.models.layers import Conv2d, Linear

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (official MaPO LoRA)
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights gives
KOHYA_FILE = "lora_kohya.safetensors"
FORMATS = ("diffusers", "kohya")
DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


class LoRAFileError(ValueError):
  """A LoRA file that does not fit the model (its keys, ranks or targets), or that we cannot read."""


class LoRAParam(nnx.Variable):
  """An adapter matrix (A or B): the only parameters a LoRA run trains."""


class DropoutKey(nnx.Variable):
  """One adapter's dropout key (raw uint32 key data) for one training micro-batch: set by `set_dropout_keys`
  on the trained model inside the step, never on the reference, never saved."""


class LoRA(nnx.Module):
  """The low-rank update s · (drop(x) A) B of one linear layer; `x` arrives in the layer's compute dtype.

  drop is PEFT's `lora_dropout` on the adapter's input (inverted dropout: kept entries scaled by 1/(1 - p)),
  active only while a `DropoutKey` is set, i.e. in the train step with config.lora.dropout > 0.
  """

  def __init__(self, a, b, scale: float, axes: tuple[str, str], conv: bool = False, dropout: float = 0.0):
    lead = tuple(axes[:-2])  # ("layers",) for the stacked adapter of a scanned stack's layer
    self.a = LoRAParam(a, axes=(*lead, axes[-2], None))  # the rank axis is small: replicated
    self.b = LoRAParam(b, axes=(*lead, None, axes[-1]))
    self.scale = float(scale)
    self.conv = conv  # on a 1x1 convolution: files hold A and B as (r, in, 1, 1) and (out, r, 1, 1)
    self.dropout = float(dropout)
    self.dropout_key = None

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def stacked(self) -> int | None:
    """N for the stacked adapter of a scanned stack's layer, else None."""
    return self.a.shape[0] if self.a.ndim == 3 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dropout_key is not None:
      keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros_like(x))
    h = jnp.dot(x, self.a[...].astype(x.dtype))
    return jnp.dot(h, self.b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


def _fits(module) -> bool:
  """Linear layers, and 1x1 stride-1 convolutions (a linear map per pixel: SD 1.x's proj_in / proj_out)."""
  if isinstance(module, Conv2d):
    return module.kernel.shape[-4:-2] == (1, 1) and module.stride == 1 and module.padding == 0
  return isinstance(module, Linear)


def linear_layers(model: nnx.Module) -> dict[str, Linear | Conv2d]:
  """Every layer of `model` an adapter fits (`_fits`), by its diffusers module name."""
  return {".".join(map(str, path)): module for path, module in nnx.iter_graph(model) if _fits(module)}


def adapted(model: nnx.Module) -> dict[str, LoRA]:
  """The adapters attached to `model`, by module name (a stacked one by its stack's name)."""
  return {name: m.lora for name, m in linear_layers(model).items() if m.lora is not None}


def _stacked(name: str, layer) -> int | None:
  """N for a layer of a scanned stack (its name passes through STACK), else None."""
  return layer.kernel.shape[0] if STACK in name.split(".") else None


def block_names(name: str, layer) -> list[str]:
  """The diffusers module names of layer `name`: itself, or the N per-block names of a scanned stack's layer."""
  n = _stacked(name, layer)
  if n is None:
    return [name]
  parts = name.split(".")
  at = parts.index(STACK)
  return [".".join([*parts[:at], str(i), *parts[at + 1:]]) for i in range(n)]


def _order(name: str) -> tuple:
  """The unrolled model's order of module names (nnx.iter_graph: attributes sorted, list indices by number)."""
  return unrolled_order(tuple(int(p) if p.isdigit() else p for p in name.split(".")))


def unrolled_layers(layers: Mapping[str, Linear | Conv2d]) -> dict[str, tuple[str, int | None]]:
  """Every per-block module name of `layers` (`linear_layers`) -> (its name in `layers`, block index or None),
  in the unrolled model's order."""
  out = {}
  for name, layer in layers.items():
    n = _stacked(name, layer)
    for i, block in enumerate(block_names(name, layer)):
      out[block] = (name, None if n is None else i)
  return dict(sorted(out.items(), key=lambda item: _order(item[0])))


def _unrolled_adapters(model: nnx.Module) -> list[tuple[str, np.ndarray, np.ndarray, LoRA]]:
  """(per-block name, A (in, r), B (r, out) as float32 host arrays, adapter) of every adapter, in the unrolled
  model's order: a stacked adapter as its N blocks."""
  out, host = [], {}
  layers = linear_layers(model)
  for name, (layer_name, i) in unrolled_layers(layers).items():
    lora = layers[layer_name].lora
    if lora is not None:
      if layer_name not in host:
        host[layer_name] = _host(lora)
      a, b = host[layer_name]
      out.append((name, a if i is None else a[i], b if i is None else b[i], lora))
  return out


def match_targets(model: nnx.Module, targets: Sequence[str]) -> list[str]:
  """The layers (`linear_layers`) `targets` select (PEFT's rule: the name equals a target or ends in "." +
  target). A target that selects nothing, or only modules an adapter does not fit, is an error."""
  linears = linear_layers(model)
  blocks = unrolled_layers(linears)
  names = [".".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and p]
  hits = lambda target, pool: [n for n in pool if n == target or n.endswith("." + target)]
  for target in targets:
    if not hits(target, blocks):
      others = hits(target, names)
      kind = (f"only other modules ({type(_module_at(model, others[0])).__name__} {others[0]})" if others
              else "no module")
      raise ValueError(f"config.lora.targets: {target!r} matches {kind}; LoRA adapts linear layers and 1x1 "
                       f"convolutions (e.g. {', '.join(DEFAULT_TARGETS)}, ff.net.0.proj, ff.net.2, proj_in, proj_out)")
  selected = {n for n in blocks if any(n == t or n.endswith("." + t) for t in targets)}
  for name, layer in linears.items():
    chosen = [b for b in block_names(name, layer) if b in selected]
    if 0 < len(chosen) < len(block_names(name, layer)):
      raise ValueError(f"config.lora.targets select {chosen} but not every block of the scanned stack {name}: a "
                       "scanned stack is adapted whole (or run unrolled: config.scan_blocks=False)")
  return [n for n in linears if block_names(n, linears[n])[0] in selected]


def _module_at(model: nnx.Module, name: str):
  for part in name.split("."):
    model = model[int(part)] if part.isdigit() else getattr(model, part)
  return model


def _axes(layer) -> tuple[str, ...]:
  """The logical axes of the layer's (in, out) features, after the block axis of a scanned stack's layer: A and
  B are sharded like them."""
  axes = tuple(layer.kernel.get_metadata().get("axes") or (None,) * layer.kernel.ndim)
  return (*axes[:1], *axes[-2:]) if axes[0] == LAYER_AXIS else axes[-2:]


def _features(layer) -> tuple[int, int]:
  return tuple(layer.kernel.shape[-2:])


def _abstract(layer) -> bool:
  return isinstance(layer.kernel.get_value(), jax.ShapeDtypeStruct)


def attach(layer, a: np.ndarray, b: np.ndarray, scale: float, dtype=np.float32, dropout: float = 0.0) -> None:
  """Gives `layer` the adapter (A, B, scale); ShapeDtypeStructs when the layer is abstract (aot). A layer of a
  scanned stack takes stacked A (N, in, r) and B (N, r, out)."""
  a, b = np.asarray(a, dtype), np.asarray(b, dtype)
  if _abstract(layer):
    a, b = jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(b.shape, b.dtype)
  # nnx.data: the layer declared `lora` as a static None
  layer.lora = nnx.data(LoRA(a, b, scale, _axes(layer), conv=isinstance(layer, Conv2d), dropout=dropout))


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str], seed: int,
                 dtype=np.float32, dropout: float = 0.0) -> list[str]:
  """Attaches fresh adapters (PEFT's default init: A ~ U(±1/sqrt(in)), B = 0) to the targeted layers, in
  place; returns their names. Host arrays from one seeded generator, so every process draws the same."""
  if rank < 1:
    raise ValueError(f"config.lora.rank: {rank} must be >= 1 to add adapters (0 = full fine-tune)")
  names = match_targets(model, targets)
  rng = np.random.default_rng(seed)
  layers = linear_layers(model)
  draws = {}  # drawn per block in the unrolled model's order: a scanned model draws the unrolled one's A
  for block, (name, i) in unrolled_layers({n: layers[n] for n in names}).items():
    fan_in = _features(layers[name])[0]
    bound = 1.0 / np.sqrt(fan_in)
    draws.setdefault(name, {})[i] = (rng.uniform(-bound, bound, (fan_in, rank)) if not _abstract(layers[name])
                                     else np.zeros((fan_in, rank)))
  for name in names:
    fan_in, fan_out = _features(layers[name])
    n = _stacked(name, layers[name])
    a = draws[name][None] if n is None else np.stack([draws[name][i] for i in range(n)])
    attach(layers[name], a, np.zeros((*a.shape[:-2], rank, fan_out)), alpha / rank, dtype, dropout)
  return names


def set_dropout_keys(model: nnx.Module, key_data: jax.Array) -> None:
  """Gives each adapter of `model` with dropout > 0 its own key, folded from the raw key `key_data` by the
  adapter's index in name order, so every layer draws an independent mask; in place. A stacked adapter gets
  its blocks' keys stacked, folded by their per-block names' indices: the unrolled model's masks."""
  key = jax.random.wrap_key_data(key_data)
  layers = linear_layers(model)
  names = sorted(b for name, m in layers.items() if m.lora is not None for b in block_names(name, m))
  index = {b: i for i, b in enumerate(names)}
  fold = lambda block: jax.random.key_data(jax.random.fold_in(key, index[block]))
  for name, layer in layers.items():
    adapter = layer.lora
    if adapter is not None and adapter.dropout > 0:
      blocks = block_names(name, layer)
      data = fold(blocks[0]) if adapter.stacked is None else jnp.stack([fold(b) for b in blocks])
      adapter.dropout_key = nnx.data(DropoutKey(data))


def fuse(model: nnx.Module) -> nnx.Module:
  """Merges every adapter into its layer (W ← W + s · A B, in float32, cast back to W's dtype) and detaches
  it; in place."""
  for layer in linear_layers(model).values():
    if layer.lora is not None:
      lora = layer.lora
      kernel = np.asarray(jax.device_get(layer.kernel.get_value()))
      # A stacked adapter: a batched product per block, (N, in, r) @ (N, r, out).
      delta = lora.scale * (np.asarray(jax.device_get(lora.a.get_value()), np.float32)
                            @ np.asarray(jax.device_get(lora.b.get_value()), np.float32)).reshape(kernel.shape)
      layer.kernel.set_value(jnp.asarray((kernel.astype(np.float32) + delta).astype(kernel.dtype)))
      layer.lora = None
  return model


# --- files ----------------------------------------------------------------------------------------------

def _host(lora: LoRA) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray(jax.device_get(lora.a.get_value()), np.float32),
          np.asarray(jax.device_get(lora.b.get_value()), np.float32))


def _torch_layout(weight: np.ndarray, conv: bool) -> np.ndarray:
  """(out, in) as a torch Linear weight, or (out, in, 1, 1) as a 1x1 Conv2d weight."""
  return np.ascontiguousarray(weight[:, :, None, None] if conv else weight)


def diffusers_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """PEFT/diffusers keys; the scale is folded into lora_B, so every reader (alpha = r by default) agrees."""
  out = {}
  for name, a, b, lora in _unrolled_adapters(model):
    out[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = _torch_layout(a.T, lora.conv)
    out[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = _torch_layout((b * lora.scale).T, lora.conv)
  return out


def kohya_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """kohya keys with alpha = s · r per module."""
  out = {}
  for name, a, b, lora in _unrolled_adapters(model):
    key = KOHYA_PREFIX + name.replace(".", "_")
    out[f"{key}.lora_down.weight"] = _torch_layout(a.T, lora.conv)
    out[f"{key}.lora_up.weight"] = _torch_layout(b.T, lora.conv)
    out[f"{key}.alpha"] = np.asarray(lora.scale * lora.rank, np.float32)
  return out


def save(model: nnx.Module, out_dir: str | os.PathLike, fmt: str = "diffusers", dtype=np.float32) -> Path:
  """Writes the model's adapters to OUT_DIR/pytorch_lora_weights.safetensors (diffusers) or
  OUT_DIR/lora_kohya.safetensors (kohya); returns the file."""
  if fmt not in FORMATS:
    raise ValueError(f"LoRA format {fmt!r} is not one of {FORMATS}")
  tensors = diffusers_state_dict(model) if fmt == "diffusers" else kohya_state_dict(model)
  if not tensors:
    raise ValueError("the model has no LoRA adapters to save")
  path = Path(out_dir) / (DIFFUSERS_FILE if fmt == "diffusers" else KOHYA_FILE)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file({k: v.astype(dtype) for k, v in tensors.items()}, path, metadata={"format": "pt"})
  return path


def _metadata_scales(path: Path, metadata: Mapping[str, str] | None) -> tuple[float | None, dict[str, float]]:
  """diffusers' `lora_adapter_metadata` (the LoraConfig, keys prefixed "unet."): (lora_alpha, alpha_pattern)."""
  if not metadata or METADATA_KEY not in metadata:
    return None, {}
  try:
    config = json.loads(metadata[METADATA_KEY])
  except json.JSONDecodeError as e:
    raise LoRAFileError(f"{path}: metadata {METADATA_KEY!r} is not JSON: {e}") from None
  alpha = config.get(DIFFUSERS_PREFIX + "lora_alpha")
  return (None if alpha is None else float(alpha)), dict(config.get(DIFFUSERS_PREFIX + "alpha_pattern") or {})


def read(path: str | os.PathLike, layers: Mapping[str, Linear | Conv2d]
         ) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
  """A diffusers or kohya LoRA file as {module name: (A (in, r), B' (r, out), A's key in the file)} with each
  module's scale folded into B', so that the update is x A B'. `layers` are the model's `linear_layers` (kohya
  names replace "." with "_", which only the model's own names can undo); modules are named per block, also
  in a scanned stack. Every key is checked: anything we would otherwise ignore (text-encoder adapters, adapters
  of other convolutions, unknown modules) is an error naming it."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"LoRA file {path} does not exist")
  with safe_open(path, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata()
  if not tensors:
    raise LoRAFileError(f"{path} holds no tensors")
  blocks = unrolled_layers(layers)
  names = set(blocks)
  kohya = any(k.startswith(KOHYA_PREFIX) for k in tensors)
  if kohya:
    by_kohya = {KOHYA_PREFIX + n.replace(".", "_"): n for n in names}
    pattern = re.compile(r"(lora_unet_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
    down, up = "lora_down", "lora_up"
  else:
    pattern, down, up = re.compile(r"unet\.([\w.]+?)\.(lora_A\.weight|lora_B\.weight)"), "lora_A", "lora_B"
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    m = pattern.fullmatch(key)
    if m is None:
      what = ("a text-encoder adapter (not supported: only the UNet's)" if re.match(r"(lora_te|text_encoder)", key)
              else f"not a {'kohya' if kohya else 'diffusers'} UNet LoRA key")
      raise LoRAFileError(f"{path}: key {key!r} is {what}")
    module = by_kohya.get(m.group(1)) if kohya else m.group(1)
    if module not in names:
      raise LoRAFileError(f"{path}: key {key!r} names module {m.group(1)!r}, which is not a linear layer (or 1x1 "
                          "convolution) of this model (a LoRA for another architecture?)")
    parts.setdefault(module, {})[m.group(2).split(".")[0]] = value
  meta_alpha, alpha_pattern = (None, {}) if kohya else _metadata_scales(path, metadata)
  out = {}
  for module, p in sorted(parts.items()):
    key = (KOHYA_PREFIX + module.replace(".", "_")) if kohya else DIFFUSERS_PREFIX + module
    if down not in p or up not in p:
      raise LoRAFileError(f"{path}: {key} has {sorted(p)} but needs both {down} and {up}")
    a, b = p[down], p[up]
    if isinstance(layers[blocks[module][0]], Conv2d) and a.ndim == b.ndim == 4 and a.shape[2:] == b.shape[2:] == (1, 1):
      a, b = a[:, :, 0, 0], b[:, :, 0, 0]  # a 1x1 convolution's adapter: the same linear map per pixel
    if a.ndim != 2 or b.ndim != 2:
      raise LoRAFileError(f"{path}: {key}.{down}.weight has shape {a.shape}: only adapters of linear layers and "
                          "1x1 convolutions are supported")
    if a.shape[0] != b.shape[1]:
      raise LoRAFileError(f"{path}: {key}: {down} {a.shape} and {up} {b.shape} disagree on the rank")
    rank = a.shape[0]
    if kohya:
      alpha = float(np.asarray(p["alpha"], np.float32)) if "alpha" in p else float(rank)
    else:
      alpha = next((float(v) for k, v in alpha_pattern.items() if module == k or module.endswith("." + k)),
                   meta_alpha if meta_alpha is not None else float(rank))
    out[module] = (np.asarray(a, np.float32).T, np.asarray(b, np.float32).T * (alpha / rank), f"{key}.{down}.weight")
  return out


def load_into(model: nnx.Module, path: str | os.PathLike, *, scale: float = 1.0) -> list[str]:
  """Puts the LoRA file at `path` into `model`, in place; returns the adapted module names (per block).

  A model with adapters (a LoRA run's `init_from`) takes the file's values into them: the file must adapt
  exactly the same modules at the same rank, and B = B' / s with the model's own scale. A model without
  adapters (generate, evaluate) gets the file's adapters with scale `scale` (the file's own scale folded
  into B'): `scale` = 1 applies the LoRA as trained. A scanned stack's layer takes its N blocks' adapters
  stacked: the file must adapt all of its blocks, at one rank."""
  layers = linear_layers(model)
  blocks = unrolled_layers(layers)
  weights = read(path, layers)
  existing = {block for block, (name, _) in blocks.items() if layers[name].lora is not None}
  if existing:
    missing, extra = sorted(existing - set(weights)), sorted(set(weights) - existing)
    if missing or extra:
      parts = ([f"modules without adapters in the file: {missing[:5]}"] if missing else []) + (
          [f"modules the targets do not select: {extra[:5]}"] if extra else [])
      raise LoRAFileError(f"{path} does not fit config.lora.targets: {'; '.join(parts)} ({len(missing)} missing, "
                          f"{len(extra)} extra)")
  by_layer: dict[str, dict] = {}
  for block, (a, b, key) in weights.items():
    name, i = blocks[block]
    fan_in, fan_out = _features(layers[name])
    if a.shape[0] != fan_in or b.shape[1] != fan_out:
      raise LoRAFileError(f"{path}: key {key!r}: the adapter maps {a.shape[0]} -> {b.shape[1]} features, layer "
                          f"{block} {fan_in} -> {fan_out} (a LoRA for another architecture?)")
    lora = layers[name].lora
    if lora is not None and a.shape[1] != lora.rank:
      raise LoRAFileError(f"{path}: key {key!r} has rank {a.shape[1]}, config.lora.rank is {lora.rank}")
    by_layer.setdefault(name, {})[i] = (a, b, key)
  for name, parts in by_layer.items():
    layer = layers[name]
    if None in parts:
      a, b, _ = parts[None]
    else:
      names = block_names(name, layer)
      absent = [names[i] for i in range(len(names)) if i not in parts]
      if absent:
        raise LoRAFileError(f"{path} adapts blocks of the scanned stack {name} but not {absent[:3]} ({len(absent)} "
                            "of them): a scanned stack is adapted whole (or load it unrolled: "
                            "config.scan_blocks=False)")
      ranks = sorted({parts[i][0].shape[1] for i in parts})
      if len(ranks) > 1:
        raise LoRAFileError(f"{path}: the blocks of the scanned stack {name} have ranks {ranks}: a stacked adapter "
                            "has one rank (load it unrolled: config.scan_blocks=False)")
      a = np.stack([parts[i][0] for i in range(len(names))])
      b = np.stack([parts[i][1] for i in range(len(names))])
    if layer.lora is not None:
      lora = layer.lora
      dtype = lora.a.get_value().dtype
      lora.a.set_value(jnp.asarray(a, dtype))
      lora.b.set_value(jnp.asarray(b / lora.scale, dtype))
    else:
      attach(layer, a, b, scale)
  return sorted(weights)


def from_config(model: nnx.Module, lora_config, seed: int, dtype=np.float32) -> list[str]:
  """A LoRA run's adapters on `model` (config.lora: rank, alpha, targets, init_from), in place."""
  names = add_adapters(model, rank=lora_config.rank, alpha=lora_config.alpha, targets=tuple(lora_config.targets),
                       seed=seed, dtype=dtype, dropout=float(lora_config.dropout))
  if lora_config.init_from and not any(_abstract(l) for l in linear_layers(model).values()):
    load_into(model, lora_config.init_from)
  return names
