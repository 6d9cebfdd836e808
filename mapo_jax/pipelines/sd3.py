"""The Stable Diffusion 3 / 3.5 family (diffusers' `StableDiffusion3Pipeline`): every fact of it that training,
sampling, encoding and export rely on, in one module. `mapo_jax.pipelines.family(path)` picks it from
`model_index.json`. The facts, read from diffusers 0.42 (pipelines/stable_diffusion_3/
pipeline_stable_diffusion_3.py) unless said otherwise; docs/sd3.md explains them:

- The denoiser is the MMDiT in `transformer/` (models/sd3.py); `denoise(model, x, t, cond)` calls it with the
  NHWC latents, `timestep = t` (sigma * 1000, what the pipeline passes), the prompt embeddings and the pooled
  embedding. SDXL's time ids, which every cache row holds, are ignored.
- Text: three towers. `_get_clip_prompt_embeds` runs CLIP-L (`text_encoder`) and CLIP-G (`text_encoder_2`), both
  `CLIPTextModelWithProjection`, on ids padded / truncated to the FIRST tokenizer's model_max_length (77) and
  keeps each tower's penultimate hidden state (clip_skip None: `hidden_states[-2]`) and its projected pooled
  output (`text_embeds`, output [0]). `encode_prompt` concatenates the two states on the feature axis
  (768 + 1280 = 2048 wide), pads them with zeros on the right to T5's width (`F.pad` with a negative amount
  would crop instead; we do the same), and appends T5's last hidden state on the token axis:
  prompt_embeds (B, 77 + max_sequence_length, 4096), max_sequence_length 256 by default (`__call__`).
  pooled_prompt_embeds is [CLIP-L text_embeds, CLIP-G text_embeds] (768 + 1280 = 2048).
- `_get_t5_prompt_embeds`: T5 (`text_encoder_3`) on ids padded to max_sequence_length with `</s>` and no
  attention mask (models/t5.py `tokenize`). text_encoder_3 may be absent (model_index [null, null]): zeros
  (B, max_sequence_length, transformer joint_attention_dim) take its place, and the CLIP states are padded to
  that width.
- Guidance: classifier-free, weight `guidance_scale` (default 7.0), on when it is > 1. Without a negative
  prompt the pipeline encodes "" through all three towers (`negative_prompt or ""`), never zeros.
- Schedule: `FlowMatchEulerDiscreteScheduler`; `__call__` passes no sigmas, and `mu` only when the scheduler
  config sets use_dynamic_shifting (then from image_seq_len = (h / patch) (w / patch) of the latents and the
  config's base/max values; diffusion.sample computes the same from the latents' shape). The latents are
  unit-variance noise, not scaled (init sigma 1).
- Latents: decode divides by the VAE's scaling_factor and adds its shift_factor (SD3 / 3.5: 1.5305, 0.0609):
  `models.vae.Latents`, shared with every family.
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
from mapo_jax.models import t5 as t5_lib
from mapo_jax.models.clip import CLIPTextModel, load_text_encoder
from mapo_jax.models.layers import Options
from mapo_jax.models.sd3 import (DIFFUSERS_DEFAULTS, SD3Config, SD3Transformer2DModel, abstract_sd3_transformer,
                                 load_sd3_transformer, save_sd3_transformer)
from mapo_jax.models.t5 import T5EncoderModel, load_t5_encoder
from mapo_jax.models.vae import AutoencoderKL, load_vae
from mapo_jax.models.vae import Latents
from mapo_jax.pipelines.folders import PipelineFolder, in_folder, load_clip_tokenizer, vae_scale_factor

CLASS_NAMES = ("StableDiffusion3Pipeline",)  # model_index.json _class_name
DENOISER = "transformer"  # the model_index name of the model that trains
COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
PROMPT_KEYS = COND_KEYS
PRESETS = presets.SD3_TRANSFORMERS  # named transformer configs (aot --architecture)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
              "tokenizer_3", "scheduler")
# What prompt encoding and decoding need (training's on-the-fly encoding, sample grids, encode).
FROZEN = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
CLIP_TOWERS = ("text_encoder", "text_encoder_2")
T5_TOWER = "text_encoder_3"
_TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", T5_TOWER: "tokenizer_3"}

TEXT_TOKENS = 77  # CLIP's model_max_length
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s max_sequence_length: T5's tokens
# stabilityai/stable-diffusion-3.5-large and -medium `scheduler/scheduler_config.json` (the same as SD3 medium's:
# shift 3, no dynamic shifting); the keys not listed keep FlowMatchEulerDiscreteScheduler's defaults.
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# The SD3 / SD3.5 VAE's latent normalisation (vae/config.json: scaling_factor, shift_factor), for presets.
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609
VAE_DOWNSAMPLE = 8  # the SD3 VAE (four blocks): presets (no VAE config) assume it


def load_denoiser(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32, attention: str | None = None,
                  remat: str = "none", scan: bool = False, variant: str | None = None, mesh=None
                  ) -> SD3Transformer2DModel:
  """The pipeline's (or a bare folder's) SD3 transformer, `load_sd3_transformer`: sharded safetensors and
  variants; with `mesh` each parameter is born sharded. With `scan`, each run of identical consecutive blocks is
  scanned (models/sd3.py `BlockRuns`: SD3.5 medium's dual-attention blocks, the plain ones, the last
  context_pre_only one); the files keep diffusers' per-block keys."""
  return load_sd3_transformer(path, dtype, param_dtype=param_dtype, attention=attention, remat=remat, scan=scan,
                              variant=variant, mesh=mesh)


