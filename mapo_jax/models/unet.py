"""diffusers' `UNet2DConditionModel` in Flax NNX (NHWC), built from the checkpoint's own config.json.

Covers the options used by SDXL base/refiner-style, SD 1.x and SD 2.x UNets; any other value of a
config option fails at construction with an error naming the key. Attribute names mirror diffusers'
module names so `mapo_jax.convert` maps weights by path. With `Options.scan`, each Transformer2DModel's
`transformer_blocks` (diffusers' ModuleList of identical BasicTransformerBlocks, `transformer_layers_per_block`
deep: SDXL's ten at the 32x32 level) is a scanned stack (layers.ScannedBlocks), compiled once per stack.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mapo_jax import convert, sharding
from mapo_jax.models.attention import Attention
from mapo_jax.models.layers import (Conv2d, Downsample2D, Dropout, GroupNorm, LayerNorm, Linear,
                                    Options, Upsample2D, block_stack, remat_call, run_blocks)

# diffusers' defaults for every UNet2DConditionModel option (diffusers 0.42).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Options whose only supported value is the one given (anything else is a different architecture).
_FIXED = {
    "center_input_sample": False, "only_cross_attention": False, "dropout": 0.0, "act_fn": "silu",
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
_CHOICES = {
    "addition_embed_type": (None, "text_time"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "conv_in_kernel": (1, 3, 5, 7), "conv_out_kernel": (1, 3, 5, 7),
}
_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")

@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """A validated diffusers UNet config with every per-block option expanded to a tuple."""
  raw_json: str  # the config.json contents; a string keeps the dataclass hashable (static under jit)
  in_channels: int
  out_channels: int
  flip_sin_to_cos: bool
  freq_shift: float
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  transformer_layers_per_block: tuple[int, ...]
  num_attention_heads: tuple[int, ...]
  cross_attention_dim: tuple[int, ...]
  downsample_padding: int
  mid_block_scale_factor: float
  norm_num_groups: int
  norm_eps: float
  use_linear_projection: bool
  upcast_attention: bool
  addition_embed_type: str | None
  addition_time_embed_dim: int | None
  projection_class_embeddings_input_dim: int | None
  conv_in_kernel: int
  conv_out_kernel: int

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "UNetConfig":
    c = convert.with_defaults("UNet", config, DIFFUSERS_DEFAULTS)
    for key, value in _FIXED.items():
      v = c[key]
      if key == "only_cross_attention" and isinstance(v, (list, tuple)) and not any(v):
        v = False
      if v != value:
        raise ValueError(f"UNet config: unsupported {key}={c[key]!r} (only {value!r} is supported)")
    for key, choices in _CHOICES.items():
      if c[key] not in choices:
        raise ValueError(f"UNet config: unsupported {key}={c[key]!r} (supported: {choices})")
    bad = [t for t in c["down_block_types"] if t not in _DOWN_BLOCKS]
    bad += [t for t in c["up_block_types"] if t not in _UP_BLOCKS]
    if bad:
      raise ValueError(f"UNet config: unsupported block type(s) {bad} in down_block_types/up_block_types")
    n = len(c["down_block_types"])
    if len(c["up_block_types"]) != n or len(c["block_out_channels"]) != n:
      raise ValueError("UNet config: down_block_types, up_block_types and block_out_channels differ in length")

    def per_block(key, value):
      if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) for v in value):
          raise ValueError(f"UNet config: {key}={value!r} must be an int or a list of {n} ints")
        return tuple(value)
      return (value,) * n

    # diffusers issue 2011: in SD configs `attention_head_dim` holds the number of heads.
    heads = c["num_attention_heads"] or c["attention_head_dim"]
    if c["addition_embed_type"] == "text_time":
      for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if c[key] is None:
          raise ValueError(f"UNet config: addition_embed_type='text_time' needs {key}")
    return cls(
        raw_json=json.dumps(dict(config), sort_keys=True), in_channels=c["in_channels"], out_channels=c["out_channels"],
        flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"],
        down_block_types=tuple(c["down_block_types"]), up_block_types=tuple(c["up_block_types"]),
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=per_block("layers_per_block", c["layers_per_block"]),
        transformer_layers_per_block=per_block("transformer_layers_per_block",
                                               c["transformer_layers_per_block"]),
        num_attention_heads=per_block("attention_head_dim/num_attention_heads", heads),
        cross_attention_dim=per_block("cross_attention_dim", c["cross_attention_dim"]),
        downsample_padding=c["downsample_padding"], mid_block_scale_factor=c["mid_block_scale_factor"],
        norm_num_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
        use_linear_projection=bool(c["use_linear_projection"]), upcast_attention=bool(c["upcast_attention"]),
        addition_embed_type=c["addition_embed_type"], addition_time_embed_dim=c["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
        conv_in_kernel=c["conv_in_kernel"], conv_out_kernel=c["conv_out_kernel"])


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps, as diffusers' `get_timestep_embedding` (float32)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  def __init__(self, in_dim: int, dim: int, *, opts: Options, rngs: nnx.Rngs):
    lin = functools.partial(Linear, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.linear_1 = lin(in_dim, dim, axes=("embed", "mlp"))
    self.linear_2 = lin(dim, dim, axes=("mlp", "embed"))

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, groups: int, eps: float,
               output_scale_factor: float = 1.0, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(groups, in_ch, eps=eps, **kw)
    self.conv1 = Conv2d(in_ch, out_ch, 3, **kw)
    self.time_emb_proj = Linear(temb_ch, out_ch, axes=("embed", "conv_out"), **kw)
    self.norm2 = GroupNorm(groups, out_ch, eps=eps, **kw)
    self.conv2 = Conv2d(out_ch, out_ch, 3, **kw)
    self.conv_shortcut = Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x, temb):
    h = self.conv1(self.norm1(x, silu=True))
    h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(self.norm2(h, silu=True))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x.astype(h.dtype) + h
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class GEGLU(nnx.Module):
  """proj → (hidden, gate); hidden * gelu(gate) with the exact (erf) GELU, as diffusers."""

  def __init__(self, dim: int, inner: int, *, opts: Options, rngs: nnx.Rngs):
    self.proj = Linear(dim, 2 * inner, axes=("embed", "mlp"), dtype=opts.dtype,
                       param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x):
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, *, opts: Options, rngs: nnx.Rngs):
    inner = 4 * dim
    self.net = nnx.List([
        GEGLU(dim, inner, opts=opts, rngs=rngs), Dropout(),
        Linear(inner, dim, axes=("mlp", "embed"), dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with a residual."""

  def __init__(self, dim: int, heads: int, dim_head: int, cross_dim: int, *, upcast: bool, opts: Options,
               rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    attn = functools.partial(Attention, dim, heads=heads, dim_head=dim_head, upcast=upcast,
                             implementation=opts.attention, **kw)
    self.norm1 = LayerNorm(dim, **kw)
    self.attn1 = attn()
    self.norm2 = LayerNorm(dim, **kw)
    self.attn2 = attn(cross_attention_dim=cross_dim)
    self.norm3 = LayerNorm(dim, **kw)
    self.ff = FeedForward(dim, opts=opts, rngs=rngs)

  def __call__(self, x, context):
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
  """GroupNorm → proj_in → transformer blocks on (B, H·W, C) tokens → proj_out, plus the residual."""

  def __init__(self, heads: int, channels: int, depth: int, cross_dim: int, *, cfg: UNetConfig,
               opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    dim_head = channels // heads
    inner = heads * dim_head
    self.norm = GroupNorm(cfg.norm_num_groups, channels, eps=1e-6, **kw)
    if cfg.use_linear_projection:
      self.proj_in = Linear(channels, inner, axes=("embed", "mlp"), **kw)
      self.proj_out = Linear(inner, channels, axes=("mlp", "embed"), **kw)
    else:  # a 1×1 convolution is the same map on NHWC tokens
      self.proj_in = Conv2d(channels, inner, 1, **kw)
      self.proj_out = Conv2d(inner, channels, 1, **kw)
    self.transformer_blocks = block_stack(
        lambda: BasicTransformerBlock(inner, heads, dim_head, cross_dim, upcast=cfg.upcast_attention, opts=opts,
                                      rngs=rngs), depth, scan=opts.scan)
    self.remat = opts.remat

  def __call__(self, x, context):
    b, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x)).reshape(b, h * w, -1)
    tokens = run_blocks(self.transformer_blocks, self.remat, tokens, context)
    return self.proj_out(tokens.reshape(b, h, w, -1)) + x.astype(tokens.dtype)


