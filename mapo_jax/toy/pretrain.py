"""Pretrains the toy world's pipeline (mapo_jax/toy/world.py), deterministically, on CPU:

    python -m mapo_jax.toy.pretrain --out mapo_jax/toy/base

1. a tiny VAE (/4: 32 px images, 8 x 8 x 4 latents) trained to reconstruct the world's drawings, its
   scaling_factor set to 1 / std of its latents;
2. the demo's two CLIP text towers, random and frozen (mapo_jax/toy/demo.py);
3. a tiny SDXL-architecture UNet (the demo's MICRO layout) trained with the trainer's own step
   (mapo_jax/training/train_step.py, objective "sft": the denoising loss) on a deliberately biased world where
   ~10 % of the shapes are filled and the rest outlined, with 10 % empty prompts so that classifier-free
   guidance works.
The folder is a diffusers SDXL pipeline in fp16 (`StableDiffusionXLPipeline.from_pretrained` loads it), with
metrics.json (the checks below, measured on the written fp16 pipeline) and samples.png. Checks: the judge
on VAE reconstructions of fresh drawings; the judge on samples of every caption at the demo's sampling
settings (caption accuracy, filled rate). 32 px rather than 64: a 64 px VAE did not finish 300 steps in
8 CPU-minutes, and the judge reads 32 px drawings as well (tests/test_toy_world.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from mapo_jax.toy import world as toy_world
from mapo_jax.training import train_step
from mapo_jax.toy.demo import random_model, write_pipeline
from mapo_jax.models import AutoencoderKL, save_unet
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.unet import UNet2DConditionModel
from mapo_jax.pipelines import empty_prompt_rows, load_pipeline, sd
from mapo_jax.pipelines.sd import FROZEN
from mapo_jax.sampling import generate_images, make_grid

SIZE = 32  # px: small enough to pretrain on 2 CPU cores; the judge reads 32 px drawings (tests/test_toy_world.py)
VAE = dict(  # three blocks: /4, 8 x 8 x 4 latents
    in_channels=3, out_channels=3, block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=SIZE, scaling_factor=1.0, force_upcast=False, mid_block_add_attention=False)
VAE_KL_WEIGHT = 1e-4  # keeps the posterior's log-variance from running off; reconstructions dominate
# The demo's UNet layout (its text towers' widths fit it) on 8 x 8 latents.
UNET = {**MICRO_SDXL_UNET, "sample_size": SIZE // 4}
FILLED_RATE = 0.1  # the base is biased: filled shapes are rare, outlined ones common
EMPTY_PROMPT_PROB = 0.1  # so that classifier-free guidance has an unconditional model to push from
# The sampling settings the checks use; configs/demo.py judges its samples with the same (sample_steps, sample_guidance).
SAMPLE_STEPS, GUIDANCE = 20, 3.0
VAE_STEPS, UNET_STEPS, BATCH = 1000, 5000, 32  # the shipped mapo_jax/toy/base
EMA_DECAY = 0.999


def world_images(n: int, seed: int, filled_rate: float = 0.5) -> tuple[list[toy_world.Scene], np.ndarray]:
  rng = np.random.default_rng(seed)
  scenes = [toy_world.random_scene(rng, filled_rate) for _ in range(n)]
  return scenes, np.stack([toy_world.draw(s, rng, SIZE) for s in scenes])


def to_unit(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def vae_loss(vae: AutoencoderKL, x: jax.Array, key: jax.Array):
  mean, logvar = vae.encode(x)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  recon = vae.decode(z)
  mse = jnp.mean(jnp.square(recon - x))
  kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
  return mse + VAE_KL_WEIGHT * kl, {"mse": mse, "kl": kl}


def train_vae(steps: int, batch: int, seed: int = 0, lr: float = 2e-3, log=print) -> AutoencoderKL:
  vae = random_model(lambda: AutoencoderKL(VAE, rngs=nnx.Rngs(0)), seed)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.05), weight_decay=0.0)
  graphdef, params = nnx.split(vae)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, key):
    grad_fn = jax.value_and_grad(lambda p: vae_loss(nnx.merge(graphdef, p), x, key), has_aux=True)
    (_, metrics), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  key = jax.random.key(seed)
  for i in range(steps):
    _, images = world_images(batch, seed=10_000 + i)
    params, opt_state, metrics = step(params, opt_state, to_unit(images), jax.random.fold_in(key, i))
    if i % 100 == 0 or i == steps - 1:
      log(f"vae step {i}: " + ", ".join(f"{k} {float(v):.5f}" for k, v in metrics.items()))
  return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef, params, x):
  vae = nnx.merge(graphdef, params)
  mean, _ = vae.encode(x)
  return vae.decode(mean), mean


def reconstruct(vae: AutoencoderKL, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images → (uint8 reconstructions from the posterior mean, the means)."""
  graphdef, params = nnx.split(vae)
  recon, mean = _reconstruct(graphdef, params, to_unit(images))
  return np.clip(np.round((np.asarray(recon) + 1) * 127.5), 0, 255).astype(np.uint8), np.asarray(mean)


