"""FLUX.1's transformer (diffusers' `FluxTransformer2DModel`) in Flax NNX, built from its own config.json.

The facts this file relies on, read from diffusers 0.42:
  models/transformers/transformer_flux.py
    FluxTransformer2DModel: x_embedder / context_embedder (Linear), time_text_embed, `num_layers` double-stream
      `FluxTransformerBlock`s, `num_single_layers` `FluxSingleTransformerBlock`s, norm_out
      (AdaLayerNormContinuous, no affine, eps 1e-6), proj_out (inner -> patch_size² · out_channels).
      `timestep` and `guidance` are multiplied by 1000 inside the model (the pipeline passes sigmas in [0, 1];
      diffusers rounds them to the compute dtype first, we keep float32); RoPE positions: `cat(txt_ids, img_ids)`.
    FluxTransformerBlock: AdaLayerNormZero norm1 / norm1_context, joint attention (text tokens first), then
      per stream LayerNorm(eps 1e-6, no affine) modulated by (shift_mlp, scale_mlp), a GELU(tanh) FeedForward
      (ff.net.0.proj, ff.net.2; 4x width) gated by gate_mlp; a float16 text stream is clipped to ±65504.
    FluxSingleTransformerBlock: AdaLayerNormZeroSingle `norm`, self-attention without an output projection
      (pre_only) in parallel with proj_mlp + GELU(tanh), `proj_out` over their concatenation, gated
      (float16: clipped to ±65504).
    FluxAttention / FluxAttnProcessor: to_q/k/v (bias), RMSNorm(head_dim, eps 1e-6) on q and k per stream
      (norm_q, norm_k, norm_added_q, norm_added_k), the context stream's add_q/k/v_proj, RoPE on q and k of
      the joint sequence, softmax(q kᵀ/√d) v, then to_out.0 (image) and to_add_out (text).
    FluxPosEmbed: per axis i of the (N, n_axes) ids, angles pos_i · θ^(-2j/d_i) (θ = 10000, j < d_i/2; in
      float64), cos/sin repeated pairwise (`repeat_interleave_real=True`) and concatenated over axes.
  models/embeddings.py
    apply_rotary_emb(use_real_unbind_dim=-1): (x[2j], x[2j+1]) is rotated as one complex number, in float32.
    CombinedTimestep(Guidance)TextProjEmbeddings: 256-channel sinusoids (flip_sin_to_cos, shift 0) through
      TimestepEmbedding (linear_1, SiLU, linear_2) for the timestep (and the guidance), plus
      PixArtAlphaTextProjection(act_fn="silu") of the pooled text embedding (linear_1, SiLU, linear_2).
  models/normalization.py
    AdaLayerNormZero: linear(silu(temb)) -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp);
    AdaLayerNormZeroSingle: -> (shift, scale, gate); both LayerNorm(eps 1e-6) · (1 + scale) + shift.
    AdaLayerNormContinuous: -> (scale, shift): the opposite ORDER.
  Black Forest Labs, FLUX.1 (github.com/black-forest-labs/flux, src/flux/model.py): the same architecture.

Precision: parameters in `param_dtype`, matmuls in `dtype`. LayerNorm / RMSNorm statistics, the adaptive
modulation `norm(x) · (1 + scale) + shift`, RoPE and the sinusoidal embeddings are float32 (diffusers does the
modulation in the compute dtype; float32 is at least as exact). RoPE angles are float32 products (diffusers:
float64): their error is about one float32 ulp of the angle, ~4e-6 rad at position 64 (a 1024 px image).

Sharding (mapo_jax.sharding logical axes): the model width is "embed" (fsdp) on every kernel's input or output
side, attention projections "heads" and the MLP / AdaLN-modulation / embedder widths "mlp" (tensor); the text
and pooled inputs of context_embedder / x_embedder are "kv_embed"; QK-norm scales "norm" (replicated).

Scanned stacks (`Options.scan`, config.scan_blocks): `transformer_blocks` and `single_transformer_blocks` are each
N identical blocks, so each becomes one layers.ScannedBlocks (parameters stacked on a leading "layers" axis, one
jax.lax.scan); the double blocks carry the (image, text) pair. mapo_jax.convert maps the stacked parameters to
diffusers' per-block keys, so files are the same either way.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import convert, sharding
from mapo_jax.models.attention import dot_product_attention
from mapo_jax.models.layers import Dropout, Linear, Options, RMSNorm, block_stack, run_blocks
from mapo_jax.models.unet import TimestepEmbedding, timestep_embedding

# diffusers' defaults for every FluxTransformer2DModel option (diffusers 0.42, FluxTransformer2DModel.__init__).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}
SUBFOLDER = "transformer"  # the transformer's folder in a FluxPipeline folder
ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000)
TIME_CHANNELS = 256  # Timesteps(num_channels=256)
TIME_SCALE = 1000.0  # timestep and guidance are multiplied by 1000 inside the model
EPS = 1e-6  # every LayerNorm and RMSNorm of the model
MLP_RATIO = 4.0  # FeedForward(mult=4), FluxSingleTransformerBlock(mlp_ratio=4.0)


def _int(c: Mapping[str, Any], key: str, minimum: int) -> int:
  v = c[key]
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    raise ValueError(f"FLUX transformer config: {key}={v!r} must be an integer >= {minimum}")
  return v


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """A validated diffusers FluxTransformer2DModel config (out_channels resolved)."""
  raw_json: str  # the config.json contents; a string keeps the dataclass hashable (static under jit)
  patch_size: int
  in_channels: int
  out_channels: int
  num_layers: int
  num_single_layers: int
  attention_head_dim: int
  num_attention_heads: int
  joint_attention_dim: int
  pooled_projection_dim: int
  guidance_embeds: bool
  axes_dims_rope: tuple[int, ...]

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden_dim(self) -> int:
    return int(self.inner_dim * MLP_RATIO)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "FluxConfig":
    c = convert.with_defaults("FLUX transformer", config, DIFFUSERS_DEFAULTS)
    ints = {k: _int(c, k, 1) for k in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                                       "joint_attention_dim", "pooled_projection_dim")}
    ints.update({k: _int(c, k, 0) for k in ("num_layers", "num_single_layers")})  # diffusers builds empty stacks
    out_channels = c["out_channels"]
    if out_channels is None or out_channels == 0:  # diffusers: `out_channels or in_channels`
      out_channels = ints["in_channels"]
    else:
      out_channels = _int(c, "out_channels", 1)
    if not isinstance(c["guidance_embeds"], bool):
      raise ValueError(f"FLUX transformer config: guidance_embeds={c['guidance_embeds']!r} must be true or false")
    axes = c["axes_dims_rope"]
    if (not isinstance(axes, (list, tuple)) or not axes
        or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 or d % 2 for d in axes)):
      raise ValueError(f"FLUX transformer config: axes_dims_rope={axes!r} must be a list of positive even "
                       "integers (one rotary block per position axis)")
    if sum(axes) != ints["attention_head_dim"]:
      # diffusers builds such a model, but its rotary tables then do not fit the heads at the first call.
      raise ValueError(f"FLUX transformer config: axes_dims_rope={list(axes)} must sum to attention_head_dim="
                       f"{ints['attention_head_dim']}")
    return cls(raw_json=json.dumps(dict(config), sort_keys=True), out_channels=out_channels,
               guidance_embeds=c["guidance_embeds"], axes_dims_rope=tuple(axes), **ints)


# --- Rotary position embedding -------------------------------------------------------------------------------

def rope_angles(ids: jax.Array, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> jax.Array:
  """(N, sum(axes_dims) / 2) float32 angles of FluxPosEmbed for (N, n_axes) position ids: axis i contributes
  ids[:, i] · θ^(-2j/d_i), j < d_i/2. The frequencies are float64 constants rounded once to float32."""
  if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
    raise ValueError(f"position ids must be (tokens, {len(axes_dims)}) (one column per axes_dims_rope entry), "
                     f"got {ids.shape}")
  pos = ids.astype(jnp.float32)
  parts = []
  for i, d in enumerate(axes_dims):
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    parts.append(pos[:, i:i + 1] * jnp.asarray(freqs, jnp.float32)[None])
  return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates each pair (x[2j], x[2j+1]) of (B, N, H, D) `x` by the angle whose cos/sin are (N, D/2), in
  float32 (diffusers' apply_rotary_emb with interleaved real/imaginary parts). Returns float32."""
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = x[..., 0], x[..., 1]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.stack([re * cos - im * sin, im * cos + re * sin], axis=-1).reshape(*x.shape[:-2], -1)


