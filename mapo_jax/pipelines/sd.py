"""The Stable Diffusion family (SD 1.x, SD 2.x, SDXL): every fact of it that training, sampling, encoding and
export rely on, in one module. `mapo_jax.pipelines.family(path)` picks it from `model_index.json`.

- The denoiser is the UNet in `unet/`; `denoise(model, x, t, cond)` is the one place that calls it.
- Conditioning (`COND_KEYS`): prompt embeddings, the pooled embedding and SDXL's six micro-conditioning
  time ids. A UNet whose config has `addition_embed_type: "text_time"` (SDXL) takes the last two; SD 1.x/2.x
  UNets take only the prompt embeddings.
- Latent space (`Latents`): the VAE config's `scaling_factor`, `shift_factor`, `latents_mean`,
  `latents_std`, applied the same way by training and decoding (docs/sdxl.md).
- Prompt encoding follows diffusers' `StableDiffusionXLPipeline.encode_prompt` / `StableDiffusionPipeline
  .encode_prompt` (no clip_skip, no LoRA scale): each tower's tokenizer pads/truncates to its
  `model_max_length` (77). With a second tower (SDXL) the prompt embeddings are the penultimate hidden
  states of every tower, concatenated (77 x 2048 for SDXL base), and the pooled embedding is tower 2's
  projected `text_embeds`; with one tower (SD 1.x/2.x) they are its last hidden state, and the pooled
  embedding is its `pooler_output` (unused by that UNet; the default RPO embedding).
- Sampling conditioning matches a diffusers `StableDiffusionXLPipeline` call: time ids [H, W, 0, 0, H, W]
  (original size = target size = the output size, crop (0, 0)) for prompt and negative alike; without a
  negative prompt, zeros when the pipeline sets `force_zeros_for_empty_prompt` (SDXL), else the encoded
  empty prompt.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import convert, diffusion, sharding
from mapo_jax.models.clip import CLIPTextModel, load_text_encoder
from mapo_jax.models import presets
from mapo_jax.models.layers import Options
from mapo_jax.models.unet import UNet2DConditionModel, UNetConfig, load_unet, save_unet
from mapo_jax.models.vae import AutoencoderKL, Latents, load_vae
from mapo_jax.pipelines.folders import PipelineFolder, in_folder, load_clip_tokenizer

CLASS_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # model_index.json _class_name
DENOISER = "unet"  # the model_index name of the model that trains
COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "time_ids")
PROMPT_KEYS = COND_KEYS[:2]  # the keys `encode_prompts` gives: what an empty prompt replaces (not time ids)
load_denoiser, save_denoiser = load_unet, save_unet
PRESETS = presets.UNETS  # named UNet configs (aot --architecture)


def resolution_multiple(path: str | os.PathLike) -> int:
  """The image sizes a pipeline trains at must be multiples of this: the VAE's downsampling (8 for SD/SDXL)
  times the UNet's (2 per downsampling block), so every UNet level has whole latent pixels. Reads only
  the two config.json files."""
  vae = convert.read_config(convert.model_folder(path, "vae"))
  vae_factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
  if not (Path(path) / DENOISER / "config.json").is_file():  # an encoder-only folder (VAE and text towers)
    return vae_factor
  unet = convert.read_config(Path(path) / DENOISER)
  return vae_factor * 2 ** (len(unet.get("down_block_types", ())) - 1)


def abstract_denoiser(path_or_config: str | os.PathLike | Mapping[str, Any], *, dtype=jnp.float32,
                      param_dtype=jnp.float32, attention: str | None = None, remat: str = "none",
                      scan: bool = False) -> UNet2DConditionModel:
  """The UNet of a pipeline (or UNet) folder, or of a config.json dict, as shapes only: no weights read,
  nothing allocated. The options are `load_unet`'s (ahead-of-time compiles need the real ones; `scan`
  also decides the parameters' layout: stacked blocks, as a scanned run's checkpoints hold them)."""
  config = (path_or_config if isinstance(path_or_config, Mapping)
            else convert.read_config(convert.model_folder(path_or_config, DENOISER)))
  options = Options(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan)
  return nnx.eval_shape(lambda: UNet2DConditionModel(config, options=options, rngs=nnx.Rngs(0)))


# The SD / SDXL training schedule (scheduler_config.json of SD 1.5 and SDXL base 1.0) and the VAEs' scaling
# factors, for architectures given without a pipeline folder (presets).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon")
SDXL_SCALING_FACTOR, SD_SCALING_FACTOR = 0.13025, 0.18215
TEXT_TOKENS = 77  # CLIP's model_max_length
VAE_DOWNSAMPLE = 8  # the SD / SDXL VAEs: presets (no VAE config) assume it


def preset_latents(denoiser_config: Mapping[str, Any]) -> Latents:
  """The latent normalisation of the VAE that goes with a UNet config: SDXL's VAE for text_time UNets."""
  sdxl = denoiser_config.get("addition_embed_type") == "text_time"
  return Latents(scale=SDXL_SCALING_FACTOR if sdxl else SD_SCALING_FACTOR)


