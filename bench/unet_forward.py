"""Times the UNet forward pass, ours (JAX) beside diffusers' (PyTorch) in the same command.

  python bench/unet_forward.py --config tiny --res 64 --batch 2                 # CPU, seconds
  python bench/unet_forward.py --config sdxl --res 1024 --batch 2 --dtype bfloat16   # one GPU

Random weights (timing does not depend on them). Prints one JSON line per implementation:
impl, config, res, batch, dtype, fwd_s (median), images_per_s, compile_s.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mapo_jax.models import init_unet, presets
from mapo_jax.models.layers import Options

CONFIGS = {"sdxl": presets.SDXL_BASE_UNET, "sd15": presets.SD15_UNET, "tiny": presets.BENCH_TINY_UNET}


def inputs(cfg, batch, res):
  rng = np.random.default_rng(0)
  h = res // 8
  x = rng.standard_normal((batch, h, h, 4)).astype(np.float32)
  t = rng.integers(0, 1000, batch)
  ctx = rng.standard_normal((batch, 77, cfg["cross_attention_dim"])).astype(np.float32)
  extra = {}
  if cfg.get("addition_embed_type") == "text_time":
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    extra = dict(text_embeds=rng.standard_normal((batch, pooled)).astype(np.float32),
                 time_ids=np.tile(np.array([[res, res, 0, 0, res, res]], np.float32), (batch, 1)))
  return x, t, ctx, extra


def timed(fn, steps, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_jax(a, cfg):
  from flax import nnx
  unet = init_unet(cfg, options=Options(dtype=jnp.dtype(a.dtype), attention=a.attention))
  graphdef, params = nnx.split(unet)
  x, t, ctx, extra = jax.device_put(inputs(cfg, a.batch, a.res))
  fwd = jax.jit(lambda p, *args, **kw: nnx.merge(graphdef, p)(*args, **kw))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, x, t, ctx, **extra).compile()
  compile_s = time.perf_counter() - t0
  med = timed(lambda: compiled(params, x, t, ctx, **extra).block_until_ready(), a.steps, a.warmup)
  return dict(impl="jax", device=jax.devices()[0].device_kind, fwd_s=round(med, 4),
              images_per_s=round(a.batch / med, 2), compile_s=round(compile_s, 1))


def run_torch(a, cfg):
  import torch
  from diffusers import UNet2DConditionModel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  unet = UNet2DConditionModel(**cfg).to(dev).eval()
  x, t, ctx, extra = inputs(cfg, a.batch, a.res)
  to = lambda v: torch.tensor(v, device=dev)
  added = {k: to(v) for k, v in extra.items()} or None
  args = (to(x.transpose(0, 3, 1, 2)), to(t), to(ctx))
  dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32

  def fwd():
    with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=a.dtype == "bfloat16"):
      unet(*args, added_cond_kwargs=added)
    if dev == "cuda":
      torch.cuda.synchronize()

  med = timed(fwd, a.steps, a.warmup)
  return dict(impl="torch", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              fwd_s=round(med, 4), images_per_s=round(a.batch / med, 2))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
  p.add_argument("--res", type=int, default=64)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--attention", default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no-torch", action="store_true", help="skip the diffusers side")
  a = p.parse_args()
  common = dict(config=a.config, res=a.res, batch=a.batch, dtype=a.dtype)
  print(json.dumps(dict(common, **run_jax(a, CONFIGS[a.config]))), flush=True)
  if not a.no_torch:
    print(json.dumps(dict(common, **run_torch(a, CONFIGS[a.config]))))


if __name__ == "__main__":
  main()
