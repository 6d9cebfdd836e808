"""diffusers' `SD3Transformer2DModel` (the MMDiT of Stable Diffusion 3 / 3.5) in Flax NNX, NHWC latents.

Built from the checkpoint's own `transformer/config.json`; attribute names mirror diffusers' module names, so
`mapo_jax.convert` maps every weight by path. Facts relied on (diffusers 0.42):
  models/transformers/transformer_sd3.py  SD3Transformer2DModel: PatchEmbed (pos_embed) → time_text_embed →
      context_embedder → JointTransformerBlocks (block i has `attn2` when i is in dual_attention_layers; the last
      block is context_pre_only) → norm_out (AdaLayerNormContinuous, eps 1e-6, no affine) → proj_out →
      unpatchify "nhwpqc->nchpwq". out_channels None means in_channels.
  models/attention.py  JointTransformerBlock: norm1 = AdaLayerNormZero (6 chunks: shift_msa, scale_msa, gate_msa,
      shift_mlp, scale_mlp, gate_mlp) or SD35AdaLayerNormZeroX (9 chunks: the same six, then shift_msa2,
      scale_msa2, gate_msa2; the second attention reads the same normalised x with its own shift/scale).
      norm1_context = AdaLayerNormZero, or for context_pre_only AdaLayerNormContinuous (no context output, no
      ff_context, no to_add_out). norm2 / norm2_context: LayerNorm(eps 1e-6) without parameters; FeedForward with
      "gelu-approximate" (tanh GELU, 4x width: net.0.proj, net.2).
  models/attention_processor.py  JointAttnProcessor2_0: the joint sequence is [image tokens, text tokens]
      (image first); per-head qk norm on q/k (norm_q, norm_k) and on the text stream's q/k (norm_added_q,
      norm_added_k); Attention(eps=1e-6, bias=True) keeps biases on every projection. qk_norm values that run
      with added_kv_proj_dim: None, "rms_norm", "layer_norm" (with weight and bias), "fp32_layer_norm" (none).
  models/normalization.py  AdaLayerNormContinuous splits its projection as (scale, shift), in that order
      (the original SD3 code uses (shift, scale): diffusers' converter swaps the weights).
  models/embeddings.py  PatchEmbed: a patch_size-stride conv; with pos_embed_max_size a fixed 2-D sin-cos table of
      pos_embed_max_size² positions (a *persistent* buffer: saved in the checkpoint as `pos_embed.pos_embed`,
      shape (1, M², D)) centre-cropped to the latent's patch grid; without it, a non-persistent table computed for
      the grid. get_2d_sincos_pos_embed: positions arange(n) / (n / base_size), base_size = sample_size //
      patch_size; the first half of the channels encodes the column, the second the row; each half is
      [sin(pos·ω), cos(pos·ω)], ω = 10000^(-k/(D/4)), in float64. CombinedTimestepTextProjEmbeddings: Timesteps(256,
      flip_sin_to_cos=True, downscale_freq_shift=0) → TimestepEmbedding (linear_1, SiLU, linear_2), plus
      PixArtAlphaTextProjection of the pooled text (linear_1, SiLU, linear_2).
Scanned stacks (`Options.scan`, config.scan_blocks): the blocks are not all identical (the dual-attention ones,
the last context_pre_only one), so each run of identical consecutive blocks is one stack (layers.block_stack:
scanned when longer than one block). SD3.5 medium: blocks 0-12 (attn2), 13-22 and 23 are three runs. The runs live
in `BlockRuns` (attribute `runs`), whose parameter paths `transformer_blocks.runs.{r}.{i}...` are renamed to
diffusers' `transformer_blocks.{first block of run r + i}...` when loading and saving (`checkpoint_name`), so files
keep the diffusers layout. Without scan, or when no run is longer than one block, `transformer_blocks` is the plain
list of blocks, named as diffusers names them.
The positional table is kept as a `Buffer` (an NNX variable that is not a Param: loaded and saved with the
checkpoint, never trained), because the released checkpoints carry their own table.
Paper: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
arXiv:2403.03206.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import convert, sharding
from mapo_jax.models.attention import dot_product_attention
from mapo_jax.models.layers import (Conv2d, Dropout, LayerNorm, Linear, Options, RMSNorm, block_stack, remat_call,
                                    run_blocks)
from mapo_jax.models.unet import TimestepEmbedding, timestep_embedding

# diffusers' defaults for every SD3Transformer2DModel option (diffusers 0.42).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
    "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
    "qk_norm": None,
}
# The qk_norm values diffusers' Attention runs with a text stream (added_kv_proj_dim): "layer_norm_across_heads"
# and "l2" fail at construction there, "rms_norm_across_heads" at the first forward pass.
QK_NORMS = (None, "rms_norm", "layer_norm", "fp32_layer_norm")
POS_EMBED_KEY = "pos_embed.pos_embed"  # the persistent buffer's checkpoint key
TIME_PROJ_DIM = 256  # CombinedTimestepTextProjEmbeddings' Timesteps(num_channels=256)
EPS = 1e-6  # every norm of the block, norm_out and the qk norms


@dataclasses.dataclass(frozen=True)
class SD3Config:
  """A validated diffusers SD3Transformer2DModel config."""
  raw_json: str  # the config.json contents; a string keeps the dataclass hashable (static under jit)
  sample_size: int
  patch_size: int
  in_channels: int
  out_channels: int
  num_layers: int
  attention_head_dim: int
  num_attention_heads: int
  joint_attention_dim: int
  caption_projection_dim: int
  pooled_projection_dim: int
  pos_embed_max_size: int | None
  dual_attention_layers: tuple[int, ...]
  qk_norm: str | None

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> SD3Config:
    c = convert.with_defaults("SD3 transformer", config, DIFFUSERS_DEFAULTS)
    ints = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")
    for key in ints:
      if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
        raise ValueError(f"SD3 transformer config: {key}={c[key]!r} must be a positive int")
    out = c["in_channels"] if c["out_channels"] is None else c["out_channels"]
    if not isinstance(out, int) or out < 1:
      raise ValueError(f"SD3 transformer config: out_channels={c['out_channels']!r} must be a positive int or null")
    if c["qk_norm"] not in QK_NORMS:
      raise ValueError(f"SD3 transformer config: unsupported qk_norm={c['qk_norm']!r} (supported: {QK_NORMS})")
    max_size = c["pos_embed_max_size"]
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
      raise ValueError(f"SD3 transformer config: pos_embed_max_size={max_size!r} must be a positive int or null")
    dual = c["dual_attention_layers"]
    if not isinstance(dual, (list, tuple)) or not all(isinstance(i, int) for i in dual):
      raise ValueError(f"SD3 transformer config: dual_attention_layers={dual!r} must be a list of ints")
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    # The context stream enters blocks of width inner_dim: diffusers builds other widths but fails on them.
    if c["caption_projection_dim"] != inner:
      raise ValueError(f"SD3 transformer config: caption_projection_dim={c['caption_projection_dim']} must equal "
                       f"num_attention_heads * attention_head_dim = {inner}")
    if inner % 4:  # the 2-D sin-cos table gives a quarter of the channels to each of sin/cos × row/column
      raise ValueError(f"SD3 transformer config: num_attention_heads * attention_head_dim = {inner} must be a "
                       "multiple of 4 (the sin-cos position table)")
    return cls(
        raw_json=json.dumps(dict(config), sort_keys=True), sample_size=c["sample_size"],
        patch_size=c["patch_size"], in_channels=c["in_channels"], out_channels=out, num_layers=c["num_layers"],
        attention_head_dim=c["attention_head_dim"], num_attention_heads=c["num_attention_heads"],
        joint_attention_dim=c["joint_attention_dim"], caption_projection_dim=c["caption_projection_dim"],
        pooled_projection_dim=c["pooled_projection_dim"], pos_embed_max_size=max_size,
        dual_attention_layers=tuple(sorted(set(dual))), qk_norm=c["qk_norm"])


class Buffer(nnx.Variable):
  """A fixed array the checkpoint stores beside the parameters (a persistent torch buffer): loaded and saved
  with the weights, never trained (training filters on nnx.Param)."""


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k/(dim/2)), in float64 as diffusers, returned as float32."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  args = np.outer(positions.astype(np.float64), omega)
  return np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)


def _grid_positions(n: int, base_size: int) -> np.ndarray:
  # torch divides a float32 arange by the Python float n / base_size in float32.
  return np.arange(n, dtype=np.float32) / np.float32(n / base_size)


def sincos_pos_embed(dim: int, rows: int, cols: int, base_size: int, xp=np) -> Any:
  """diffusers' get_2d_sincos_pos_embed for a (rows, cols) grid: (rows·cols, dim) float32, row-major tokens,
  the first dim/2 channels encoding the column, the last dim/2 the row. The 1-D tables are small numpy
  arrays; `xp=jnp` broadcasts them on the device (no host copy of a large table, nothing under eval_shape)."""
  col = _sincos_1d(dim // 2, _grid_positions(cols, base_size))  # (cols, dim/2)
  row = _sincos_1d(dim // 2, _grid_positions(rows, base_size))  # (rows, dim/2)
  half = (rows, cols, dim // 2)
  table = xp.concatenate([xp.broadcast_to(xp.asarray(col)[None], half),
                          xp.broadcast_to(xp.asarray(row)[:, None], half)], axis=-1)
  return table.reshape(rows * cols, dim)


class PatchEmbed(nnx.Module):
  """Patchify (a stride-patch_size conv) plus the sin-cos position table, centre-cropped to the latent grid."""

  def __init__(self, cfg: SD3Config, *, opts: Options, rngs: nnx.Rngs):
    p, dim = cfg.patch_size, cfg.inner_dim
    self.proj = Conv2d(cfg.in_channels, dim, p, stride=p, padding=0, dtype=opts.dtype,
                       param_dtype=opts.param_dtype, rngs=rngs)
    self.patch_size, self.dim, self.max_size = p, dim, cfg.pos_embed_max_size
    self.base_size = cfg.sample_size // p
    if self.max_size is None:
      self.pos_embed = None  # diffusers' buffer is then non-persistent: computed per grid in __call__
    else:
      m = self.max_size
      table = sincos_pos_embed(dim, m, m, self.base_size, xp=jnp).reshape(1, m * m, dim)
      self.pos_embed = Buffer(table.astype(opts.param_dtype), axes=(None, None, "embed"))

  def positions(self, rows: int, cols: int) -> jax.Array:
    """The (rows·cols, dim) position table of a rows × cols patch grid."""
    if self.pos_embed is None:
      return sincos_pos_embed(self.dim, rows, cols, self.base_size, xp=jnp)
    m = self.max_size
    if rows > m or cols > m:
      raise ValueError(f"a {rows} x {cols} patch grid exceeds pos_embed_max_size={m}")
    top, left = (m - rows) // 2, (m - cols) // 2
    table = self.pos_embed[...].reshape(m, m, self.dim)[top:top + rows, left:left + cols]
    return table.reshape(rows * cols, self.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) latents → (B, (H/p)·(W/p), dim) tokens, row-major over the patch grid."""
    b = x.shape[0]
    patches = self.proj(x)
    rows, cols = patches.shape[1:3]
    tokens = patches.reshape(b, rows * cols, self.dim)
    # diffusers adds the float32 table and casts the sum back to the compute dtype.
    return (tokens.astype(jnp.float32) + self.positions(rows, cols).astype(jnp.float32)).astype(tokens.dtype)


