"""Text-to-image sampling: prompts → conditioning → latents (one jitted denoising loop) → uint8 images.

Matches a diffusers (v0.42) `StableDiffusionXLPipeline(prompt, negative_prompt=..., latents=...)` call. The
pipeline's family (mapo_jax/pipelines/) supplies what is model-specific: the conditioning
(`pipe.conditioning`; classifier-free guidance only when guidance > 1), the denoiser call (`pipe.denoise`)
and the latent normalisation (`pipe.latents`). Here:
- initial noise: unit-variance NHWC latents, scaled by the sampler's init_noise_sigma inside
  `diffusion.sample` (prepare_latents does that to given latents too);
- decode: latents denormalised (`Latents.denormalize`) through the VAE, then (x / 2 + 0.5) clipped,
  × 255 rounded to uint8.
The batch is sharded over all devices of the mesh when it divides evenly (else replicated); the mesh may
span several processes, which then all call with the same prompts and seed (the trainer's sample grids on
a multi-host slice). The trainer's
sample grids, `python -m mapo_jax.generate` and `python -m mapo_jax.evaluate` all sample through here.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mapo_jax import diffusion
from mapo_jax.models.vae import AutoencoderKL

Pipeline = Any  # a family's Pipeline (mapo_jax/pipelines/)
# A denoiser module, or its split form (graphdef, state, ...) as `nnx.split` returns it: the trainer
# passes its current parameters this way.
UNet = nnx.Module | tuple
Cond = dict[str, jax.Array]  # the family's conditioning arrays (COND_KEYS), each with a leading batch axis
SAMPLERS = ("euler", "ddim")


def default_size(pipe: Pipeline) -> tuple[int, int]:
  """diffusers' default (height, width): the denoiser's sample_size (128 when unset) × the VAE scale factor."""
  size = pipe.denoiser_config.get("sample_size") or 128
  return (size * pipe.vae_scale_factor,) * 2


def batch_mesh() -> Mesh:
  """A 1-D mesh over all devices, the default place of sampling batches."""
  return Mesh(np.array(jax.devices()), ("batch",))


def _place(tree, batch: int, mesh: Mesh):
  """Shards the leading (batch) axis over every mesh axis at once when it divides, else replicates. The
  inputs are the same on every process (prompts, seeds), so each process fills its own devices' shards:
  the mesh may span several processes (a multi-host TPU slice)."""
  sharding = NamedSharding(mesh, P(mesh.axis_names) if batch % mesh.size == 0 else P())

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


@functools.partial(jax.jit, static_argnames=("denoise", "graphdef", "steps", "sampler", "options"))
def _sample(denoise, graphdef, states, schedule, init_latents, cond, uncond, guidance, *, steps, sampler, options):
  model = nnx.merge(graphdef, *states)
  return diffusion.sample(functools.partial(denoise, model), init_latents, schedule, steps, sampler=sampler,
                          guidance_scale=guidance, cond=cond, uncond=uncond, **dict(options))


def generate_latents(denoise, unet: UNet, schedule: diffusion.Schedule | dict[str, Any], cond: Cond,
                     uncond: Cond | None, init_latents, *, steps: int, guidance: float, sampler: str = "euler",
                     mesh: Mesh | None = None, options: tuple = ()) -> jax.Array:
  """Final latents (B, h, w, C) float32 from unit-variance noise `init_latents` (B, h, w, C).

  `denoise(model, x, t, cond)` is the family's denoiser call (`pipe.denoise`). One compiled loop per
  denoiser structure, schedule options, step count, sampler and shapes; the guidance weight is traced.
  `uncond` None runs without guidance (then `guidance` must be <= 1). `options`: the family's extra static
  arguments of `diffusion.sample` (`pipe.sample_options(steps)`, hashable (name, value) pairs). `mesh`: where
  the batch goes (default `batch_mesh()`; the trainer passes its own). Parameters stay where they are.
  """
  graphdef, *states = unet if isinstance(unet, tuple) else nnx.split(unet)
  if uncond is None and guidance > 1:
    raise ValueError(f"guidance={guidance} needs uncond (negative) embeddings")
  batch = len(init_latents)
  mesh = batch_mesh() if mesh is None else mesh
  inputs = _place((jnp.asarray(init_latents, jnp.float32), cond, uncond), batch, mesh)
  with jax.set_mesh(mesh):  # traced under the mesh, as the train step is (per-shard attention kernels)
    return _sample(denoise, graphdef, tuple(states), diffusion.as_schedule(schedule), *inputs,
                   jnp.float32(guidance), steps=steps, sampler=sampler, options=tuple(options))


@functools.partial(jax.jit, static_argnames=("graphdef", "latents"))
def _decode(graphdef, state, z, *, latents):
  x = nnx.merge(graphdef, state).decode(latents.denormalize(z)).astype(jnp.float32)
  return jnp.round(jnp.clip(x * 0.5 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def decode(vae: AutoencoderKL, latents, z: jax.Array) -> jax.Array:
  """uint8 (B, H, W, 3) images from final latents z, as diffusers' decode + VaeImageProcessor.postprocess.
  `latents` is the pipeline's latent normalisation (`pipe.latents`).

  The VAE computes in its own dtype: `load_vae` already keeps float32 for a float16 request when the
  config sets force_upcast (the original SDXL VAE overflows in float16), as diffusers upcasts it.
  """
  graphdef, state = nnx.split(vae)
  return _decode(graphdef, state, jnp.asarray(z, jnp.float32), latents=latents)


@functools.partial(jax.jit, static_argnames=("count", "shape"))
def _noise(seed, first, *, count, shape):
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), first + jnp.arange(count))
  # Drawn flat, then reshaped: the same numbers (threefry is partitionable), but XLA:CPU compiles the
  # multi-dimensional draw several times slower.
  return jax.vmap(lambda k: jax.random.normal(k, (math.prod(shape),), jnp.float32).reshape(shape))(keys)


def initial_noise(seed: int, count: int, shape: Sequence[int], *, first: int = 0) -> jax.Array:
  """(count, *shape) unit-variance noise; image i draws from fold_in(key(seed), first + i), so an image's
  noise depends on its seed and index only, not on how the prompts are batched."""
  return _noise(seed, first, count=count, shape=tuple(shape))


def generate_images(pipe: Pipeline, prompts: Sequence[str], *, negative_prompts: Sequence[str] | None = None,
                    steps: int, guidance: float, seed: int = 0, height: int | None = None,
                    width: int | None = None, init_latents=None, sampler: str = "euler",
                    unet: UNet | None = None, batch_size: int | None = None,
                    mesh: Mesh | None = None, true_cfg: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, H, W, 3), final latents float32 (N, h, w, C)) for N prompts, on the host.

  `pipe` needs the VAE, text encoders, tokenizers and scheduler; `unet` (default `pipe.denoiser`) may be a
  module or (graphdef, state, ...). `init_latents` (N, h, w, C) unit-variance noise, C the VAE's latent
  channels, fixes the size (height/width must then agree); without it the noise comes from
  `initial_noise(seed, ...)` at height × width (default: `default_size`). `guidance` is the family's guidance
  (classifier-free for SD / SDXL / SD3, the guidance embedding for FLUX-dev); `true_cfg` FLUX's true
  classifier-free guidance with the negative prompts. `batch_size` prompts are sampled at a time (default:
  all); the last batch is padded by repeating its last prompt, so every batch uses one compiled loop. `mesh`:
  as for `generate_latents`. The trainer passes height and width when `pipe` holds no denoiser.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}; expected one of {SAMPLERS}")
  n, f = len(prompts), pipe.vae_scale_factor
  if init_latents is not None:
    init_latents = np.asarray(init_latents, np.float32)
    size = (init_latents.shape[1] * f, init_latents.shape[2] * f)
    if (init_latents.shape[0] != n or (height or size[0], width or size[1]) != size
        or init_latents.shape[3] != pipe.latent_channels):
      raise ValueError(f"init_latents {init_latents.shape} do not fit {n} prompts at {height}x{width} px "
                       f"(latents are 1/{f} of the image size, with {pipe.latent_channels} channels)")
  else:
    size = (height or default_size(pipe)[0], width or default_size(pipe)[1])
    if size[0] % f or size[1] % f:
      raise ValueError(f"height and width must be multiples of {f}, got {size[0]}x{size[1]}")
  unet = pipe.denoiser if unet is None else unet
  bs = batch_size or n
  images, latents = [], []
  for start in range(0, n, bs):
    idx = [min(i, n - 1) for i in range(start, start + bs)]  # padded with the last prompt
    negatives = None if negative_prompts is None else [negative_prompts[i] for i in idx]
    cond, uncond, cfg = pipe.conditioning([prompts[i] for i in idx], negatives, height=size[0], width=size[1],
                                          guidance=guidance, true_cfg=true_cfg)
    noise = (init_latents[idx] if init_latents is not None else
             initial_noise(seed, bs, (size[0] // f, size[1] // f, pipe.latent_channels), first=start))
    z = generate_latents(pipe.denoise, unet, pipe.scheduler_config, cond, uncond, noise, steps=steps, guidance=cfg,
                         sampler=sampler, mesh=mesh, options=pipe.sample_options(steps))
    keep = min(bs, n - start)
    z = np.asarray(multihost_utils.process_allgather(z, tiled=True))  # every process decodes all of them
    images.append(np.asarray(jax.device_get(decode(pipe.vae, pipe.latents, z)))[:keep])
    latents.append(z[:keep])
  return np.concatenate(images), np.concatenate(latents)


def make_grid(images: np.ndarray, cols: int) -> np.ndarray:
  """(rows·H, cols·W, C) uint8 tiling of (N, H, W, C) images row by row; empty cells are black."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  grid = np.zeros((rows * cols, h, w, c), images.dtype)
  grid[:n] = images
  return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
