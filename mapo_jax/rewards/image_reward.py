"""ImageReward (THUDM/ImageReward, `ImageReward.py`) in Flax NNX: a BLIP ViT image encoder, BLIP's BERT text
encoder cross-attending to the image tokens, and an MLP head on the [CLS] state.

  score = (mlp(h_CLS) - 0.16717362830052426) / 1.0333394966054072     (ImageReward.score)
  h = text_encoder(ids, padding mask, image tokens = visual_encoder(pixels))

visual_encoder (BLIP `vit.py`, timm's layout): stride-p conv patches (with bias) → [cls_token; patches] +
pos_embed → pre-LN blocks x + attn(norm1(x)), x + fc2(GELU(fc1(norm2(x)))) with fused `qkv` → `norm`;
LayerNorm eps 1e-6. The head width is 64, as in BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16), so the
architecture is read from the checkpoint's shapes.
text_encoder (BLIP `med.py` BertModel in its "multimodal" mode): LN(word + position embeddings) →
post-LN layers h = LN(h + self-attention(h)) with the padding mask, h = LN(h + cross-attention(h, image)),
h = LN(h + W2 GELU(W1 h)); sizes from the `med_config.json` released beside the checkpoint.
mlp: the LAION aesthetic predictor's layout (`aesthetic.AestheticHead`), on 768 features.
Attribute names mirror the checkpoint's keys under `blip.visual_encoder.`, `blip.text_encoder.` and `mlp.`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import convert
from mapo_jax.convert import torch_pickle
from mapo_jax.rewards.aesthetic import AestheticHead
from mapo_jax.models.clip import ACTIVATIONS
from mapo_jax.models.layers import Embed, LayerNorm, Linear, Options

SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__
MAX_LENGTH = 35  # ImageReward.score pads / truncates prompts to 35 tokens
VIT_HEAD_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  hidden_size: int  # the BERT text encoder's
  text_layers: int
  text_heads: int
  intermediate_size: int
  vocab_size: int
  max_position_embeddings: int
  layer_norm_eps: float

  @classmethod
  def from_checkpoint(cls, state: Mapping[str, Any], med_config: Mapping[str, Any], source: str):
    """Vision sizes from the state dict's shapes, text sizes from med_config.json (a BertConfig)."""
    for key, want, default in (("add_cross_attention", True, False), ("hidden_act", "gelu", "gelu"),
                               ("position_embedding_type", "absolute", "absolute")):
      if med_config.get(key, default) != want:
        raise ValueError(f"{source}: med_config.json {key}={med_config.get(key, default)!r} is not supported "
                         f"(need {want!r})")
    try:
      width = state["blip.visual_encoder.cls_token"].shape[-1]
      patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
      tokens = state["blip.visual_encoder.pos_embed"].shape[-2]
    except KeyError as e:
      raise ValueError(f"{source} is not an ImageReward checkpoint: no {e.args[0]}") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid != tokens - 1 or width % VIT_HEAD_WIDTH:
      raise ValueError(f"{source}: pos_embed of {tokens} tokens / width {width} is not a square BLIP ViT")
    return cls(image_size=grid * patch, patch_size=patch, vision_width=width, vision_layers=layers,
               hidden_size=med_config["hidden_size"], text_layers=med_config["num_hidden_layers"],
               text_heads=med_config["num_attention_heads"], intermediate_size=med_config["intermediate_size"],
               vocab_size=med_config["vocab_size"], max_position_embeddings=med_config["max_position_embeddings"],
               layer_norm_eps=med_config.get("layer_norm_eps", 1e-12))


def _attention(q, k, v, heads: int, bias=None):
  split = lambda t: t.reshape(*t.shape[:2], heads, -1)
  out = jax.nn.dot_product_attention(split(q), split(k), split(v), bias=bias)
  return out.reshape(*q.shape[:2], -1)


_GELU = ACTIVATIONS["gelu"]  # torch.nn.GELU and transformers' "gelu": the erf form


# --- BLIP ViT -------------------------------------------------------------------------------------------------

class ViTAttention(nnx.Module):
  def __init__(self, width: int, *, kw):
    self.qkv = Linear(width, 3 * width, axes=("embed", "heads"), **kw)
    self.proj = Linear(width, width, axes=("heads", "embed"), **kw)
    self.heads = width // VIT_HEAD_WIDTH

  def __call__(self, x):
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    return self.proj(_attention(q, k, v, self.heads))


