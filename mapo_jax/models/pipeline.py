"""A diffusers pipeline folder (`model_index.json`) loaded without PyTorch, and prompt encoding.

Prompt encoding follows diffusers' `StableDiffusionXLPipeline.encode_prompt` / `StableDiffusionPipeline
.encode_prompt` (no clip_skip, no LoRA scale): each tower's tokenizer pads/truncates to its
`model_max_length` (77). With a second tower (SDXL) the prompt embeddings are the penultimate hidden
states of every tower, concatenated (77 x 2048 for SDXL base), and the pooled embedding is tower 2's
projected `text_embeds`; with one tower (SD 1.x/2.x) they are its last hidden state, and the pooled
embedding is its `pooler_output` (unused by that UNet; the default RPO embedding).
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

from mapo_jax.models.clip import CLIPTextModel, load_text_encoder
from mapo_jax.models.unet import UNet2DConditionModel, load_unet
from mapo_jax.models.vae import AutoencoderKL, load_vae

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclasses.dataclass(eq=False)
class Pipeline:
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

  @property
  def towers(self) -> tuple[str, ...]:
    """The text encoders this pipeline conditions on, per its model_index.json."""
    return tuple(name for name in _TOKENIZER if _in_folder(self.model_index, name))

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


def _in_folder(model_index: Mapping[str, Any], name: str) -> bool:
  entry = model_index.get(name)  # ["library", "ClassName"], or [null, null] for an absent component
  return isinstance(entry, (list, tuple)) and entry[0] is not None


def _load_tokenizer(folder: Path):
  from transformers import CLIPTokenizer  # imported here: only tokenization needs transformers
  return CLIPTokenizer.from_pretrained(folder)


def load_pipeline(path: str | os.PathLike, components: Iterable[str] = COMPONENTS, *,
                  unet_kwargs: Mapping[str, Any] | None = None, vae_kwargs: Mapping[str, Any] | None = None,
                  text_encoder_kwargs: Mapping[str, Any] | None = None) -> Pipeline:
  """Loads the named components of a diffusers pipeline folder.

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
      "tokenizer": _load_tokenizer,
      "tokenizer_2": _load_tokenizer,
      "scheduler": lambda folder: json.loads((folder / "scheduler_config.json").read_text()),
  }
  loaded = {("scheduler_config" if name == "scheduler" else name): loaders[name](path / name)
            for name in components if _in_folder(model_index, name)}
  return Pipeline(path=path, model_index=model_index, **loaded)


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


def encode_uncond(pipeline: Pipeline, batch_size: int) -> dict[str, jax.Array]:
  """The unconditional (negative) embeddings for classifier-free guidance, as `encode_prompts` lays them out.

  SDXL pipelines whose model_index sets `force_zeros_for_empty_prompt` (diffusers' default: true) use
  zeros; others encode the empty prompt. An explicit negative prompt is just `encode_prompts(negatives)`.
  """
  out = encode_prompts(pipeline, [""] * batch_size)
  if "text_encoder_2" in pipeline.towers and pipeline.model_index.get("force_zeros_for_empty_prompt", True):
    out = {k: jnp.zeros_like(v) for k, v in out.items()}
  return out
