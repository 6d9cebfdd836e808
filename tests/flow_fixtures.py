"""Shared fixtures of the flow-matching models and pipelines (FLUX.1, ...): tiny random reference models
built with diffusers / transformers and the inputs their pipelines build."""
from __future__ import annotations


# --- FLUX.1 transformer (tests/test_flux_transformer.py) ------------------------------------------------------

def make_diffusers_flux_transformer(config, path=None, seed=0, scale=0.05):
  """A diffusers FluxTransformer2DModel from `config` with every parameter perturbed (its zero-initialised
  proj_out and AdaLN linears then matter), saved to `path` if given; returns the torch model (eval mode)."""
  import torch
  from diffusers import FluxTransformer2DModel
  from conftest import perturb_
  torch.manual_seed(seed)
  model = perturb_(FluxTransformer2DModel(**config), seed, scale=scale).eval()
  if path is not None:
    model.save_pretrained(path)
  return model


def flux_transformer_inputs(config, seed, *, batch=2, height=3, width=5, tokens=7):
  """Random float32 inputs of a FLUX transformer as FluxPipeline builds them: packed latents of a
  height x width token grid with their image ids, text states with zero text ids, pooled text, sigmas in
  (0, 1] and, for guidance_embeds configs, guidance scales. Returns a dict of numpy arrays keyed like the call."""
  import numpy as np
  from mapo_jax.models.flux import latent_image_ids
  rng = np.random.default_rng(seed)
  out_of = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  inputs = dict(
      hidden_states=out_of(batch, height * width, config["in_channels"]),
      encoder_hidden_states=out_of(batch, tokens, config["joint_attention_dim"]),
      pooled_projections=out_of(batch, config["pooled_projection_dim"]),
      timestep=rng.uniform(0.05, 1.0, batch).astype(np.float32),
      img_ids=latent_image_ids(height, width), txt_ids=np.zeros((tokens, 3), np.float32))
  if config.get("guidance_embeds"):
    inputs["guidance"] = rng.uniform(1.0, 5.0, batch).astype(np.float32)
  return inputs


# --- T5 text encoder (tests/test_t5.py; FLUX's text_encoder_2, SD3's text_encoder_3) ---------------------------

# A Unigram vocabulary laid out as T5's: <pad> 0, </s> 1, <unk> 2, then pieces ("▁" marks a word start), then
# the sentinels in reverse order, as in the real 32100-token vocabulary. Single letters cover any lowercase text.
T5_SENTINELS = 2
T5_VOCAB = (
    [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    + [(f"▁{w}", -3.0) for w in ("a", "the", "red", "cat", "dog", "on", "of", "photo", "blue", "sky")]
    + [("at", -4.0), ("og", -4.0), ("ed", -4.0), ("▁ca", -4.5)]
    + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_SENTINELS))])
# T5 v1.1 (gated-GELU) at toy size; vocab_size = the tiny tokenizer's size.
TINY_T5 = dict(vocab_size=len(T5_VOCAB), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)


def make_t5_tokenizer(folder):
  """A tiny T5TokenizerFast (T5_VOCAB, Unigram) built offline, saved to `folder` with save_pretrained and
  loaded back from it with T5TokenizerFast.from_pretrained."""
  from transformers import T5TokenizerFast
  tokenizer = T5TokenizerFast(vocab=list(T5_VOCAB), extra_ids=T5_SENTINELS, model_max_length=512)
  tokenizer.save_pretrained(folder)
  return T5TokenizerFast.from_pretrained(folder)


def make_t5_encoder(folder, config=TINY_T5, seed=0, scale=0.05):
  """A random transformers T5EncoderModel from `config` (T5Config keywords) with every parameter perturbed
  (its all-ones norm weights then matter), saved to `folder` if given; returns the torch model (eval mode)."""
  import torch
  from transformers import T5Config, T5EncoderModel
  from conftest import perturb_
  torch.manual_seed(seed)
  model = perturb_(T5EncoderModel(T5Config(**config)), seed, scale=scale).eval()
  if folder is not None:
    model.save_pretrained(folder)
  return model


