"""Pretrains the toy world's pipelines (mapo_jax/toy/world.py), deterministically, on CPU:

    python -m mapo_jax.toy.pretrain --out mapo_jax/toy/base                          # SDXL layout (default)
    python -m mapo_jax.toy.pretrain --family flux --out mapo_jax/toy/flux_base       # its FLUX.1 twin

`--family sdxl` (mapo_jax/toy/base):
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

`--family flux` (mapo_jax/toy/flux_base): a diffusers FluxPipeline folder (mapo_jax/pipelines/flux.py) on the same
world, the same bias and the same latent space:
1. the SDXL base's VAE weights (read from `--vae`, default mapo_jax/toy/base/vae), its config given a
   `shift_factor` and a `scaling_factor` that make the latents zero-mean and unit-variance, as FLUX.1's VAE config
   does ((z - shift_factor) * scaling_factor; FluxPipeline decodes with both, so a FLUX folder needs a number in
   shift_factor). Its 4 latent channels pack 2x2 into 16-channel tokens (FluxPipeline._pack_latents), 4 x 4 tokens
   per 32 px image;
2. text_encoder: the SDXL base's first CLIP tower (the same random draw; FluxPipeline uses its pooler_output);
   text_encoder_2: a tiny random T5 encoder (transformers T5EncoderModel), frozen, with a word-level Unigram
   T5 tokenizer. Prompts are encoded at FLUX_T5_TOKENS T5 tokens (FluxPipeline's `max_sequence_length`; 512 by
   default there, 256 for schnell in BFL's CLI): the toy's captions take 4, and at 512 every step of the
   transformer would spend ~97 % of its work on padding (a training step 70x slower on 2 CPU cores);
3. a tiny FluxTransformer2DModel (double- and single-stream blocks, guidance embedding as FLUX.1-dev) trained
   with the trainer's own step (objective "sft" on a FlowMatchEulerDiscreteScheduler: the rectified-flow velocity
   loss, sigma uniform as train_dreambooth_lora_flux.py's default weighting_scheme "none") at the embedded guidance
   FLUX_TRAIN_GUIDANCE, on the same biased world with the same 10 % empty prompts; the shipped weights are the EMA;
4. FLUX.1-dev's scheduler config (mapo_jax/pipelines/flux.py SCHEDULER_CONFIG).
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
from mapo_jax.toy import demo
from mapo_jax.toy.demo import load_toy, random_model, write_pipeline
from mapo_jax.models import AutoencoderKL, CLIPTextModel, load_vae, save_text_encoder, save_unet, save_vae
from mapo_jax.models.flux import FluxTransformer2DModel, save_flux_transformer
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.t5 import T5EncoderModel, save_t5_encoder
from mapo_jax.models.unet import UNet2DConditionModel
from mapo_jax.pipelines import empty_prompt_rows, family, flux, sd
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

# --- The FLUX.1 twin (--family flux) ---------------------------------------------------------------------------
FLUX_T5_TOKENS = demo.FLUX_T5_TOKENS  # FluxPipeline's max_sequence_length for the twin (demo.py says why)
# A T5 v1.1-style encoder (gated GELU) at toy width; its width is the transformer's joint_attention_dim.
FLUX_T5 = dict(
    architectures=["T5EncoderModel"], model_type="t5", d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0,
    eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
# T5's word pieces: the toy world's words whole ("▁" marks a word start), single letters for anything else; a
# Unigram vocabulary laid out as T5's (<pad> 0, </s> 1, <unk> 2).
FLUX_T5_WORDS = ("a", "red", "green", "blue", "circle", "square", "triangle")
FLUX_T5_VOCAB = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
                 + [(f"\u2581{w}", -3.0) for w in FLUX_T5_WORDS]
                 + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"])
FLUX_TRANSFORMER = dict(  # FLUX.1's layout (both block kinds, 3-axis RoPE summing to the head width) at width 64
    attention_head_dim=16, axes_dims_rope=[4, 6, 6], guidance_embeds=True, in_channels=4 * VAE["latent_channels"],
    joint_attention_dim=FLUX_T5["d_model"], num_attention_heads=4, num_layers=2, num_single_layers=2,
    patch_size=1, pooled_projection_dim=demo.TEXT_ENCODER["hidden_size"])
FLUX_SCHEDULER = dict(flux.SCHEDULER_CONFIG)  # FLUX.1-dev's
# The embedded guidance the transformer trains at (config.flow.guidance's default, train_dreambooth_lora_flux.py's
# --guidance_scale) and samples with (FluxPipeline's guidance_scale default).
FLUX_TRAIN_GUIDANCE = FLUX_GUIDANCE = flux.TRAIN_GUIDANCE
FLUX_SAMPLE_STEPS = 20
FLUX_STEPS, FLUX_BATCH, FLUX_LR = 10000, 32, 2e-3  # 5000 steps: 51 % caption-correct, broken outlines


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


def latent_shift_scale(vae: AutoencoderKL, n: int = 512, seed: int = 1) -> tuple[float, float]:
  """(mean, 1 / std) of the posterior means over world drawings, rounded to 4 decimals as FLUX.1's published
  shift_factor 0.1159 and scaling_factor 0.3611 are: the FLUX VAE config's normalisation (z - shift) * scale."""
  _, images = world_images(n, seed)
  _, mean = reconstruct(vae, images)
  return round(float(np.mean(mean)), 4), round(float(1.0 / np.std(mean)), 4)


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


