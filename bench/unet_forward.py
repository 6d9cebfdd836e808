"""Times the denoiser's forward pass (the SD / SDXL UNet, the FLUX.1 transformer, the SD3 / SD3.5 MMDiT), ours
(JAX) beside diffusers' (PyTorch) in the same command.

  python bench/unet_forward.py --config tiny --res 64 --batch 2                 # CPU, seconds
  python bench/unet_forward.py --config tiny_flux --res 64 --batch 2            # CPU: the tiny FLUX preset
  python bench/unet_forward.py --config sdxl --res 1024 --batch 2 --dtype bfloat16   # one GPU
  python bench/unet_forward.py --config flux1_dev --res 1024 --batch 1 --dtype bfloat16
  python bench/unet_forward.py --config tiny_sd35 --res 64 --batch 2            # CPU: the tiny SD3.5 preset
  python bench/unet_forward.py --config sd35_medium --res 1024 --batch 2 --dtype bfloat16

Random weights (timing does not depend on them). Inputs as the pipelines build them: NHWC latents, 77 CLIP tokens
and SDXL's time ids for the UNet; for FLUX the 2x2-packed latent tokens with their position ids, --text-tokens T5
tokens (default 512, FluxPipeline's max_sequence_length), the pooled CLIP embedding, sigmas and (dev) a guidance
scale; for SD3 NHWC latents, 77 CLIP + --text-tokens T5 tokens (default 256, StableDiffusion3Pipeline's
max_sequence_length), the pooled embedding and timesteps sigma * 1000. Prints one JSON line per implementation: impl, config, res, batch, dtype, fwd_s (median), images_per_s,
compile_s.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mapo_jax.models import init_unet, presets
from mapo_jax.models.flux import init_flux_transformer, latent_image_ids
from mapo_jax.models.layers import Options
from mapo_jax.models.sd3 import init_sd3_transformer

# name -> (denoiser kind, config). A kind is one entry of INPUTS, JAX_MODELS and TORCH_MODELS below.
CONFIGS = {
    "sdxl": ("unet", presets.SDXL_BASE_UNET), "sd15": ("unet", presets.SD15_UNET),
    "tiny": ("unet", presets.BENCH_TINY_UNET),
    "flux1_dev": ("flux", presets.FLUX1_DEV_TRANSFORMER),
    "tiny_flux": ("flux", presets.TINY_FLUX_PIPELINE_TRANSFORMER),
    "sd35_medium": ("sd3", presets.SD35_MEDIUM_TRANSFORMER), "sd35_large": ("sd3", presets.SD35_LARGE_TRANSFORMER),
    "tiny_sd3": ("sd3", presets.TINY_SD3_TRANSFORMER), "tiny_sd35": ("sd3", presets.TINY_SD35_TRANSFORMER),
}


def unet_inputs(cfg, a, rng):
  """(args, kwargs) of our UNet call: NHWC latents, integer timesteps, CLIP states (and SDXL's added inputs)."""
  h = a.res // 8
  x = rng.standard_normal((a.batch, h, h, 4)).astype(np.float32)
  t = rng.integers(0, 1000, a.batch)
  ctx = rng.standard_normal((a.batch, 77, cfg["cross_attention_dim"])).astype(np.float32)
  extra = {}
  if cfg.get("addition_embed_type") == "text_time":
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    extra = dict(text_embeds=rng.standard_normal((a.batch, pooled)).astype(np.float32),
                 time_ids=np.tile(np.array([[a.res, a.res, 0, 0, a.res, a.res]], np.float32), (a.batch, 1)))
  return (x, t, ctx), extra


def flux_inputs(cfg, a, rng):
  """(args, kwargs) of our FluxTransformer2DModel call, keyed as diffusers' forward names them."""
  side = a.res // 16  # packed tokens per side: VAE 8 x the 2x2 packing
  tokens = a.text_tokens or 512
  kw = dict(hidden_states=rng.standard_normal((a.batch, side * side, cfg["in_channels"])).astype(np.float32),
            encoder_hidden_states=rng.standard_normal((a.batch, tokens, cfg["joint_attention_dim"])).astype(np.float32),
            pooled_projections=rng.standard_normal((a.batch, cfg["pooled_projection_dim"])).astype(np.float32),
            timestep=rng.uniform(0.05, 1.0, a.batch).astype(np.float32),
            img_ids=latent_image_ids(side, side), txt_ids=np.zeros((tokens, 3), np.float32))
  if cfg.get("guidance_embeds"):
    kw["guidance"] = np.full((a.batch,), 3.5, np.float32)
  return (), kw


def sd3_inputs(cfg, a, rng):
  """(args, kwargs) of our SD3Transformer2DModel call, keyed as diffusers' forward names them (NHWC latents)."""
  h = a.res // 8
  tokens = 77 + (a.text_tokens or 256)  # both CLIP towers' 77, then T5's max_sequence_length
  kw = dict(hidden_states=rng.standard_normal((a.batch, h, h, cfg["in_channels"])).astype(np.float32),
            encoder_hidden_states=rng.standard_normal((a.batch, tokens, cfg["joint_attention_dim"])).astype(np.float32),
            pooled_projections=rng.standard_normal((a.batch, cfg["pooled_projection_dim"])).astype(np.float32),
            timestep=(1000 * rng.uniform(0.05, 1.0, a.batch)).astype(np.float32))
  return (), kw


INPUTS = {"unet": unet_inputs, "flux": flux_inputs, "sd3": sd3_inputs}
JAX_MODELS = {"unet": init_unet, "flux": init_flux_transformer, "sd3": init_sd3_transformer}


def timed(fn, steps, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_jax(a, kind, cfg):
  from flax import nnx
  model = JAX_MODELS[kind](cfg, options=Options(dtype=jnp.dtype(a.dtype), attention=a.attention))
  graphdef, params = nnx.split(model)
  args, kwargs = jax.device_put(INPUTS[kind](cfg, a, np.random.default_rng(0)))
  fwd = jax.jit(lambda p, *args, **kw: nnx.merge(graphdef, p)(*args, **kw))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, *args, **kwargs).compile()
  compile_s = time.perf_counter() - t0
  med = timed(lambda: jax.block_until_ready(compiled(params, *args, **kwargs)), a.steps, a.warmup)
  return dict(impl="jax", device=jax.devices()[0].device_kind, fwd_s=round(med, 4),
              images_per_s=round(a.batch / med, 2), compile_s=round(compile_s, 1))


def torch_unet(cfg, a, dev):
  """A diffusers UNet and a no-argument call of it on the same inputs as ours (NCHW)."""
  import torch
  from diffusers import UNet2DConditionModel
  unet = UNet2DConditionModel(**cfg).to(dev).eval()
  (x, t, ctx), extra = unet_inputs(cfg, a, np.random.default_rng(0))
  to = lambda v: torch.tensor(v, device=dev)
  added = {k: to(v) for k, v in extra.items()} or None
  args = (to(x.transpose(0, 3, 1, 2)), to(t), to(ctx))
  return lambda: unet(*args, added_cond_kwargs=added)


def torch_flux(cfg, a, dev):
  """A diffusers FluxTransformer2DModel and a no-argument call of it on the same inputs as ours."""
  import torch
  from diffusers import FluxTransformer2DModel
  model = FluxTransformer2DModel(**cfg).to(dev).eval()
  _, kw = flux_inputs(cfg, a, np.random.default_rng(0))
  kw = {k: torch.tensor(v, device=dev) for k, v in kw.items()}
  return lambda: model(**kw)


def torch_sd3(cfg, a, dev):
  """A diffusers SD3Transformer2DModel and a no-argument call of it on the same inputs as ours (NCHW)."""
  import torch
  from diffusers import SD3Transformer2DModel
  model = SD3Transformer2DModel(**cfg).to(dev).eval()
  _, kw = sd3_inputs(cfg, a, np.random.default_rng(0))
  kw["hidden_states"] = kw["hidden_states"].transpose(0, 3, 1, 2)
  kw = {k: torch.tensor(v, device=dev) for k, v in kw.items()}
  return lambda: model(**kw)


TORCH_MODELS = {"unet": torch_unet, "flux": torch_flux, "sd3": torch_sd3}


def run_torch(a, kind, cfg):
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  call = TORCH_MODELS[kind](cfg, a, dev)
  dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32

  def fwd():
    with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=a.dtype == "bfloat16"):
      call()
    if dev == "cuda":
      torch.cuda.synchronize()

  med = timed(fwd, a.steps, a.warmup)
  return dict(impl="torch", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              fwd_s=round(med, 4), images_per_s=round(a.batch / med, 2))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
  p.add_argument("--res", type=int, default=64, help="image pixels per side (FLUX, SD3: a multiple of 16)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--attention", default=None)
  p.add_argument("--text-tokens", type=int, default=None,
                 help="FLUX and SD3: T5 tokens (default 512 for FLUX, 256 for SD3, which adds 77 CLIP tokens)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no-torch", action="store_true", help="skip the diffusers side")
  a = p.parse_args()
  kind, cfg = CONFIGS[a.config]
  common = dict(config=a.config, res=a.res, batch=a.batch, dtype=a.dtype)
  print(json.dumps(dict(common, **run_jax(a, kind, cfg))), flush=True)
  if not a.no_torch:
    print(json.dumps(dict(common, **run_torch(a, kind, cfg))))


if __name__ == "__main__":
  main()
