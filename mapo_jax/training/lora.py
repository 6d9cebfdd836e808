"""LoRA: low-rank adapters on the denoiser's linear layers, and the LoRA files diffusers and kohya's tools read.

An adapted `Linear` (or 1x1 `Conv2d`, per pixel) computes y = x W + b + s · (x A) B with A (in, r),
B (r, out) and s = alpha / r (LoRA, Hu et al. 2021, arXiv 2106.09685, eq. 3; PEFT's
`scaling = lora_alpha / r`). A is drawn as PEFT's default (`init_lora_weights=True`: kaiming-uniform with
a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and B is zero, so a fresh adapter leaves the model's output
exactly as it was. A and B are `LoRAParam`s, their own variable type: the train state takes
`trainable=LoRAParam` and everything else stays frozen.

Modules are named by their path in the model joined with dots, which is the diffusers module name
(`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, FLUX's `single_transformer_blocks.3.attn.to_q`).
A model whose paths differ from diffusers' names somewhere (SD3's scanned runs, models/sd3.py `BlockRuns`) says
so with a `checkpoint_name(name)` method, and every name outside the model is diffusers'. `targets` select
modules as PEFT's `target_modules` list does: a name matches a target equal to it or ending in "." + target.

File formats (docs/lora.md). The component prefix is the pipeline's name of the denoiser: `unet.` for SD / SDXL
UNets, `transformer.` for FLUX's and SD3's transformers (diffusers' `transformer_name`).
  diffusers  `<component>.<module>.lora_A.weight` (r, in) and `<component>.<module>.lora_B.weight` (out, r):
             PEFT's state dict as diffusers' `save_lora_weights` writes it (StableDiffusionXLPipeline,
             FluxPipeline, StableDiffusion3Pipeline). It carries no alpha; diffusers then takes alpha = r
             (scale 1) unless the file's `lora_adapter_metadata` says otherwise, so we write s·B as lora_B and
             read metadata alphas when present.
  kohya      `lora_unet_<module>.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and `.alpha` (a
             scalar): the scale is alpha / r per module. For a UNet, <module> is the diffusers name with "."
             → "_". For FLUX it is Black Forest Labs' module name (kohya sd-scripts' and ComfyUI's FLUX LoRAs:
             `lora_unet_double_blocks_0_img_attn_qkv`), where q, k, v (and, in single blocks, the MLP input)
             are one fused linear layer: their adapters are written as one block-diagonal adapter of rank
             n·r (diffusers' `_convert_kohya_flux_lora_to_diffusers` splits it back; `_bfl_module` lists the
             mapping), and alpha = rank with s folded into lora_up. SD3 has no kohya format here (diffusers 0.42
             reads none for it).
  Adapters of 1x1 convolutions hold A and B as (r, in, 1, 1) and (out, r, 1, 1) in both formats.

Scanned stacks (models/layers.py `ScannedBlocks`, config.scan_blocks): a layer inside a stack is N layers with
one stacked (N, in, out) kernel, named `...transformer_blocks.stack.attn1.to_q` here. Its adapter is stacked
too, A (N, in, r) and B (N, r, out), and everything outside the model sees the N per-block names
(`...transformer_blocks.{i}.attn1.to_q`, mapo_jax.convert's rule, then the model's `checkpoint_name`): target
matching, the random draws of fresh adapters, dropout keys and both file formats, so a scanned model's adapters
and files are the unrolled model's. A stack is adapted whole: targets (or a file) that select only some of its
blocks are an error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mapo_jax.convert.params import LAYER_AXIS, STACK, unrolled_order
from mapo_jax.models.flux import FluxTransformer2DModel
from mapo_jax.models.layers import Conv2d, Linear
from mapo_jax.models.sd3 import SD3Transformer2DModel

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (official MaPO LoRA)
# huggingface/diffusers examples/dreambooth/train_dreambooth_lora_flux.py: `target_modules` without --lora_layers
# (every attention projection of both streams, and both streams' feed-forwards; "attn.to_k" also selects the
# single-stream blocks' attention inputs).
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")
# examples/dreambooth/train_dreambooth_lora_sd3.py: `target_modules` without --lora_layers (the joint attention's
# projections; not SD3.5's attn2).
SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
               "attn.to_out.0", "attn.to_q", "attn.to_v")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights gives
KOHYA_FILE = "lora_kohya.safetensors"
FORMATS = ("diffusers", "kohya")
DIFFUSERS_PREFIX = "unet."  # a UNet's component prefix (`Layout.prefix`)
KOHYA_PREFIX = "lora_unet_"  # every kohya denoiser key's prefix, UNet or FLUX transformer
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


# --- the model's layers and their diffusers names --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """What a model's LoRA files look like: the diffusers component prefix ("unet." or "transformer.") and the kohya
  module naming ("diffusers": diffusers' names with "." → "_"; "bfl": Black Forest Labs' FLUX names; None: no
  kohya format)."""
  prefix: str
  kohya: str | None
  family: str  # for messages: "UNet", "FLUX transformer", "SD3 transformer"


def layout(model: nnx.Module) -> Layout:
  """The LoRA file layout of a denoiser (the pipeline component it is)."""
  if isinstance(model, FluxTransformer2DModel):
    return Layout("transformer.", "bfl", "FLUX transformer")
  if isinstance(model, SD3Transformer2DModel):
    return Layout("transformer.", None, "SD3 transformer")
  return Layout(DIFFUSERS_PREFIX, "diffusers", "UNet")


def _same(name: str) -> str:
  return name


def checkpoint_names(model: nnx.Module) -> Callable[[str], str]:
  """The model's map from its module paths (a scanned stack's block index in place of STACK) to diffusers' module
  names: its `checkpoint_name` method (models/sd3.py), else the identity."""
  return getattr(model, "checkpoint_name", None) or _same


def _fits(module) -> bool:
  """Linear layers, and 1x1 stride-1 convolutions (a linear map per pixel: SD 1.x's proj_in / proj_out)."""
  if isinstance(module, Conv2d):
    return module.kernel.shape[-4:-2] == (1, 1) and module.stride == 1 and module.padding == 0
  return isinstance(module, Linear)


def linear_layers(model: nnx.Module) -> dict[str, Linear | Conv2d]:
  """Every layer of `model` an adapter fits (`_fits`), by its path in the model (its diffusers module name, up to
  scanned stacks' STACK and the model's `checkpoint_name`)."""
  return {".".join(map(str, path)): module for path, module in nnx.iter_graph(model) if _fits(module)}


def adapted(model: nnx.Module) -> dict[str, LoRA]:
  """The adapters attached to `model`, by layer path (a stacked one by its stack's path)."""
  return {name: m.lora for name, m in linear_layers(model).items() if m.lora is not None}


def _stacked(name: str, layer) -> int | None:
  """N for a layer of a scanned stack (its name passes through STACK), else None."""
  return layer.kernel.shape[0] if STACK in name.split(".") else None


def block_names(name: str, layer, rename: Callable[[str], str] = _same) -> list[str]:
  """The diffusers module names of layer `name`: itself, or the N per-block names of a scanned stack's layer,
  through the model's `rename` (`checkpoint_names`)."""
  n = _stacked(name, layer)
  if n is None:
    return [rename(name)]
  parts = name.split(".")
  at = parts.index(STACK)
  return [rename(".".join([*parts[:at], str(i), *parts[at + 1:]])) for i in range(n)]


def _order(name: str) -> tuple:
  """The unrolled model's order of module names (nnx.iter_graph: attributes sorted, list indices by number)."""
  return unrolled_order(tuple(int(p) if p.isdigit() else p for p in name.split(".")))


def unrolled_layers(layers: Mapping[str, Linear | Conv2d], rename: Callable[[str], str] = _same
                    ) -> dict[str, tuple[str, int | None]]:
  """Every per-block diffusers module name of `layers` (`linear_layers`) -> (its path in `layers`, block index or
  None), in the unrolled model's order."""
  out = {}
  for name, layer in layers.items():
    n = _stacked(name, layer)
    for i, block in enumerate(block_names(name, layer, rename)):
      out[block] = (name, None if n is None else i)
  return dict(sorted(out.items(), key=lambda item: _order(item[0])))


def _unrolled_adapters(model: nnx.Module) -> list[tuple[str, np.ndarray, np.ndarray, LoRA]]:
  """(per-block name, A (in, r), B (r, out) as float32 host arrays, adapter) of every adapter, in the unrolled
  model's order: a stacked adapter as its N blocks."""
  out, host = [], {}
  layers = linear_layers(model)
  for name, (layer_name, i) in unrolled_layers(layers, checkpoint_names(model)).items():
    lora = layers[layer_name].lora
    if lora is not None:
      if layer_name not in host:
        host[layer_name] = _host(lora)
      a, b = host[layer_name]
      out.append((name, a if i is None else a[i], b if i is None else b[i], lora))
  return out


def match_targets(model: nnx.Module, targets: Sequence[str]) -> list[str]:
  """The layers (`linear_layers` paths) `targets` select (PEFT's rule on diffusers' names: the name equals a
  target or ends in "." + target). A target that selects nothing, or only modules an adapter does not fit, is
  an error."""
  linears = linear_layers(model)
  rename = checkpoint_names(model)
  blocks = unrolled_layers(linears, rename)
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
    chosen = [b for b in block_names(name, layer, rename) if b in selected]
    if 0 < len(chosen) < len(block_names(name, layer, rename)):
      raise ValueError(f"config.lora.targets select {chosen} but not every block of the scanned stack {name}: a "
                       "scanned stack is adapted whole (or run unrolled: config.scan_blocks=False)")
  return [n for n in linears if block_names(n, linears[n], rename)[0] in selected]


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
  place; returns their paths. Host arrays from one seeded generator, so every process draws the same."""
  if rank < 1:
    raise ValueError(f"config.lora.rank: {rank} must be >= 1 to add adapters (0 = full fine-tune)")
  names = match_targets(model, targets)
  rng = np.random.default_rng(seed)
  layers = linear_layers(model)
  draws = {}  # drawn per block in the unrolled model's order: a scanned model draws the unrolled one's A
  for block, (name, i) in unrolled_layers({n: layers[n] for n in names}, checkpoint_names(model)).items():
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
  rename = checkpoint_names(model)
  names = sorted(b for name, m in layers.items() if m.lora is not None for b in block_names(name, m, rename))
  index = {b: i for i, b in enumerate(names)}
  fold = lambda block: jax.random.key_data(jax.random.fold_in(key, index[block]))
  for name, layer in layers.items():
    adapter = layer.lora
    if adapter is not None and adapter.dropout > 0:
      blocks = block_names(name, layer, rename)
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


# --- FLUX's kohya names: Black Forest Labs' modules -------------------------------------------------------------
# diffusers loaders/lora_conversion_utils.py `_convert_kohya_flux_lora_to_diffusers` (sd-scripts' FLUX LoRA keys,
# what ComfyUI reads too) and diffusers' FLUX conversion (models/transformers/transformer_flux.py ⇄ BFL
# src/flux/model.py): module -> (BFL module with "." -> "_", slot, slots). A fused BFL layer's output rows are its
# slots' outputs in slot order: img_attn.qkv = [to_q; to_k; to_v], single blocks' linear1 = [to_q; to_k; to_v;
# proj_mlp]. final_layer.adaLN_modulation.1 gives (shift, scale) where norm_out.linear gives (scale, shift): its
# rows are swapped (diffusers' `swap_scale_shift`).
_BFL_BLOCK = {  # within double block i: "double_blocks_{i}_" + ...
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1), "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1)}
_BFL_SINGLE = {  # within single block i: "single_blocks_{i}_" + ...
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1)}
_BFL_OTHER = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear"}
_BFL_SWAPPED = "final_layer_adaLN_modulation_1"


def _bfl_module(name: str) -> tuple[str, int, int]:
  """FLUX module `name` (diffusers) -> (its BFL module in kohya form, its slot there, the module's slot count)."""
  for prefix, table, bfl in (("transformer_blocks.", _BFL_BLOCK, "double_blocks"),
                             ("single_transformer_blocks.", _BFL_SINGLE, "single_blocks")):
    if name.startswith(prefix):
      index, _, rest = name[len(prefix):].partition(".")
      if index.isdigit() and rest in table:
        module, slot, slots = table[rest]
        return f"{bfl}_{index}_{module}", slot, slots
  if name in _BFL_OTHER:
    return _BFL_OTHER[name], 0, 1
  raise KeyError(f"FLUX module {name!r} has no Black Forest Labs name")


def _swap_halves(rows: np.ndarray) -> np.ndarray:
  """Rows [a; b] -> [b; a]: (scale, shift) ⇄ (shift, scale) of FLUX's final modulation."""
  half = rows.shape[0] // 2
  return np.concatenate([rows[half:], rows[:half]])


def _bfl_groups(blocks: Mapping[str, tuple[str, int | None]], layers) -> dict[str, list[tuple[str, int]]]:
  """BFL module -> its slots' (diffusers module, output features), for every FLUX module of `blocks`
  (`unrolled_layers`), in the unrolled model's order of their first slot."""
  groups: dict[str, list] = {}
  for block, (name, _) in blocks.items():
    module, slot, slots = _bfl_module(block)
    groups.setdefault(module, [None] * slots)[slot] = (block, _features(layers[name])[1])
  for module, slots in groups.items():
    if any(s is None for s in slots):  # the model lacks part of a fused layer (not FLUX.1's layout)
      raise ValueError(f"FLUX kohya format: {module} fuses {len(slots)} layers, this model has "
                       f"{sum(s is not None for s in slots)} of them")
  return groups


def _bfl_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """kohya keys with BFL module names. A fused module's adapter stacks its slots' A (zeros for a slot without an
  adapter, at the first adapter's rank) and holds their B on the block diagonal: x down^T up^T = the sum of the
  slots' updates, each in its own output rows. The scale s is folded into up and alpha = rank (scale 1): diffusers'
  converter ignores the alphas of the final layer's modules, and slots may differ in s."""
  layers = linear_layers(model)
  adapters = {name: (a, b, lora) for name, a, b, lora in _unrolled_adapters(model)}
  groups = _bfl_groups(unrolled_layers(layers, checkpoint_names(model)), layers)
  out = {}
  for module, slots in groups.items():
    present = [adapters.get(block) for block, _ in slots]
    if not any(present):
      continue
    fan_in, rank = next(p for p in present if p is not None)[0].shape
    downs, ups = [], []
    for (_, width), p in zip(slots, present):
      a, b, lora = p if p is not None else (np.zeros((fan_in, rank), np.float32),
                                             np.zeros((rank, width), np.float32), None)
      downs.append(a.T)
      ups.append(b.T * (1.0 if lora is None else lora.scale))
    total = sum(d.shape[0] for d in downs)
    up = np.zeros((sum(u.shape[0] for u in ups), total), np.float32)
    row = col = 0
    for u in ups:
      up[row:row + u.shape[0], col:col + u.shape[1]] = u
      row, col = row + u.shape[0], col + u.shape[1]
    key = KOHYA_PREFIX + module
    out[f"{key}.lora_down.weight"] = np.ascontiguousarray(np.concatenate(downs))
    out[f"{key}.lora_up.weight"] = _swap_halves(up) if module == _BFL_SWAPPED else up
    out[f"{key}.alpha"] = np.asarray(total, np.float32)
  return out


def _bfl_split(path: Path, key: str, slots: list[tuple[str, int]], down: np.ndarray, up: np.ndarray
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """A fused BFL module's adapter (down (R, in), up' = up · alpha / R) as its slots' (A (in, r), B' (r, out)). A
  block-diagonal up' whose R splits evenly (our files, and diffusers' "sparse" case) gives each slot its own
  rank-R/n adapter, and a slot whose part of both is zero (our padding) none; any other up' gives every slot the
  whole down with its own rows of up' (diffusers' rule: the same update either way)."""
  widths = [w for _, w in slots]
  if up.shape[0] != sum(widths):
    raise LoRAFileError(f"{path}: key {key!r}: lora_up has {up.shape[0]} rows, this model's fused layer "
                        f"{sum(widths)} ({' + '.join(map(str, widths))}): a LoRA for another architecture?")
  rows = np.cumsum([0, *widths])
  n, rank = len(slots), down.shape[0]
  if rank % n == 0:
    c = rank // n
    off_diagonal = [up[rows[j]:rows[j + 1], k * c:(k + 1) * c] for j in range(n) for k in range(n) if j != k]
    if not any(np.any(block) for block in off_diagonal):
      out = {}
      for j, (block, _) in enumerate(slots):
        a, b = down[j * c:(j + 1) * c], up[rows[j]:rows[j + 1], j * c:(j + 1) * c]
        if n == 1 or np.any(a) or np.any(b):
          out[block] = (a.T, b.T)
      return out
  return {block: (down.T, up[rows[j]:rows[j + 1]].T) for j, (block, _) in enumerate(slots)}


# --- files ----------------------------------------------------------------------------------------------

def _host(lora: LoRA) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray(jax.device_get(lora.a.get_value()), np.float32),
          np.asarray(jax.device_get(lora.b.get_value()), np.float32))


def _torch_layout(weight: np.ndarray, conv: bool) -> np.ndarray:
  """(out, in) as a torch Linear weight, or (out, in, 1, 1) as a 1x1 Conv2d weight."""
  return np.ascontiguousarray(weight[:, :, None, None] if conv else weight)


def diffusers_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """PEFT/diffusers keys under the model's component prefix; the scale is folded into lora_B, so every reader
  (alpha = r by default) agrees."""
  prefix = layout(model).prefix
  out = {}
  for name, a, b, lora in _unrolled_adapters(model):
    out[f"{prefix}{name}.lora_A.weight"] = _torch_layout(a.T, lora.conv)
    out[f"{prefix}{name}.lora_B.weight"] = _torch_layout((b * lora.scale).T, lora.conv)
  return out


def kohya_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """kohya keys with alpha = s · r per module: diffusers' names for a UNet, BFL's for FLUX (`_bfl_state_dict`)."""
  kind = layout(model)
  if kind.kohya is None:
    raise ValueError(f"LoRA format 'kohya': not available for the {kind.family} (diffusers reads no kohya file "
                     "of it); write the diffusers format")
  if kind.kohya == "bfl":
    return _bfl_state_dict(model)
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


def _metadata_scales(path: Path, metadata: Mapping[str, str] | None, prefix: str
                     ) -> tuple[float | None, dict[str, float]]:
  """diffusers' `lora_adapter_metadata` (the LoraConfig, keys prefixed by the component): (lora_alpha,
  alpha_pattern)."""
  if not metadata or METADATA_KEY not in metadata:
    return None, {}
  try:
    config = json.loads(metadata[METADATA_KEY])
  except json.JSONDecodeError as e:
    raise LoRAFileError(f"{path}: metadata {METADATA_KEY!r} is not JSON: {e}") from None
  alpha = config.get(prefix + "lora_alpha")
  return (None if alpha is None else float(alpha)), dict(config.get(prefix + "alpha_pattern") or {})


_TEXT_ENCODER_KEY = re.compile(r"(lora_te|text_encoder)")


def read(path: str | os.PathLike, model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
  """A diffusers or kohya LoRA file for `model` as {module name: (A (in, r), B' (r, out), A's key in the file)}
  with each module's scale folded into B', so that the update is x A B'. Modules are named per block (diffusers'
  names), also in a scanned stack; kohya names are mapped back by comparing them with the model's own names
  ("_" also occurs inside names). Every key is checked: anything we would otherwise ignore (text-encoder adapters,
  adapters of other convolutions, unknown modules, another component's prefix) is an error naming it."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"LoRA file {path} does not exist")
  with safe_open(path, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata()
  if not tensors:
    raise LoRAFileError(f"{path} holds no tensors")
  kind = layout(model)
  layers = linear_layers(model)
  blocks = unrolled_layers(layers, checkpoint_names(model))
  kohya = any(k.startswith(KOHYA_PREFIX) for k in tensors)
  if kohya and kind.kohya is None:
    raise LoRAFileError(f"{path} is a kohya file (lora_unet_* keys); the {kind.family} reads only the diffusers "
                        "format")
  if kohya:
    if kind.kohya == "bfl":
      groups = _bfl_groups(blocks, layers)
      by_kohya = {KOHYA_PREFIX + module: module for module in groups}
    else:
      by_kohya = {KOHYA_PREFIX + n.replace(".", "_"): n for n in blocks}
    pattern = re.compile(r"(lora_unet_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
    down, up = "lora_down", "lora_up"
  else:
    pattern = re.compile(re.escape(kind.prefix) + r"([\w.]+?)\.(lora_A\.weight|lora_B\.weight)")
    down, up = "lora_A", "lora_B"
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    m = pattern.fullmatch(key)
    if m is None:
      what = (f"a text-encoder adapter (not supported: only the {kind.family}'s)" if _TEXT_ENCODER_KEY.match(key)
              else f"not a {'kohya' if kohya else 'diffusers'} {kind.family} LoRA key")
      raise LoRAFileError(f"{path}: key {key!r} is {what}")
    module = by_kohya.get(m.group(1)) if kohya else m.group(1)
    if module is None or (not kohya and module not in blocks):
      raise LoRAFileError(f"{path}: key {key!r} names module {m.group(1)!r}, which is not a linear layer (or 1x1 "
                          "convolution) of this model (a LoRA for another architecture?)")
    parts.setdefault(module, {})[m.group(2).split(".")[0]] = value
  meta_alpha, alpha_pattern = (None, {}) if kohya else _metadata_scales(path, metadata, kind.prefix)
  out = {}
  for module, p in sorted(parts.items()):
    key = (KOHYA_PREFIX + (module if kind.kohya == "bfl" else module.replace(".", "_"))) if kohya else (
        kind.prefix + module)
    if down not in p or up not in p:
      raise LoRAFileError(f"{path}: {key} has {sorted(p)} but needs both {down} and {up}")
    a, b = p[down], p[up]
    conv = not (kohya and kind.kohya == "bfl") and isinstance(layers[blocks[module][0]], Conv2d)
    if conv and a.ndim == b.ndim == 4 and a.shape[2:] == b.shape[2:] == (1, 1):
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
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32) * (alpha / rank)
    if kohya and kind.kohya == "bfl":
      if module == _BFL_SWAPPED:
        b = _swap_halves(b)
      for block, (a_j, b_j) in _bfl_split(path, key, groups[module], a, b).items():
        out[block] = (a_j, b_j, f"{key}.{down}.weight")
    else:
      out[module] = (a.T, b.T, f"{key}.{down}.weight")
  return dict(sorted(out.items()))


def load_into(model: nnx.Module, path: str | os.PathLike, *, scale: float = 1.0) -> list[str]:
  """Puts the LoRA file at `path` into `model`, in place; returns the adapted module names (per block).

  A model with adapters (a LoRA run's `init_from`) takes the file's values into them: the file must adapt
  exactly the same modules at the same rank, and B = B' / s with the model's own scale. A model without
  adapters (generate, evaluate) gets the file's adapters with scale `scale` (the file's own scale folded
  into B'): `scale` = 1 applies the LoRA as trained. A scanned stack's layer takes its N blocks' adapters
  stacked: the file must adapt all of its blocks, at one rank."""
  layers = linear_layers(model)
  rename = checkpoint_names(model)
  blocks = unrolled_layers(layers, rename)
  weights = read(path, model)
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
      names = block_names(name, layer, rename)
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
