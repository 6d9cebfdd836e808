"""Model families, one module each, chosen once from a pipeline folder's `model_index.json` `_class_name`
(diffusers' own dispatch). An unknown class fails with its name. A new family is a new module here, added
to FAMILIES: nothing else in the package learns a family's name.

A family module provides what the trainer, the sampler, encoding, export and aot need, and nothing else knows:
  CLASS_NAMES               the `_class_name`s it serves
  DENOISER, COND_KEYS       the model_index name of the model that trains ("unet", "transformer"); the
                            conditioning keys of a training batch its `denoise` reads
  PROMPT_KEYS               the conditioning keys a prompt's encoding gives (empty-prompt dropout swaps them)
  FROZEN, COMPONENTS        the components prompt encoding and decoding need; all of them
  time_ids(h, w, batch)     optional: fixed micro-conditioning rows (config.data.time_ids = "fixed"; SDXL)
  Pipeline, load_pipeline   the pipeline folder's components. A Pipeline has `denoiser` (the loaded model that
                            trains, or None), `denoiser_config`, `vae`, `latents`, `latent_channels`,
                            `vae_scale_factor`, `scheduler_config` and `schedule` (diffusion.NoiseSchedule or
                            diffusion.FlowMatchSchedule: the sampler and the train step follow its type),
                            `denoise`, `encode_prompts(captions)`, `conditioning(prompts, negatives, height=,
                            width=, guidance=, true_cfg=) -> (cond, uncond or None, cfg_scale)` and
                            `sample_options(steps)` (extra static arguments of `diffusion.sample`)
  load_denoiser, save_denoiser, abstract_denoiser
  denoise(model, x, t, cond)  the one call of the denoiser: x NHWC latents as the VAE makes them (any packing
                            is the family's business), t the schedule's model time (DDPM: the timestep;
                            flow matching: sigma * num_train_timesteps), cond the COND_KEYS arrays
  Latents                   the latent normalisation, from the VAE config
  abstract_batch, preset_latents, PRESETS, SCHEDULER_CONFIG, resolution_multiple   for aot and config checks
  encode_prompts, tokenize
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import jax
import numpy as np

from mapo_jax.pipelines import flux, sd, sd3

FAMILIES: tuple[ModuleType, ...] = (sd, sd3, flux)


def family(path: str | os.PathLike) -> ModuleType:
  """The family module of the diffusers pipeline folder at `path`."""
  index = Path(path) / "model_index.json"
  if not index.is_file():
    raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: it has no model_index.json")
  name = json.loads(index.read_text()).get("_class_name")
  for module in FAMILIES:
    if name in module.CLASS_NAMES:
      return module
  known = sorted(n for module in FAMILIES for n in module.CLASS_NAMES)
  raise ValueError(f"{index}: _class_name {name!r} is not a supported pipeline (supported: {', '.join(known)})")


def load_pipeline(path: str | os.PathLike, components=None, **kwargs):
  """`family(path).load_pipeline(path, components, ...)`; components default to all of that family's."""
  module = family(path)
  return module.load_pipeline(path, module.COMPONENTS if components is None else components, **kwargs)


def text_options(path: str | os.PathLike, max_sequence_length: int) -> dict[str, int]:
  """`load_pipeline` / `load_step_text` keyword arguments that encode prompts of the pipeline at `path` at
  `max_sequence_length` T5 tokens (0: the family's default, no arguments). A family without a T5 tower refuses
  a length."""
  if not max_sequence_length:
    return {}
  name = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
  return family_text_options(family(path), max_sequence_length, f"{path} is a {name} folder")


def family_text_options(module: ModuleType, max_sequence_length: int, what: str) -> dict[str, int]:
  """`text_options` for a family module (`aot` has no folder): ValueError naming `what` for a family without T5."""
  if not max_sequence_length:
    return {}
  if not hasattr(module, "MAX_SEQUENCE_LENGTH"):
    raise ValueError(f"{what}, whose prompts have no T5 tokens (a T5 length applies to FLUX.1 and SD3 pipelines "
                     "only; 0 for the others)")
  if not 1 <= max_sequence_length <= 512:
    raise ValueError(f"{max_sequence_length} T5 tokens: the pipelines take 1..512")
  return {"max_sequence_length": max_sequence_length}


def empty_prompt_rows(pipe, dtypes: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """The empty prompt "" through the pipeline's text towers, one row per prompt key, as the official
  Diffusion-DPO trainer encodes its dropped captions (SalesforceAIResearch/DiffusionDPO train.py:
  `captions.append("")`, then the towers; not the zeros SDXL pipelines use for the unconditional branch
  at sampling). `dtypes`: the cache's storage dtypes, so the rows are rounded as a cached "" would be."""
  rows = {k: np.asarray(v[0], np.float32) for k, v in jax.device_get(pipe.encode_prompts([""])).items()}
  if dtypes:
    rows = {k: v.astype(dtypes[k]).astype(np.float32) for k, v in rows.items()}
  return rows