def abstract_batch(denoiser_config: Mapping[str, Any], resolution: int, pairs: int, mesh,
                   rpo_embedding: str = "pooled", vae_downsample: int = VAE_DOWNSAMPLE
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch of `pairs` as ShapeDtypeStructs sharded over the batch axes: the keys, shapes and
  dtypes (float32: the loader's default cast, data/loader.py) that data/cache.py batches have.

  The pooled embedding is SDXL's projected text embedding (projection_class_embeddings_input_dim minus the
  six time ids' embeddings) or, for one-tower UNets, the text encoder's pooler output (its width is the
  UNet's cross_attention_dim). rpo_emb is the pooled embedding or the prompt embeddings' mean.
  `vae_downsample`: the pipeline's VAE factor, 2 ** (len(vae block_out_channels) - 1); 8 for SD and SDXL."""
  cfg = UNetConfig.from_dict(denoiser_config)
  width = cfg.cross_attention_dim[0]
  if cfg.addition_embed_type == "text_time":
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
  else:
    pooled = width
  side = resolution // vae_downsample
  moments = (pairs, side, side, 2 * cfg.in_channels)
  shapes = {"moments_w": moments, "moments_l": moments, "prompt_embeds": (pairs, TEXT_TOKENS, width),
            "pooled_prompt_embeds": (pairs, pooled), "time_ids": (pairs, 6),
            "rpo_emb": (pairs, pooled if rpo_embedding == "pooled" else width)}
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding) for k, shape in shapes.items()}

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# What prompt encoding and decoding need (training's on-the-fly encoding, sample grids, encode).
FROZEN = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def denoise(model: UNet2DConditionModel, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
  """The UNet's prediction for noisy latents x (B, h, w, C) at timesteps t (B,) under `cond` (COND_KEYS)."""
  if model.cfg.addition_embed_type == "text_time":
    return model(x, t, cond["prompt_embeds"], text_embeds=cond["pooled_prompt_embeds"], time_ids=cond["time_ids"])
  return model(x, t, cond["prompt_embeds"])


def time_ids(height: int, width: int, batch: int) -> np.ndarray:
  """(batch, 6) float32 [orig_H, orig_W, crop_top, crop_left, target_H, target_W] = [H, W, 0, 0, H, W]."""
  return np.tile(np.array([height, width, 0, 0, height, width], np.float32), (batch, 1))

_TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclasses.dataclass(eq=False)
class Pipeline(PipelineFolder):
  """The components asked for; one not asked for, or absent from the folder (SD 1.x has no *_2), is None."""
  path: Path
  model_index: dict[str, Any]
  unet: UNet2DConditionModel | None = None
  vae: AutoencoderKL | None = None
  text_encoder: CLIPTextModel | None = None
  text_encoder_2: CLIPTextModel | None = None
  tokenizer: Any = None  # transformers CLIPTokenizer
  tokenizer_2: Any = None
  scheduler_config: dict[str, Any] | None = None
  vae_path: Path | None = None  # a VAE folder used instead of `path/vae` (load_pipeline's `vae`)

  @functools.cached_property
  def schedule(self) -> diffusion.NoiseSchedule:
    """The training noise schedule, from scheduler/scheduler_config.json."""
    return diffusion.NoiseSchedule.from_config(self._scheduler_config)

  denoise = staticmethod(denoise)

  @property
  def denoiser(self) -> UNet2DConditionModel | None:
    """The model that trains (DENOISER), if loaded."""
    return self.unet

  def sample_options(self, steps: int) -> tuple:
    """Extra static arguments of `diffusion.sample` for this family: none (the scheduler config says all)."""
    del steps
    return ()

  def encode_prompts(self, captions: Sequence[str]) -> dict[str, jax.Array]:
    return encode_prompts(self, captions)

  @property
  def default_guidance(self) -> float:
    """diffusers' default guidance_scale: 5.0 for StableDiffusionXLPipeline, 7.5 for StableDiffusionPipeline."""
    return 5.0 if "text_encoder_2" in self.towers else 7.5

  def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                   height: int, width: int, guidance: float | None = None, true_cfg: float = 1.0):
    """(cond, uncond, cfg_scale) for sampling: classifier-free guidance at weight `guidance` (None: diffusers'
    default, `default_guidance`; uncond None when guidance <= 1, as diffusers skips it). `true_cfg` is FLUX's;
    SD pipelines have no second weight."""
    if true_cfg != 1.0:
      raise ValueError(f"true_cfg={true_cfg}: an SD / SDXL pipeline guides with --guidance alone")
    guidance = self.default_guidance if guidance is None else guidance
    cond, uncond = conditioning(self, prompts, negative_prompts, height=height, width=width, guidance=guidance)
    return cond, uncond, guidance

  @functools.cached_property
  def denoiser_config(self) -> dict[str, Any]:
    return self.unet.config if self.unet is not None else convert.read_config(self.path / DENOISER)

  @property
  def towers(self) -> tuple[str, ...]:
    """The text encoders this pipeline conditions on, per its model_index.json."""
    return tuple(name for name in _TOKENIZER if in_folder(self.model_index, name))

  @functools.cached_property
  def prompt_encoder(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]]:
    """`tokenize`'s ids → prompt embeddings, jitted; the frozen towers are split once, here."""
    names = self.towers
    missing = [name for name in names if getattr(self, name) is None]
    if missing:
      raise ValueError(f"prompt encoding needs {missing}, which load_pipeline did not load")
    graphdef, state = nnx.split(tuple(getattr(self, name) for name in names))
    sdxl = "text_encoder_2" in names

    def encode(state, ids):
      towers = nnx.merge(graphdef, state)
      outs = [tower(ids[name]) for tower, name in zip(towers, names)]
      if sdxl:
        return {"prompt_embeds": jnp.concatenate([o["hidden_states"][-2] for o in outs], axis=-1),
                "pooled_prompt_embeds": outs[-1]["text_embeds"]}
      return {"prompt_embeds": outs[0]["last_hidden_state"], "pooled_prompt_embeds": outs[0]["pooler_output"]}

    return functools.partial(jax.jit(encode), state)


