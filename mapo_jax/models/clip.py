"""The CLIP text transformer (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`) in Flax NNX.

Built from a transformers config.json (`model_type: clip_text_model`); `architectures` says whether the
projection head (`text_projection`, no bias) exists. Attribute names mirror the checkpoint keys
(`text_model.embeddings.token_embedding`, `text_model.encoder.layers.N.self_attn.q_proj`, ...) so
`mapo_jax.convert` maps weights by path. Frozen here: no dropout, no padding mask (the diffusers SD/SDXL
pipelines pass none), only the causal mask.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mapo_jax import convert
from mapo_jax.models.layers import Embed, LayerNorm, Linear
from mapo_jax.models.layers import Options

# transformers' CLIPTextConfig defaults for the options that shape the model (transformers 5).
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers' "gelu" is the erf form
}
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """A validated transformers CLIPTextConfig (other keys of the file are generic and ignored)."""
  raw_json: str  # the config.json contents; a string keeps the dataclass hashable (static under jit)
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  projection_dim: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str
  layer_norm_eps: float
  eos_token_id: int
  with_projection: bool

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    if config.get("model_type", "clip_text_model") != "clip_text_model":
      raise ValueError(f"CLIP text config: unsupported model_type={config['model_type']!r} "
                       "(need 'clip_text_model')")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
      raise ValueError(f"CLIP text config: unsupported architectures={architectures!r} (one of {ARCHITECTURES})")
    c = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in config.items() if k in TRANSFORMERS_DEFAULTS}}
    if c["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"CLIP text config: unsupported hidden_act={c['hidden_act']!r} "
                       f"(supported: {sorted(ACTIVATIONS)})")
    if not isinstance(c["eos_token_id"], int):
      raise ValueError(f"CLIP text config: eos_token_id={c['eos_token_id']!r} must be one int")
    if c["hidden_size"] % c["num_attention_heads"]:
      raise ValueError(f"CLIP text config: hidden_size={c['hidden_size']} does not split into "
                       f"num_attention_heads={c['num_attention_heads']}")
    return cls(raw_json=json.dumps(dict(config), sort_keys=True), **c, with_projection=architectures[0] == "CLIPTextModelWithProjection")


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.token_embedding = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position_embedding = Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

  def __call__(self, input_ids):
    return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[-1]))


class CLIPAttention(nnx.Module):
  """Causal multi-head self-attention with q/k/v/out projections (all with bias)."""

  def __init__(self, cfg: CLIPTextConfig, *, opts: Options, rngs: nnx.Rngs):
    lin = functools.partial(Linear, cfg.hidden_size, cfg.hidden_size, dtype=opts.dtype,
                            param_dtype=opts.param_dtype, rngs=rngs)
    self.k_proj = lin(axes=("embed", "heads"))
    self.v_proj = lin(axes=("embed", "heads"))
    self.q_proj = lin(axes=("embed", "heads"))
    self.out_proj = lin(axes=("heads", "embed"))
    self.heads = cfg.num_attention_heads

  def __call__(self, x):
    split = lambda t: t.reshape(*x.shape[:2], self.heads, -1)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    # jax.nn's function rather than attention.dot_product_attention, which takes no mask; its default
    # (XLA) path softmaxes in float32. 77 tokens make this a negligible share of the work.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out_proj(out.reshape(*x.shape[:2], -1))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.activation = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x):
    return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, cfg: CLIPTextConfig, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(eps=cfg.layer_norm_eps, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(cfg, opts=opts, rngs=rngs)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, **kw)
    self.mlp = CLIPMLP(cfg, opts=opts, rngs=rngs)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, **kw)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, opts: Options, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, opts=opts, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, opts: Options, rngs: nnx.Rngs):
    self.embeddings = CLIPTextEmbeddings(cfg, opts=opts, rngs=rngs)
    self.encoder = CLIPEncoder(cfg, opts=opts, rngs=rngs)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=opts.dtype,
                                      param_dtype=opts.param_dtype, rngs=rngs)
    self.eos_token_id = cfg.eos_token_id

  def __call__(self, input_ids):
    x = self.embeddings(input_ids)
    hidden_states = [x]
    for layer in self.encoder.layers:
      x = layer(x)
      hidden_states.append(x)
    last = self.final_layer_norm(x)
    if self.eos_token_id == 2:
      # Configs written before transformers PR #24773 carry eos_token_id 2: pool at the largest id,
      # which is the EOS token in CLIP's vocabulary.
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # the first EOS (padding may be EOS too)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    return {"last_hidden_state": last, "hidden_states": tuple(hidden_states), "pooler_output": pooled}


class CLIPTextModel(nnx.Module):
  """`CLIPTextModel`, or `CLIPTextModelWithProjection` when the config's architectures say so.

  Call: input_ids (B, T) int → {"last_hidden_state" (B, T, D), "hidden_states" (embeddings output, then
  each layer's output: num_hidden_layers + 1 arrays), "pooler_output" (B, D), and with the projection
  "text_embeds" (B, projection_dim)}.
  """

  def __init__(self, config: Mapping[str, Any] | CLIPTextConfig, *, options: Options = Options(),
               rngs: nnx.Rngs):
    cfg = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)
    self.cfg = cfg
    self.text_model = CLIPTextTransformer(cfg, opts=options, rngs=rngs)
    self.text_projection = (
        Linear(cfg.hidden_size, cfg.projection_dim, use_bias=False, axes=("embed", "mlp"), dtype=options.dtype,
               param_dtype=options.param_dtype, rngs=rngs) if cfg.with_projection else None)

  @property
  def config(self) -> dict[str, Any]:
    """The transformers config dict this model was built from."""
    return json.loads(self.cfg.raw_json)

  def __call__(self, input_ids: jax.Array) -> dict[str, Any]:
    out = self.text_model(input_ids)
    if self.text_projection is not None:
      out["text_embeds"] = self.text_projection(out["pooler_output"])
    return out


def _checkpoint_key(key: str) -> str:
  # transformers 5 saves a bare CLIPTextModel without the `text_model.` prefix the hub files carry.
  return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def load_text_encoder(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
                      variant: str | None = None, subfolder: str = "text_encoder") -> CLIPTextModel:
  """Loads a transformers CLIP text-model folder (or a pipeline folder's `subfolder`) without PyTorch."""
  folder = convert.model_folder(path, subfolder)
  cfg = CLIPTextConfig.from_dict(convert.read_config(folder))  # validate before reading any weights
  options = Options(dtype=dtype, param_dtype=param_dtype)
  # Older files keep the non-persistent `position_ids` buffer.
  return convert.load_model(folder, lambda: CLIPTextModel(cfg, options=options, rngs=nnx.Rngs(0)),
                            stem=convert.TRANSFORMERS_STEM, variant=variant, rename=_checkpoint_key,
                            ignore=[r"text_model\.embeddings\.position_ids"])


def save_text_encoder(encoder: CLIPTextModel, out_dir: str | os.PathLike, *, dtype: str | None = None):
  """Writes a transformers folder that `CLIPTextModel(WithProjection).from_pretrained` loads."""
  return convert.save_model(encoder, out_dir, encoder.config, stem=convert.TRANSFORMERS_STEM, dtype=dtype)
