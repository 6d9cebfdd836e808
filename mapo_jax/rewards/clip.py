"""A CLIP-style reward model: transformers' `CLIPModel` (text and vision towers, projections, logit scale)
in Flax NNX, with CLIPImageProcessor's preprocessing, for PickScore / HPS-style preference scores.

score(prompt, image) = logit_scale.exp() * cos(image_embeds, text_embeds), as the PickScore README computes
it; the CLIP text-image score is 100 * max(cos, 0) (torchmetrics' CLIPScore). The text tower is
`clip.CLIPTextTransformer`; the vision tower reuses its layers without the causal mask. Attribute names
mirror the checkpoint keys (`vision_model.encoder.layers.N.self_attn.q_proj`, `visual_projection`, ...).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from mapo_jax import convert
from mapo_jax.models.clip import (ACTIVATIONS, CLIPAttention, CLIPEncoderLayer, CLIPTextConfig,
                                  CLIPTextTransformer)
from mapo_jax.models.layers import Embed, LayerNorm, Linear
from mapo_jax.models.layers import Options

# transformers' CLIPVisionConfig / CLIPConfig defaults for the options that shape the model (transformers 5).
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
CLIP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """A validated transformers CLIPVisionConfig; its field names are those `CLIPEncoderLayer` reads."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_channels: int
  image_size: int
  patch_size: int
  hidden_act: str
  layer_norm_eps: float

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    c = {**VISION_DEFAULTS, **{k: v for k, v in config.items() if k in VISION_DEFAULTS}}
    if c["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"CLIP vision config: unsupported hidden_act={c['hidden_act']!r} "
                       f"(supported: {sorted(ACTIVATIONS)})")
    if c["image_size"] % c["patch_size"]:
      raise ValueError(f"CLIP vision config: image_size={c['image_size']} is not a multiple of "
                       f"patch_size={c['patch_size']}")
    return cls(**c)


class CLIPVisionAttention(CLIPAttention):
  """CLIPAttention without the causal mask: every patch attends to every patch."""

  def __call__(self, x):
    split = lambda t: t.reshape(*x.shape[:2], self.heads, -1)
    out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
    return self.out_proj(out.reshape(*x.shape[:2], -1))


class CLIPVisionEncoderLayer(CLIPEncoderLayer):
  def __init__(self, cfg: CLIPVisionConfig, *, opts: Options, rngs: nnx.Rngs):
    super().__init__(cfg, opts=opts, rngs=rngs)
    self.self_attn = CLIPVisionAttention(cfg, opts=opts, rngs=rngs)  # replaces the causal one


class CLIPVisionEncoder(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, opts: Options, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPVisionEncoderLayer(cfg, opts=opts, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])


