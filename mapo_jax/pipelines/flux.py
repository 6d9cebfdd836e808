"""The FLUX.1 family (black-forest-labs FLUX.1-dev, FLUX.1-schnell and fine-tunes of them): every fact of it that
training, sampling, encoding and export rely on, in one module. `mapo_jax.pipelines.family(path)` picks it from
`model_index.json` (`_class_name: FluxPipeline`). docs/flux.md explains the facts in prose.

Facts, read from diffusers 0.42 `pipelines/flux/pipeline_flux.py` (FluxPipeline) unless said otherwise:
- Components: `transformer` (FluxTransformer2DModel, mapo_jax/models/flux.py), `vae` (AutoencoderKL, 16 latent
  channels, no quant convs), `text_encoder` (CLIPTextModel, CLIP ViT-L/14), `text_encoder_2` (T5EncoderModel,
  T5 v1.1 XXL), `tokenizer` (CLIPTokenizer), `tokenizer_2` (T5TokenizerFast), `scheduler`
  (FlowMatchEulerDiscreteScheduler).
- Prompt encoding (`encode_prompt`, `_get_clip_prompt_embeds`, `_get_t5_prompt_embeds`): the CLIP tower's
  `pooler_output` on ids padded / truncated to its `model_max_length` (77) is `pooled_prompt_embeds`; the T5
  tower's last hidden state on ids padded / truncated to `max_sequence_length` (a call argument, default 512, at
  most 512) is `prompt_embeds`; no attention mask for either; text position ids are zeros (L, 3).
  `max_sequence_length` is a Pipeline attribute here (default 512, as diffusers). BFL's reference CLI
  (github.com/black-forest-labs/flux, src/flux/cli.py) encodes at 256 tokens for schnell and 512 for dev:
  pass `max_sequence_length=256` to `load_pipeline` to do the same.
- Latents: the VAE's NCHW latents, 2x2 patches packed into tokens (`_pack_latents`: token (i, j) holds channels
  c * 4 + 2 * di + dj of pixel (2i + di, 2j + dj)), with image position ids (0, i, j) (`_prepare_latent_image_ids`).
  `num_channels_latents = transformer.config.in_channels // 4`. Images must be multiples of 16 pixels
  (VAE factor 8 times the 2x2 packing); diffusers warns and floors other sizes, we refuse them.
- Denoising: the transformer gets `timestep = t / 1000` where t = sigma * 1000 (the scheduler's timesteps), and
  with `guidance_embeds` the guidance scale itself (diffusers' `guidance_scale`, default 3.5) for every image;
  it multiplies both by 1000 inside. No classifier-free branch for guidance-distilled models.
  True CFG: with `true_cfg_scale > 1` and a negative prompt, a second call on the negative prompt's encoding
  (same guidance) and neg + true_cfg_scale (cond - neg); otherwise the negative prompt is ignored.
- Sigmas: `np.linspace(1, 1/n, n)` (`diffusion.linear_sigmas`) unless the scheduler config sets
  `use_flow_sigmas`; mu = calculate_shift(packed token count, the scheduler config's base/max values), which
  FlowMatchEulerDiscreteScheduler.set_timesteps uses only with `use_dynamic_shifting` (dev: true, schnell: false
  with shift 1). `diffusion.sample` computes both from the NHWC latents with patch size 2.
- Decoding: latents / scaling_factor + shift_factor through the VAE (`Latents` of pipelines/sd.py, which
  reads both from the VAE config).
- Training (no FluxPipeline code): `denoise` packs the NHWC latents itself, so the train step and the cache see
  VAE-shaped latents (N, H/8, W/8, 16). A guidance-distilled transformer trains at guidance TRAIN_GUIDANCE =
  3.5 unless the batch carries "guidance": diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
  (`--guidance_scale`, default 3.5, passed when `transformer.config.guidance_embeds`).
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
from mapo_jax.models import presets
from mapo_jax.models.clip import CLIPTextModel, load_text_encoder
from mapo_jax.models.layers import Options
from mapo_jax.models.flux import (FluxConfig, FluxTransformer2DModel, abstract_flux_transformer, latent_image_ids,
                                  load_flux_transformer, save_flux_transformer)
from mapo_jax.models.t5 import T5EncoderModel, load_t5_encoder
from mapo_jax.models.t5 import tokenize as t5_tokenize
from mapo_jax.models.vae import AutoencoderKL, load_vae
# The latent normalisation is the same formula for every family ((z - shift - mean) * scale / std); it lives in
# sd.py, the first family, and is shared from there.
from mapo_jax.models.vae import Latents
from mapo_jax.pipelines.folders import PipelineFolder, in_folder

CLASS_NAMES = ("FluxPipeline",)  # model_index.json _class_name
DENOISER = "transformer"  # the model_index name of the model that trains
COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")  # a training batch's keys that `denoise` reads
PROMPT_KEYS = COND_KEYS  # what `encode_prompts` gives (empty-prompt dropout swaps them)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# What prompt encoding and decoding need (training's on-the-fly encoding, sample grids, encode).
FROZEN = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
PRESETS = presets.FLUX_TRANSFORMERS  # named transformer configs (aot --architecture)

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s max_sequence_length default, and its upper bound
GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale default: the guidance embedding's value at sampling
TRAIN_GUIDANCE = 3.5  # train_dreambooth_lora_flux.py --guidance_scale default: the value training feeds
PATCH = 2  # FluxPipeline packs 2x2 latent patches into one token
TIME_SCALE = 1000.0  # the pipeline passes timestep / 1000 (t = sigma * num_train_timesteps)
VAE_DOWNSAMPLE = 8  # FLUX.1's VAE (4 blocks): presets (no VAE config) assume it

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (FLUX.1-schnell's: shift 1.0, use_dynamic_shifting
# false; it trains the same: dynamic shifting leaves the training sigmas unshifted, as shift 1 does).
SCHEDULER_CONFIG = dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256, base_shift=0.5,
                        max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                        use_dynamic_shifting=True)
SCHNELL_SCHEDULER_CONFIG = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                                use_dynamic_shifting=False)
# black-forest-labs/FLUX.1-dev (and -schnell) vae/config.json's latent normalisation, for presets.
SCALING_FACTOR, SHIFT_FACTOR = 0.3611, 0.1159


# --- The denoiser ---------------------------------------------------------------------------------------------------

def check_denoiser_config(config: Mapping[str, Any]) -> FluxConfig:
  """The transformer config validated (models/flux.py) and checked for what FluxPipeline itself needs: it packs
  2x2 latent patches into `in_channels` = 4 x latent channels and unpacks `out_channels` the same way, so the
  transformer must take and give one token per packed patch (patch_size 1, out_channels = in_channels)."""
  cfg = config if isinstance(config, FluxConfig) else FluxConfig.from_dict(config)
  if cfg.patch_size != 1:
    raise ValueError(f"FLUX transformer config: patch_size={cfg.patch_size}: FluxPipeline packs 2x2 latent "
                     "patches itself and needs patch_size 1")
  if cfg.in_channels % (PATCH * PATCH):
    raise ValueError(f"FLUX transformer config: in_channels={cfg.in_channels} must be 4 x the latent channels "
                     "(2x2 packed patches)")
  if cfg.out_channels != cfg.in_channels:
    raise ValueError(f"FLUX transformer config: out_channels={cfg.out_channels} must equal in_channels="
                     f"{cfg.in_channels} (FluxPipeline unpacks the prediction like the latents)")
  return cfg


def latent_channels_of(denoiser_config: Mapping[str, Any]) -> int:
  """The VAE latent channels a transformer config packs: in_channels // 4 (FluxPipeline's num_channels_latents)."""
  return check_denoiser_config(denoiser_config).in_channels // (PATCH * PATCH)