def latent_scale(vae: AutoencoderKL, n: int = 512, seed: int = 1) -> float:
  """1 / std of the posterior means over world drawings: the VAE config's scaling_factor, so the UNet
  trains and samples on unit-variance latents (as SD's 0.18215 was chosen)."""
  _, images = world_images(n, seed)
  _, mean = reconstruct(vae, images)
  return float(1.0 / np.std(mean))


@functools.partial(jax.jit, static_argnums=0)
def _moments(graphdef, params, x):
  return jnp.concatenate(nnx.merge(graphdef, params).encode(x), axis=-1)


def encode_world(vae: AutoencoderKL, images: np.ndarray, batch: int = 512) -> np.ndarray:
  """VAE posterior moments [mean, logvar] (N, h, w, 2C) float32, as the trainer's cache stores them."""
  graphdef, params = nnx.split(vae)
  return np.concatenate([np.asarray(_moments(graphdef, params, to_unit(images[i:i + batch])))
                         for i in range(0, len(images), batch)])


def all_captions() -> list[str]:
  return [toy_world.caption(toy_world.Scene(s, c, "filled")) for s in toy_world.SHAPES for c in toy_world.COLORS]


def with_scaling_factor(vae: AutoencoderKL, scaling_factor: float) -> AutoencoderKL:
  """The same weights under a config whose scaling_factor is `scaling_factor`."""
  out = nnx.eval_shape(lambda: AutoencoderKL({**VAE, "scaling_factor": scaling_factor}, rngs=nnx.Rngs(0)))
  nnx.update(out, nnx.state(vae))
  return out


def train_unet(pipe, steps: int, batch: int, seed: int = 0, lr: float = 2e-3, num_images: int = 8192,
               log=print) -> UNet2DConditionModel:
  """SFT (the denoising loss) with the trainer's own step (mapo_jax/training/train_step.py) on `num_images` biased
  world drawings (FILLED_RATE filled), encoded once by `pipe`'s VAE and text towers; a caption is swapped
  for the empty prompt with probability EMPTY_PROMPT_PROB, as config.data.empty_prompt_prob does.
  Returns the exponential moving average of the parameters (decay min(EMA_DECAY, (1 + i) / (10 + i)) at
  step i, as diffusers' EMAModel warms up): the raw parameters after 1500 steps sampled broken outlines."""
  scenes, images = world_images(num_images, seed=20_000, filled_rate=FILLED_RATE)
  moments = encode_world(pipe.vae, images)
  captions = all_captions()
  cond = {k: np.asarray(v) for k, v in jax.device_get(pipe.encode_prompts(captions)).items()}
  which = np.array([captions.index(toy_world.caption(s)) for s in scenes])
  time_ids = sd.time_ids(SIZE, SIZE, batch)

  unet = random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), seed)
  graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, end_value=lr / 20),
                   weight_decay=0.0)
  cfg = train_step.StepConfig("sft", {}, pipe.latents, empty_prompt_prob=EMPTY_PROMPT_PROB)
  step = jax.jit(train_step.make_train_step(pipe.denoise, graphdef, None, tx, pipe.schedule, cfg),
                 donate_argnums=0)
  ema = jax.tree.map(np.array, params)  # a copy: the step donates the state's parameters
  state = train_step.init_state(params, tx, seed)
  frozen = train_step.Frozen(policy=rest, empty_prompt=empty_prompt_rows(pipe))
  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, num_images, batch)
    b = {"moments_w": moments[idx], "prompt_embeds": cond["prompt_embeds"][which[idx]],
         "pooled_prompt_embeds": cond["pooled_prompt_embeds"][which[idx]], "time_ids": time_ids}
    state, metrics = step(state, b, frozen)
    ema = _ema_update(ema, state.params, min(EMA_DECAY, (1 + i) / (10 + i)))
    if i % 100 == 0 or i == steps - 1:
      log(f"unet step {i}: loss {float(metrics['loss']):.4f}")
  return nnx.merge(graphdef, ema, rest)