def with_vae_config(vae: AutoencoderKL, **changes) -> AutoencoderKL:
  """The same weights under the VAE's config with `changes` (scaling_factor, shift_factor)."""
  out = nnx.eval_shape(lambda: AutoencoderKL({**vae.config, **changes}, rngs=nnx.Rngs(0)))
  nnx.update(out, nnx.state(vae))
  return out


def with_scaling_factor(vae: AutoencoderKL, scaling_factor: float) -> AutoencoderKL:
  """The same weights under a config whose scaling_factor is `scaling_factor`."""
  out = nnx.eval_shape(lambda: AutoencoderKL({**VAE, "scaling_factor": scaling_factor}, rngs=nnx.Rngs(0)))
  nnx.update(out, nnx.state(vae))
  return out


def is_flux(pipe) -> bool:
  return isinstance(pipe, flux.Pipeline)


def sample_settings(pipe) -> tuple[int, float]:
  """(steps, guidance) at which a toy pipeline is judged: Euler steps, and the classifier-free guidance scale
  (SDXL) or the embedded guidance (the FLUX twin)."""
  return (FLUX_SAMPLE_STEPS, FLUX_GUIDANCE) if is_flux(pipe) else (SAMPLE_STEPS, GUIDANCE)


def train_denoiser(pipe, model, steps: int, batch: int, seed: int = 0, lr: float = 2e-3, num_images: int = 8192,
                   guidance: float | None = None, log=print):
  """SFT (the denoising loss) of `model`, the pipeline's denoiser (a UNet, or the FLUX twin's transformer), with the
  trainer's own step (mapo_jax/training/train_step.py) on `num_images` biased world drawings (FILLED_RATE filled),
  encoded once by `pipe`'s VAE and text towers; a caption is swapped for the empty prompt with probability
  EMPTY_PROMPT_PROB, as config.data.empty_prompt_prob does. The schedule (DDPM or flow matching) is the pipeline's;
  `guidance` is the embedded guidance every pair trains at (a guidance-distilled transformer; StepConfig.guidance).
  Returns the exponential moving average of the parameters (decay min(EMA_DECAY, (1 + i) / (10 + i)) at
  step i, as diffusers' EMAModel warms up): the raw parameters after 1500 steps sampled broken outlines."""
  scenes, images = world_images(num_images, seed=20_000, filled_rate=FILLED_RATE)
  moments = encode_world(pipe.vae, images)
  captions = all_captions()
  cond = {k: np.asarray(v) for k, v in jax.device_get(pipe.encode_prompts(captions)).items()}
  which = np.array([captions.index(toy_world.caption(s)) for s in scenes])
  extra = {} if is_flux(pipe) else {"time_ids": sd.time_ids(SIZE, SIZE, batch)}

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, end_value=lr / 20),
                   weight_decay=0.0)
  cfg = train_step.StepConfig("sft", {}, pipe.latents, empty_prompt_prob=EMPTY_PROMPT_PROB, guidance=guidance)
  step = jax.jit(train_step.make_train_step(pipe.denoise, graphdef, None, tx, pipe.schedule, cfg),
                 donate_argnums=0)
  ema = jax.tree.map(np.array, params)  # a copy: the step donates the state's parameters
  state = train_step.init_state(params, tx, seed)
  frozen = train_step.Frozen(policy=rest, empty_prompt=empty_prompt_rows(pipe))
  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, num_images, batch)
    b = {"moments_w": moments[idx], **{k: v[which[idx]] for k, v in cond.items()}, **extra}
    state, metrics = step(state, b, frozen)
    ema = _ema_update(ema, state.params, min(EMA_DECAY, (1 + i) / (10 + i)))
    if i % 100 == 0 or i == steps - 1:
      log(f"denoiser step {i}: loss {float(metrics['loss']):.4f}")
  return nnx.merge(graphdef, ema, rest)


