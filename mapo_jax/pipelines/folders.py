"""What every family reads from a diffusers pipeline folder the same way: which components model_index.json
lists, the CLIP tokenizers, and the VAE's and scheduler's configs (`PipelineFolder`)."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mapo_jax import convert
from mapo_jax.models.vae import Latents


def in_folder(model_index: Mapping[str, Any], name: str) -> bool:
  """Whether model_index.json lists component `name` (diffusers writes [null, null] for an absent one)."""
  entry = model_index.get(name)  # ["library", "ClassName"], or [null, null] for an absent component
  return isinstance(entry, (list, tuple)) and entry[0] is not None


def load_clip_tokenizer(folder: Path):
  """A CLIP tokenizer folder (transformers' CLIPTokenizer, as every family with CLIP towers loads it)."""
  from transformers import CLIPTokenizer  # imported here: only tokenization needs transformers
  return CLIPTokenizer.from_pretrained(folder)


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
  """Pixels per latent along each axis (8 for every published family), as diffusers' pipelines compute it."""
  return 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)


class PipelineFolder:
  """The part of every family's Pipeline dataclass that reads its folder the same way. The dataclass defines
  `path`, `vae` (the loaded AutoencoderKL or None), `vae_path` (a VAE folder used instead of path/vae) and
  `scheduler_config` (None: the folder's)."""

  @functools.cached_property
  def _vae_config(self) -> dict[str, Any]:
    """The loaded VAE's config or, when it was not loaded, its config.json."""
    if self.vae is not None:
      return self.vae.config
    return convert.read_config(convert.model_folder(self.vae_path or self.path, "vae"))

  @functools.cached_property
  def latents(self) -> Latents:
    """The VAE's latent normalisation: (z - shift_factor) * scaling_factor."""
    return Latents.from_vae_config(self._vae_config)

  @property
  def latent_channels(self) -> int:
    return int(self._vae_config.get("latent_channels", 4))

  @property
  def vae_scale_factor(self) -> int:
    return vae_scale_factor(self._vae_config)

  @functools.cached_property
  def _scheduler_config(self) -> dict[str, Any]:
    """The scheduler config given to load_pipeline, else the folder's scheduler/scheduler_config.json."""
    return self.scheduler_config or json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