# --- Adaptive layer norms ---------------------------------------------------------------------------------------

def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """LayerNorm(eps 1e-6, no affine) of (B, N, D) `x`, times (1 + scale) plus shift ((B, D) each); float32,
  cast to `dtype` once at the end."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + EPS)
  y = y * (1 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
  return y.astype(dtype)


class AdaLayerNormZero(nnx.Module):
  """diffusers' AdaLayerNormZero (chunks=6) / AdaLayerNormZeroSingle (chunks=3): `linear` maps silu(temb) to
  `chunks` (B, D) vectors; the first two (shift, scale) modulate the normalised x, the rest are returned."""

  def __init__(self, dim: int, chunks: int, *, opts: Options, rngs: nnx.Rngs):
    self.linear = Linear(dim, chunks * dim, axes=("embed", "mlp"), dtype=opts.dtype, param_dtype=opts.param_dtype,
                         rngs=rngs)
    self.chunks, self.dtype = chunks, opts.dtype

  def __call__(self, x, temb):
    shift, scale, *rest = jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)
    return modulate(x, shift, scale, self.dtype), rest


class AdaLayerNormContinuous(nnx.Module):
  """diffusers' AdaLayerNormContinuous (no affine, eps 1e-6): linear(silu(temb)) -> (scale, shift): scale first."""

  def __init__(self, dim: int, *, opts: Options, rngs: nnx.Rngs):
    self.linear = Linear(dim, 2 * dim, axes=("embed", "mlp"), dtype=opts.dtype, param_dtype=opts.param_dtype,
                         rngs=rngs)
    self.dtype = opts.dtype

  def __call__(self, x, temb):
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1)
    return modulate(x, shift, scale, self.dtype)