def load_denoiser(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32, attention: str | None = None,
                  remat: str = "none", scan: bool = False, variant: str | None = None,
                  mesh=None) -> FluxTransformer2DModel:
  """The transformer of a FluxPipeline folder (or a transformer folder): safetensors, sharded or not, fp16 / bf16
  `variant`s; with `mesh`, each parameter is born sharded by the logical-axis rules. With `scan`, the double- and
  single-stream block stacks are scanned (models/flux.py); the files keep diffusers' per-block keys."""
  check_denoiser_config(convert.read_config(convert.model_folder(path, DENOISER)))
  return load_flux_transformer(path, dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan,
                               variant=variant, mesh=mesh)


def save_denoiser(model: FluxTransformer2DModel, out_dir: str | os.PathLike, *, dtype: str | None = None) -> Path:
  """Writes a folder that `FluxTransformer2DModel.from_pretrained` loads (weights cast to `dtype` if given)."""
  return save_flux_transformer(model, out_dir, dtype=dtype)


def abstract_denoiser(path_or_config: str | os.PathLike | Mapping[str, Any], *, dtype=jnp.float32,
                      param_dtype=jnp.float32, attention: str | None = None, remat: str = "none",
                      scan: bool = False) -> FluxTransformer2DModel:
  """The transformer of a pipeline (or transformer) folder, or of a config.json dict, as shapes only. `scan`, as in
  load_denoiser, also decides the parameters' layout (stacked blocks, as a scanned run's checkpoints hold them)."""
  config = (path_or_config if isinstance(path_or_config, Mapping)
            else convert.read_config(convert.model_folder(path_or_config, DENOISER)))
  check_denoiser_config(config)
  return abstract_flux_transformer(config, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat,
                                   scan=scan)