# --- SD3 / SD3.5 transformer (tests/test_sd3_transformer.py) ------------------------------------------------------

def make_diffusers_sd3_transformer(config, path=None, seed=0, scale=0.05):
  """A diffusers SD3Transformer2DModel from `config` with every parameter perturbed (its zero-initialised
  adaLN and output layers then matter), saved to `path` if given; returns the torch model (eval mode)."""
  import torch
  from diffusers import SD3Transformer2DModel
  from conftest import perturb_
  torch.manual_seed(seed)
  model = perturb_(SD3Transformer2DModel(**config), seed, scale=scale).eval()
  if path is not None:
    model.save_pretrained(path)
  return model


def sd3_transformer_inputs(config, seed, *, batch=2, height=8, width=8, tokens=5):
  """Random float32 inputs of an SD3 transformer as StableDiffusion3Pipeline passes them: NHWC latents, text
  states, pooled text and timesteps sigma · 1000. Returns a dict of numpy arrays keyed like the call."""
  import numpy as np
  rng = np.random.default_rng(seed)
  out_of = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return dict(hidden_states=out_of(batch, height, width, config["in_channels"]),
              encoder_hidden_states=out_of(batch, tokens, config["joint_attention_dim"]),
              pooled_projections=out_of(batch, config["pooled_projection_dim"]),
              timestep=(1000 * rng.uniform(0.05, 1.0, batch)).astype(np.float32))


def sd3_transformer_torch(model, inputs):
  """The diffusers transformer's output on `inputs` (numpy, NHWC), as NHWC numpy."""
  import torch
  args = {k: torch.tensor(v) for k, v in inputs.items()}
  args["hidden_states"] = args["hidden_states"].permute(0, 3, 1, 2)
  with torch.no_grad():
    out = model(**args).sample
  return out.permute(0, 2, 3, 1).numpy()


# --- SD3 / SD3.5 pipeline (tests/test_sd3_pipeline.py) ------------------------------------------------------------

# SD3's three text towers at toy size. CLIP-L (quick_gelu, legacy eos_token_id 2: argmax pooling) and CLIP-G (gelu,
# the real EOS id: first-EOS pooling), both with projections (pooled 8 + 12 = 20); their penultimate states (8 + 16
# = 24 wide) are zero-padded to T5's width 32, which is the transformer's joint_attention_dim.
SD3_CLIP_L = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=8, bos_token_id=0,
                  pad_token_id=1, eos_token_id=2)
SD3_CLIP_G = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=12)
# SD3.5's VAE layout: 16 latent channels, no quant convs, its shift and scaling factors; four blocks (8x down).
SD3_VAE = dict(block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
               sample_size=64, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)


def sd3_pipeline_transformer(config):
  """A tiny SD3 transformer config (presets.TINY_SD3_TRANSFORMER / TINY_SD35_TRANSFORMER) fitted to the tiny
  pipeline's towers and VAE: 16 latent channels, T5's width, the two towers' pooled width."""
  return dict(config, in_channels=16, out_channels=16, joint_attention_dim=TINY_T5["d_model"],
              pooled_projection_dim=SD3_CLIP_L["projection_dim"] + SD3_CLIP_G["projection_dim"])