# --- Embeddings ------------------------------------------------------------------------------------------------

class CombinedTimestepTextProjEmbeddings(nnx.Module):
  """temb = timestep_embedder(sinusoids(1000 t)) [+ guidance_embedder(sinusoids(1000 g))] + text_embedder(pooled).

  diffusers' CombinedTimestepTextProjEmbeddings and, with guidance, CombinedTimestepGuidanceTextProjEmbeddings;
  text_embedder (PixArtAlphaTextProjection with SiLU) has TimestepEmbedding's layout: linear_1, SiLU, linear_2."""

  def __init__(self, dim: int, pooled_dim: int, *, guidance: bool, opts: Options, rngs: nnx.Rngs):
    self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim, opts=opts, rngs=rngs)
    self.guidance_embedder = TimestepEmbedding(TIME_CHANNELS, dim, opts=opts, rngs=rngs) if guidance else None
    self.text_embedder = TimestepEmbedding(pooled_dim, dim, opts=opts, rngs=rngs)
    self.dtype = opts.dtype

  def _embed(self, embedder, t):
    sinusoids = timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=0)
    return embedder(sinusoids.astype(self.dtype))

  def __call__(self, timestep, guidance, pooled):
    emb = self._embed(self.timestep_embedder, timestep)
    if self.guidance_embedder is not None:
      emb = emb + self._embed(self.guidance_embedder, guidance)
    return emb + self.text_embedder(pooled)


# --- Attention and feed-forward ---------------------------------------------------------------------------------

