"""The T5 text encoder (transformers' `T5EncoderModel`) in Flax NNX: FLUX.1's `text_encoder_2` and SD3's
`text_encoder_3` (T5 v1.1 XXL), built from the checkpoint's own config.json (`model_type: t5`).

The facts this file relies on, read from transformers 5 (models/t5/):
  configuration_t5.py  T5Config: defaults (TRANSFORMERS_DEFAULTS below); `feed_forward_proj` is "ACT" or
    "gated-ACT", giving `dense_act_fn` = ACT ("gated-gelu" -> "gelu_new", the tanh approximation) and
    `is_gated_act`; `dense_act_fn` / `is_gated_act` stored in the file override the derived ones (they are
    applied after the derivation). `tie_word_embeddings` is forced True.
  modeling_t5.py
    T5EncoderModel: `shared` (nn.Embedding) and `encoder` (T5Stack); `encoder.embed_tokens` is tied to
      `shared` (`_tied_weights_keys`), `save_pretrained` writes `shared.weight` only. When a file holds both
      keys, the two are loaded untied and the encoder computes with `encoder.embed_tokens.weight`.
      `decoder.*` keys (a T5ForConditionalGeneration file) are ignored (`_keys_to_ignore_on_load_unexpected`).
    T5Stack: embed_tokens -> `block.N` -> `final_layer_norm`; the position bias is computed once, by block 0
      (the only one with `relative_attention_bias`), and shared by every block.
    T5Block: `layer.0` T5LayerSelfAttention (x + SelfAttention(layer_norm(x))), `layer.1` T5LayerFF
      (x + DenseReluDense(layer_norm(x))); pre-norm residual blocks.
    T5Attention: q/k/v/o linears without bias (inner width num_heads · d_kv, which may differ from d_model);
      scores q·kᵀ NOT scaled (`scaling = 1.0`) plus the position bias; encoder buckets are bidirectional
      (`_relative_position_bucket`: half the buckets for keys after the query; of each half, the first
      half exact distances, the rest log-spaced up to `relative_attention_max_distance`, computed in
      float32 and truncated; beyond it, the last bucket).
    T5DenseGatedActDense: wo(act(wi_0 x) · wi_1 x); T5DenseActDense: wo(act(wi x)); no bias.
    T5LayerNorm: RMSNorm, x · rsqrt(mean(x²) + layer_norm_epsilon) · weight, statistics in float32.
    `_keep_in_fp32_modules = ["wo"]` and the float16 clamps in T5Block: T5 v1.1's feed-forward outputs
      overflow float16 (transformers issue #20287).
  diffusers FluxPipeline / StableDiffusion3Pipeline `_get_t5_prompt_embeds` call the encoder on
    `padding="max_length", truncation=True` ids WITHOUT an attention mask: padding tokens attend and are
    attended to. This model takes no mask either (`tokenize` below makes the same ids).

Precision: parameters in `param_dtype`, matmuls in `dtype`; the residual stream, the norms, the attention
logits (with the position bias) and the softmax are float32. With `dtype` float16, `wo` computes in float32
as transformers keeps it (its outputs overflow float16); bfloat16 has float32's range.

Config: keys that shape or change the computation are read (with transformers' defaults); the other keys of
a transformers config (generic PretrainedConfig attributes, dropout, initialiser and decoder settings, legacy
keys such as `output_past`) do not affect the encoder's forward pass and are ignored, as transformers itself
accepts any extra key. `is_decoder: true` (a causal stack with cross-attention) fails.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import convert, sharding
from mapo_jax.models.layers import Embed, Linear, Options, RMSNorm, fan_in_normal, remat_call

# transformers' T5Config defaults for the options that shape the encoder (transformers 5).
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
# transformers' ACT2FN entries (activations.py) we implement; the tanh forms are one formula.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # the erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
# T5EncoderModel, or a whole T5 whose encoder is read (its decoder.* and lm_head keys are skipped).
ARCHITECTURES = ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """A validated transformers T5Config, as the encoder uses it."""
  raw_json: str  # the config.json contents; a string keeps the dataclass hashable (static under jit)
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int
  relative_attention_max_distance: int
  layer_norm_epsilon: float
  feed_forward_proj: str
  dense_act_fn: str
  is_gated_act: bool

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "T5Config":
    if config.get("model_type", "t5") != "t5":
      raise ValueError(f"T5 config: unsupported model_type={config['model_type']!r} (need 't5')")
    architectures = config.get("architectures") or ["T5EncoderModel"]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
      raise ValueError(f"T5 config: unsupported architectures={architectures!r} (one of {ARCHITECTURES})")
    if config.get("is_decoder", False):
      raise ValueError("T5 config: is_decoder=True (a causal decoder stack) is not supported")
    c = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in config.items() if k in TRANSFORMERS_DEFAULTS}}
    # T5Config.__post_init__ / validate_architecture: "ACT" or "gated-ACT"; "gated-gelu" means gelu_new.
    parts = str(c["feed_forward_proj"]).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"T5 config: feed_forward_proj={c['feed_forward_proj']!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if c["feed_forward_proj"] == "gated-gelu" else parts[-1]
    act = config.get("dense_act_fn", act)  # a stored value wins, as in transformers
    gated = bool(config.get("is_gated_act", parts[0] == "gated"))
    if act not in ACTIVATIONS:
      key = "dense_act_fn" if "dense_act_fn" in config else "feed_forward_proj"
      raise ValueError(f"T5 config: unsupported activation {act!r} (from {key}; supported: {sorted(ACTIVATIONS)})")
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "relative_attention_max_distance"):
      if not isinstance(c[key], int) or c[key] < 1:
        raise ValueError(f"T5 config: {key}={c[key]!r} must be a positive int")
    if not isinstance(c["num_layers"], int) or c["num_layers"] < 0:
      raise ValueError(f"T5 config: num_layers={c['num_layers']!r} must be an int >= 0")
    # Bidirectional buckets: half per direction, half of those exact; fewer than 4 leaves no exact bucket
    # and transformers' log-bucket formula divides by zero.
    if not isinstance(c["relative_attention_num_buckets"], int) or c["relative_attention_num_buckets"] < 4:
      raise ValueError(f"T5 config: relative_attention_num_buckets={c['relative_attention_num_buckets']!r} "
                       "must be an int >= 4")
    return cls(raw_json=json.dumps(dict(config), sort_keys=True), **c, dense_act_fn=act, is_gated_act=gated)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """(query_length, key_length) int32 bucket of each relative position `key - query`, bidirectional, as
  transformers' `T5Attention._relative_position_bucket` computes it: the log-spaced buckets in float32 and
  truncated, so the exact rounding (e.g. at distances 16, 32, 64 with the defaults) is the same.

  Static (numpy): the positions depend on the sequence length only. Raises where transformers' table lookup
  fails (a max_distance no larger than the exact buckets makes the log-bucket formula infinite or NaN)."""
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  max_exact = half // 2
  distance = np.abs(relative)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  # float -> int truncates toward zero, as torch's .to(long); a non-finite value becomes out of range.
  large = max_exact + np.where(np.isfinite(scaled), scaled, np.float32(-2**62)).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets = (relative > 0) * half + np.where(distance < max_exact, distance, large)
  if buckets.size and (buckets.min() < 0 or buckets.max() >= num_buckets):
    raise ValueError(f"T5: relative_attention_max_distance={max_distance} with relative_attention_num_buckets="
                     f"{num_buckets} gives no valid bucket for distances >= {max_exact} (transformers fails too)")
  return buckets.astype(np.int32)


class RelativeAttentionBias(nnx.Module):
  """The (num_buckets, num_heads) table of learnt position biases (transformers' nn.Embedding)."""

  def __init__(self, num_buckets: int, num_heads: int, d_model: int, *, param_dtype, rngs: nnx.Rngs):
    init = fan_in_normal(math.sqrt(num_buckets / d_model))  # N(0, 1/d_model), transformers' initialisation
    # The heads axis follows the attention heads' sharding, so each device's logits get their own biases.
    self.embedding = nnx.Param(init(rngs.params(), (num_buckets, num_heads), param_dtype), axes=(None, "heads"))

  def __call__(self, buckets: np.ndarray) -> jax.Array:
    """(H, Lq, Lk) float32 biases for a (Lq, Lk) table of buckets."""
    return jnp.take(self.embedding[...].astype(jnp.float32), jnp.asarray(buckets), axis=0).transpose(2, 0, 1)


class T5Attention(nnx.Module):
  """Unmasked self-attention: softmax(q kᵀ + position_bias) v, no 1/√d (the scale is learnt into q)."""

  def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, opts: Options, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    lin = functools.partial(Linear, use_bias=False, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.q = lin(cfg.d_model, inner, axes=("embed", "heads"))
    self.k = lin(cfg.d_model, inner, axes=("embed", "heads"))
    self.v = lin(cfg.d_model, inner, axes=("embed", "heads"))
    self.o = lin(inner, cfg.d_model, axes=("heads", "embed"))
    self.relative_attention_bias = (
        RelativeAttentionBias(cfg.relative_attention_num_buckets, cfg.num_heads, cfg.d_model,
                              param_dtype=opts.param_dtype, rngs=rngs) if has_relative_attention_bias else None)
    self.heads, self.dtype = cfg.num_heads, opts.dtype

  def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
    # Not models/attention.py: its kernels scale by 1/√d and add no bias.
    split = lambda t: t.reshape(*x.shape[:2], self.heads, -1)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.o(out.reshape(*x.shape[:2], -1))


class T5LayerSelfAttention(nnx.Module):
  def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, opts: Options, rngs: nnx.Rngs):
    self.SelfAttention = T5Attention(cfg, has_relative_attention_bias=has_relative_attention_bias, opts=opts,
                                     rngs=rngs)
    self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=opts.dtype,
                              param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x, position_bias):
    return x + self.SelfAttention(self.layer_norm(x), position_bias).astype(jnp.float32)