class CLIPVisionEmbeddings(nnx.Module):
  """[class token; patch embeddings] + position embeddings.

  The checkpoint's stride-p Conv2d `patch_embedding` (no bias) is held as a Linear map of flattened
  (p, p, C) patches, and its (D,) `class_embedding` as a one-row Embed table (see `_fix_layout`).
  """

  def __init__(self, cfg: CLIPVisionConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    d, p = cfg.hidden_size, cfg.patch_size
    self.class_embedding = Embed(1, d, **kw)
    self.patch_embedding = Linear(p * p * cfg.num_channels, d, use_bias=False, axes=("conv_in", "embed"), **kw)
    self.position_embedding = Embed((cfg.image_size // p) ** 2 + 1, d, **kw)
    self.patch_size, self.image_size = p, cfg.image_size

  def __call__(self, pixels):
    b, h, w, c = pixels.shape
    p = self.patch_size
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"CLIP vision tower: input {h}x{w} != image_size {self.image_size}")
    patches = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    x = self.patch_embedding(patches)
    cls = jnp.broadcast_to(self.class_embedding(jnp.zeros((1,), jnp.int32)), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding(jnp.arange(x.shape[1]))


class CLIPVisionTransformer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(eps=cfg.layer_norm_eps, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.embeddings = CLIPVisionEmbeddings(cfg, opts=opts, rngs=rngs)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, **kw)  # sic: the checkpoint's name
    self.encoder = CLIPVisionEncoder(cfg, opts=opts, rngs=rngs)
    self.post_layernorm = LayerNorm(cfg.hidden_size, **kw)

  def __call__(self, pixels):
    x = self.pre_layrnorm(self.embeddings(pixels))
    for layer in self.encoder.layers:
      x = layer(x)
    return self.post_layernorm(x[:, 0])  # pooled: the class token


class LogitScale(nnx.Module):
  """The learned log temperature (checkpoint key `logit_scale`, a scalar)."""

  def __init__(self, value: float, *, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.full((), value, param_dtype), axes=())


class CLIPModel(nnx.Module):
  """transformers' `CLIPModel`. Call: (input_ids (B, T) int, pixels (B, S, S, C) preprocessed) →
  {"text_embeds", "image_embeds" (B, P), "cosine" (B,), "score" (B,) = logit_scale.exp() * cosine},
  pairing text i with image i."""

  def __init__(self, config: Mapping[str, Any], *, options: Options = Options(), rngs: nnx.Rngs):
    if config.get("model_type", "clip") != "clip":
      raise ValueError(f"CLIP config: unsupported model_type={config['model_type']!r} (need 'clip')")
    c = {**CLIP_DEFAULTS, **config}
    text_cfg = CLIPTextConfig.from_dict(c.get("text_config", {}))
    vision_cfg = CLIPVisionConfig.from_dict(c.get("vision_config", {}))
    kw = dict(use_bias=False, axes=("embed", "mlp"), dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs)
    self.text_cfg = text_cfg
    self.text_model = CLIPTextTransformer(text_cfg, opts=options, rngs=rngs)
    self.vision_model = CLIPVisionTransformer(vision_cfg, opts=options, rngs=rngs)
    self.text_projection = Linear(text_cfg.hidden_size, c["projection_dim"], **kw)
    self.visual_projection = Linear(vision_cfg.hidden_size, c["projection_dim"], **kw)
    self.logit_scale = LogitScale(c["logit_scale_init_value"], param_dtype=options.param_dtype)

  def text_embeds(self, input_ids):
    """transformers' `get_text_features`: the projected EOS-token state (B, P)."""
    return self.text_projection(self.text_model(input_ids)["pooler_output"])

  def image_embeds(self, pixels):
    """transformers' `get_image_features`: the projected class-token state (B, P)."""
    return self.visual_projection(self.vision_model(pixels))

  def __call__(self, input_ids, pixels):
    text = self.text_embeds(input_ids).astype(jnp.float32)
    image = self.image_embeds(pixels).astype(jnp.float32)
    normed = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    cosine = jnp.sum(normed(text) * normed(image), axis=-1)
    score = jnp.exp(self.logit_scale.scale[...].astype(jnp.float32)) * cosine
    return {"text_embeds": text, "image_embeds": image, "cosine": cosine, "score": score}


# Checkpoint keys whose tensors we hold under a module (see CLIPVisionEmbeddings, LogitScale).
_RENAME = {"vision_model.embeddings.class_embedding": "vision_model.embeddings.class_embedding.weight",
           "logit_scale": "logit_scale.weight"}


def _fix_layout(key: str, value: np.ndarray, want: tuple) -> np.ndarray:
  if key == "vision_model.embeddings.patch_embedding.weight":  # (D, C, p, p) → (D, p·p·C), patch order (p, p, C)
    return value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
  if key == "vision_model.embeddings.class_embedding.weight":  # (D,) → (1, D)
    return value.reshape(1, -1)  # a wrong D is left to the shape check
  return value


def load_clip_model(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32) -> CLIPModel:
  """Loads a transformers `CLIPModel` folder (config.json + safetensors weights) without PyTorch."""
  folder = Path(path)
  config = convert.read_config(folder)
  options = Options(dtype=dtype, param_dtype=param_dtype)
  return convert.load_model(folder, lambda: CLIPModel(config, options=options, rngs=nnx.Rngs(0)),
                            stem=convert.TRANSFORMERS_STEM, rename=lambda k: _RENAME.get(k, k),
                            ignore=[r"(text|vision)_model\.embeddings\.position_ids"], fix=_fix_layout)


def preprocess(images: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
  """CLIPImageProcessor (PIL backend) on uint8 (B, H, W, 3) images → float32 (B, S, S, 3).

  Resize the shorter side to size["shortest_edge"] (the longer to int(size · long / short)) with the
  config's PIL filter (bicubic), centre crop crop_size (offset (len - crop) // 2), × rescale_factor,
  then (x - image_mean) / image_std. `config` is the preprocessor_config.json contents; legacy integer
  `size` / `crop_size` values mean shortest edge / square crop, as transformers reads them.
  """
  off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if config.get(k) is False]
  if off:
    raise ValueError(f"image processor options {off} = false are not supported")
  size, crop = config["size"], config["crop_size"]
  short_side = size if isinstance(size, int) else size["shortest_edge"]
  crop_h, crop_w = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
  mean, std = (np.asarray(config[k], np.float32) for k in ("image_mean", "image_std"))
  out = []
  for image in images:
    pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    w, h = pil.size
    scale_long = lambda long, short: int(short_side * long / short)
    new_h, new_w = (short_side, scale_long(w, h)) if h <= w else (scale_long(h, w), short_side)
    x = np.asarray(pil.resize((new_w, new_h), resample=config.get("resample", Image.BICUBIC)))
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    x = x[top:top + crop_h, left:left + crop_w]
    x = (x.astype(np.float64) * config.get("rescale_factor", 1 / 255)).astype(np.float32)
    out.append((x - mean) / std)
  return np.stack(out)


@functools.partial(jax.jit, static_argnames="graphdef")
def _score(graphdef, state, input_ids, pixels):
  out = nnx.merge(graphdef, state)(input_ids, pixels)
  return {"score": out["score"], "cosine": out["cosine"]}


@dataclasses.dataclass(eq=False)
class RewardModel:
  """A CLIPModel with its tokenizer and image-processor config, as a PickScore / HPS folder holds them."""
  model: CLIPModel
  tokenizer: Any  # transformers tokenizer
  processor_config: dict[str, Any]

  def __call__(self, prompts: Sequence[str], images: np.ndarray, *, batch_size: int = 8) -> dict[str, np.ndarray]:
    """{"score": the reward, "cosine", "clip_score": 100 * max(cosine, 0)}, (N,) float32 each, for prompt i
    with image i (uint8 (N, H, W, 3)). Batches are padded to `batch_size`, so one compile serves all."""
    graphdef, state = nnx.split(self.model)
    max_length = self.model.text_cfg.max_position_embeddings
    n, parts = len(prompts), []
    for start in range(0, n, batch_size):
      idx = [min(i, n - 1) for i in range(start, start + batch_size)]
      ids = self.tokenizer([prompts[i] for i in idx], padding="max_length", max_length=max_length,
                           truncation=True, return_tensors="np")["input_ids"].astype(np.int32)
      out = jax.device_get(_score(graphdef, state, ids, preprocess(images[idx], self.processor_config)))
      parts.append({k: np.asarray(v)[:min(batch_size, n - start)] for k, v in out.items()})
    result = {k: np.concatenate([p[k] for p in parts]) for k in ("score", "cosine")}
    result["clip_score"] = 100 * np.maximum(result["cosine"], 0)
    return result


def load_reward_model(path: str | os.PathLike) -> RewardModel:
  """A transformers CLIPModel folder with its tokenizer files and preprocessor_config.json."""
  from transformers import AutoTokenizer  # imported here: only tokenization needs transformers
  folder = Path(path)
  processor = folder / "preprocessor_config.json"
  if not processor.is_file():
    raise FileNotFoundError(f"{folder} has no preprocessor_config.json (copy the CLIP processor files of the "
                            "model's base, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K for PickScore)")
  return RewardModel(model=load_clip_model(folder), tokenizer=AutoTokenizer.from_pretrained(folder),
                     processor_config=json.loads(processor.read_text()))
