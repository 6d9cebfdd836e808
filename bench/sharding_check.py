"""Does XLA partition our layers correctly on every (data, fsdp, tensor) mesh of 8 devices? Prints, per mesh,
the relative error of (1) the minimal pattern `x @ w + x` (x: batch over (data, fsdp), features over tensor;
w: (tensor, fsdp)) and (2) every parameter gradient of a small SDXL-layout UNet (a 128-wide level), each
against the same computation on one device.

    python bench/sharding_check.py          # CPU, 8 host devices, about 2 minutes

Measured 2026-12-03, jax 0.10.2, CPU (2 cores): every mesh with an axis of size 1 is exact to float32
rounding (pattern <= 2e-7; no gradient leaf off by more than 1e-4, worst 7e-6); (2, 2, 2) is wrong: pattern
0.72, all 212 gradient leaves off (worst 0.21). `sharding.check_partitioning` refuses such meshes at start-up for this reason.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mapo_jax import sharding  # noqa: E402
from mapo_jax.models.presets import MICRO_SDXL_UNET  # noqa: E402
from mapo_jax.models.unet import UNet2DConditionModel  # noqa: E402
from mapo_jax.toy.demo import random_model  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 4, 1), (1, 4, 2), (4, 1, 2), (1, 2, 4), (2, 2, 2))
UNET = dict(MICRO_SDXL_UNET, block_out_channels=[16, 128], attention_head_dim=[2, 8])


def gradient_errors(mesh, model, args) -> np.ndarray:
  graphdef, _ = nnx.split(model)

  def loss(params, x, t, context, pooled, time_ids):
    out = nnx.merge(graphdef, params)(x, t, context, text_embeds=pooled, time_ids=time_ids)
    return jnp.mean(jnp.square(out - 1.0))

  grad = jax.jit(jax.grad(loss))
  want = grad(nnx.to_pure_dict(nnx.state(model, nnx.Param)), *args)
  params, _ = sharding.place(model, mesh)
  with jax.set_mesh(mesh):
    got = grad(params, *jax.device_put(args, sharding.batch_sharding(mesh)))
  return np.array([np.linalg.norm(np.asarray(a) - np.asarray(b)) / (np.linalg.norm(np.asarray(b)) + 1e-30)
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))])


def main():
  rng = np.random.default_rng(1)
  model = random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), seed=0)
  args = (jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32), jnp.arange(8) * 100,
          jnp.asarray(rng.standard_normal((8, 5, 24)), jnp.float32), jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
          jnp.tile(jnp.asarray([[64, 64, 0, 0, 64, 64]], jnp.float32), (8, 1)))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
  print("mesh (data, fsdp, tensor) | x @ w + x rel. error | gradient leaves off > 1e-4 | worst leaf")
  for shape in MESHES:
    mesh = sharding.make_mesh(shape)
    errors = gradient_errors(mesh, model, args)
    print(f"{str(shape):25s} | {sharding.partitioning_error(mesh, 8, 128):20.2g} | {int((errors > 1e-4).sum()):4d} of {len(errors)} "
          f"| {errors.max():.2g}")


if __name__ == "__main__":
  main()