class T5DenseActDense(nnx.Module):
  """Original T5 (`feed_forward_proj: relu`): wo(act(wi x))."""

  def __init__(self, cfg: T5Config, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(use_bias=False, param_dtype=opts.param_dtype, rngs=rngs)
    self.wi = Linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), dtype=opts.dtype, **kw)
    self.wo = Linear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), dtype=_wo_dtype(opts.dtype), **kw)
    self.act = ACTIVATIONS[cfg.dense_act_fn]

  def __call__(self, x):
    return self.wo(self.act(self.wi(x).astype(jnp.float32)))


class T5DenseGatedActDense(nnx.Module):
  """T5 v1.1 (`feed_forward_proj: gated-gelu`): wo(act(wi_0 x) · wi_1 x)."""

  def __init__(self, cfg: T5Config, *, opts: Options, rngs: nnx.Rngs):
    kw = dict(use_bias=False, param_dtype=opts.param_dtype, rngs=rngs)
    self.wi_0 = Linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), dtype=opts.dtype, **kw)
    self.wi_1 = Linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), dtype=opts.dtype, **kw)
    self.wo = Linear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), dtype=_wo_dtype(opts.dtype), **kw)
    self.act = ACTIVATIONS[cfg.dense_act_fn]

  def __call__(self, x):
    # The elementwise gate in float32 (fused by XLA; rounds once, into wo's input).
    return self.wo(self.act(self.wi_0(x).astype(jnp.float32)) * self.wi_1(x).astype(jnp.float32))


