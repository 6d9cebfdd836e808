"""diffusers' `AutoencoderKL` in Flax NNX (NHWC), built from the checkpoint's own config.json.

Covers the SD 1.x/2.x and SDXL VAEs (incl. madebyollin's sdxl-vae-fp16-fix config). Attribute names
mirror diffusers' module names (encoder.down_blocks.N.resnets.M..., mid_block.attentions.0.to_q, ...)
so `mapo_jax.convert` maps weights by path. Latents are *unscaled*: callers multiply by
`vae.config["scaling_factor"]` after `posterior_sample` and divide before `decode`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mapo_jax import convert
from mapo_jax.models.attention import Attention
from mapo_jax.models.layers import Conv2d, Dropout, GroupNorm
from mapo_jax.models.layers import Downsample2D, Options, Upsample2D

# diffusers' defaults for every AutoencoderKL option (diffusers 0.42).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
EPS = 1e-6  # diffusers' Encoder/Decoder use 1e-6 in every GroupNorm
# Old checkpoints name the mid-block attention projections as the pre-0.14 `AttentionBlock` did;
# diffusers renames them at load (ModelMixin._fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"(.*\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """A validated diffusers AutoencoderKL config."""
  raw_json: str  # the config.json contents; a string keeps the dataclass hashable (static under jit)
  in_channels: int
  out_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  force_upcast: bool
  use_quant_conv: bool
  use_post_quant_conv: bool
  mid_block_add_attention: bool

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
    c = convert.with_defaults("VAE", config, DIFFUSERS_DEFAULTS)
    if c["act_fn"] != "silu":
      raise ValueError(f"VAE config: unsupported act_fn={c['act_fn']!r} (only 'silu' is supported)")
    n = len(c["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      if list(c[key]) != [block] * n:
        raise ValueError(f"VAE config: unsupported {key}={c[key]!r} (need {n} x {block!r}, one per "
                         "block_out_channels entry)")
    return cls(
        raw_json=json.dumps(dict(config), sort_keys=True), in_channels=c["in_channels"], out_channels=c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
        latent_channels=c["latent_channels"], norm_num_groups=c["norm_num_groups"],
        force_upcast=bool(c["force_upcast"]),
        use_quant_conv=bool(c["use_quant_conv"]), use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]))


class ResnetBlock2D(nnx.Module):
  """diffusers' ResnetBlock2D without a time embedding (temb_channels=None)."""

  def __init__(self, in_ch: int, out_ch: int, *, groups: int, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(groups, in_ch, eps=EPS, **kw)
    self.conv1 = Conv2d(in_ch, out_ch, 3, **kw)
    self.norm2 = GroupNorm(groups, out_ch, eps=EPS, **kw)
    self.dropout = Dropout()
    self.conv2 = Conv2d(out_ch, out_ch, 3, **kw)
    self.conv_shortcut = Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv1(self.norm1(x, silu=True))
    h = self.conv2(self.dropout(self.norm2(h, silu=True)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x.astype(h.dtype) + h


class SpatialSelfAttention(Attention):
  """The mid-block `Attention(group_norm=..., residual_connection=True)`: one head over all H·W pixels."""

  def __init__(self, channels: int, *, groups: int, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    # upcast: QK^T and softmax in float32 (diffusers: upcast_softmax=True); 512-wide float16 logits overflow.
    super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True, upcast=True,
                     implementation=opts.attention, **kw)
    self.group_norm = GroupNorm(groups, channels, eps=EPS, **kw)

  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    return super().__call__(tokens).reshape(b, h, w, c) + x.astype(self.group_norm.dtype)


class UNetMidBlock2D(nnx.Module):
  def __init__(self, channels: int, *, cfg: VAEConfig, opts: Options, rngs: nnx.Rngs):
    kw = dict(groups=cfg.norm_num_groups, opts=opts, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
    self.attentions = (nnx.List([SpatialSelfAttention(channels, **kw)]) if cfg.mid_block_add_attention
                       else None)

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, *, last: bool, cfg: VAEConfig, opts: Options, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, groups=cfg.norm_num_groups, opts=opts, rngs=rngs)
        for j in range(cfg.layers_per_block)])
    # The Encoder builds its downsamplers with padding=0: pad right/bottom by one, then a stride-2 conv.
    self.downsamplers = None if last else nnx.List([Downsample2D(out_ch, padding=0, opts=opts, rngs=rngs)])

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, *, last: bool, cfg: VAEConfig, opts: Options, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, groups=cfg.norm_num_groups, opts=opts, rngs=rngs)
        for j in range(cfg.layers_per_block + 1)])
    self.upsamplers = None if last else nnx.List([Upsample2D(out_ch, opts=opts, rngs=rngs)])

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, (2 * x.shape[1], 2 * x.shape[2]))  # nearest, scale factor 2
    return x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], last=i == n - 1, cfg=cfg, opts=opts, rngs=rngs)
        for i in range(n)])
    self.mid_block = UNetMidBlock2D(ch[-1], cfg=cfg, opts=opts, rngs=rngs)
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], eps=EPS, **kw)
    self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)  # double_z: mean and logvar

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(self.conv_norm_out(self.mid_block(x), silu=True))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    rev, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
    self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(rev[0], cfg=cfg, opts=opts, rngs=rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], last=i == n - 1, cfg=cfg, opts=opts, rngs=rngs)
        for i in range(n)])
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], eps=EPS, **kw)
    self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(self.conv_norm_out(x, silu=True))