def load_pipeline(path: str | os.PathLike, components: Iterable[str] = COMPONENTS, *,
                  unet_kwargs: Mapping[str, Any] | None = None, vae_kwargs: Mapping[str, Any] | None = None,
                  text_encoder_kwargs: Mapping[str, Any] | None = None, vae: str | os.PathLike | None = None
                  ) -> Pipeline:
  """Loads the named components of a diffusers pipeline folder.

  `vae`: a VAE folder (or a pipeline folder's vae/) loaded instead of the pipeline's, e.g. the fp16-safe
  madebyollin/sdxl-vae-fp16-fix; `latents` then follows its config.
  `components` are model_index.json names ("scheduler" reads scheduler/scheduler_config.json into
  `scheduler_config`). The kwargs go to `load_unet`, `load_vae` and `load_text_encoder` (both towers),
  e.g. `unet_kwargs=dict(dtype=jnp.bfloat16, remat="full")`.
  """
  path = Path(path)
  components = tuple(components)
  unknown = sorted(set(components) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"unknown pipeline component(s) {unknown}; known: {COMPONENTS}")
  model_index = json.loads((path / "model_index.json").read_text())
  text_encoder = lambda folder: load_text_encoder(folder, **(text_encoder_kwargs or {}))
  loaders = {
      "unet": lambda folder: load_unet(folder, **(unet_kwargs or {})),
      "vae": lambda folder: load_vae(folder, **(vae_kwargs or {})),
      "text_encoder": text_encoder,
      "text_encoder_2": text_encoder,
      "tokenizer": load_clip_tokenizer,
      "tokenizer_2": load_clip_tokenizer,
      "scheduler": lambda folder: json.loads((folder / "scheduler_config.json").read_text()),
  }
  vae_path = Path(vae) if vae else None
  folder = lambda name: vae_path if name == "vae" and vae_path is not None else path / name
  loaded = {("scheduler_config" if name == "scheduler" else name): loaders[name](folder(name))
            for name in components if in_folder(model_index, name)}
  return Pipeline(path=path, model_index=model_index, vae_path=vae_path, **loaded)