class CombinedTimestepTextProjEmbeddings(nnx.Module):
  """temb = TimestepEmbedding(sinusoid(t)) + PixArtAlphaTextProjection(pooled); both are linear → SiLU → linear,
  the structure (and key names) of TimestepEmbedding."""

  def __init__(self, dim: int, pooled_dim: int, *, opts: Options, rngs: nnx.Rngs):
    self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim, opts=opts, rngs=rngs)
    self.text_embedder = TimestepEmbedding(pooled_dim, dim, opts=opts, rngs=rngs)
    self.dtype = opts.dtype

  def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
    t = timestep_embedding(timestep, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=0)
    return self.timestep_embedder(t.astype(self.dtype)) + self.text_embedder(pooled)


class AdaLayerNormZero(nnx.Module):
  """LayerNorm (no affine) modulated by a projection of SiLU(temb): diffusers' AdaLayerNormZero (6 chunks) or,
  with `dual`, SD35AdaLayerNormZeroX (9 chunks: a second shift/scale/gate for `attn2`)."""

  def __init__(self, dim: int, *, dual: bool, opts: Options, rngs: nnx.Rngs):
    self.linear = Linear(dim, (9 if dual else 6) * dim, axes=("embed", "mlp"), dtype=opts.dtype,
                         param_dtype=opts.param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=EPS, use_affine=False, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.dual = dual

  def __call__(self, x: jax.Array, temb: jax.Array):
    """→ (x for attn, gate_msa, shift_mlp, scale_mlp, gate_mlp[, x for attn2, gate_msa2]); chunks are (B, 1, dim)."""
    chunks = [c[:, None] for c in jnp.split(self.linear(jax.nn.silu(temb)), 9 if self.dual else 6, axis=-1)]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
    normed = self.norm(x)
    out = (normed * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    if not self.dual:
      return out
    shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
    return (*out, normed * (1 + scale_msa2) + shift_msa2, gate_msa2)


class AdaLayerNormContinuous(nnx.Module):
  """LayerNorm (no affine) · (1 + scale) + shift, with (scale, shift) = linear(SiLU(cond)) in that order."""

  def __init__(self, dim: int, *, opts: Options, rngs: nnx.Rngs):
    self.linear = Linear(dim, 2 * dim, axes=("embed", "mlp"), dtype=opts.dtype, param_dtype=opts.param_dtype,
                         rngs=rngs)
    self.norm = LayerNorm(dim, eps=EPS, use_affine=False, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.linear(jax.nn.silu(cond)), 2, axis=-1)
    return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class GELU(nnx.Module):
  """proj → tanh-approximated GELU (diffusers' GELU(approximate="tanh"))."""

  def __init__(self, dim: int, inner: int, *, opts: Options, rngs: nnx.Rngs):
    self.proj = Linear(dim, inner, axes=("embed", "mlp"), dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
  """net = [GELU(dim → 4·dim), Dropout, Linear(4·dim → dim)] (diffusers' FeedForward, "gelu-approximate")."""

  def __init__(self, dim: int, *, opts: Options, rngs: nnx.Rngs):
    self.net = nnx.List([
        GELU(dim, 4 * dim, opts=opts, rngs=rngs), Dropout(),
        Linear(4 * dim, dim, axes=("mlp", "embed"), dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


def _qk_norm(kind: str | None, head_dim: int, opts: Options, rngs: nnx.Rngs) -> nnx.Module | None:
  kw = dict(eps=EPS, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
  if kind is None:
    return None
  if kind == "rms_norm":
    return RMSNorm(head_dim, **kw)
  return LayerNorm(head_dim, use_affine=kind == "layer_norm", **kw)  # "fp32_layer_norm": no parameters


class JointAttention(nnx.Module):
  """diffusers' Attention with JointAttnProcessor2_0. With `joint`, the text stream has its own projections
  (add_q_proj/add_k_proj/add_v_proj, norm_added_q/k) and attends jointly with the image stream, the sequence being
  [image tokens, text tokens]; `context_out` adds to_add_out (absent in the context_pre_only last block). Without
  `joint`, plain self-attention over the image tokens (the dual blocks' attn2)."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, context_out: bool, qk_norm: str | None,
               opts: Options, rngs: nnx.Rngs):
    inner = heads * head_dim
    lin = functools.partial(Linear, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.to_q = lin(dim, inner, axes=("embed", "heads"))
    self.to_k = lin(dim, inner, axes=("embed", "heads"))
    self.to_v = lin(dim, inner, axes=("embed", "heads"))
    self.norm_q = _qk_norm(qk_norm, head_dim, opts, rngs)
    self.norm_k = _qk_norm(qk_norm, head_dim, opts, rngs)
    if joint:
      self.add_q_proj = lin(dim, inner, axes=("embed", "heads"))
      self.add_k_proj = lin(dim, inner, axes=("embed", "heads"))
      self.add_v_proj = lin(dim, inner, axes=("embed", "heads"))
      self.norm_added_q = _qk_norm(qk_norm, head_dim, opts, rngs)
      self.norm_added_k = _qk_norm(qk_norm, head_dim, opts, rngs)
    else:
      self.add_q_proj = self.add_k_proj = self.add_v_proj = self.norm_added_q = self.norm_added_k = None
    self.to_out = nnx.List([lin(inner, dim, axes=("heads", "embed")), Dropout()])
    self.to_add_out = lin(inner, dim, axes=("heads", "embed")) if joint and context_out else None
    self.heads, self.implementation = heads, opts.attention

  def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # (B, T, heads, head_dim)
    q, k, v = split(to_q(x)), split(to_k(x)), split(to_v(x))
    if norm_q is not None:
      q, k = norm_q(q), norm_k(k)
    return q, k, v

  def __call__(self, x: jax.Array, context: jax.Array | None = None):
    """x (B, N, dim) image tokens, context (B, T, dim) text tokens or None. Returns the image stream's output and,
    with a context, the text stream's (None in the context_pre_only block)."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    n = x.shape[1]
    if context is not None:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                             self.norm_added_k)
      q, k, v = (jnp.concatenate([a, c.astype(a.dtype)], axis=1) for a, c in ((q, cq), (k, ck), (v, cv)))
    out = dot_product_attention(q, k, v, implementation=self.implementation)
    out = out.reshape(*out.shape[:2], -1)
    hidden = self.to_out[0](out[:, :n])
    if context is None:
      return hidden
    return hidden, (self.to_add_out(out[:, n:]) if self.to_add_out is not None else None)


class JointTransformerBlock(nnx.Module):
  """One MMDiT block: joint attention of the image and text streams, each with its own adaLN-Zero modulation and
  feed-forward; `dual` adds an image-only attention (attn2, SD3.5's MMDiT-X); `context_pre_only` (the last block)
  keeps only the image stream's output."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, context_pre_only: bool, dual: bool,
               qk_norm: str | None, opts: Options, rngs: nnx.Rngs):
    kw = dict(opts=opts, rngs=rngs)
    norm_kw = dict(eps=EPS, use_affine=False, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.norm1 = AdaLayerNormZero(dim, dual=dual, **kw)
    self.norm1_context = (AdaLayerNormContinuous(dim, **kw) if context_pre_only
                          else AdaLayerNormZero(dim, dual=False, **kw))
    self.attn = JointAttention(dim, heads, head_dim, joint=True, context_out=not context_pre_only,
                               qk_norm=qk_norm, **kw)
    self.attn2 = (JointAttention(dim, heads, head_dim, joint=False, context_out=False, qk_norm=qk_norm, **kw)
                  if dual else None)
    self.norm2 = LayerNorm(dim, **norm_kw)
    self.ff = FeedForward(dim, **kw)
    self.norm2_context = None if context_pre_only else LayerNorm(dim, **norm_kw)
    self.ff_context = None if context_pre_only else FeedForward(dim, **kw)
    self.context_pre_only, self.dual = context_pre_only, dual

  def __call__(self, hidden: jax.Array, context: jax.Array, temb: jax.Array):
    """→ (hidden, context or None after the context_pre_only block): the inputs' order, so a run of blocks carries
    the pair through a scan."""
    if self.dual:
      x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2 = self.norm1(hidden, temb)
    else:
      x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden, temb)
    if self.context_pre_only:
      c = self.norm1_context(context, temb)
    else:
      c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)

    attn_out, context_attn_out = self.attn(x, c)
    hidden = hidden + gate_msa * attn_out
    if self.dual:
      hidden = hidden + gate_msa2 * self.attn2(x2)
    hidden = hidden + gate_mlp * self.ff(self.norm2(hidden) * (1 + scale_mlp) + shift_mlp)

    if self.context_pre_only:
      return hidden, None
    context = context + c_gate_msa * context_attn_out
    context = context + c_gate_mlp * self.ff_context(self.norm2_context(context) * (1 + c_scale_mlp) + c_shift_mlp)
    return hidden, context


Runs = tuple[tuple[int, int], ...]  # (first block, count) per run of identical consecutive blocks


def block_runs(cfg: SD3Config) -> Runs:
  """(first block, count) of each run of identical consecutive blocks. A block's structure is decided by whether it
  has attn2 (dual_attention_layers) and whether it is the last, context_pre_only, one."""
  kind = lambda i: (i in cfg.dual_attention_layers, i == cfg.num_layers - 1)
  runs: list[list[int]] = []
  for i in range(cfg.num_layers):
    if runs and kind(i) == kind(runs[-1][0]):
      runs[-1][1] += 1
    else:
      runs.append([i, 1])
  return tuple((first, n) for first, n in runs)


def scanned_runs(cfg: SD3Config, scan: bool) -> Runs | None:
  """The runs a model with `Options.scan = scan` holds in `BlockRuns`, or None for the plain list of blocks (no
  scan, or no run longer than one block: nothing to scan)."""
  runs = block_runs(cfg)
  return runs if scan and any(n > 1 for _, n in runs) else None


_RUN_KEY = re.compile(r"transformer_blocks\.runs\.(\d+)\.(\d+)(?=\.|$)")
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)(?=\.|$)")


def checkpoint_name(runs: Runs, name: str) -> str:
  """Every `transformer_blocks.runs.{r}.{i}` in `name` (a parameter key, module name or message of a `BlockRuns`
  model) as diffusers names the block: `transformer_blocks.{first block of run r + i}`."""
  return _RUN_KEY.sub(lambda m: f"transformer_blocks.{runs[int(m[1])][0] + int(m[2])}", name)


def internal_name(runs: Runs, key: str) -> str:
  """The inverse of `checkpoint_name` for one key: diffusers' `transformer_blocks.{k}...` as a `BlockRuns` path
  (a block number past the last run is left as it is, for the loader to report as unexpected)."""
  m = _BLOCK_KEY.match(key)
  if m is None:
    return key
  k = int(m[1])
  for r, (first, n) in enumerate(runs):
    if first <= k < first + n:
      return f"transformer_blocks.runs.{r}.{k - first}{key[m.end():]}"
  return key


class BlockRuns(nnx.Module):
  """The transformer blocks as runs of identical consecutive blocks (`block_runs`), each a `block_stack` (scanned
  when longer than one block), run in order on the (hidden, context) pair."""

  def __init__(self, make: Callable[[int], nnx.Module], runs: Runs, *, scan: bool):
    # Built run by run, block by block: the unrolled list's order, so the random draws are the same.
    self.runs = nnx.List([block_stack(functools.partial(make, first), n, scan=scan) for first, n in runs])
    self.layout = runs

  def __call__(self, hidden, context, temb, *, remat: str):
    for run in self.runs:
      hidden, context = run_blocks(run, remat, (hidden, context), temb)
    return hidden, context


class SD3Transformer2DModel(nnx.Module):
  """The SD3 / SD3.5 MMDiT. Call: (hidden_states (B, H, W, in_channels), encoder_hidden_states (B, T,
  joint_attention_dim), pooled_projections (B, pooled_projection_dim), timestep (B,) as the pipeline passes it
  (sigma · 1000)) → (B, H, W, out_channels) in the compute dtype (H, W multiples of patch_size)."""

  def __init__(self, config: Mapping[str, Any] | SD3Config, *, options: Options = Options(), rngs: nnx.Rngs):
    cfg = config if isinstance(config, SD3Config) else SD3Config.from_dict(config)
    opts = options
    dim = cfg.inner_dim
    kw = dict(opts=opts, rngs=rngs)
    self.cfg, self.options = cfg, opts
    self.pos_embed = PatchEmbed(cfg, **kw)
    self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim, **kw)
    self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim, axes=("kv_embed", "embed"),
                                   dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    make = lambda i: JointTransformerBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim,
                                           context_pre_only=i == cfg.num_layers - 1,
                                           dual=i in cfg.dual_attention_layers, qk_norm=cfg.qk_norm, **kw)
    runs = scanned_runs(cfg, opts.scan)
    if runs is not None:
      self.transformer_blocks = BlockRuns(make, runs, scan=True)
    else:  # diffusers' own layout
      self.transformer_blocks = nnx.List([make(i) for i in range(cfg.num_layers)])
    self.norm_out = AdaLayerNormContinuous(dim, **kw)
    self.proj_out = Linear(dim, cfg.patch_size ** 2 * cfg.out_channels, axes=("embed", "mlp"), dtype=opts.dtype,
                           param_dtype=opts.param_dtype, rngs=rngs)
    self.remat = opts.remat

  @property
  def config(self) -> dict[str, Any]:
    """The diffusers config dict this model was built from."""
    return json.loads(self.cfg.raw_json)

  def checkpoint_name(self, name: str) -> str:
    """The diffusers name of one of this model's parameter keys or module names (`convert.torch_key`, a LoRA
    module name): they differ only inside scanned runs (the module-level `checkpoint_name`)."""
    blocks = self.transformer_blocks
    return checkpoint_name(blocks.layout, name) if isinstance(blocks, BlockRuns) else name

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
               timestep: jax.Array) -> jax.Array:
    cfg, p = self.cfg, self.cfg.patch_size
    b, height, width = hidden_states.shape[:3]
    rows, cols = height // p, width // p
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    hidden = self.pos_embed(hidden_states)
    temb = self.time_text_embed(timestep, pooled_projections)
    context = self.context_embedder(encoder_hidden_states)
    if isinstance(self.transformer_blocks, BlockRuns):
      hidden, _ = self.transformer_blocks(hidden, context, temb, remat=self.remat)
    else:
      for block in self.transformer_blocks:
        hidden, context = remat_call(block, self.remat, hidden, context, temb)
    out = self.proj_out(self.norm_out(hidden, temb))
    # Unpatchify: token (r, c) holds a p × p × C patch, laid out (p_row, p_col, C) ("nhwpqc" in diffusers).
    out = out.reshape(b, rows, cols, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, rows * p, cols * p, cfg.out_channels)


def _options(dtype, param_dtype, attention, remat, scan) -> Options:
  return Options(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan)


def abstract_sd3_transformer(config: Mapping[str, Any] | SD3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                             attention: str | None = None, remat: str = "none", scan: bool = False
                             ) -> SD3Transformer2DModel:
  """The model with ShapeDtypeStructs for arrays (nnx.eval_shape): shardings, ahead-of-time compiles, counts.
  `scan` also decides the parameters' layout (scanned runs, as a scanned run's checkpoints hold them)."""
  cfg = config if isinstance(config, SD3Config) else SD3Config.from_dict(config)
  options = _options(dtype, param_dtype, attention, remat, scan)
  return nnx.eval_shape(lambda: SD3Transformer2DModel(cfg, options=options, rngs=nnx.Rngs(0)))


def init_sd3_transformer(config: Mapping[str, Any] | SD3Config, *, options: Options = Options(),
                         seed: int = 0) -> SD3Transformer2DModel:
  """A randomly initialised model (benchmarks, tests), created in one compiled program."""
  cfg = config if isinstance(config, SD3Config) else SD3Config.from_dict(config)
  return nnx.jit(lambda: SD3Transformer2DModel(cfg, options=options, rngs=nnx.Rngs(seed)))()


def load_sd3_transformer(path, dtype=jnp.float32, *, param_dtype=jnp.float32, attention: str | None = None,
                         remat: str = "none", scan: bool = False, variant: str | None = None, mesh=None
                         ) -> SD3Transformer2DModel:
  """Loads a diffusers SD3Transformer2DModel folder (or a pipeline folder's `transformer/`) without PyTorch;
  sharded safetensors and variants (e.g. "fp16") as convert.load_model reads them.

  With `mesh`, every parameter (and the position table) is born sharded by the logical-axis rules. With `scan`,
  each run of identical consecutive blocks is scanned (`BlockRuns`); the folder's per-block keys fill them."""
  folder = convert.model_folder(path, "transformer")
  cfg = SD3Config.from_dict(convert.read_config(folder))  # validate before reading any weights
  options = _options(dtype, param_dtype, attention, remat, scan)
  shardings = None if mesh is None else functools.partial(sharding.model_shardings, mesh=mesh)
  has_table = cfg.pos_embed_max_size is not None
  runs = scanned_runs(cfg, scan)
  try:
    model = convert.load_model(
        folder, lambda: SD3Transformer2DModel(cfg, options=options, rngs=nnx.Rngs(0)), stem=convert.DIFFUSERS_STEM,
        variant=variant, shardings=shardings, rename=None if runs is None else functools.partial(internal_name, runs),
        ignore=[POS_EMBED_KEY.replace(".", r"\.")] if has_table else ())
  except convert.CheckpointMismatchError as e:
    if runs is None:
      raise
    raise convert.CheckpointMismatchError(checkpoint_name(runs, str(e))) from None  # diffusers' key names
  if has_table:
    buffer = model.pos_embed.pos_embed
    with convert.open_weights(folder, convert.DIFFUSERS_STEM, variant) as weights:
      if POS_EMBED_KEY not in weights:
        raise convert.CheckpointMismatchError(f"{folder} does not match the model built from its config:\n"
                                              f"  1 missing keys:\n    {POS_EMBED_KEY}")
      table = np.asarray(weights[POS_EMBED_KEY])
    if table.shape != tuple(buffer.shape):
      raise convert.CheckpointMismatchError(
          f"{folder} does not match the model built from its config:\n  1 mis-shaped keys:\n"
          f"    {POS_EMBED_KEY}: checkpoint {table.shape}, model {tuple(buffer.shape)}")
    table = table.astype(buffer.dtype)  # cast on the host
    if mesh is None:
      buffer.set_value(jnp.asarray(table))
    else:  # each device receives its block, as convert.load_model places the parameters
      placement = sharding.model_shardings(model, mesh, Buffer)["pos_embed"]["pos_embed"]
      buffer.set_value(jax.make_array_from_callback(table.shape, placement, lambda index: table[index]))
  return model


def save_sd3_transformer(model: SD3Transformer2DModel, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
  """Writes a diffusers folder that `SD3Transformer2DModel.from_pretrained` loads with no missing or unexpected
  keys: config.json and the weights (cast to `dtype`: fp32, fp16 or bf16; default: as stored), the position table
  included."""
  if dtype is not None and dtype not in convert.NUMPY_DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {sorted(convert.NUMPY_DTYPES)}")
  cast = convert.NUMPY_DTYPES[dtype] if dtype else None
  # Keys in the unrolled model's order (convert.state_dict), named as diffusers names them.
  tensors = {model.checkpoint_name(k): v for k, v in convert.state_dict(model, cast).items()}
  if model.pos_embed.pos_embed is not None:
    table = convert.host_params(model.pos_embed.pos_embed.get_value())
    tensors[POS_EMBED_KEY] = table if cast is None else table.astype(cast)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = {"_class_name": "SD3Transformer2DModel", **model.config}
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  convert.write_weights(out, tensors, convert.DIFFUSERS_STEM)
  return out