class DownBlock(nnx.Module):
  """DownBlock2D or, with attention, CrossAttnDownBlock2D: (resnet → [transformer])* → [downsample]."""

  def __init__(self, i: int, in_ch: int, out_ch: int, temb_ch: int, *, attention: bool, last: bool,
               cfg: UNetConfig, opts: Options, rngs: nnx.Rngs):
    n = cfg.layers_per_block[i]
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, opts=opts, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch, **kw)
                             for j in range(n)])
    self.attentions = nnx.List([
        Transformer2DModel(cfg.num_attention_heads[i], out_ch, cfg.transformer_layers_per_block[i],
                           cfg.cross_attention_dim[i], cfg=cfg, opts=opts, rngs=rngs)
        for _ in range(n)]) if attention else None
    self.downsamplers = None if last else nnx.List([
        Downsample2D(out_ch, padding=cfg.downsample_padding, opts=opts, rngs=rngs)])
    self.remat = opts.remat

  def __call__(self, x, temb, context):
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = remat_call(resnet, self.remat, x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):
  """UpBlock2D or CrossAttnUpBlock2D: (concat skip → resnet → [transformer])* → [upsample]."""

  def __init__(self, i: int, in_ch: int, prev_ch: int, out_ch: int, temb_ch: int, *, attention: bool,
               last: bool, cfg: UNetConfig, opts: Options, rngs: nnx.Rngs):
    r = len(cfg.block_out_channels) - 1 - i  # the matching down block
    n = cfg.layers_per_block[r] + 1
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, opts=opts, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D((prev_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch, temb_ch,
                      **kw) for j in range(n)])
    self.attentions = nnx.List([
        Transformer2DModel(cfg.num_attention_heads[r], out_ch, cfg.transformer_layers_per_block[r],
                           cfg.cross_attention_dim[r], cfg=cfg, opts=opts, rngs=rngs)
        for _ in range(n)]) if attention else None
    self.upsamplers = None if last else nnx.List([Upsample2D(out_ch, opts=opts, rngs=rngs)])
    self.remat = opts.remat

  def __call__(self, x, skips, temb, context, upsample_size):
    for j, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = remat_call(resnet, self.remat, x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNetMidBlock2DCrossAttn(nnx.Module):
  def __init__(self, channels: int, temb_ch: int, *, cfg: UNetConfig, opts: Options, rngs: nnx.Rngs):
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor,
              opts=opts, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_ch, **kw) for _ in range(2)])
    self.attentions = nnx.List([Transformer2DModel(
        cfg.num_attention_heads[-1], channels, cfg.transformer_layers_per_block[-1],
        cfg.cross_attention_dim[-1], cfg=cfg, opts=opts, rngs=rngs)])
    self.remat = opts.remat

  def __call__(self, x, temb, context):
    x = remat_call(self.resnets[0], self.remat, x, temb)
    x = self.attentions[0](x, context)
    return remat_call(self.resnets[1], self.remat, x, temb)