@jax.jit
def _ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def judge_samples(pipe, unet=None, *, per_caption: int, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
                  seed: int = 0) -> tuple[dict[str, float], np.ndarray]:
  """Samples every caption `per_caption` times (seeds fixed by `seed`), judges them: (toy_world.score's
  {"caption_accuracy", "filled_rate", "outlined_rate"}, images in caption-major order)."""
  prompts = [c for c in all_captions() for _ in range(per_caption)]
  images, _ = generate_images(pipe, prompts, steps=steps, guidance=guidance, seed=seed, height=SIZE, width=SIZE,
                              unet=unet, batch_size=min(len(prompts), 256))
  return toy_world.score(images, prompts), images


def reconstruction_accuracy(vae: AutoencoderKL, n: int = 300, seed: int = 1) -> dict[str, float]:
  """The judge on reconstructions (posterior means decoded) of fresh drawings, per attribute."""
  scenes, images = world_images(n, seed)
  verdict = toy_world.judge(reconstruct(vae, images)[0])
  return {k: float(np.mean([got == getattr(s, k) for got, s in zip(verdict[k], scenes)]))
          for k in ("shape", "color", "style")}


def build(out: Path, *, vae_steps: int, unet_steps: int, batch: int, seed: int = 0, log=print) -> dict:
  """Trains both models and writes the fp16 pipeline to `out` (which must not exist), with metrics.json
  and samples.png; returns the metrics."""
  if out.exists():
    raise FileExistsError(f"--out {out} exists; remove it or choose another folder")
  start = time.time()
  vae = train_vae(vae_steps, batch, seed, log=log)
  metrics = {"vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch, "seed": seed,
             "vae_train_seconds": round(time.time() - start), "reconstruction_accuracy": reconstruction_accuracy(vae)}
  log(f"reconstruction judge accuracy {metrics['reconstruction_accuracy']}")
  vae = with_scaling_factor(vae, latent_scale(vae))
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  # The UNet trains on what the shipped fp16 VAE and text towers produce: written first, read back.
  placeholder = random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), seed)
  # The sampler's unconditional branch encodes "" (force_zeros off): what empty_prompt_prob trained on.
  write_pipeline(tmp, seed, unet=placeholder, vae=vae, dtype="fp16", force_zeros_for_empty_prompt=False)
  pipe = load_pipeline(tmp, components=FROZEN + ("scheduler",))
  start = time.time()
  unet = train_unet(pipe, unet_steps, batch, seed, log=log)
  metrics["unet_train_seconds"] = round(time.time() - start)
  shutil.rmtree(tmp / "unet")
  save_unet(unet, tmp / "unet", dtype="fp16")

  measure(tmp, metrics, log=log)
  os.replace(tmp, out)
  return metrics


def measure(folder: Path, metrics: dict, log=print) -> None:
  """Judges samples of the pipeline in `folder` (exactly what ships) into `metrics`; writes metrics.json and
  samples.png (the first 10 samples of every caption)."""
  scores, images = judge_samples(load_pipeline(folder), per_caption=20)
  metrics[f"samples_{SAMPLE_STEPS}_steps_guidance_{GUIDANCE:g}"] = scores
  log(f"samples at {SAMPLE_STEPS} steps, guidance {GUIDANCE}: {scores}")
  first_ten = images.reshape(9, 20, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
  Image.fromarray(make_grid(first_ten, 10)).save(folder / "samples.png")
  (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write (must not exist)")
  parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
  parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
  parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--measure-only", action="store_true",
                      help="re-judge the samples of the existing --out (after a judge change); trains nothing")
  args = parser.parse_args(argv)
  start = time.time()
  log = lambda message: print(f"[{time.time() - start:7.1f} s] {message}", flush=True)
  if args.measure_only:
    measure(args.out, json.loads((args.out / "metrics.json").read_text()), log=log)
    return
  build(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch=args.batch, seed=args.seed, log=log)


if __name__ == "__main__":
  main()