class AutoencoderKL(nnx.Module):
  """`encode(x)` → (mean, logvar) of the latent posterior; `decode(z)` → image. NHWC, images in [-1, 1]."""

  def __init__(self, config: Mapping[str, Any] | VAEConfig, *, options: Options = Options(), rngs: nnx.Rngs):
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
    kw = dict(dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs)
    c = cfg.latent_channels
    self.cfg = cfg
    self.encoder = Encoder(cfg, opts=options, rngs=rngs)
    self.decoder = Decoder(cfg, opts=options, rngs=rngs)
    self.quant_conv = Conv2d(2 * c, 2 * c, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv2d(c, c, 1, **kw) if cfg.use_post_quant_conv else None

  @property
  def config(self) -> dict[str, Any]:
    """The diffusers config dict with diffusers' defaults filled in (SD 1.x files omit scaling_factor)."""
    return {**DIFFUSERS_DEFAULTS, **json.loads(self.cfg.raw_json)}

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

  def decode(self, z: jax.Array) -> jax.Array:
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)


def posterior_sample(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """A float32 draw mean + exp(logvar / 2) * N(0, 1) from the diagonal Gaussian posterior."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  # Drawn flat, then reshaped: the same numbers as drawing in shape (threefry is partitionable), but
  # XLA:CPU compiles the 4-D draw several times slower.
  noise = jax.random.normal(key, (mean.size,), jnp.float32).reshape(mean.shape)
  return mean + jnp.exp(0.5 * logvar) * noise


def _rename_legacy(key: str) -> str:
  m = _LEGACY_KEY.fullmatch(key)
  return f"{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else key


def load_vae(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
             attention: str | None = "xla", variant: str | None = None) -> AutoencoderKL:
  """Loads a diffusers VAE folder (or a pipeline folder's `vae/`) without PyTorch.

  A float16 `dtype` computes in float32 when the config sets `force_upcast` (the original SDXL VAE
  overflows in float16), as diffusers' pipelines upcast it. `attention` defaults to "xla" because the
  mid-block attention has one 512-wide head, beyond what the cuDNN flash kernel accepts.
  """
  folder = convert.model_folder(path, "vae")
  cfg = VAEConfig.from_dict(convert.read_config(folder))  # validate before reading any weights
  if jnp.dtype(dtype) == jnp.float16 and cfg.force_upcast:
    dtype = jnp.float32
  options = Options(dtype=dtype, param_dtype=param_dtype, attention=attention)
  return convert.load_model(folder, lambda: AutoencoderKL(cfg, options=options, rngs=nnx.Rngs(0)),
                            stem=convert.DIFFUSERS_STEM, variant=variant, rename=_rename_legacy)


def save_vae(vae: AutoencoderKL, out_dir: str | os.PathLike, *, dtype: str | None = None):
  """Writes a diffusers VAE folder that `AutoencoderKL.from_pretrained` loads."""
  config = {"_class_name": "AutoencoderKL", **json.loads(vae.cfg.raw_json)}
  return convert.save_model(vae, out_dir, config, stem=convert.DIFFUSERS_STEM, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Latents:
  """The VAE's latent normalisation, read from its config; training and decoding both use it.

  normalize(z) = (z - shift - mean) * scale / std, denormalize is its inverse, where diffusers writes
  `(z - latents_mean) * scaling_factor / latents_std` (SDXL-style configs with per-channel statistics),
  `(z - shift_factor) * scaling_factor` (SD3-style) or `z * scaling_factor` (SD 1.x/2.x, SDXL base).
  Per-channel values broadcast over the last (channel) axis of NHWC latents. Hashable: static under jit.
  """
  scale: float = 0.18215
  shift: float = 0.0
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @classmethod
  def from_vae_config(cls, config: Mapping[str, Any]) -> "Latents":
    tup = lambda v: None if v is None else tuple(float(x) for x in v)
    return cls(scale=float(config.get("scaling_factor") or 0.18215), shift=float(config.get("shift_factor") or 0.0),
               mean=tup(config.get("latents_mean")), std=tup(config.get("latents_std")))

  def _stats(self):
    mean = jnp.asarray(self.mean if self.mean is not None else 0.0, jnp.float32) + self.shift
    std = jnp.asarray(self.std if self.std is not None else 1.0, jnp.float32)
    return mean, std

  def normalize(self, z: jax.Array) -> jax.Array:
    """VAE latents → the space the denoiser trains and samples in."""
    mean, std = self._stats()
    return (z - mean) * (self.scale / std)

  def denormalize(self, z: jax.Array) -> jax.Array:
    """The denoiser's latent space → VAE latents, for decoding."""
    mean, std = self._stats()
    return z * (std / self.scale) + mean