class ViTMlp(nnx.Module):
  def __init__(self, width: int, *, kw):
    self.fc1 = Linear(width, 4 * width, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(4 * width, width, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.fc2(_GELU(self.fc1(x)))


class ViTBlock(nnx.Module):
  def __init__(self, width: int, *, kw, norm_kw):
    self.norm1 = LayerNorm(width, **norm_kw)
    self.attn = ViTAttention(width, kw=kw)
    self.norm2 = LayerNorm(width, **norm_kw)
    self.mlp = ViTMlp(width, kw=kw)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
  """BLIP's ViT: pixels (B, S, S, 3) → all token states (B, 1 + (S/p)², W), after the final `norm`. The
  patch conv is held as a Linear map of flattened (p, p, 3) patches (`patch_embed`)."""

  def __init__(self, cfg: ImageRewardConfig, *, kw, norm_kw):
    w, p = cfg.vision_width, cfg.patch_size
    self.patch_embed = Linear(p * p * 3, w, axes=("conv_in", "embed"), **kw)
    self.cls_token = Embed(1, w, **kw)
    self.pos_embed = Embed((cfg.image_size // p) ** 2 + 1, w, **kw)
    self.blocks = nnx.List([ViTBlock(w, kw=kw, norm_kw=norm_kw) for _ in range(cfg.vision_layers)])
    self.norm = LayerNorm(w, **norm_kw)
    self.patch_size, self.image_size = p, cfg.image_size

  def __call__(self, pixels):
    b, h, w, c = pixels.shape
    p = self.patch_size
    if (h, w, c) != (self.image_size, self.image_size, 3):
      raise ValueError(f"BLIP ViT: input {h}x{w}x{c} != {self.image_size}x{self.image_size}x3")
    patches = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    x = self.patch_embed(patches)
    cls = jnp.broadcast_to(self.cls_token(jnp.zeros((1,), jnp.int32)), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed(jnp.arange(x.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


# --- BLIP's BERT (med.py) -----------------------------------------------------------------------------------

class BertSelfAttention(nnx.Module):
  def __init__(self, hidden: int, kv_width: int, heads: int, *, kw):
    self.query = Linear(hidden, hidden, axes=("embed", "heads"), **kw)
    self.key = Linear(kv_width, hidden, axes=("kv_embed", "heads"), **kw)
    self.value = Linear(kv_width, hidden, axes=("kv_embed", "heads"), **kw)
    self.heads = heads

  def __call__(self, x, context, bias):
    return _attention(self.query(x), self.key(context), self.value(context), self.heads, bias)


class BertSelfOutput(nnx.Module):
  def __init__(self, hidden: int, *, kw, norm_kw):
    self.dense = Linear(hidden, hidden, axes=("heads", "embed"), **kw)
    self.LayerNorm = LayerNorm(hidden, **norm_kw)

  def __call__(self, h, residual):
    return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
  def __init__(self, hidden: int, kv_width: int, heads: int, *, kw, norm_kw):
    self.self = BertSelfAttention(hidden, kv_width, heads, kw=kw)
    self.output = BertSelfOutput(hidden, kw=kw, norm_kw=norm_kw)

  def __call__(self, x, context, bias=None):
    return self.output(self.self(x, context, bias), x)


class BertIntermediate(nnx.Module):
  def __init__(self, hidden: int, inner: int, *, kw):
    self.dense = Linear(hidden, inner, axes=("embed", "mlp"), **kw)

  def __call__(self, x):
    return _GELU(self.dense(x))


class BertOutput(nnx.Module):
  def __init__(self, inner: int, hidden: int, *, kw, norm_kw):
    self.dense = Linear(inner, hidden, axes=("mlp", "embed"), **kw)
    self.LayerNorm = LayerNorm(hidden, **norm_kw)

  def __call__(self, h, residual):
    return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nnx.Module):
  def __init__(self, cfg: ImageRewardConfig, *, kw, norm_kw):
    d = cfg.hidden_size
    self.attention = BertAttention(d, d, cfg.text_heads, kw=kw, norm_kw=norm_kw)
    self.crossattention = BertAttention(d, cfg.vision_width, cfg.text_heads, kw=kw, norm_kw=norm_kw)
    self.intermediate = BertIntermediate(d, cfg.intermediate_size, kw=kw)
    self.output = BertOutput(cfg.intermediate_size, d, kw=kw, norm_kw=norm_kw)

  def __call__(self, h, padding_bias, image):
    h = self.attention(h, h, padding_bias)
    h = self.crossattention(h, image)  # every image token is attended (ImageReward passes an all-ones mask)
    return self.output(self.intermediate(h), h)


class BertEmbeddings(nnx.Module):
  def __init__(self, cfg: ImageRewardConfig, *, kw, norm_kw):
    self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position_embeddings = Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
    self.LayerNorm = LayerNorm(cfg.hidden_size, **norm_kw)

  def __call__(self, ids):
    return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(jnp.arange(ids.shape[-1])))


class BertEncoder(nnx.Module):
  def __init__(self, cfg: ImageRewardConfig, *, kw, norm_kw):
    self.layer = nnx.List([BertLayer(cfg, kw=kw, norm_kw=norm_kw) for _ in range(cfg.text_layers)])


class BertModel(nnx.Module):
  """med.py's BertModel (no pooler), mode "multimodal": ids, mask (B, T), image states → (B, T, D)."""

  def __init__(self, cfg: ImageRewardConfig, *, kw, norm_kw):
    self.embeddings = BertEmbeddings(cfg, kw=kw, norm_kw=norm_kw)
    self.encoder = BertEncoder(cfg, kw=kw, norm_kw=norm_kw)

  def __call__(self, ids, mask, image):
    # med.py's extended mask: (1 - mask) · -10000 added to the scores of padded keys.
    bias = ((1.0 - mask.astype(jnp.float32)) * -10000.0)[:, None, None, :]
    h = self.embeddings(ids)
    for layer in self.encoder.layer:
      h = layer(h, bias, image)
    return h


class BLIP(nnx.Module):
  def __init__(self, cfg: ImageRewardConfig, *, kw, vision_norm_kw, text_norm_kw):
    self.visual_encoder = VisionTransformer(cfg, kw=kw, norm_kw=vision_norm_kw)
    self.text_encoder = BertModel(cfg, kw=kw, norm_kw=text_norm_kw)


class ImageReward(nnx.Module):
  """Call: ids, mask (B, T) int, pixels (B, S, S, 3) CLIP-normalised → ImageReward scores (B,)."""

  def __init__(self, cfg: ImageRewardConfig, *, options: Options = Options(), rngs: nnx.Rngs):
    kw = dict(dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs)
    self.cfg = cfg
    self.blip = BLIP(cfg, kw=kw, vision_norm_kw={**kw, "eps": 1e-6},
                     text_norm_kw={**kw, "eps": cfg.layer_norm_eps})
    self.mlp = AestheticHead(cfg.hidden_size, options=options, rngs=rngs)

  def __call__(self, ids, mask, pixels):
    image = self.blip.visual_encoder(pixels)
    h = self.blip.text_encoder(ids, mask, image)[:, 0].astype(jnp.float32)
    return (self.mlp(h) - SCORE_MEAN) / SCORE_STD


# Keys the score does not use: BLIP's contrastive projections (blip.vision_proj / text_proj), anything else
# outside the two towers and the head, and the position_ids buffer. ImageReward itself loads with
# strict=False; inside the towers and the head we stay strict.
_UNUSED = r"(?!blip\.visual_encoder\.|blip\.text_encoder\.|mlp\.).*|blip\.text_encoder\.embeddings\.position_ids"
_BARE = {"blip.visual_encoder.cls_token": "blip.visual_encoder.cls_token.weight",
         "blip.visual_encoder.pos_embed": "blip.visual_encoder.pos_embed.weight",
         "blip.visual_encoder.patch_embed.proj.weight": "blip.visual_encoder.patch_embed.weight",
         "blip.visual_encoder.patch_embed.proj.bias": "blip.visual_encoder.patch_embed.bias"}


def _fix_layout(key: str, value: np.ndarray, want: tuple) -> np.ndarray:
  if key == "blip.visual_encoder.patch_embed.weight":  # (W, 3, p, p) → (W, p·p·3), patch order (p, p, 3)
    return value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
  if key in ("blip.visual_encoder.cls_token.weight", "blip.visual_encoder.pos_embed.weight"):  # (1, N, W) → (N, W)
    return value.reshape(-1, value.shape[-1])
  return value


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = Path(path)
  if path.suffix == ".safetensors":
    return convert.read_weights(path.parent, path.name.removesuffix(".safetensors"))
  state = torch_pickle.load(path)
  state = state.get("state_dict", state) if isinstance(state, Mapping) else state
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} does not hold a state dict")
  return dict(state)


def load_image_reward(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32) -> ImageReward:
  """ImageReward from its state-dict file `path` (ImageReward.pt or a .safetensors copy) and the
  med_config.json beside it."""
  path = Path(path)
  state = read_state_dict(path)
  if "blip.visual_encoder.cls_token" not in state or "mlp.layers.0.weight" not in state:
    raise ValueError(f"{path} is not an ImageReward checkpoint (no blip.visual_encoder.cls_token / "
                     f"mlp.layers.0.weight); its first keys: {sorted(state)[:5]}")
  cfg = ImageRewardConfig.from_checkpoint(state, read_med_config(path.parent), str(path))
  options = Options(dtype=dtype, param_dtype=param_dtype)
  model = nnx.eval_shape(lambda: ImageReward(cfg, options=options, rngs=nnx.Rngs(0)))
  convert.load_state_dict(model, {_BARE.get(k, k): v for k, v in state.items()}, source=str(path),
                          ignore=[_UNUSED], fix=_fix_layout)
  return model


def read_med_config(folder: Path) -> dict[str, Any]:
  file = folder / "med_config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{folder} has no med_config.json (ImageReward's BERT config, released beside "
                            "ImageReward.pt in THUDM/ImageReward)")
  return json.loads(file.read_text())