class UNet2DConditionModel(nnx.Module):
  """The conditional UNet. Call: (sample NHWC, timesteps (B,), encoder_hidden_states (B, T, D),
  text_embeds (B, P), time_ids (B, 6)) → NHWC prediction."""

  def __init__(self, config: Mapping[str, Any] | UNetConfig, *, options: Options = Options(),
               rngs: nnx.Rngs):
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
    opts = options
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    ch = cfg.block_out_channels
    temb_ch = 4 * ch[0]
    self.cfg, self.options = cfg, opts
    self.conv_in = Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
    self.time_embedding = TimestepEmbedding(ch[0], temb_ch, opts=opts, rngs=rngs)
    self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch, opts=opts,
                                            rngs=rngs) if cfg.addition_embed_type == "text_time" else None)
    n = len(ch)
    self.down_blocks = nnx.List([
        DownBlock(i, ch[max(i - 1, 0)], ch[i], temb_ch, attention=t == "CrossAttnDownBlock2D",
                  last=i == n - 1, cfg=cfg, opts=opts, rngs=rngs)
        for i, t in enumerate(cfg.down_block_types)])
    self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb_ch, cfg=cfg, opts=opts, rngs=rngs)
    rev = ch[::-1]
    self.up_blocks = nnx.List([
        UpBlock(i, rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb_ch,
                attention=t == "CrossAttnUpBlock2D", last=i == n - 1, cfg=cfg, opts=opts, rngs=rngs)
        for i, t in enumerate(cfg.up_block_types)])
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, **kw)
    self.conv_out = Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

  @property
  def config(self) -> dict[str, Any]:
    """The diffusers config dict this model was built from."""
    return json.loads(self.cfg.raw_json)

  def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None):
    cfg, dtype = self.cfg, self.options.dtype
    b = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift)
    emb = self.time_embedding(t_emb.astype(dtype))
    if self.add_embedding is not None:
      if text_embeds is None or time_ids is None:
        raise ValueError("this UNet (addition_embed_type='text_time') needs text_embeds and time_ids")
      time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                       flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
      add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(b, -1)], axis=-1)
      emb = emb + self.add_embedding(add.astype(dtype))
    context = encoder_hidden_states.astype(dtype)

    x = self.conv_in(sample)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, emb, context)
      skips.extend(block_skips)
    x = self.mid_block(x, emb, context)
    for block in self.up_blocks:
      block_skips = [skips.pop() for _ in block.resnets][::-1]
      size = skips[-1].shape[1:3] if skips else None
      x = block(x, block_skips, emb, context, size)
    return self.conv_out(self.conv_norm_out(x, silu=True))


