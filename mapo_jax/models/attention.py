"""Multi-head attention: one math function with selectable kernels, and the diffusers `Attention` block.

Implementations (all take q, k, v as (batch, tokens, heads, head_dim)):
  "einsum"  plain XLA einsums, softmax in float32; runs everywhere (the CPU default).
  "xla"     `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention, bf16/fp16
            only (the GPU default; float32 inputs fall back to "xla").
  "pallas"  the Pallas TPU splash-attention kernel (the TPU default) when both sequence lengths fill its
            128-token blocks; other shapes fall back to "xla" (see `_splash_fits`).

Custom kernels (Mosaic on TPU, cuDNN custom calls on GPU) run under `jax.shard_map` over the mesh the step
is traced under (`jax.set_mesh(mesh)`): GSPMD cannot partition a Mosaic kernel ("Mosaic kernels cannot be
automatically partitioned"), and attention is independent per example and per head, so each device runs
the kernel on its own batch (and head) shard with no communication. Jit the step under `jax.set_mesh`;
without a context mesh the kernel is called unwrapped, which is right only on one device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mapo_jax.models.layers import Dropout, Dtype, Linear
from mapo_jax.sharding import BATCH_AXES, LOGICAL_RULES

IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "pallas")
HEAD_AXIS = LOGICAL_RULES["heads"]  # the mesh axis of to_q/to_k/to_v's output features ("tensor")

# Tests only: run the Pallas TPU kernel in interpret mode (on CPU) and with smaller blocks.
INTERPRET = False
SPLASH_MAX_BLOCK = 512


def default_implementation(platform: str | None = None) -> str:
  """The kernel for the platform the step is compiled for ("tpu", "gpu", "cpu"; None: jax.default_backend()).
  Pass the target's platform (`mesh_platform`) when compiling ahead of time for other devices."""
  return {"gpu": "cudnn", "tpu": "pallas"}.get(platform or jax.default_backend(), "einsum")


def mesh_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> str:
  """The platform of a mesh's devices, e.g. "tpu" for a mesh of `jax.experimental.topologies` devices."""
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh.devices.flat[0].platform
  return mesh.abstract_device.platform


def _einsum_attention(q, k, v, scale, upcast):
  if upcast:  # diffusers' upcast_attention: the QK^T product itself in float32
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _splash_block(tokens: int) -> int:
  """The largest block (a multiple of 128 up to SPLASH_MAX_BLOCK) that divides `tokens`."""
  return max(b for b in range(128, SPLASH_MAX_BLOCK + 1, 128) if tokens % b == 0)


def _splash_fits(q_tokens: int, kv_tokens: int) -> bool:
  # Splash tiles both sequences in blocks of multiples of 128 tokens (TPU lanes) that divide them. SDXL's
  # self-attention (1024 / 4096 latent tokens) fits. The 77-token text context of cross-attention does not,
  # and goes to XLA rather than padding the keys to 128 under a mask: its logits are only (tokens, 77) per
  # head, so a fused kernel saves little memory, while padding would spend 51/128 of the kernel's work on
  # masked keys; MaxDiffusion likewise sends short sequences to XLA dot-product attention
  # (`flash_min_seq_length`, github.com/AI-Hypercomputer/maxdiffusion models/attention_flax.py).
  return q_tokens % 128 == 0 and kv_tokens % 128 == 0


def _splash_attention(q, k, v, scale):
  """Splash attention (block-sparse flash attention for TPU, jax.experimental.pallas.ops.tpu.splash_attention;
  Dao et al. 2022, arXiv:2205.14135) on one device's shard, with a full (unmasked) mask."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  _, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  bq, bkv = _splash_block(q_len), _splash_block(kv_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                            block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = masks.MultiHeadMask([masks.FullMask((q_len, kv_len))] * heads)
  # Built per shard from the local shapes, so the kernel sees only this device's heads (head_shards=1).
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=INTERPRET)
  # The kernel takes one example as (heads, tokens, head_dim) and does not scale the logits: scale q first
  # (exact for power-of-two head_dim such as SDXL's 64; one extra rounding of q otherwise). Logits are
  # accumulated in float32 inside the kernel, which is what upcast_attention asks for.
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v))
  return heads_first(out)


def _cudnn_attention(q, k, v, scale):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def shard_spec(mesh: jax.sharding.AbstractMesh, batch: int, heads: int) -> P:
  """PartitionSpec of a (batch, tokens, heads, head_dim) array for per-shard attention: the batch over the
  batch axes (in order, while their product divides it), heads over HEAD_AXIS when it divides them; any
  other axis (and one that does not divide) replicates the computation over it, which is still correct."""
  usable = lambda a: a in mesh.axis_names and mesh.shape[a] > 1 and a not in mesh.manual_axes
  batch_axes, size = [], 1
  for a in filter(usable, BATCH_AXES):
    if batch % (size * mesh.shape[a]):
      break
    batch_axes.append(a)
    size *= mesh.shape[a]
  head_axis = HEAD_AXIS if usable(HEAD_AXIS) and heads % mesh.shape[HEAD_AXIS] == 0 else None
  return P(tuple(batch_axes) or None, None, head_axis, None)


def sharded(fn, q, k, v):
  """fn(q, k, v) on each device's shard under the context mesh (`jax.set_mesh`), or directly without a
  multi-device one. `fn` must be independent per example and per head."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, k, v)
  spec = shard_spec(mesh, q.shape[0], q.shape[2])
  if mesh.explicit_axes:  # Explicit-axis meshes (jax.make_mesh's default) want inputs laid out as in_specs
    q, k, v = (jax.reshard(x, spec) for x in (q, k, v))
  # check_vma=False: pallas_call and cuDNN custom calls carry no varying-axes rules; the specs above make
  # the outputs replicated exactly over the axes the inputs are replicated over.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
                          upcast: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over (batch, tokens, heads, head_dim) arrays."""
  impl = implementation or default_implementation()
  scale = q.shape[-1] ** -0.5
  if impl == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16) or upcast):
    impl = "xla"
  if impl == "pallas" and not _splash_fits(q.shape[1], k.shape[1]):
    impl = "xla"
  if impl == "einsum":
    return _einsum_attention(q, k, v, scale, upcast)
  if impl == "pallas":
    return sharded(functools.partial(_splash_attention, scale=scale), q, k, v)
  if impl == "cudnn":
    return sharded(functools.partial(_cudnn_attention, scale=scale), q, k, v)
  if impl == "xla":
    if upcast:
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    # Per shard, as the kernels: left to GSPMD, the (tokens x tokens) logits of FLUX.1-dev's forward at 1024 px
    # were laid out for the whole batch on every chip of an fsdp mesh (33 GiB of temporaries per chip on
    # v5litepod-8 against 0.5 GiB with the per-shard kernel; bench/RESULTS.md).
    xla = functools.partial(jax.nn.dot_product_attention, scale=scale, implementation="xla")
    return sharded(xla, q, k, v).astype(v.dtype)
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
