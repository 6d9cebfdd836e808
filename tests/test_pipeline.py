"""load_pipeline and prompt encoding against diffusers' SDXL and SD pipelines on tiny random folders."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import (TINY_CLIP_L, TINY_SD15_UNET, TINY_VAE, make_clip_text_model, make_clip_tokenizer,
                      make_diffusers_vae, perturb_, rel_l2, sdxl_scheduler)
from mapo_jax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from mapo_jax.pipelines import load_pipeline
from mapo_jax.pipelines.sd import encode_prompts, encode_uncond, tokenize

# One batch size throughout, so each pipeline's prompt encoder compiles once. The last caption is longer
# than 77 tokens (truncated, EOS kept).
CAPTIONS = ["a cat", "the red dog!", "", "zebra on the red cat, " * 20]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_pipeline_dir):
  from diffusers import StableDiffusionXLPipeline
  return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir), load_pipeline(tiny_sdxl_pipeline_dir)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  """A tiny SD-1.5-layout pipeline: one CLIP tower, no *_2 components."""
  from diffusers import StableDiffusionPipeline, UNet2DConditionModel as TorchUNet
  path = tmp_path_factory.mktemp("tiny_sd15_pipeline")
  tokenizer = make_clip_tokenizer(path / "tokenizer")
  torch.manual_seed(0)
  ref = StableDiffusionPipeline(
      vae=make_diffusers_vae(TINY_VAE),
      text_encoder=make_clip_text_model({**TINY_CLIP_L, "hidden_size": 40, "num_attention_heads": 4,
                                         "vocab_size": len(tokenizer)}),
      tokenizer=tokenizer, unet=perturb_(TorchUNet(**TINY_SD15_UNET)).eval(), scheduler=sdxl_scheduler(),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  ref.save_pretrained(path)
  return ref, load_pipeline(path)


def test_sdxl_components(sdxl, tiny_sdxl_pipeline_dir):
  _, pipe = sdxl
  assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
  assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.text_encoder.text_projection is None
  assert pipe.text_encoder_2.text_projection is not None
  assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
  assert pipe.towers == ("text_encoder", "text_encoder_2")
  assert pipe.scheduler_config == json.loads((tiny_sdxl_pipeline_dir / "scheduler" / "scheduler_config.json")
                                             .read_text())
  assert pipe.vae.config["scaling_factor"] == 0.13025


def test_tokenize_matches_the_tokenizers(sdxl):
  ref, pipe = sdxl
  ids = tokenize(pipe, CAPTIONS)
  assert set(ids) == {"text_encoder", "text_encoder_2"}
  for name, tokenizer in (("text_encoder", ref.tokenizer), ("text_encoder_2", ref.tokenizer_2)):
    expected = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[name].dtype == np.int32
    np.testing.assert_array_equal(ids[name], expected)


def test_sdxl_prompts_match_diffusers(sdxl):
  ref, pipe = sdxl
  with torch.no_grad():
    prompt_embeds, _, pooled, _ = ref.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
  out = encode_prompts(pipe, CAPTIONS)
  assert out["prompt_embeds"].shape == (4, 77, 16 + 32) and out["pooled_prompt_embeds"].shape == (4, 32)
  assert rel_l2(out["prompt_embeds"], prompt_embeds.numpy()) <= 1e-5
  assert rel_l2(out["pooled_prompt_embeds"], pooled.numpy()) <= 1e-5


def test_sdxl_negative_embeddings_match_diffusers(sdxl, monkeypatch):
  ref, pipe = sdxl
  negatives = ["blurry", "", "a dog", "ugly cat"]
  with torch.no_grad():
    _, zeros, _, zeros_pooled = ref.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=True)
    _, neg, _, neg_pooled = ref.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=True,
                                              negative_prompt=negatives)
    ref.register_to_config(force_zeros_for_empty_prompt=False)
    try:
      _, empty, _, empty_pooled = ref.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=True)
    finally:
      ref.register_to_config(force_zeros_for_empty_prompt=True)
  assert not zeros.any() and not zeros_pooled.any()  # force_zeros_for_empty_prompt (SDXL base)
  uncond = encode_uncond(pipe, 4)
  assert uncond["prompt_embeds"].shape == zeros.shape and uncond["pooled_prompt_embeds"].shape == zeros_pooled.shape
  assert not np.asarray(uncond["prompt_embeds"]).any() and not np.asarray(uncond["pooled_prompt_embeds"]).any()
  explicit = encode_prompts(pipe, negatives)
  assert rel_l2(explicit["prompt_embeds"], neg.numpy()) <= 1e-5
  assert rel_l2(explicit["pooled_prompt_embeds"], neg_pooled.numpy()) <= 1e-5
  monkeypatch.setitem(pipe.model_index, "force_zeros_for_empty_prompt", False)
  uncond = encode_uncond(pipe, 4)
  assert rel_l2(uncond["prompt_embeds"], empty.numpy()) <= 1e-5
  assert rel_l2(uncond["pooled_prompt_embeds"], empty_pooled.numpy()) <= 1e-5


def test_sd15_prompts_match_diffusers(sd15):
  ref, pipe = sd15
  assert pipe.text_encoder_2 is None and pipe.tokenizer_2 is None and pipe.towers == ("text_encoder",)
  ids = ref.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    prompt_embeds, empty = ref.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True)
    pooled = ref.text_encoder(ids).pooler_output
  out = encode_prompts(pipe, CAPTIONS)
  assert out["prompt_embeds"].shape == (4, 77, 40) and out["pooled_prompt_embeds"].shape == (4, 40)
  assert rel_l2(out["prompt_embeds"], prompt_embeds.numpy()) <= 1e-5
  assert rel_l2(out["pooled_prompt_embeds"], pooled.numpy()) <= 1e-5
  assert rel_l2(encode_uncond(pipe, 4)["prompt_embeds"], empty.numpy()) <= 1e-5  # SD encodes "" (no zeros)


def test_components_and_dtype_options(sdxl, tiny_sdxl_pipeline_dir):
  _, full = sdxl
  pipe = load_pipeline(tiny_sdxl_pipeline_dir, components=("unet", "text_encoder", "text_encoder_2", "tokenizer",
                                                           "tokenizer_2"),
                       unet_kwargs=dict(dtype=jnp.bfloat16, remat="full"),
                       text_encoder_kwargs=dict(dtype=jnp.bfloat16))
  assert pipe.vae is None and pipe.scheduler_config is None
  assert pipe.unet.options.dtype == jnp.bfloat16 and pipe.unet.options.remat == "full"
  out, ref = encode_prompts(pipe, CAPTIONS), encode_prompts(full, CAPTIONS)
  assert out["prompt_embeds"].dtype == jnp.bfloat16
  assert rel_l2(out["prompt_embeds"].astype(jnp.float32), ref["prompt_embeds"]) <= 2e-2


def test_component_errors(tiny_sdxl_pipeline_dir):
  with pytest.raises(ValueError, match="unet2"):
    load_pipeline(tiny_sdxl_pipeline_dir, components=("unet2",))
  pipe = load_pipeline(tiny_sdxl_pipeline_dir, components=("text_encoder", "tokenizer", "tokenizer_2"))
  with pytest.raises(ValueError, match="text_encoder_2"):
    encode_prompts(pipe, CAPTIONS)
