"""open_clip's `CLIP` (a ViT image tower and a causal text transformer) in Flax NNX, loaded from an open_clip
state dict (`visual.transformer.resblocks.N.attn.in_proj_weight`, `positional_embedding`, `text_projection`,
`logit_scale`, ...) as HPS v2 / v2.1 release it, without PyTorch.

The architecture comes from an open_clip model config (`embed_dim`, `quick_gelu`, `vision_cfg` {image_size,
layers, width, head_width, patch_size, mlp_ratio}, `text_cfg` {context_length, vocab_size, width, heads,
layers, mlp_ratio}); `VIT_H_14` is open_clip's `model_configs/ViT-H-14.json`. Options that change the
computation but are not implemented here (layer scale, attentional pooling, custom text towers, ...) are
refused by name. Attribute names mirror the state-dict keys; `_rename` maps the few that are bare tensors.

Forward (open_clip `CLIP.encode_image` / `encode_text`):
  image: patches (stride-p conv, no bias) → [class; patches] + positions → ln_pre → blocks → ln_post on the
         class token → @ visual.proj
  text:  tokens + positions → causal blocks → ln_final → the state at argmax(token id) (the end-of-text
         token, the largest id) → @ text_projection
  block: x + attn(ln_1(x)), then x + c_proj(act(c_fc(ln_2(x)))); act = GELU (erf), or QuickGELU when
         `quick_gelu`.
"""
from __future__ import annotations

import dataclasses
import gzip
import html
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import convert
from mapo_jax.convert import torch_pickle
from mapo_jax.models.clip import ACTIVATIONS
from mapo_jax.models.layers import Embed, LayerNorm, Linear, Options
from mapo_jax.rewards.clip import LogitScale

VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# Options of open_clip's CLIPVisionCfg / CLIPTextCfg / CLIP that we implement (with open_clip's defaults) ...
VISION_DEFAULTS = {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 16,
                   "mlp_ratio": 4.0}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                 "mlp_ratio": 4.0}
# ... options that must keep open_clip's default, because another value changes the computation ...
_VISION_FIXED = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                 "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                 "timm_model_name": None}
_TEXT_FIXED = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
               "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "hf_model_name": None}