def save_sd3_pipeline(path, transformer_config, *, t5=True, scheduler_config=None, seed=0, scale=0.2):
  """Saves a random StableDiffusion3Pipeline folder with diffusers' own save_pretrained and returns the torch
  pipeline. `t5=False` leaves text_encoder_3 / tokenizer_3 out (diffusers then feeds zeros in T5's place).
  `scheduler_config`: FlowMatchEulerDiscreteScheduler keywords (default: SD3.5's published config)."""
  import torch
  from conftest import make_clip_text_model, make_clip_tokenizer, make_diffusers_vae
  from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
  from mapo_jax.pipelines import sd3
  tokenizer = make_clip_tokenizer(f"{path}/tokenizer")
  tokenizer_2 = make_clip_tokenizer(f"{path}/tokenizer_2", pad_token="!")  # SD3's CLIP-G pads with "!"
  eos = tokenizer.eos_token_id
  text_encoder = make_clip_text_model({**SD3_CLIP_L, "vocab_size": len(tokenizer)}, projection=True, seed=seed)
  text_encoder_2 = make_clip_text_model(
      {**SD3_CLIP_G, "vocab_size": len(tokenizer), "bos_token_id": eos - 1, "eos_token_id": eos, "pad_token_id": 0},
      projection=True, seed=seed + 1)
  tokenizer_3 = make_t5_tokenizer(f"{path}/tokenizer_3") if t5 else None
  text_encoder_3 = make_t5_encoder(None, seed=seed + 2) if t5 else None
  transformer = make_diffusers_sd3_transformer(transformer_config, seed=seed + 3, scale=scale)
  scheduler = FlowMatchEulerDiscreteScheduler.from_config(
      dict(sd3.SCHEDULER_CONFIG) if scheduler_config is None else scheduler_config)
  torch.manual_seed(seed)
  pipe = StableDiffusion3Pipeline(
      transformer=transformer, scheduler=scheduler, vae=make_diffusers_vae(SD3_VAE, seed + 4),
      text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
      text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
  pipe.save_pretrained(path)
  pipe.set_progress_bar_config(disable=True)
  return pipe


# --- FLUX.1 pipeline folders (tests/test_flux_pipeline.py) -------------------------------------------------------

# FLUX.1's VAE layout at toy size: 16 latent channels, four blocks (latents 1/8 of the image), no quant convs, the
# published scaling and shift factors.
TINY_FLUX_VAE = dict(
    block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
    sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def make_tiny_flux_pipeline(path, *, guidance_embeds=True, seed=0, scale=0.2):
  """A random FluxPipeline folder written by diffusers' own `FluxPipeline(...).save_pretrained(path)`: the tiny
  pipeline transformer preset (dev-like with `guidance_embeds`, else schnell-like) sized to a tiny CLIP tower
  (conftest TINY_CLIP_L: pooled width 16) and TINY_T5 (width 32), TINY_FLUX_VAE, and FLUX.1-dev's or -schnell's
  scheduler config. Every parameter is perturbed (`scale` for the transformer, so its zero-initialised output
  layers move the latents). Returns the torch pipeline (eval mode)."""
  from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
  from conftest import TINY_CLIP_L, make_clip_text_model, make_clip_tokenizer, make_diffusers_vae
  from mapo_jax.models.presets import TINY_FLUX_PIPELINE_TRANSFORMER
  from mapo_jax.pipelines import flux
  tokenizer = make_clip_tokenizer(f"{path}/tokenizer")
  text_encoder = make_clip_text_model({**TINY_CLIP_L, "vocab_size": len(tokenizer)}, seed=seed)
  config = dict(TINY_FLUX_PIPELINE_TRANSFORMER, guidance_embeds=guidance_embeds,
                joint_attention_dim=TINY_T5["d_model"], pooled_projection_dim=TINY_CLIP_L["hidden_size"])
  scheduler = flux.SCHEDULER_CONFIG if guidance_embeds else flux.SCHNELL_SCHEDULER_CONFIG
  pipe = FluxPipeline(
      scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler), vae=make_diffusers_vae(TINY_FLUX_VAE, seed + 1),
      text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=make_t5_encoder(None, seed=seed + 2),
      tokenizer_2=make_t5_tokenizer(f"{path}/tokenizer_2"),
      transformer=make_diffusers_flux_transformer(config, seed=seed + 3, scale=scale))
  pipe.save_pretrained(path)
  pipe.set_progress_bar_config(disable=True)
  return pipe