def train_unet(pipe, steps: int, batch: int, seed: int = 0, lr: float = 2e-3, num_images: int = 8192,
               log=print) -> UNet2DConditionModel:
  """The SDXL base's UNet: `train_denoiser` from the MICRO layout's random weights."""
  unet = random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), seed)
  return train_denoiser(pipe, unet, steps, batch, seed, lr, num_images, log=log)


@jax.jit
def _ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def judge_samples(pipe, unet=None, *, per_caption: int, steps: int | None = None, guidance: float | None = None,
                  seed: int = 0) -> tuple[dict[str, float], np.ndarray]:
  """Samples every caption `per_caption` times (seeds fixed by `seed`), judges them: (toy_world.score's
  {"caption_accuracy", "filled_rate", "outlined_rate"}, images in caption-major order). `steps` and `guidance`
  default to the pipeline's `sample_settings`; `unet`: the denoiser to sample (default the pipeline's)."""
  default_steps, default_guidance = sample_settings(pipe)
  steps = default_steps if steps is None else steps
  guidance = default_guidance if guidance is None else guidance
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
  placeholder = random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), seed)
  # The sampler's unconditional branch encodes "" (force_zeros off): what empty_prompt_prob trained on.
  write = lambda tmp: write_pipeline(tmp, seed, unet=placeholder, vae=vae, dtype="fp16",
                                     force_zeros_for_empty_prompt=False)
  train = lambda pipe: train_unet(pipe, unet_steps, batch, seed, log=log)
  return _ship(out, write, train, save_unet, metrics, "unet_train_seconds", log)


def _ship(out: Path, write, train, save, metrics: dict, seconds_key: str, log) -> dict:
  """Writes the pipeline (`write(folder)`) under a temporary name, trains its denoiser on what the written fp16 VAE
  and text towers produce (`train(pipe)`, read back from the folder), saves it in fp16 (`save`), measures, renames
  the folder to `out`; returns the metrics."""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  write(tmp)
  family_module = family(tmp)
  pipe = load_toy(tmp, family_module.FROZEN + ("scheduler",))
  start = time.time()
  model = train(pipe)
  metrics[seconds_key] = round(time.time() - start)
  shutil.rmtree(tmp / family_module.DENOISER)
  save(model, tmp / family_module.DENOISER, dtype="fp16")
  measure(tmp, metrics, log=log)
  os.replace(tmp, out)
  return metrics


# --- The FLUX.1 twin -------------------------------------------------------------------------------------------

def t5_tokenizer_files(folder: Path) -> None:
  """The twin's T5 tokenizer (FLUX_T5_VOCAB, Unigram, no sentinels), as transformers' T5TokenizerFast writes it."""
  from transformers import T5TokenizerFast  # only the build needs it: the folder ships with its files
  T5TokenizerFast(vocab=list(FLUX_T5_VOCAB), extra_ids=0, model_max_length=FLUX_T5_TOKENS).save_pretrained(folder)


def flux_text_towers(seed: int) -> tuple[CLIPTextModel, T5EncoderModel]:
  """The twin's frozen random towers: the SDXL base's first CLIP tower (write_pipeline's draw, seed + 2) and T5."""
  clip = random_model(lambda: CLIPTextModel(demo.TEXT_ENCODER, rngs=nnx.Rngs(0)), seed + 2)
  t5 = random_model(lambda: T5EncoderModel({**FLUX_T5, "vocab_size": len(FLUX_T5_VOCAB)}, rngs=nnx.Rngs(0)),
                    seed + 4)
  return clip, t5


def random_flux_transformer(seed: int) -> FluxTransformer2DModel:
  """`random_model`'s weights, with DiT's adaLN-Zero start (Peebles & Xie 2023, arXiv 2212.09748, section 3.2): every
  modulation linear (norm1, norm1_context, the single blocks' norm, norm_out) and the final proj_out are zero, so
  each block starts as the identity and the model's first prediction is 0. The random start trained worse here."""
  model = random_model(lambda: FluxTransformer2DModel(FLUX_TRANSFORMER, rngs=nnx.Rngs(0)), seed + 5)
  graphdef, state = nnx.split(model)

  def zero_start(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    modulation = "linear" in names and any(n in ("norm1", "norm1_context", "norm", "norm_out") for n in names)
    return np.zeros(x.shape, x.dtype) if modulation or names[0] == "proj_out" else x

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(zero_start, state))