class GELU(nnx.Module):
  """diffusers' GELU(approximate="tanh"): proj, then the tanh-approximated GELU."""

  def __init__(self, dim: int, inner: int, *, opts: Options, rngs: nnx.Rngs):
    self.proj = Linear(dim, inner, axes=("embed", "mlp"), dtype=opts.dtype, param_dtype=opts.param_dtype,
                       rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
  """diffusers' FeedForward(activation_fn="gelu-approximate"): net = [GELU(dim -> 4 dim), Dropout, Linear]."""

  def __init__(self, dim: int, *, opts: Options, rngs: nnx.Rngs):
    inner = int(dim * MLP_RATIO)
    self.net = nnx.List([
        GELU(dim, inner, opts=opts, rngs=rngs), Dropout(),
        Linear(inner, dim, axes=("mlp", "embed"), dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class FluxAttention(nnx.Module):
  """diffusers' FluxAttention with FluxAttnProcessor. `context` (double-stream blocks): the text stream's own
  projections and QK norms, joint attention over [text; image], outputs split back (to_out.0 for the image,
  to_add_out for the text). Without it (single-stream blocks, pre_only): self-attention, no output projection."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, context: bool, opts: Options, rngs: nnx.Rngs):
    inner = heads * head_dim
    lin = functools.partial(Linear, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    # QK norms return float32: RoPE follows in float32, then one cast to the compute dtype.
    norm = functools.partial(RMSNorm, head_dim, eps=EPS, dtype=jnp.float32, param_dtype=opts.param_dtype, rngs=rngs)
    self.norm_q, self.norm_k = norm(), norm()
    self.to_q = lin(dim, inner, axes=("embed", "heads"))
    self.to_k = lin(dim, inner, axes=("embed", "heads"))
    self.to_v = lin(dim, inner, axes=("embed", "heads"))
    if context:
      self.to_out = nnx.List([lin(inner, dim, axes=("heads", "embed")), Dropout()])
      self.norm_added_q, self.norm_added_k = norm(), norm()
      self.add_q_proj = lin(dim, inner, axes=("embed", "heads"))
      self.add_k_proj = lin(dim, inner, axes=("embed", "heads"))
      self.add_v_proj = lin(dim, inner, axes=("embed", "heads"))
      self.to_add_out = lin(inner, dim, axes=("heads", "embed"))
    else:
      self.to_out = None
    self.heads, self.dtype, self.implementation = heads, opts.dtype, opts.attention

  def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
    return norm_q(split(to_q(x))), norm_k(split(to_k(x))), split(to_v(x))

  def __call__(self, x, context, rope):
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    if context is not None:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                             self.norm_added_k)
      q, k, v = (jnp.concatenate([c, i], axis=1) for c, i in ((cq, q), (ck, k), (cv, v)))
    cos, sin = rope
    q, k = (apply_rope(t, cos, sin).astype(self.dtype) for t in (q, k))
    out = dot_product_attention(q, k, v.astype(self.dtype), implementation=self.implementation)
    out = out.reshape(*out.shape[:2], -1)
    if context is None:
      return out
    n = context.shape[1]
    return self.to_out[0](out[:, n:]), self.to_add_out(out[:, :n])


def _clip_fp16(x):
  """diffusers clips float16 activations to the finite range (the joint stream of single blocks, the text
  stream of double blocks)."""
  return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxTransformerBlock(nnx.Module):
  """The double-stream (MM-DiT) block: image and text streams with their own weights, joint attention."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, opts: Options, rngs: nnx.Rngs):
    self.norm1 = AdaLayerNormZero(dim, 6, opts=opts, rngs=rngs)
    self.norm1_context = AdaLayerNormZero(dim, 6, opts=opts, rngs=rngs)
    self.attn = FluxAttention(dim, heads, head_dim, context=True, opts=opts, rngs=rngs)
    self.ff = FeedForward(dim, opts=opts, rngs=rngs)
    self.ff_context = FeedForward(dim, opts=opts, rngs=rngs)
    self.dtype = opts.dtype

  def __call__(self, x, context, temb, rope):
    nx, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
    nc, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)
    attn, c_attn = self.attn(nx, nc, rope)
    x = x + gate_msa[:, None] * attn
    x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp, self.dtype))
    context = context + c_gate_msa[:, None] * c_attn
    context = context + c_gate_mlp[:, None] * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp,
                                                                       self.dtype))
    return x, _clip_fp16(context)  # diffusers clips only the text stream here