_COMMON_FIXED = {"act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                 "scale_attn": False, "scale_fc": False}
_TOP_FIXED = {"custom_text": False, "init_logit_bias": None, "nonscalar_logit_scale": False}
# ... and options without effect on an evaluation forward pass (dropout, tokenizer and training settings).
_VISION_IGNORED = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                   "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_IGNORED = {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "eos_id", "output_tokens",
                 "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_IGNORED = {"init_logit_scale", "cast_dtype", "output_dict"}


def _checked(section: str, cfg: Mapping[str, Any], defaults, fixed, ignored) -> dict[str, Any]:
  for key, value in cfg.items():
    if key in fixed:
      if value != fixed[key]:
        raise ValueError(f"open_clip config: {section}{key}={value!r} is not supported (only {fixed[key]!r})")
    elif key not in defaults and key not in ignored:
      raise ValueError(f"open_clip config: unknown option {section}{key}")
  return {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}


@dataclasses.dataclass(frozen=True)
class OpenCLIPConfig:
  embed_dim: int
  quick_gelu: bool
  vision: tuple  # sorted (key, value) items of VISION_DEFAULTS' keys
  text: tuple

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "OpenCLIPConfig":
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
      if key not in config:
        raise ValueError(f"open_clip config: missing {key!r} (have {sorted(config)})")
    _checked("", {k: v for k, v in config.items() if k not in ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")},
             {}, _TOP_FIXED, _TOP_IGNORED)
    vision = _checked("vision_cfg.", config["vision_cfg"], VISION_DEFAULTS, {**_VISION_FIXED, **_COMMON_FIXED},
                      _VISION_IGNORED)
    text = _checked("text_cfg.", config["text_cfg"], TEXT_DEFAULTS, {**_TEXT_FIXED, **_COMMON_FIXED}, _TEXT_IGNORED)
    if vision["image_size"] % vision["patch_size"]:
      raise ValueError(f"open_clip config: vision_cfg.image_size={vision['image_size']} is not a multiple of "
                       f"patch_size={vision['patch_size']}")
    if vision["width"] % vision["head_width"] or text["width"] % text["heads"]:
      raise ValueError("open_clip config: a tower's width does not split into its heads")
    return cls(embed_dim=int(config["embed_dim"]), quick_gelu=bool(config.get("quick_gelu", False)),
               vision=tuple(sorted(vision.items())), text=tuple(sorted(text.items())))

  @property
  def vision_cfg(self) -> dict[str, Any]:
    return dict(self.vision)

  @property
  def text_cfg(self) -> dict[str, Any]:
    return dict(self.text)


class MultiheadAttention(nnx.Module):
  """torch.nn.MultiheadAttention (self-attention): one fused q/k/v projection `in_proj`, then `out_proj`."""

  def __init__(self, width: int, heads: int, *, causal: bool, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.in_proj = Linear(width, 3 * width, axes=("embed", "heads"), **kw)
    self.out_proj = Linear(width, width, axes=("heads", "embed"), **kw)
    self.heads, self.causal = heads, causal

  def __call__(self, x):
    q, k, v = (t.reshape(*x.shape[:2], self.heads, -1) for t in jnp.split(self.in_proj(x), 3, axis=-1))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    return self.out_proj(out.reshape(*x.shape[:2], -1))


class MLP(nnx.Module):
  def __init__(self, width: int, hidden: int, act, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.c_fc = Linear(width, hidden, axes=("embed", "mlp"), **kw)
    self.c_proj = Linear(hidden, width, axes=("mlp", "embed"), **kw)
    self.act = act

  def __call__(self, x):
    return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  def __init__(self, width: int, heads: int, mlp_ratio: float, act, *, causal: bool, opts: Options,
               rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.ln_1 = LayerNorm(width, **kw)
    self.attn = MultiheadAttention(width, heads, causal=causal, opts=opts, rngs=rngs)
    self.ln_2 = LayerNorm(width, **kw)
    self.mlp = MLP(width, int(width * mlp_ratio), act, opts=opts, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act, *, causal: bool,
               opts: Options, rngs: nnx.Rngs):
    self.resblocks = nnx.List([ResidualAttentionBlock(width, heads, mlp_ratio, act, causal=causal, opts=opts,
                                                      rngs=rngs) for _ in range(layers)])

  def __call__(self, x):
    for block in self.resblocks:
      x = block(x)
    return x


class VisionTransformer(nnx.Module):
  """open_clip's `VisionTransformer` (`visual.*`). The stride-p conv `conv1` (no bias) is held as a
  Linear map of flattened (p, p, C) patches; `class_embedding` and `positional_embedding` as tables."""

  def __init__(self, cfg: Mapping[str, Any], embed_dim: int, act, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    width, p = cfg["width"], cfg["patch_size"]
    self.conv1 = Linear(p * p * 3, width, use_bias=False, axes=("conv_in", "embed"), **kw)
    self.class_embedding = Embed(1, width, **kw)
    self.positional_embedding = Embed((cfg["image_size"] // p) ** 2 + 1, width, **kw)
    self.ln_pre = LayerNorm(width, **kw)
    self.transformer = Transformer(width, cfg["layers"], width // cfg["head_width"], cfg["mlp_ratio"], act,
                                   causal=False, opts=opts, rngs=rngs)
    self.ln_post = LayerNorm(width, **kw)
    self.proj = Linear(width, embed_dim, use_bias=False, axes=("embed", "mlp"), **kw)
    self.patch_size, self.image_size = p, cfg["image_size"]

  def __call__(self, pixels):
    b, h, w, c = pixels.shape
    p = self.patch_size
    if (h, w, c) != (self.image_size, self.image_size, 3):
      raise ValueError(f"open_clip vision tower: input {h}x{w}x{c} != {self.image_size}x{self.image_size}x3")
    patches = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    x = self.conv1(patches)
    cls = jnp.broadcast_to(self.class_embedding(jnp.zeros((1,), jnp.int32)), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = self.ln_pre(x + self.positional_embedding(jnp.arange(x.shape[1])))
    return self.proj(self.ln_post(self.transformer(x)[:, 0]))


class OpenCLIP(nnx.Module):
  """open_clip's `CLIP`. `encode_image(pixels (B, S, S, 3) normalised)`, `encode_text(ids (B, T))` → (B, E),
  unnormalised, as open_clip's encode_* with normalize=False."""

  def __init__(self, config: OpenCLIPConfig | Mapping[str, Any], *, options: Options = Options(),
               rngs: nnx.Rngs):
    cfg = config if isinstance(config, OpenCLIPConfig) else OpenCLIPConfig.from_dict(config)
    self.cfg = cfg
    act = ACTIVATIONS["quick_gelu" if cfg.quick_gelu else "gelu"]
    kw = dict(dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs)
    text = cfg.text_cfg
    self.visual = VisionTransformer(cfg.vision_cfg, cfg.embed_dim, act, opts=options, rngs=rngs)
    self.token_embedding = Embed(text["vocab_size"], text["width"], **kw)
    self.positional_embedding = Embed(text["context_length"], text["width"], **kw)
    self.transformer = Transformer(text["width"], text["layers"], text["heads"], text["mlp_ratio"], act,
                                   causal=True, opts=options, rngs=rngs)
    self.ln_final = LayerNorm(text["width"], **kw)
    self.text_projection = Linear(text["width"], cfg.embed_dim, use_bias=False, axes=("embed", "mlp"), **kw)
    self.logit_scale = LogitScale(float(np.log(1 / 0.07)), param_dtype=options.param_dtype)

  def encode_image(self, pixels):
    return self.visual(pixels)

  def encode_text(self, ids):
    x = self.token_embedding(ids) + self.positional_embedding(jnp.arange(ids.shape[-1]))
    x = self.ln_final(self.transformer(x))
    pooled = jnp.take_along_axis(x, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
    return self.text_projection(pooled)


# State-dict keys held under another name: bare tensors become module weights, and
# nn.MultiheadAttention's fused in_proj_{weight,bias} a Linear `in_proj`.
_BARE = ("visual.class_embedding", "visual.positional_embedding", "visual.proj", "positional_embedding",
         "text_projection", "logit_scale")


def _rename(key: str) -> str:
  if key in _BARE:
    return f"{key}.weight"
  return re.sub(r"attn\.in_proj_(weight|bias)$", r"attn.in_proj.\1", key)


def _fix_layout(key: str, value: np.ndarray, want: tuple) -> np.ndarray:
  if key == "visual.conv1.weight":  # (D, C, p, p) → (D, p·p·C), patch order (p, p, C)
    return value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
  if key in ("visual.proj.weight", "text_projection.weight"):  # used as x @ W: (in, out) → torch Linear's (out, in)
    return value.T
  if key == "visual.class_embedding.weight":  # (D,) → (1, D)
    return value.reshape(1, -1)  # a wrong D is left to the shape check
  return value


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """An open_clip state dict from a torch.save file (bare, or under "state_dict" as open_clip's training
  checkpoints and HPS v2 keep it), or from a .safetensors file."""
  path = Path(path)
  if path.suffix == ".safetensors":
    return convert.read_weights(path.parent, path.name.removesuffix(".safetensors"))
  state = torch_pickle.load(path)
  if isinstance(state, Mapping) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, Mapping) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError(f"{path} does not hold a state dict of tensors")
  # DistributedDataParallel training checkpoints prefix every key.
  if state and all(k.startswith("module.") for k in state):
    state = {k.removeprefix("module."): v for k, v in state.items()}
  return dict(state)


def load_open_clip(path: str | os.PathLike, config: Mapping[str, Any] = VIT_H_14, dtype=jnp.float32, *,
                   param_dtype=jnp.float32) -> OpenCLIP:
  """An open_clip model of architecture `config` with the weights of state-dict file `path`."""
  cfg = OpenCLIPConfig.from_dict(config)  # validate before reading any weights
  state = read_state_dict(path)
  if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
    raise ValueError(f"{path} is not an open_clip CLIP state dict (no visual.conv1.weight / "
                     f"token_embedding.weight); its first keys: {sorted(state)[:5]}")
  options = Options(dtype=dtype, param_dtype=param_dtype)
  model = nnx.eval_shape(lambda: OpenCLIP(cfg, options=options, rngs=nnx.Rngs(0)))
  convert.load_state_dict(model, {_rename(k): v for k, v in state.items()}, source=str(path),
                          ignore=[r"(visual\.)?attn_mask"], fix=_fix_layout)
  return model


# --- Tokenizer ---------------------------------------------------------------------------------------------

OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 byte symbols ×2 (+ "</w>"), 48894 merges, 2 specials


def _byte_symbols() -> list[str]:
  """GPT-2 / CLIP byte-level BPE's printable stand-ins for the 256 bytes, in vocabulary order: the printable
  Latin-1 bytes as themselves, then the other bytes, in byte order, as code points 256, 257, ..."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in keep]
  return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def _bpe_file(folder: Path) -> Path | None:
  """open_clip's BPE merges file: beside the checkpoint, else the one inside an installed open_clip
  (located without importing open_clip, which would import torch)."""
  if (folder / OPEN_CLIP_BPE).is_file():
    return folder / OPEN_CLIP_BPE
  spec = importlib.util.find_spec("open_clip")
  for location in (spec.submodule_search_locations or []) if spec else []:
    if (Path(location) / OPEN_CLIP_BPE).is_file():
      return Path(location) / OPEN_CLIP_BPE
  return None


def tokenizer_from_bpe(bpe_path: str | os.PathLike):
  """A transformers CLIPTokenizer with the vocabulary of open_clip's SimpleTokenizer (`bpe_path`: its
  gzipped merges list; the vocabulary is the byte symbols, the same with "</w>", the merged pairs, then
  <|startoftext|> and <|endoftext|>)."""
  from transformers import CLIPTokenizer
  lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:_NUM_MERGES + 1]
  merges = [tuple(line.split()) for line in lines]
  symbols = _byte_symbols()
  tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
            "<|startoftext|>", "<|endoftext|>"]
  return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def load_tokenizer(folder: str | os.PathLike):
  """The CLIP tokenizer for an open_clip checkpoint in `folder`: a transformers CLIP tokenizer saved there
  (tokenizer.json, or vocab.json + merges.txt, e.g. copied from laion/CLIP-ViT-H-14-laion2B-s32B-b79K),
  else open_clip's BPE file (see `_bpe_file`)."""
  from transformers import CLIPTokenizer
  folder = Path(folder)
  if (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
    return CLIPTokenizer.from_pretrained(str(folder))
  bpe = _bpe_file(folder)
  if bpe is None:
    raise FileNotFoundError(f"no CLIP tokenizer for the checkpoint in {folder}: put vocab.json + merges.txt "
                            f"(e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K) or open_clip's {OPEN_CLIP_BPE} "
                            "there, or install open_clip_torch")
  return tokenizer_from_bpe(bpe)


def tokenize(tokenizer, prompts: Sequence[str], context_length: int = 77) -> np.ndarray:
  """open_clip's `tokenize`: <|startoftext|> + BPE tokens + <|endoftext|>, cut to `context_length` (the last
  kept token becomes <|endoftext|>), zero-padded, int32 (N, context_length). Text is cleaned as open_clip
  cleans it (HTML entities unescaped twice, whitespace collapsed, lower case) except for ftfy's repair of
  mis-decoded Unicode."""
  clean = [re.sub(r"\s+", " ", html.unescape(html.unescape(p))).strip().lower() for p in prompts]
  ids = tokenizer(clean, padding="max_length", max_length=context_length, truncation=True,
                  return_tensors="np")["input_ids"].astype(np.int32)
  eot = tokenizer.eos_token_id
  after_eot = np.cumsum(ids == eot, axis=1) - (ids == eot) > 0  # padding: everything after the first EOT
  return np.where(after_eot, 0, ids)
