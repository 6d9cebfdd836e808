"""Basic layers shared by the UNet, the VAE and the CLIP text towers, and stacks of identical blocks.

Layout is NHWC. Parameters are created in `param_dtype` and cast to the compute `dtype` at use;
normalisation statistics are always float32. Every parameter carries logical axis names in its
`axes` metadata; `mapo_jax.sharding` maps them to mesh axes. Attribute names (`kernel`, `bias`,
`scale`, `embedding`) are translated to PyTorch names in `mapo_jax.convert`.

A stack of N identical blocks (SDXL's ten-deep transformer stacks, FLUX's 19 + 38 blocks) is either an
`nnx.List` run block by block, or, with `Options.scan`, a `ScannedBlocks` whose parameters are stacked on a
leading "layers" axis and run by `jax.lax.scan`: XLA then compiles the block once instead of N times
(MaxText's `scan_layers`; maxdiffusion scans its FLUX and Wan blocks the same way). `block_stack` builds
either, `run_blocks` runs either; `mapo_jax.convert` maps a stacked parameter to and from the N per-block
checkpoint keys, so files keep the diffusers layout.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mapo_jax.convert.params import LAYER_AXIS, STACK

Dtype = jnp.dtype


def _next_key(rngs: nnx.Rngs) -> jax.Array:
  """`rngs.params()` without its in-place counter update, which is quadratic under tracing (jax 0.10)."""
  stream = rngs.params
  count = stream.count.get_value()
  stream.count.set_value(count + 1)
  return jax.random.fold_in(stream.key.get_value(), count)


def fan_in_normal(std_scale: float = 1.0):
  """N(0, std_scale² / fan_in) (LeCun normal), drawn flat and reshaped: XLA on CPU compiles
  multi-dimensional random draws several times slower."""
  def init(key, shape, dtype):
    fan_in = math.prod(shape[:-1]) or 1
    flat = jax.random.normal(key, (math.prod(shape),), jnp.float32) * (std_scale / math.sqrt(fan_in))
    return flat.reshape(shape).astype(dtype)
  return init


def _param(rngs: nnx.Rngs, init, shape, param_dtype, axes) -> nnx.Param:
  return nnx.Param(init(_next_key(rngs), shape, param_dtype), axes=axes)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel (in, out). `axes` names the (in, out) logical axes.

  `lora`: an optional low-rank adapter (mapo_jax/training/lora.py) whose output is added; None unless attached.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               axes: tuple[str, str] = ("embed", "mlp"), dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    init = fan_in_normal()
    self.kernel = _param(rngs, init, (in_features, out_features), param_dtype, axes)
    self.bias = (_param(rngs, jax.nn.initializers.zeros, (out_features,), param_dtype, axes[1:])
                 if use_bias else None)
    self.dtype = dtype
    self.lora = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x.astype(self.dtype))
    return y


class Conv2d(nnx.Module):
  """2-D convolution on NHWC inputs; kernel (kh, kw, in, out) with symmetric padding."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
               padding: int | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    init = fan_in_normal()
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = _param(rngs, init, shape, param_dtype, ("conv_h", "conv_w", "conv_in", "conv_out"))
    self.bias = _param(rngs, jax.nn.initializers.zeros, (out_channels,), param_dtype, ("conv_out",))
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.dtype = dtype
    self.lora = None  # 1x1 convolutions only (SD 1.x's proj_in / proj_out): a per-pixel linear map

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x.astype(self.dtype))
    return y


class GroupNorm(nnx.Module):
  """GroupNorm over the channel axis (last) with float32 statistics, optionally fused with SiLU."""

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
    self.scale = _param(rngs, jax.nn.initializers.ones, (num_channels,), param_dtype, ("norm",))
    self.bias = _param(rngs, jax.nn.initializers.zeros, (num_channels,), param_dtype, ("norm",))
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype

  def __call__(self, x: jax.Array, *, silu: bool = False) -> jax.Array:
    shape = x.shape
    g = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    if silu:
      y = jax.nn.silu(y)
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with float32 statistics."""

  def __init__(self, num_features: int, *, eps: float = 1e-5, use_affine: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if use_affine:
      self.scale = _param(rngs, jax.nn.initializers.ones, (num_features,), param_dtype, ("norm",))
      self.bias = _param(rngs, jax.nn.initializers.zeros, (num_features,), param_dtype, ("norm",))
    else:
      self.scale = self.bias = None
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis with float32 statistics: x / sqrt(mean(x²) + eps) · scale
  (diffusers' `RMSNorm`, transformers' `T5LayerNorm`: no mean subtraction, no bias). Without
  `use_scale`, no parameter (diffusers' elementwise_affine=False)."""

  def __init__(self, num_features: int, *, eps: float = 1e-6, use_scale: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.scale = (_param(rngs, jax.nn.initializers.ones, (num_features,), param_dtype, ("norm",))
                  if use_scale else None)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """Lookup table (num_embeddings, features)."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    init = fan_in_normal(0.02 * math.sqrt(num_embeddings))  # N(0, 0.02²) as CLIP initialises
    self.embedding = _param(rngs, init, (num_embeddings, features), param_dtype, ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Dropout(nnx.Module):
  """A parameter-free placeholder that keeps module indices aligned with PyTorch checkpoints.

  Preference fine-tuning of these models uses no dropout, so it is the identity.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How the model computes (not what it is): dtypes, attention kernel, rematerialisation, and whether
  stacks of identical blocks are scanned (`block_stack`: the same function, compiled once per stack)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str | None = None
  remat: str = "none"
  scan: bool = False

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")


def remat_call(module: nnx.Module, policy: str, *args):
  """Calls `module(*args)`, rematerialising its activations in the backward pass per `policy`.

  `jax.checkpoint` of a pure function of the module's state (split here, merged inside), not `nnx.remat`:
  nnx.remat updates the module's variables in place, which fails when the module was merged at an outer
  trace level and is called inside `jax.lax.scan` (the sampling loop). The module must not be mutated by
  its call. Without a gradient, checkpointing changes nothing: sampling a remat model costs the same."""
  if policy == "none":
    return module(*args)
  graphdef, state = nnx.split(module)
  return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a), policy=REMAT_POLICIES[policy])(state, *args)