class FluxSingleTransformerBlock(nnx.Module):
  """The single-stream block on the joint [text; image] sequence: attention and MLP in parallel, one proj_out.

  diffusers concatenates and splits the two streams around every single block; this one takes the joint
  sequence itself (the same arithmetic), and the model concatenates once before the stack."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, opts: Options, rngs: nnx.Rngs):
    mlp = int(dim * MLP_RATIO)
    lin = functools.partial(Linear, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.norm = AdaLayerNormZero(dim, 3, opts=opts, rngs=rngs)
    self.proj_mlp = lin(dim, mlp, axes=("embed", "mlp"))
    self.proj_out = lin(dim + mlp, dim, axes=("mlp", "embed"))
    self.attn = FluxAttention(dim, heads, head_dim, context=False, opts=opts, rngs=rngs)

  def __call__(self, x, temb, rope):
    nx, (gate,) = self.norm(x, temb)
    mlp = jax.nn.gelu(self.proj_mlp(nx), approximate=True)
    h = jnp.concatenate([self.attn(nx, None, rope), mlp], axis=-1)
    return _clip_fp16(x + gate[:, None] * self.proj_out(h))


class FluxTransformer2DModel(nnx.Module):
  """FLUX.1's transformer. Call: (hidden_states (B, S, in_channels) packed latents, encoder_hidden_states
  (B, T, joint_attention_dim), pooled_projections (B, pooled_projection_dim), timestep (B,) sigmas in [0, 1],
  img_ids (S, n_axes), txt_ids (T, n_axes), guidance (B,) or None) -> (B, S, patch_size² · out_channels)."""

  def __init__(self, config: Mapping[str, Any] | FluxConfig, *, options: Options = Options(), rngs: nnx.Rngs):
    cfg = config if isinstance(config, FluxConfig) else FluxConfig.from_dict(config)
    opts = options
    dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    lin = functools.partial(Linear, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.cfg, self.options, self.remat = cfg, opts, opts.remat
    self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim,
                                                              guidance=cfg.guidance_embeds, opts=opts, rngs=rngs)
    self.context_embedder = lin(cfg.joint_attention_dim, dim, axes=("kv_embed", "embed"))
    self.x_embedder = lin(cfg.in_channels, dim, axes=("kv_embed", "embed"))
    # With opts.scan each stack is one ScannedBlocks (19 + 38 blocks for FLUX.1: two compiled block bodies).
    self.transformer_blocks = block_stack(lambda: FluxTransformerBlock(dim, heads, head_dim, opts=opts, rngs=rngs),
                                          cfg.num_layers, scan=opts.scan)
    self.single_transformer_blocks = block_stack(
        lambda: FluxSingleTransformerBlock(dim, heads, head_dim, opts=opts, rngs=rngs), cfg.num_single_layers,
        scan=opts.scan)
    self.norm_out = AdaLayerNormContinuous(dim, opts=opts, rngs=rngs)
    self.proj_out = lin(dim, cfg.patch_size ** 2 * cfg.out_channels, axes=("embed", "mlp"))

  @property
  def config(self) -> dict[str, Any]:
    """The diffusers config dict this model was built from."""
    return json.loads(self.cfg.raw_json)

  def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
               guidance: jax.Array | None = None):
    cfg = self.cfg
    if (guidance is None) == cfg.guidance_embeds:
      raise ValueError("this FLUX transformer (guidance_embeds=true) needs `guidance`" if cfg.guidance_embeds else
                       "this FLUX transformer (guidance_embeds=false) takes no `guidance`")
    b = hidden_states.shape[0]
    # float32 sigmas scaled by 1000. diffusers first rounds them to the compute dtype (bf16: 0.7 -> 0.69921875,
    # a shift of 0.8 rad in the fastest sinusoid); under jit XLA may drop such a round trip anyway
    # (xla_allow_excess_precision), so the rounding would not even be reproducible: it is not mirrored.
    scaled = lambda t: jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,)) * TIME_SCALE
    temb = self.time_text_embed(scaled(timestep), None if guidance is None else scaled(guidance),
                                pooled_projections)
    x = self.x_embedder(hidden_states)
    context = self.context_embedder(encoder_hidden_states)
    # diffusers still accepts (deprecated) batched ids and uses the first example's.
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    angles = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)
    rope = (jnp.cos(angles), jnp.sin(angles))

    x, context = run_blocks(self.transformer_blocks, self.remat, (x, context), temb, rope)
    n = context.shape[1]
    joint = jnp.concatenate([context, x], axis=1)
    joint = run_blocks(self.single_transformer_blocks, self.remat, joint, temb, rope)
    return self.proj_out(self.norm_out(joint[:, n:], temb))


# --- Folders -----------------------------------------------------------------------------------------------------

def _config_of(path_or_config) -> FluxConfig:
  if isinstance(path_or_config, FluxConfig):
    return path_or_config
  if isinstance(path_or_config, Mapping):
    return FluxConfig.from_dict(path_or_config)
  return FluxConfig.from_dict(convert.read_config(convert.model_folder(path_or_config, SUBFOLDER)))


def load_flux_transformer(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
                          attention: str | None = None, remat: str = "none", scan: bool = False,
                          variant: str | None = None, mesh=None) -> FluxTransformer2DModel:
  """Loads a diffusers FluxTransformer2DModel folder (or a pipeline folder's `transformer/`) without PyTorch:
  one file or shards with an index, and the fp16 / bf16 `variant` files.

  With `mesh`, every parameter is born sharded by the logical-axis rules (sharding.model_shardings): each
  device receives only its block, cast to `param_dtype` on the host. With `scan`, the two block stacks are
  scanned (Options.scan); the folder's per-block keys fill the stacked parameters."""
  folder = convert.model_folder(path, SUBFOLDER)
  cfg = FluxConfig.from_dict(convert.read_config(folder))  # validate before reading any weights
  options = Options(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan)
  shardings = None if mesh is None else functools.partial(sharding.model_shardings, mesh=mesh)
  return convert.load_model(folder, lambda: FluxTransformer2DModel(cfg, options=options, rngs=nnx.Rngs(0)),
                            stem=convert.DIFFUSERS_STEM, variant=variant, shardings=shardings)


def save_flux_transformer(model: FluxTransformer2DModel, out_dir: str | os.PathLike, dtype: str | None = None):
  """Writes a folder `FluxTransformer2DModel.from_pretrained` loads (weights cast to fp32 / fp16 / bf16 if
  `dtype` is given, else as stored)."""
  config = {"_class_name": "FluxTransformer2DModel", **model.config}
  return convert.save_model(model, out_dir, config, stem=convert.DIFFUSERS_STEM, dtype=dtype)


def abstract_flux_transformer(config: str | os.PathLike | Mapping[str, Any] | FluxConfig, *, dtype=jnp.float32,
                              param_dtype=jnp.float32, attention: str | None = None, remat: str = "none",
                              scan: bool = False) -> FluxTransformer2DModel:
  """The transformer of a config dict (or a transformer / pipeline folder) as shapes only: nothing read or
  allocated (ahead-of-time compiles). The options are load_flux_transformer's (`scan` also decides the
  parameters' layout: stacked blocks, as a scanned run's checkpoints hold them)."""
  cfg = _config_of(config)
  options = Options(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan)
  return nnx.eval_shape(lambda: FluxTransformer2DModel(cfg, options=options, rngs=nnx.Rngs(0)))


def init_flux_transformer(config: Mapping[str, Any] | FluxConfig, *, options: Options = Options(),
                          seed: int = 0) -> FluxTransformer2DModel:
  """A randomly initialised transformer (benchmarks, tests), created in one compiled program."""
  cfg = _config_of(config)
  return nnx.jit(lambda: FluxTransformer2DModel(cfg, options=options, rngs=nnx.Rngs(seed)))()


def latent_image_ids(height: int, width: int) -> np.ndarray:
  """(height · width, 3) position ids of a packed latent grid, row-major, as FluxPipeline's
  `_prepare_latent_image_ids` builds them: (0, row, column); height and width count packed (2x2) tokens."""
  ids = np.zeros((height, width, 3), np.float32)
  ids[..., 1] = np.arange(height)[:, None]
  ids[..., 2] = np.arange(width)[None, :]
  return ids.reshape(height * width, 3)
