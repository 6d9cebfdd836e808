"""Multi-head attention: one math function with selectable kernels, and the diffusers `Attention` block.

Implementations (all take q, k, v as (batch, tokens, heads, head_dim)):
  "einsum"  plain XLA einsums, softmax in float32; runs everywhere (the CPU default).
  "xla"     `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention, bf16/fp16
            only (the GPU default; float32 inputs fall back to "xla").
  "pallas"  the Pallas TPU flash-attention kernel (the TPU default) for sequence lengths that fill its
            128-token blocks; other shapes (77-token cross-attention) fall back to "xla".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mapo_jax.models.layers import Dropout, Dtype, Linear

IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "pallas")


def default_implementation() -> str:
  return {"gpu": "cudnn", "tpu": "pallas"}.get(jax.default_backend(), "einsum")


def _einsum_attention(q, k, v, scale, upcast):
  if upcast:  # diffusers' upcast_attention: the QK^T product itself in float32
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _pallas_attention(q, k, v, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  out = fa.flash_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), sm_scale=scale)
  return out.transpose(0, 2, 1, 3)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
                          upcast: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over (batch, tokens, heads, head_dim) arrays."""
  impl = implementation or default_implementation()
  scale = q.shape[-1] ** -0.5
  if impl == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16) or upcast):
    impl = "xla"
  if impl == "pallas" and (q.shape[1] % 128 or k.shape[1] % 128):
    impl = "xla"
  if impl == "einsum":
    return _einsum_attention(q, k, v, scale, upcast)
  if impl == "pallas":
    return _pallas_attention(q, k, v, scale)
  if impl in ("xla", "cudnn"):
    if upcast:
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
    return out.astype(v.dtype)
  raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS}")


class Attention(nnx.Module):
  """diffusers `Attention` without norms: to_q/to_k/to_v, heads, to_out = [Linear, Dropout]."""

  def __init__(self, query_dim: int, *, heads: int, dim_head: int, cross_attention_dim: int | None = None,
               qkv_bias: bool = False, upcast: bool = False, implementation: str | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    lin = functools.partial(Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q = lin(query_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"))
    self.to_k = lin(kv_dim, inner, use_bias=qkv_bias, axes=("kv_embed", "heads"))
    self.to_v = lin(kv_dim, inner, use_bias=qkv_bias, axes=("kv_embed", "heads"))
    self.to_out = nnx.List([lin(inner, query_dim, axes=("heads", "embed")), Dropout()])
    self.heads, self.upcast, self.implementation = heads, upcast, implementation

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x (B, T, query_dim), context (B, S, cross_attention_dim) or None for self-attention."""
    context = x if context is None else context
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out = dot_product_attention(q, k, v, implementation=self.implementation, upcast=self.upcast)
    return self.to_out[0](out.reshape(*x.shape[:2], -1))