def _wo_dtype(dtype):
  # transformers keeps `wo` in float32 (_keep_in_fp32_modules): T5 v1.1's outputs there overflow float16.
  return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


class T5LayerFF(nnx.Module):
  def __init__(self, cfg: T5Config, *, opts: Options, rngs: nnx.Rngs):
    cls = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
    self.DenseReluDense = cls(cfg, opts=opts, rngs=rngs)
    self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=opts.dtype,
                              param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x):
    return x + self.DenseReluDense(self.layer_norm(x)).astype(jnp.float32)


class T5Block(nnx.Module):
  """`layer.0` self-attention, `layer.1` feed-forward. Every block is called alike: block 0 only stores the
  position-bias table, which the stack reads before the loop (transformers computes it in block 0 and
  passes it on)."""

  def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, opts: Options, rngs: nnx.Rngs):
    self.layer = nnx.List([
        T5LayerSelfAttention(cfg, has_relative_attention_bias=has_relative_attention_bias, opts=opts, rngs=rngs),
        T5LayerFF(cfg, opts=opts, rngs=rngs)])

  def __call__(self, x, position_bias):
    return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nnx.Module):
  def __init__(self, cfg: T5Config, *, opts: Options, rngs: nnx.Rngs):
    self.block = nnx.List([T5Block(cfg, has_relative_attention_bias=i == 0, opts=opts, rngs=rngs)
                           for i in range(cfg.num_layers)])
    self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=opts.dtype,
                                    param_dtype=opts.param_dtype, rngs=rngs)
    self.num_buckets = cfg.relative_attention_num_buckets
    self.max_distance = cfg.relative_attention_max_distance
    self.remat = opts.remat

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, L, d_model) float32 embeddings → the final-norm output in the compute dtype."""
    if len(self.block):
      length = x.shape[1]
      buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
      position_bias = self.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)[None]
      for block in self.block:
        x = remat_call(block, self.remat, x, position_bias)
    return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
  """transformers' `T5EncoderModel`. Call: input_ids (B, L) int → {"last_hidden_state": (B, L, d_model)} in
  the compute dtype. No attention mask (as the FLUX / SD3 pipelines call it). `options.attention` is unused:
  T5's attention adds a position bias and does not scale, which the fused kernels do not do."""

  def __init__(self, config: Mapping[str, Any] | T5Config, *, options: Options = Options(), rngs: nnx.Rngs):
    cfg = config if isinstance(config, T5Config) else T5Config.from_dict(config)
    self.cfg = cfg
    # float32 output: the residual stream starts in float32 whatever the compute dtype.
    self.shared = Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=options.param_dtype,
                        rngs=rngs)
    self.encoder = T5Stack(cfg, opts=options, rngs=rngs)

  @property
  def config(self) -> dict[str, Any]:
    """The transformers config dict this model was built from."""
    return json.loads(self.cfg.raw_json)

  def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
    return {"last_hidden_state": self.encoder(self.shared(input_ids))}


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
  """(B, max_length) int32 ids as diffusers' FluxPipeline / StableDiffusion3Pipeline `_get_t5_prompt_embeds`
  make them (FLUX max_sequence_length 512 by default, SD3 256): special tokens (the closing `</s>`),
  truncated, padded with `<pad>` to max_length."""
  ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  add_special_tokens=True, return_tensors="np").input_ids
  return np.asarray(ids, np.int32)