def load_unet(path, dtype=jnp.float32, *, param_dtype=jnp.float32, attention: str | None = None,
              remat: str = "none", scan: bool = False, variant: str | None = None, mesh=None
              ) -> UNet2DConditionModel:
  """Loads a diffusers UNet folder (or a pipeline folder's `unet/`) without PyTorch.

  With `mesh`, every parameter is born sharded by the logical-axis rules (sharding.model_shardings):
  each device receives only its block, cast to `param_dtype` on the host. With `scan`, the transformer
  stacks are scanned (Options.scan); the folder's per-block keys fill the stacked parameters.
  """
  folder = convert.model_folder(path, "unet")
  config = convert.read_config(folder)
  options = Options(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan)
  cfg = UNetConfig.from_dict(config)  # validate before reading any weights
  shardings = None if mesh is None else functools.partial(sharding.model_shardings, mesh=mesh)
  return convert.load_model(
      folder, lambda: UNet2DConditionModel(cfg, options=options, rngs=nnx.Rngs(0)),
      stem=convert.DIFFUSERS_STEM, variant=variant, shardings=shardings)


def save_unet(unet: UNet2DConditionModel, out_dir, *, dtype: str | None = None):
  """Writes a diffusers UNet folder that `UNet2DConditionModel.from_pretrained` loads."""
  config = {"_class_name": "UNet2DConditionModel", **unet.config}
  return convert.save_model(unet, out_dir, config, stem=convert.DIFFUSERS_STEM, dtype=dtype)


def init_unet(config: Mapping[str, Any], *, options: Options = Options(), seed: int = 0) -> UNet2DConditionModel:
  """A randomly initialised UNet (benchmarks, tests), created in one compiled program: eager
  initialisation dispatches and compiles every parameter's initialiser separately."""
  cfg = UNetConfig.from_dict(config)
  return nnx.jit(lambda: UNet2DConditionModel(cfg, options=options, rngs=nnx.Rngs(seed)))()