def save_denoiser(model: SD3Transformer2DModel, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
  """A diffusers transformer folder (`SD3Transformer2DModel.from_pretrained`), weights cast to `dtype`."""
  return save_sd3_transformer(model, out_dir, dtype=dtype)


def abstract_denoiser(path_or_config: str | os.PathLike | Mapping[str, Any], *, dtype=jnp.float32,
                      param_dtype=jnp.float32, attention: str | None = None, remat: str = "none",
                      scan: bool = False) -> SD3Transformer2DModel:
  """The transformer of a pipeline (or transformer) folder, or of a config.json dict, as shapes only. `scan`, as in
  load_denoiser, also decides the parameters' layout (scanned runs, as a scanned run's checkpoints hold them)."""
  config = (path_or_config if isinstance(path_or_config, Mapping)
            else convert.read_config(convert.model_folder(path_or_config, DENOISER)))
  return abstract_sd3_transformer(config, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat,
                                  scan=scan)


def denoise(model: SD3Transformer2DModel, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
  """The velocity for noisy latents x (B, h, w, C) at model times t (B,) = sigma * 1000 under `cond`."""
  return model(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"], t)


def resolution_multiple(path: str | os.PathLike) -> int:
  """Image sizes must be multiples of this: the VAE's downsampling times the transformer's patch size, so the
  latents split into whole patches. Reads only the two config.json files."""
  vae_factor = vae_scale_factor(convert.read_config(convert.model_folder(path, "vae")))
  if not (Path(path) / DENOISER / "config.json").is_file():  # an encoder-only folder (VAE and text towers)
    return vae_factor
  return vae_factor * SD3Config.from_dict(convert.read_config(Path(path) / DENOISER)).patch_size


def preset_latents(denoiser_config: Mapping[str, Any]) -> Latents:
  """The latent normalisation of the SD3 / SD3.5 VAE (the only one these transformers ship with)."""
  del denoiser_config
  return Latents(scale=SCALING_FACTOR, shift=SHIFT_FACTOR)


def abstract_batch(denoiser_config: Mapping[str, Any], resolution: int, pairs: int, mesh,
                   rpo_embedding: str = "pooled", vae_downsample: int = VAE_DOWNSAMPLE,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch of `pairs` as ShapeDtypeStructs sharded over the batch axes, the keys, shapes and dtypes
  (float32: the loader's cast) of a data/cache.py batch encoded with this family: moments of 2 x in_channels
  (mean, logvar), prompt embeddings (77 CLIP + max_sequence_length T5 tokens, joint_attention_dim wide), the
  pooled embedding (pooled_projection_dim), SDXL-style time ids (every cache row has them; unused here) and the
  RPO embedding (the pooled embedding, or the prompt embeddings' mean over tokens)."""
  cfg = SD3Config.from_dict(denoiser_config)
  side = resolution // vae_downsample
  moments = (pairs, side, side, 2 * cfg.in_channels)
  width, pooled = cfg.joint_attention_dim, cfg.pooled_projection_dim
  shapes = {"moments_w": moments, "moments_l": moments,
            "prompt_embeds": (pairs, TEXT_TOKENS + max_sequence_length, width),
            "pooled_prompt_embeds": (pairs, pooled), "time_ids": (pairs, 6),
            "rpo_emb": (pairs, pooled if rpo_embedding == "pooled" else width)}
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding) for k, shape in shapes.items()}


def encode_ids(towers: tuple, ids: Mapping[str, jax.Array], *, width: int, t5_tokens: int) -> dict[str, jax.Array]:
  """`tokenize`'s ids through the towers (CLIP-L, CLIP-G[, T5]) -> {"prompt_embeds", "pooled_prompt_embeds"} float32:
  encode_prompt as a pure function of the towers, which `encode_prompts` jits and the train step runs on a cache's
  token ids. `width`: the prompt embeddings' width; `t5_tokens`: the zero rows standing in for an absent T5."""
  clip = [tower(ids[name]) for tower, name in zip(towers[:2], CLIP_TOWERS)]
  states = jnp.concatenate([o["hidden_states"][-2].astype(jnp.float32) for o in clip], axis=-1)
  t5 = (towers[2](ids[T5_TOWER])["last_hidden_state"].astype(jnp.float32) if len(towers) > 2
        else jnp.zeros((states.shape[0], t5_tokens, width), jnp.float32))
  return {"prompt_embeds": jnp.concatenate([_fit_width(states, width), t5], axis=1),
          "pooled_prompt_embeds": jnp.concatenate([o["text_embeds"].astype(jnp.float32) for o in clip], axis=-1)}


def _fit_width(x: jax.Array, width: int) -> jax.Array:
  """x zero-padded on the right of its last axis to `width`, or cropped to it, as torch's F.pad with a positive
  or negative amount does in encode_prompt."""
  extra = width - x.shape[-1]
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra >= 0 else x[..., :width]


@dataclasses.dataclass(eq=False)
class Pipeline(PipelineFolder):
  """The components asked for; one not asked for, or absent from the folder (text_encoder_3 may be), is None."""
  path: Path
  model_index: dict[str, Any]
  transformer: SD3Transformer2DModel | None = None
  vae: AutoencoderKL | None = None
  text_encoder: CLIPTextModel | None = None
  text_encoder_2: CLIPTextModel | None = None
  text_encoder_3: T5EncoderModel | None = None
  tokenizer: Any = None  # transformers CLIPTokenizer
  tokenizer_2: Any = None
  tokenizer_3: Any = None  # transformers T5TokenizerFast
  scheduler_config: dict[str, Any] | None = None
  vae_path: Path | None = None  # a VAE folder used instead of `path/vae` (load_pipeline's `vae`)
  max_sequence_length: int = MAX_SEQUENCE_LENGTH  # T5's tokens (diffusers' __call__ default)

  denoise = staticmethod(denoise)

  @property
  def denoiser(self) -> SD3Transformer2DModel | None:
    """The model that trains (DENOISER), if loaded."""
    return self.transformer

  @functools.cached_property
  def denoiser_config(self) -> dict[str, Any]:
    return self.transformer.config if self.transformer is not None else convert.read_config(self.path / DENOISER)

  @functools.cached_property
  def schedule(self) -> diffusion.Schedule:
    """The flow-matching schedule, from scheduler/scheduler_config.json."""
    return diffusion.as_schedule(self._scheduler_config)

  def sample_options(self, steps: int) -> tuple:
    """Extra static arguments of `diffusion.sample`: with use_dynamic_shifting, the transformer's patch size (the
    shift follows the latents' patch count, as the pipeline computes it); otherwise none."""
    del steps
    if not getattr(self.schedule, "use_dynamic_shifting", False):
      return ()
    config = self.denoiser_config
    return (("patch_size", int(config.get("patch_size", DIFFUSERS_DEFAULTS["patch_size"]))),)

  def encode_prompts(self, captions: Sequence[str]) -> dict[str, jax.Array]:
    return encode_prompts(self, captions)

  default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale default

  def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                   height: int, width: int, guidance: float | None = None, true_cfg: float = 1.0):
    """(cond, uncond, cfg_scale) for sampling: classifier-free guidance at weight `guidance` (None: diffusers'
    default 7.0; uncond None when guidance <= 1, as diffusers skips it). `true_cfg` is FLUX's; SD3 guides with
    `guidance` alone."""
    del height, width  # SD3 has no size conditioning
    if true_cfg != 1.0:
      raise ValueError(f"true_cfg={true_cfg}: an SD3 pipeline guides with --guidance alone")
    guidance = self.default_guidance if guidance is None else guidance
    cond, uncond = conditioning(self, prompts, negative_prompts, guidance=guidance)
    return cond, uncond, guidance

  @property
  def towers(self) -> tuple[str, ...]:
    """The text encoders this pipeline conditions on, per its model_index.json: both CLIP towers (required),
    then T5 when the folder has it."""
    return CLIP_TOWERS + ((T5_TOWER,) if in_folder(self.model_index, T5_TOWER) else ())

  @functools.cached_property
  def text_width(self) -> int:
    """The prompt embeddings' width: T5's d_model, or without T5 the transformer's joint_attention_dim (what
    diffusers' zeros take)."""
    if T5_TOWER in self.towers:
      if self.text_encoder_3 is not None:
        return self.text_encoder_3.cfg.d_model
      return t5_lib.T5Config.from_dict(convert.read_config(self.path / T5_TOWER)).d_model
    if self.transformer is not None or (self.path / DENOISER / "config.json").is_file():
      return SD3Config.from_dict(self.denoiser_config).joint_attention_dim
    return DIFFUSERS_DEFAULTS["joint_attention_dim"]

  @functools.cached_property
  def prompt_encoder(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]]:
    """`tokenize`'s ids → prompt embeddings, jitted; the frozen towers are split once, here."""
    names = self.towers
    missing = [name for name in names if getattr(self, name) is None]
    if missing:
      raise ValueError(f"prompt encoding needs {missing}, which load_pipeline did not load")
    for name in CLIP_TOWERS:
      if getattr(self, name).text_projection is None:
        raise ValueError(f"{self.path / name}: SD3 needs a CLIPTextModelWithProjection (its pooled text_embeds); "
                         "this tower has no text_projection")
    graphdef, state = nnx.split(tuple(getattr(self, name) for name in names))
    encode = functools.partial(encode_ids, width=self.text_width, t5_tokens=self.max_sequence_length)
    return functools.partial(jax.jit(lambda state, ids: encode(nnx.merge(graphdef, state), ids)), state)

  def tokenize(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """`tokenize(self, captions)`: token ids per tower name."""
    return tokenize(self, captions)

  def step_text(self) -> tuple[tuple, Callable]:
    """(towers, encode): the loaded text towers (CLIP-L, CLIP-G, then T5 when the folder has it) and `encode_ids`
    at this pipeline's widths, for a train step that encodes a cache's token ids itself (TEXT_IN_STEP;
    docs/data.md, "Text conditioning at scale")."""
    missing = [name for name in self.towers if getattr(self, name) is None]
    if missing:
      raise ValueError(f"the train step's prompt encoding needs {missing}, which load_pipeline did not load")
    return (tuple(getattr(self, name) for name in self.towers),
            functools.partial(encode_ids, width=self.text_width, t5_tokens=self.max_sequence_length))


def _load_t5_tokenizer(folder: Path):
  from transformers import T5TokenizerFast  # imported here: only tokenization needs transformers
  return T5TokenizerFast.from_pretrained(folder)


def load_pipeline(path: str | os.PathLike, components: Iterable[str] = COMPONENTS, *,
                  transformer_kwargs: Mapping[str, Any] | None = None, vae_kwargs: Mapping[str, Any] | None = None,
                  text_encoder_kwargs: Mapping[str, Any] | None = None, vae: str | os.PathLike | None = None,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                  text_encoder_3_kwargs: Mapping[str, Any] | None = None) -> Pipeline:
  """Loads the named components of a StableDiffusion3Pipeline folder.

  `components` are model_index.json names ("scheduler" reads scheduler/scheduler_config.json into
  `scheduler_config`); one the folder lacks (text_encoder_3 may be absent) stays None. The kwargs go to
  `load_denoiser`, `load_vae` and the three text towers (`load_text_encoder`, `load_t5_encoder`), e.g.
  `transformer_kwargs=dict(dtype=jnp.bfloat16, mesh=mesh)`; `text_encoder_3_kwargs`, if given, replace
  `text_encoder_kwargs` for T5 (e.g. its `mesh`, which the CLIP loader does not take). `vae`: a VAE folder used instead of the pipeline's.
  `max_sequence_length`: T5's tokens (diffusers' default 256, at most 512).
  """
  path = Path(path)
  components = tuple(components)
  unknown = sorted(set(components) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"unknown pipeline component(s) {unknown}; known: {COMPONENTS}")
  if not 1 <= max_sequence_length <= 512:  # the pipeline's check_inputs
    raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, 512]")
  model_index = json.loads((path / "model_index.json").read_text())
  text = dict(text_encoder_kwargs or {})
  loaders = {
      "transformer": lambda folder: load_denoiser(folder, **(transformer_kwargs or {})),
      "vae": lambda folder: load_vae(folder, **(vae_kwargs or {})),
      "text_encoder": lambda folder: load_text_encoder(folder, **text),
      "text_encoder_2": lambda folder: load_text_encoder(folder, **text),
      "text_encoder_3": lambda folder: load_t5_encoder(folder, **(text if text_encoder_3_kwargs is None
                                                                  else text_encoder_3_kwargs)),
      "tokenizer": load_clip_tokenizer,
      "tokenizer_2": load_clip_tokenizer,
      "tokenizer_3": _load_t5_tokenizer,
      "scheduler": lambda folder: json.loads((folder / "scheduler_config.json").read_text()),
  }
  vae_path = Path(vae) if vae else None
  folder = lambda name: vae_path if name == "vae" and vae_path is not None else path / name
  loaded = {("scheduler_config" if name == "scheduler" else name): loaders[name](folder(name))
            for name in components if in_folder(model_index, name) or (name == "vae" and vae_path is not None)}
  return Pipeline(path=path, model_index=model_index, vae_path=vae_path, max_sequence_length=max_sequence_length,
                  **loaded)


def tokenize(pipeline: Pipeline, captions: Sequence[str]) -> dict[str, np.ndarray]:
  """Token ids int32 per tower name, as encode_prompt makes them: both CLIP towers (B, 77), padded and truncated
  to the first tokenizer's model_max_length; T5 (B, max_sequence_length) with `</s>`, when present."""
  ids = {}
  for name in pipeline.towers:
    tokenizer = getattr(pipeline, _TOKENIZER[name])
    if tokenizer is None:
      raise ValueError(f"tokenizing needs {_TOKENIZER[name]!r}, which load_pipeline did not load")
    if name == T5_TOWER:
      ids[name] = t5_lib.tokenize(tokenizer, captions, pipeline.max_sequence_length)
      continue
    # diffusers pads both CLIP towers to tokenizer 1's length (self.tokenizer_max_length).
    length = pipeline.tokenizer.model_max_length if pipeline.tokenizer is not None else TEXT_TOKENS
    tokens = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="np")
    ids[name] = tokens["input_ids"].astype(np.int32)
  return ids


# --- Text conditioning in the train step (docs/data.md, "Text conditioning at scale") -----------------------------
# An SD3 cache stores each pair's token ids and the train step runs the frozen towers on them, instead of storing
# the (77 + 256) x 4096 prompt embeddings per pair (2.6 MiB in fp16). `python -m mapo_jax.encode --text auto`
# follows this.
TEXT_IN_STEP = True
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
# stabilityai/stable-diffusion-3.5-medium (and -large) text_encoder/, text_encoder_2/, text_encoder_3/ config.json:
# CLIP-L (123 M parameters) and OpenCLIP bigG (695 M), both with projections, and T5 v1.1 XXL's encoder (4.76 B); the
# keys that shape them: aot's towers for the presets.
SD35_TEXT_CONFIGS = {
    "text_encoder": dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model",
                         vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2),
    "text_encoder_2": dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model",
                           vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                           num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                           hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=49407),
    "text_encoder_3": dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096,
                           d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                           relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                           layer_norm_epsilon=1e-6),
}