def init_t5_encoder(config: Mapping[str, Any], *, options: Options = Options(), seed: int = 0) -> T5EncoderModel:
  """A randomly initialised encoder (benchmarks, tests), created in one compiled program."""
  cfg = T5Config.from_dict(config)
  return nnx.jit(lambda: T5EncoderModel(cfg, options=options, rngs=nnx.Rngs(seed)))()


def load_t5_encoder(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
                    variant: str | None = None, mesh=None, remat: str = "none",
                    subfolder: str = "text_encoder_2") -> T5EncoderModel:
  """Loads a transformers T5 folder (config.json and model.safetensors, or shards with
  model.safetensors.index.json), or a pipeline folder's `subfolder` (FLUX: text_encoder_2, SD3:
  text_encoder_3), without PyTorch.

  The embeddings come from `encoder.embed_tokens.weight` when the file has it (what transformers' encoder
  computes with), else from `shared.weight`. With `mesh`, every parameter is born sharded by the
  logical-axis rules (each device reads only its block, cast to `param_dtype` on the host)."""
  folder = convert.model_folder(path, subfolder)
  cfg = T5Config.from_dict(convert.read_config(folder))  # validate before reading any weights
  options = Options(dtype=dtype, param_dtype=param_dtype, remat=remat)
  with convert.open_weights(folder, convert.TRANSFORMERS_STEM, variant) as weights:  # headers only
    own_embeddings = "encoder.embed_tokens.weight" in weights
  rename = None
  if own_embeddings:
    tied = {"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "shared.weight:unused"}
    rename = lambda key: tied.get(key, key)
  shardings = None if mesh is None else functools.partial(sharding.model_shardings, mesh=mesh)
  return convert.load_model(
      folder, lambda: T5EncoderModel(cfg, options=options, rngs=nnx.Rngs(0)), stem=convert.TRANSFORMERS_STEM,
      variant=variant, rename=rename, ignore=[r"shared\.weight:unused", r"decoder\..*", r"lm_head\.weight"],
      shardings=shardings)


def save_t5_encoder(model: T5EncoderModel, out_dir: str | os.PathLike, dtype: str | None = None):
  """Writes a transformers folder that `T5EncoderModel.from_pretrained` loads with no missing or unexpected
  keys: config.json (architectures T5EncoderModel) and `shared.weight` plus the encoder's weights, the
  layout transformers' save_pretrained writes. `dtype`: fp32, fp16 or bf16 (default: as stored)."""
  config = {**model.config, "architectures": ["T5EncoderModel"]}
  return convert.save_model(model, out_dir, config, stem=convert.TRANSFORMERS_STEM, dtype=dtype)