def write_flux_pipeline(out: Path, seed: int, *, transformer: FluxTransformer2DModel, vae: AutoencoderKL,
                        dtype: str | None = "fp16") -> None:
  """A FluxPipeline folder (the layout diffusers' FluxPipeline.save_pretrained writes) with our own writers."""
  clip, t5 = flux_text_towers(seed)
  save_flux_transformer(transformer, out / "transformer", dtype=dtype)
  save_vae(vae, out / "vae", dtype=dtype)
  save_text_encoder(clip, out / "text_encoder", dtype=dtype)
  save_t5_encoder(t5, out / "text_encoder_2", dtype=dtype)
  demo.clip_tokenizer_files(out / "tokenizer", pad_token="<|endoftext|>")
  t5_tokenizer_files(out / "tokenizer_2")
  (out / "scheduler").mkdir()
  (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLUX_SCHEDULER, indent=2))
  (out / "model_index.json").write_text(json.dumps({
      "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
      "image_encoder": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
      "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def build_flux(out: Path, *, steps: int, batch: int, seed: int = 0, lr: float = FLUX_LR,
               vae_folder: Path = demo.BASE / "vae", log=print) -> dict:
  """The FLUX twin: the SDXL base's VAE (from `vae_folder`) with FLUX-style normalisation, the towers, the
  transformer trained by `train_denoiser`; written to `out` (which must not exist) in fp16 with metrics.json and
  samples.png; returns the metrics."""
  if out.exists():
    raise FileExistsError(f"--out {out} exists; remove it or choose another folder")
  vae = load_vae(vae_folder)
  shift, scale = latent_shift_scale(vae)
  vae = with_vae_config(vae, shift_factor=shift, scaling_factor=scale)
  metrics = {"family": "flux", "steps": steps, "batch": batch, "lr": lr, "seed": seed, "t5_tokens": FLUX_T5_TOKENS,
             "train_guidance": FLUX_TRAIN_GUIDANCE, "vae_shift_factor": shift, "vae_scaling_factor": scale}
  write = lambda tmp: write_flux_pipeline(tmp, seed, transformer=random_flux_transformer(seed), vae=vae)
  train = lambda pipe: train_denoiser(pipe, random_flux_transformer(seed), steps, batch, seed, lr,
                                      guidance=FLUX_TRAIN_GUIDANCE, log=log)
  return _ship(out, write, train, save_flux_transformer, metrics, "train_seconds", log)


def measure(folder: Path, metrics: dict, log=print) -> None:
  """Judges samples of the pipeline in `folder` (exactly what ships) into `metrics`; writes metrics.json and
  samples.png (the first 10 samples of every caption)."""
  pipe = load_toy(folder)
  steps, guidance = sample_settings(pipe)
  scores, images = judge_samples(pipe, per_caption=20)
  metrics[f"samples_{steps}_steps_guidance_{guidance:g}"] = scores
  log(f"samples at {steps} steps, guidance {guidance}: {scores}")
  first_ten = images.reshape(9, 20, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
  Image.fromarray(make_grid(first_ten, 10)).save(folder / "samples.png")
  (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write (must not exist)")
  parser.add_argument("--family", choices=("sdxl", "flux"), default="sdxl",
                      help="sdxl: the SDXL-architecture base (mapo_jax/toy/base); flux: its FLUX.1 twin "
                           "(mapo_jax/toy/flux_base)")
  parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="sdxl only")
  parser.add_argument("--unet-steps", type=int, default=None,
                      help=f"denoiser steps (default: sdxl {UNET_STEPS}, flux {FLUX_STEPS})")
  parser.add_argument("--batch", type=int, default=None, help=f"default: sdxl {BATCH}, flux {FLUX_BATCH}")
  parser.add_argument("--vae", type=Path, default=demo.BASE / "vae",
                      help="flux only: the VAE folder whose weights the twin shares (the SDXL base's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--measure-only", action="store_true",
                      help="re-judge the samples of the existing --out (after a judge change); trains nothing")
  args = parser.parse_args(argv)
  start = time.time()
  log = lambda message: print(f"[{time.time() - start:7.1f} s] {message}", flush=True)
  if args.measure_only:
    measure(args.out, json.loads((args.out / "metrics.json").read_text()), log=log)
    return
  if args.family == "flux":
    build_flux(args.out, steps=args.unet_steps or FLUX_STEPS, batch=args.batch or FLUX_BATCH, seed=args.seed,
               vae_folder=args.vae, log=log)
    return
  build(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps or UNET_STEPS, batch=args.batch or BATCH,
        seed=args.seed, log=log)


if __name__ == "__main__":
  main()