def load_step_text(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Pipeline:
  """The tokenizers and text towers of a StableDiffusion3Pipeline folder, for `Pipeline.step_text`; with `mesh`,
  T5 (most of the text weights) is born sharded by the logical-axis rules (the CLIP towers are placed by the
  caller)."""
  kwargs = dict(dtype=dtype, param_dtype=param_dtype)
  return load_pipeline(path, TEXT_COMPONENTS, text_encoder_kwargs=kwargs, text_encoder_3_kwargs=dict(kwargs, mesh=mesh),
                       max_sequence_length=max_sequence_length)


def abstract_step_text(path: str | os.PathLike | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32,
                       max_sequence_length: int = MAX_SEQUENCE_LENGTH):
  """(towers, encode, tokens) as `step_text` gives them, shapes only (aot): the towers of a pipeline folder's
  config.json files (T5 when its model_index has it), or SD3.5's published configs (path None); tokens: each
  tower's id count (77 for both CLIP towers, max_sequence_length for T5)."""
  if path is None:
    configs, width = SD35_TEXT_CONFIGS, SD35_TEXT_CONFIGS[T5_TOWER]["d_model"]
  else:
    pipe = Pipeline(path=Path(path), model_index=json.loads((Path(path) / "model_index.json").read_text()))
    configs, width = {name: convert.read_config(Path(path) / name) for name in pipe.towers}, pipe.text_width
  options = Options(dtype=dtype, param_dtype=param_dtype)
  build = lambda name: (T5EncoderModel if name == T5_TOWER else CLIPTextModel)(configs[name], options=options,
                                                                               rngs=nnx.Rngs(0))
  towers = nnx.eval_shape(lambda: tuple(build(name) for name in configs))
  tokens = {name: max_sequence_length if name == T5_TOWER else TEXT_TOKENS for name in configs}
  return towers, functools.partial(encode_ids, width=width, t5_tokens=max_sequence_length), tokens


def encode_prompts(pipeline: Pipeline, captions: Sequence[str]) -> dict[str, jax.Array]:
  """{"prompt_embeds": (B, 77 + max_sequence_length, D), "pooled_prompt_embeds": (B, P)} float32, for the train
  step and the sampler; `pipeline.prompt_encoder(tokenize(pipeline, captions))`."""
  return pipeline.prompt_encoder(tokenize(pipeline, captions))


def conditioning(pipeline: Pipeline, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 guidance: float) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
  """(cond, uncond) for sampling; uncond is None when guidance <= 1 (diffusers skips CFG), else the negative
  prompts' encoding, or the empty prompt's when none are given (diffusers encodes "", not zeros)."""
  if negative_prompts is not None and len(negative_prompts) != len(prompts):
    raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
  cond = encode_prompts(pipeline, prompts)
  if guidance <= 1:
    return cond, None
  negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
  return cond, encode_prompts(pipeline, negatives)