def tokenize(pipeline: Pipeline, captions: Sequence[str]) -> dict[str, np.ndarray]:
  """Token ids (B, model_max_length) int32 per tower name, padded and truncated as diffusers does."""
  ids = {}
  for name in pipeline.towers:
    tokenizer = getattr(pipeline, _TOKENIZER[name])
    if tokenizer is None:
      raise ValueError(f"tokenizing needs {_TOKENIZER[name]!r}, which load_pipeline did not load")
    tokens = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="np")
    ids[name] = tokens["input_ids"].astype(np.int32)
  return ids


def encode_prompts(pipeline: Pipeline, captions: Sequence[str]) -> dict[str, jax.Array]:
  """{"prompt_embeds": (B, 77, D), "pooled_prompt_embeds": (B, P)} for the train step and the sampler.

  The same as `pipeline.prompt_encoder(tokenize(pipeline, captions))`, for callers that tokenize apart.
  """
  return pipeline.prompt_encoder(tokenize(pipeline, captions))


def conditioning(pipeline: Pipeline, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 height: int, width: int, guidance: float) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
  """(cond, uncond) for sampling at height x width; uncond is None when guidance <= 1 (diffusers skips CFG)."""
  if negative_prompts is not None and len(negative_prompts) != len(prompts):
    raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
  ids = {"time_ids": jnp.asarray(time_ids(height, width, len(prompts)))}
  cond = {**encode_prompts(pipeline, prompts), **ids}
  if guidance <= 1:
    return cond, None
  negative = (encode_uncond(pipeline, len(prompts)) if negative_prompts is None
              else encode_prompts(pipeline, negative_prompts))
  return cond, {**negative, **ids}


def encode_uncond(pipeline: Pipeline, batch_size: int) -> dict[str, jax.Array]:
  """The unconditional (negative) embeddings for classifier-free guidance, as `encode_prompts` lays them out.

  SDXL pipelines whose model_index sets `force_zeros_for_empty_prompt` (diffusers' default: true) use
  zeros; others encode the empty prompt. An explicit negative prompt is just `encode_prompts(negatives)`.
  """
  out = encode_prompts(pipeline, [""] * batch_size)
  if "text_encoder_2" in pipeline.towers and pipeline.model_index.get("force_zeros_for_empty_prompt", True):
    out = {k: jnp.zeros_like(v) for k, v in out.items()}
  return out
