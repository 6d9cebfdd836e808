"""Device mesh, logical-axis rules and sharded placement of parameters and batches.

Layers name the axes of every parameter (`axes` metadata, e.g. ("embed", "heads")); the table below
maps those logical names to mesh axes, in one place (MaxText's logical_axis_rules). Mesh axes:
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3),
  tensor  tensor parallelism over heads / MLP / conv output channels.
The batch is sharded over (data, fsdp). A dimension that a mesh axis does not divide stays replicated.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis → mesh axis (None: replicated). Weights only; activations follow from XLA's propagation.
LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp",      # model width on the input side of a linear map
    "kv_embed": "fsdp",   # cross-attention context width (text encoder dims)
    "mlp": "tensor",      # feed-forward / projection width
    "heads": "tensor",    # attention heads × head_dim
    "conv_in": "fsdp",
    "conv_out": "tensor",
    "conv_h": None, "conv_w": None,
    "norm": None,         # GroupNorm/LayerNorm scale and bias: small
    "vocab": "tensor",
    "layers": None,       # the block axis of a scanned stack's parameters (layers.ScannedBlocks): every
                          # device holds all N blocks of its shard, as it holds all blocks unrolled
}


def check_mesh_shape(shape: Sequence[int]) -> None:
  """Raises ValueError unless `shape` is 3 sizes (data, fsdp, tensor), each >= 1 or at most one -1."""
  shape = tuple(shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(not isinstance(s, int) or s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape} must be 3 sizes (data, fsdp, tensor), each >= 1 or one -1")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """`shape` with its -1 (all remaining devices) resolved; ValueError when it does not fit `num_devices`."""
  check_mesh_shape(shape)
  shape = list(shape)
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, {num_devices} available")
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  # Auto axes: XLA propagates activation shardings from the parameter and batch shardings (GSPMD).
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, str | None] = LOGICAL_RULES) -> P:
  """PartitionSpec for one parameter: each logical axis → its mesh axis, if that axis divides the dim."""
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule")
    mesh_axis = rules.get(name) if name is not None else None
    if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def logical_axes(model: nnx.Module, filter=nnx.Param) -> dict:
  """A pure dict (like `nnx.to_pure_dict(nnx.state(model, filter))`) of each parameter's logical axes."""
  state = nnx.state(model, filter)
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata().get("axes")), state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(params: Any, axes: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pure-dict parameter tree from the matching tree of logical axes."""
  return jax.tree.map(lambda ax, p: NamedSharding(mesh, logical_to_spec(ax, p.shape, mesh)),
                      axes, params, is_leaf=lambda x: isinstance(x, tuple))


def model_shardings(model: nnx.Module, mesh: Mesh, filter=nnx.Param) -> Any:
  """`param_shardings` for a model's own `filter` parameters (as `nnx.to_pure_dict(nnx.state(model, filter))`);
  the model may be abstract (nnx.eval_shape), as when loaders place weights straight into shards."""
  return param_shardings(nnx.to_pure_dict(nnx.state(model, filter)), logical_axes(model, filter), mesh)


def is_abstract(tree: Any) -> bool:
  """Whether a tree holds shapes only (nnx.eval_shape / jax.eval_shape), as ahead-of-time compiles use."""
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves (arrays or structs) placed by the matching `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def place(model: nnx.Module, mesh: Mesh, filter=nnx.Param) -> tuple[Any, Any]:
  """The model's `filter` parameters as a pure dict placed on `mesh` by the logical-axis rules, and their
  shardings. The one way parameters reach the mesh (the trained model, its frozen part, the reference);
  parameters a loader already placed there (`load_unet(..., mesh=)`) are not copied, and an abstract model
  gives ShapeDtypeStructs carrying the shardings (ahead-of-time compiles)."""
  shardings = model_shardings(model, mesh, filter)
  params = nnx.to_pure_dict(nnx.state(model, filter))
  if is_abstract(params):
    return with_shardings(params, shardings), shardings
  return jax.device_put(params, shardings), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process batches (leading dim = this process's pairs) → one global array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


class MeshPartitioningError(ValueError):
  """XLA partitions a known pattern wrongly on this mesh (`check_partitioning`)."""


def partitioning_error(mesh: Mesh, batch: int | None = None, width: int | None = None) -> float:
  """Relative error of `x @ w + x` computed by XLA on `mesh` against the same computation unsharded, for the
  layout every transformer block has: x's batch over (data, fsdp) and its features over tensor, w sharded
  (tensor, fsdp) (an attention output or feed-forward down projection). 0 up to float32 rounding where XLA
  partitions it correctly."""
  batch = batch or mesh.shape["data"] * mesh.shape["fsdp"] * 2
  width = width or mesh.shape["tensor"] * mesh.shape["fsdp"] * 16
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 8, width)).astype(np.float32)
  w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
  place = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])
  layer = lambda x, w: x @ w + x
  sharded = jax.jit(layer)(place(x, P(BATCH_AXES, None, "tensor")), place(w, P("tensor", "fsdp")))
  whole = jax.jit(layer, out_shardings=replicated(mesh))(place(x, P()), place(w, P()))
  return float(jax.jit(lambda a, b: jnp.linalg.norm(a - b) / jnp.linalg.norm(b),
                       out_shardings=replicated(mesh))(sharded, whole))


def check_partitioning(mesh: Mesh) -> None:
  """Raises MeshPartitioningError when XLA, on this mesh's own devices, gets `partitioning_error`'s pattern
  wrong. jax 0.10.2's partitioner (GSPMD and Shardy alike) swaps the batch between data and fsdp for the
  matmul and adds the un-swapped x, on any mesh whose three axes are all > 1: 72 % relative error on 8 CPU
  devices, and every gradient leaf of a small SDXL-layout UNet wrong (bench/sharding_check.py). Two-axis meshes
  are unaffected. Checked on the real devices, so the refusal lifts by itself with a fixed XLA; meshes with an
  axis of size 1 are not checked."""
  if sum(mesh.shape[a] > 1 for a in MESH_AXES) < len(MESH_AXES):
    return
  error = partitioning_error(mesh)
  if not error < 1e-5:
    raise MeshPartitioningError(
        f"XLA (jax {jax.__version__}) partitions a transformer layer wrongly on mesh {dict(mesh.shape)}: "
        f"relative error {error:.2g} (bench/sharding_check.py). Use a mesh with an axis of size 1, e.g. "
        f"(1, {mesh.shape['data'] * mesh.shape['fsdp']}, {mesh.shape['tensor']}) or "
        f"({mesh.shape['data']}, {mesh.shape['fsdp'] * mesh.shape['tensor']}, 1)")