def pack(x: jax.Array) -> jax.Array:
  """NHWC latents (B, h, w, C) -> tokens (B, (h/2)(w/2), 4C) as FluxPipeline._pack_latents lays them out: row-major
  2x2 patches, each token's channels ordered (c, di, dj)."""
  b, h, w, c = x.shape
  if h % PATCH or w % PATCH:
    raise ValueError(f"FLUX latents must have even height and width (images a multiple of 16 px), got {h}x{w}")
  x = x.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """The inverse of `pack`: tokens (B, (h/2)(w/2), 4C) -> NHWC (B, h, w, C) (FluxPipeline._unpack_latents)."""
  b, _, d = tokens.shape
  c = d // (PATCH * PATCH)
  x = tokens.reshape(b, h // PATCH, w // PATCH, c, PATCH, PATCH)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)


def denoise(model: FluxTransformer2DModel, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
  """The transformer's velocity for NHWC latents x (B, h, w, C) at model times t (B,) = sigma * 1000, under `cond`:
  prompt_embeds (B, L, joint_attention_dim), pooled_prompt_embeds (B, pooled_projection_dim) and, for a
  guidance-distilled model, an optional "guidance" (B,) (default TRAIN_GUIDANCE). Other keys (time_ids, ...) are
  ignored. Packing, position ids and the time scaling happen here, as in FluxPipeline's loop."""
  _, h, w, _ = x.shape
  text = cond["prompt_embeds"]
  img_ids = jnp.asarray(latent_image_ids(h // PATCH, w // PATCH))
  txt_ids = jnp.zeros((text.shape[1], 3), jnp.float32)
  guidance = None
  if model.cfg.guidance_embeds:
    guidance = cond.get("guidance")
    guidance = jnp.full(x.shape[:1], TRAIN_GUIDANCE, jnp.float32) if guidance is None else guidance
  timestep = jnp.asarray(t, jnp.float32) / TIME_SCALE
  out = model(pack(x), text, cond["pooled_prompt_embeds"], timestep, img_ids, txt_ids, guidance)
  return unpack(out, h, w)


# --- Latent space, schedule, presets (aot and config checks) ------------------------------------------------------

def resolution_multiple(path: str | os.PathLike) -> int:
  """Image sizes must be multiples of this: the VAE's downsampling (8) times the 2x2 packing. Reads the VAE
  config only."""
  vae = convert.read_config(convert.model_folder(path, "vae"))
  return 2 ** (len(vae.get("block_out_channels", (64,))) - 1) * PATCH


def preset_latents(denoiser_config: Mapping[str, Any]) -> Latents:
  """FLUX.1's VAE latent normalisation (the same for dev and schnell)."""
  del denoiser_config
  return Latents(scale=SCALING_FACTOR, shift=SHIFT_FACTOR)


def abstract_batch(denoiser_config: Mapping[str, Any], resolution: int, pairs: int, mesh,
                   rpo_embedding: str = "pooled", vae_downsample: int = VAE_DOWNSAMPLE,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch of `pairs` as ShapeDtypeStructs sharded over the batch axes, with the keys, shapes and
  dtypes (float32, the loader's cast) of data/cache.py batches: VAE moments [mean, logvar] of 2 x latent
  channels (32 for FLUX.1), T5 prompt embeddings (max_sequence_length, joint_attention_dim), the CLIP pooled embedding
  (pooled_projection_dim), the six time ids every cache holds (unused by FLUX) and rpo_emb (the pooled embedding,
  or the prompt embeddings' mean)."""
  cfg = check_denoiser_config(denoiser_config)
  side = resolution // vae_downsample
  moments = (pairs, side, side, 2 * cfg.in_channels // (PATCH * PATCH))
  shapes = {"moments_w": moments, "moments_l": moments,
            "prompt_embeds": (pairs, max_sequence_length, cfg.joint_attention_dim),
            "pooled_prompt_embeds": (pairs, cfg.pooled_projection_dim), "time_ids": (pairs, 6),
            "rpo_emb": (pairs, cfg.pooled_projection_dim if rpo_embedding == "pooled" else cfg.joint_attention_dim)}
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding) for k, shape in shapes.items()}


# --- The pipeline ----------------------------------------------------------------------------------------------------

_TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclasses.dataclass(eq=False)
class Pipeline(PipelineFolder):
  """The components asked for (None when not asked for). `max_sequence_length`: the T5 token count prompts are
  encoded at (diffusers' call argument; 512 by default, 256 is BFL's choice for schnell)."""
  path: Path
  model_index: dict[str, Any]
  transformer: FluxTransformer2DModel | None = None
  vae: AutoencoderKL | None = None
  text_encoder: CLIPTextModel | None = None
  text_encoder_2: T5EncoderModel | None = None
  tokenizer: Any = None  # transformers CLIPTokenizer
  tokenizer_2: Any = None  # transformers T5TokenizerFast
  scheduler_config: dict[str, Any] | None = None
  vae_path: Path | None = None  # a VAE folder used instead of `path/vae` (load_pipeline's `vae`)
  max_sequence_length: int = MAX_SEQUENCE_LENGTH

  def __post_init__(self):
    _check_sequence_length(self.max_sequence_length)

  denoise = staticmethod(denoise)

  @property
  def denoiser(self) -> FluxTransformer2DModel | None:
    """The model that trains (DENOISER), if loaded."""
    return self.transformer

  @functools.cached_property
  def denoiser_config(self) -> dict[str, Any]:
    return self.transformer.config if self.transformer is not None else convert.read_config(self.path / DENOISER)

  @functools.cached_property
  def schedule(self) -> diffusion.FlowMatchSchedule:
    """The training schedule, from scheduler/scheduler_config.json."""
    schedule = diffusion.as_schedule(self._scheduler_config)
    if not schedule.is_flow:
      raise ValueError(f"{self.path}: a FluxPipeline needs a flow-matching scheduler config")
    return schedule

  def sample_options(self, steps: int) -> tuple:
    """FluxPipeline's sigmas linspace(1, 1/n, n) (none with the scheduler config's use_flow_sigmas) and the 2x2
    packing from which `diffusion.sample` counts the image tokens that set the dynamic shift mu."""
    config = self.scheduler_config or {}
    sigmas = None if config.get("use_flow_sigmas") else tuple(float(s) for s in diffusion.linear_sigmas(steps))
    return (("sigmas", sigmas), ("patch_size", PATCH))

  def encode_prompts(self, captions: Sequence[str]) -> dict[str, jax.Array]:
    return encode_prompts(self, captions)

  def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                   height: int, width: int, guidance: float | None = None, true_cfg: float = 1.0):
    """(cond, uncond, cfg_scale) for sampling at height x width, as a FluxPipeline call with guidance_scale=
    `guidance` (None: GUIDANCE), true_cfg_scale=`true_cfg` and negative_prompt=`negative_prompts`.

    A guidance-distilled transformer gets `guidance` through cond["guidance"] and no classifier-free branch;
    true CFG (true_cfg > 1 with negative prompts) adds the negatives' encoding as uncond at weight true_cfg.
    What FluxPipeline would ignore fails, naming the flag: a negative prompt without true_cfg > 1, true_cfg
    without a negative prompt, a guidance > 1 for a transformer without a guidance embedding (schnell), and
    sizes that are not multiples of 16."""
    multiple = self.vae_scale_factor * PATCH
    if height % multiple or width % multiple:
      raise ValueError(f"--height/--width {height}x{width}: a FLUX image's sides must be multiples of {multiple} "
                       "(the VAE's 8 times the 2x2 packing)")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
      raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    true_guidance = true_cfg > 1 and negative_prompts is not None
    if negative_prompts is not None and not true_guidance:
      raise ValueError(f"--negative-prompt: FLUX uses negative prompts only for true CFG, with --true-cfg > 1 "
                       f"(got {true_cfg}); FluxPipeline would ignore them")
    if true_cfg != 1.0 and not true_guidance:
      raise ValueError(f"--true-cfg {true_cfg}: true CFG needs --negative-prompt (and a weight > 1); "
                       "FluxPipeline would ignore it")
    cond = dict(encode_prompts(self, prompts))
    extra = {}
    if self.denoiser_config.get("guidance_embeds", False):
      value = GUIDANCE if guidance is None else float(guidance)
      extra["guidance"] = jnp.full((len(prompts),), value, jnp.float32)
    elif guidance is not None and guidance > 1:
      raise ValueError(f"--guidance {guidance}: this FLUX transformer (guidance_embeds false, e.g. schnell) has no "
                       "guidance input and FluxPipeline ignores guidance_scale; pass --guidance 0")
    cond.update(extra)
    if not true_guidance:
      return cond, None, 1.0
    return cond, {**encode_prompts(self, negative_prompts), **extra}, float(true_cfg)

  @functools.cached_property
  def prompt_encoder(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]]:
    """`tokenize`'s ids -> {"prompt_embeds", "pooled_prompt_embeds"}, jitted; the frozen towers are split once."""
    missing = [name for name in _TOKENIZER if getattr(self, name) is None]
    if missing:
      raise ValueError(f"prompt encoding needs {missing}, which load_pipeline did not load")
    graphdef, state = nnx.split((self.text_encoder, self.text_encoder_2))
    return functools.partial(_encode, graphdef, state)

  def tokenize(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """`tokenize(self, captions)`: token ids per tower name."""
    return tokenize(self, captions)

  def step_text(self) -> tuple[tuple[CLIPTextModel, T5EncoderModel], Callable]:
    """(towers, encode): the loaded text towers (CLIP, T5) and `encode_ids`, for a train step that encodes a
    cache's token ids itself (TEXT_IN_STEP; docs/data.md, "Text conditioning at scale")."""
    missing = [name for name in _TOKENIZER if getattr(self, name) is None]
    if missing:
      raise ValueError(f"the train step's prompt encoding needs {missing}, which load_pipeline did not load")
    return (self.text_encoder, self.text_encoder_2), encode_ids


def encode_ids(towers: tuple[CLIPTextModel, T5EncoderModel], ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`tokenize`'s ids through (CLIP, T5) -> {"prompt_embeds", "pooled_prompt_embeds"}: FluxPipeline.encode_prompt as
  a pure function of the towers, which `encode_prompts` jits and the train step runs on a cache's token ids."""
  clip, t5 = towers
  return {"prompt_embeds": t5(ids["text_encoder_2"])["last_hidden_state"],
          "pooled_prompt_embeds": clip(ids["text_encoder"])["pooler_output"]}


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, ids):
  # One jit for every pipeline with the same towers (the graphdef is the key): reloading a folder recompiles nothing.
  return encode_ids(nnx.merge(graphdef, state), ids)


def _check_sequence_length(n: int) -> None:
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEQUENCE_LENGTH:
    raise ValueError(f"max_sequence_length={n!r}: FluxPipeline takes 1..{MAX_SEQUENCE_LENGTH} T5 tokens")


def _load_clip_tokenizer(folder: Path):
  from transformers import CLIPTokenizer  # imported here: only tokenization needs transformers
  return CLIPTokenizer.from_pretrained(folder)


def _load_t5_tokenizer(folder: Path):
  from transformers import T5TokenizerFast
  return T5TokenizerFast.from_pretrained(folder)


def load_pipeline(path: str | os.PathLike, components: Iterable[str] = COMPONENTS, *,
                  transformer_kwargs: Mapping[str, Any] | None = None, vae_kwargs: Mapping[str, Any] | None = None,
                  text_encoder_kwargs: Mapping[str, Any] | None = None,
                  text_encoder_2_kwargs: Mapping[str, Any] | None = None, vae: str | os.PathLike | None = None,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Pipeline:
  """Loads the named components of a FluxPipeline folder.

  `components` are model_index.json names ("scheduler" reads scheduler/scheduler_config.json into
  `scheduler_config`). The kwargs go to `load_denoiser`, `load_vae`, `load_text_encoder` (CLIP) and
  `load_t5_encoder` (e.g. `text_encoder_2_kwargs=dict(dtype=jnp.bfloat16)` for T5-XXL). `vae`: a VAE folder
  used instead of the pipeline's (`latents` then follows its config). `max_sequence_length`: the T5 token count
  of prompt encoding (FluxPipeline's call argument; 512, or 256 as BFL encodes for schnell)."""
  path = Path(path)
  components = tuple(components)
  unknown = sorted(set(components) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"unknown pipeline component(s) {unknown}; known: {COMPONENTS}")
  _check_sequence_length(max_sequence_length)
  model_index = json.loads((path / "model_index.json").read_text())
  loaders = {
      "transformer": lambda folder: load_denoiser(folder, **(transformer_kwargs or {})),
      "vae": lambda folder: load_vae(folder, **(vae_kwargs or {})),
      "text_encoder": lambda folder: load_text_encoder(folder, **(text_encoder_kwargs or {})),
      "text_encoder_2": lambda folder: load_t5_encoder(folder, **(text_encoder_2_kwargs or {})),
      "tokenizer": _load_clip_tokenizer,
      "tokenizer_2": _load_t5_tokenizer,
      "scheduler": lambda folder: json.loads((folder / "scheduler_config.json").read_text()),
  }
  vae_path = Path(vae) if vae else None
  folder = lambda name: vae_path if name == "vae" and vae_path is not None else path / name
  loaded = {("scheduler_config" if name == "scheduler" else name): loaders[name](folder(name))
            for name in components if in_folder(model_index, name) or (name == "vae" and vae_path is not None)}
  pipe = Pipeline(path=path, model_index=model_index, vae_path=vae_path, max_sequence_length=max_sequence_length,
                  **loaded)
  if pipe.transformer is not None and (pipe.vae is not None or vae_path is not None):
    packed = latent_channels_of(pipe.denoiser_config)
    if packed != pipe.latent_channels:
      raise ValueError(f"{path}: the transformer packs {packed} latent channels (in_channels / 4) but the VAE has "
                       f"latent_channels={pipe.latent_channels}")
  return pipe


def tokenize(pipeline: Pipeline, captions: Sequence[str]) -> dict[str, np.ndarray]:
  """Token ids per tower name, as FluxPipeline makes them: CLIP (B, model_max_length = 77) and T5
  (B, max_sequence_length), both padded to length and truncated, int32."""
  for name, tokenizer in _TOKENIZER.items():
    if getattr(pipeline, tokenizer) is None:
      raise ValueError(f"tokenizing needs {tokenizer!r}, which load_pipeline did not load")
  clip = pipeline.tokenizer(list(captions), padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                            truncation=True, return_tensors="np")["input_ids"]
  return {"text_encoder": np.asarray(clip, np.int32),
          "text_encoder_2": t5_tokenize(pipeline.tokenizer_2, captions, pipeline.max_sequence_length)}


# --- Text conditioning in the train step (docs/data.md, "Text conditioning at scale") -----------------------------
# A FLUX cache stores each pair's token ids (a few KiB) and the train step runs the frozen towers on them, instead of
# storing T5's 512 x 4096 states per pair (4 MiB in fp16). `python -m mapo_jax.encode --text auto` follows this.
TEXT_IN_STEP = True
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# black-forest-labs/FLUX.1-dev text_encoder/config.json (CLIP ViT-L/14's text tower, 123 M parameters) and
# text_encoder_2/config.json (T5 v1.1 XXL's encoder, 4.76 B), the keys that shape them: aot's towers for the presets.
CLIP_L_CONFIG = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408,
                     hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5_XXL_CONFIG = dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096, d_kv=64,
                     d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
CLIP_TOKENS = 77  # CLIPTokenizer's model_max_length in FLUX.1's tokenizer/


def load_step_text(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Pipeline:
  """The tokenizers and text towers of a FluxPipeline folder, for `Pipeline.step_text`; with `mesh`, T5 (nearly all
  of the text weights) is born sharded by the logical-axis rules (CLIP is placed by the caller)."""
  kwargs = dict(dtype=dtype, param_dtype=param_dtype)
  return load_pipeline(path, TEXT_COMPONENTS, text_encoder_kwargs=kwargs, text_encoder_2_kwargs=dict(kwargs, mesh=mesh),
                       max_sequence_length=max_sequence_length)


def abstract_step_text(path: str | os.PathLike | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32,
                       max_sequence_length: int = MAX_SEQUENCE_LENGTH):
  """(towers, encode, tokens) as `step_text` gives them, shapes only (aot): the towers of a pipeline folder's
  text_encoder*/config.json, or of FLUX.1's published configs (path None); tokens: each tower's id count."""
  configs = ((CLIP_L_CONFIG, T5_XXL_CONFIG) if path is None else
             tuple(convert.read_config(Path(path) / name) for name in _TOKENIZER))
  options = Options(dtype=dtype, param_dtype=param_dtype)
  towers = nnx.eval_shape(lambda: (CLIPTextModel(configs[0], options=options, rngs=nnx.Rngs(0)),
                                   T5EncoderModel(configs[1], options=options, rngs=nnx.Rngs(0))))
  return towers, encode_ids, {"text_encoder": CLIP_TOKENS, "text_encoder_2": max_sequence_length}


def encode_prompts(pipeline: Pipeline, captions: Sequence[str]) -> dict[str, jax.Array]:
  """{"prompt_embeds": (B, max_sequence_length, T5 width), "pooled_prompt_embeds": (B, CLIP width)}: the T5 last
  hidden state and the CLIP pooled output (FluxPipeline.encode_prompt)."""
  return pipeline.prompt_encoder(tokenize(pipeline, captions))