def _remat_policy(policy: str):
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[policy]


class ScannedBlocks(nnx.Module):
  """N identical blocks run in order by `jax.lax.scan`: one block's code, compiled once.

  The blocks are built by `make()` N times, exactly as an `nnx.List` of them would be (same random draws,
  in the same order), then every variable of the first block takes the N blocks' values stacked on a new
  leading axis, named `LAYER_AXIS` ("layers", replicated by mapo_jax.sharding). That block, held as
  attribute `STACK` ("stack"), is the stack: a parameter `transformer_blocks.stack.attn1.to_q.kernel` of
  shape (N, in, out) is what `transformer_blocks.{i}.attn1.to_q.kernel` are unrolled (mapo_jax.convert maps
  it to and from those N checkpoint keys). Variables attached later (LoRA adapters, their dropout keys)
  must be stacked the same way: the scan slices every variable of the stack along its leading axis.

  Call: `stack(carry, *args, remat=policy)` = block_{N-1}(...block_1(block_0(carry, *args), *args)...). A
  tuple carry is splatted: `block(*carry, *args)` must then return a tuple of the same structure (FLUX's
  double blocks: (x, context)). The extra `args` (context, temb, rotary embeddings) go to every block. The
  remat policy applies inside the scanned body, per block, as `remat_call` applies it to unrolled blocks.
  """

  def __init__(self, make: Callable[[], nnx.Module], n: int):
    if n < 1:
      raise ValueError(f"a scanned stack needs at least one block, got {n}")
    blocks = [make() for _ in range(n)]
    graphdef = nnx.graphdef(blocks[0])
    variables = [{p: v for p, v in nnx.iter_graph(b) if isinstance(v, nnx.Variable)} for b in blocks]
    if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
      raise ValueError(f"the blocks of a scanned stack must be identical in structure; {type(blocks[0]).__name__} "
                       "built different modules or variables for different blocks")
    for path, var in variables[0].items():
      axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
      var.set_value(jnp.stack([v[path].get_value() for v in variables]))
      var.set_metadata("axes", (LAYER_AXIS, *axes))
    setattr(self, STACK, blocks[0])
    self.length = n

  def __len__(self) -> int:
    return self.length

  def __call__(self, carry, *args, remat: str = "none"):
    graphdef, state = nnx.split(getattr(self, STACK))
    policy = _remat_policy(remat)
    splat = isinstance(carry, tuple)

    def block(layer_state, carry):
      module = nnx.merge(graphdef, layer_state)
      out = module(*carry, *args) if splat else module(carry, *args)
      # A scan's carry keeps its type: a block that widens its input (bf16 -> f32) is cast back.
      return jax.tree.map(lambda o, c: o.astype(c.dtype), out, carry)

    if policy is not None:
      block = jax.checkpoint(block, policy=policy)
    carry, _ = jax.lax.scan(lambda c, layer_state: (block(layer_state, c), None), carry, state, length=self.length)
    return carry


def block_stack(make: Callable[[], nnx.Module], n: int, *, scan: bool) -> nnx.List | ScannedBlocks:
  """N blocks from `make()`: a `ScannedBlocks` when `scan` and N > 1, else an `nnx.List` (a stack of one
  gains nothing from a scan). The one-line swap for `nnx.List([make() for _ in range(n)])`; run it with
  `run_blocks`."""
  if scan and n > 1:
    return ScannedBlocks(make, n)
  return nnx.List([make() for _ in range(n)])


def run_blocks(blocks: nnx.List | ScannedBlocks, policy: str, carry, *args):
  """Runs a `block_stack` in order on `carry` (an array, or a tuple splatted into each block's first
  arguments), passing `args` to every block, each block rematerialised per `policy` (`remat_call`)."""
  if isinstance(blocks, ScannedBlocks):
    return blocks(carry, *args, remat=policy)
  for block in blocks:
    carry = (remat_call(block, policy, *carry, *args) if isinstance(carry, tuple)
             else remat_call(block, policy, carry, *args))
  return carry


class Downsample2D(nnx.Module):
  def __init__(self, channels: int, *, padding: int, opts: Options, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=opts.dtype,
                       param_dtype=opts.param_dtype, rngs=rngs)
    self.pad_right = padding == 0  # diffusers pads (0, 1, 0, 1) when padding is 0

  def __call__(self, x):
    if self.pad_right:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  def __init__(self, channels: int, *, opts: Options, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x, size: tuple[int, int]):
    # Nearest-neighbour resize to the skip connection's size (torch 'nearest': src = floor(dst * in/out)).
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
    cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return self.conv(x[:, rows][:, :, cols])
