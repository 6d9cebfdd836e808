"""The shipped toy-world pipelines (mapo_jax/toy/base/ and its FLUX.1 twin mapo_jax/toy/flux_base/, built by
`python -m mapo_jax.toy.pretrain [--family flux]`): the VAE reconstructs the world so that the judge still reads it,
and diffusers samples from both. That their samples follow their captions and keep the world's bias is checked on
the bases' judged samples in tests/test_toy_preference.py."""
import numpy as np

from mapo_jax.toy import pretrain as tp
from mapo_jax.toy import demo
from mapo_jax.models import load_vae


def test_shipped_vae_reconstructs_the_world():
  accuracy = tp.reconstruction_accuracy(load_vae(demo.BASE / "vae"), n=150, seed=123)  # drawings not trained on
  assert min(accuracy.values()) >= 0.98, accuracy


def test_shipped_pipeline_is_fp16_and_runs_in_diffusers():
  import torch
  from diffusers import StableDiffusionXLPipeline
  from safetensors import safe_open
  for weights in demo.BASE.glob("*/*.safetensors"):
    with safe_open(weights, "np") as f:
      assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
  pipe = StableDiffusionXLPipeline.from_pretrained(demo.BASE, dtype=torch.float32)  # CPU: no fp16 matmuls
  assert pipe.unet.config.sample_size * pipe.vae_scale_factor == tp.SIZE
  images = pipe("a red circle", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert images.shape == (1, tp.SIZE, tp.SIZE, 3) and np.isfinite(images).all()


def test_shipped_flux_twin_is_fp16_and_runs_in_diffusers():
  import torch
  from diffusers import FluxPipeline
  from safetensors import safe_open
  for weights in demo.FLUX_BASE.glob("*/*.safetensors"):
    with safe_open(weights, "np") as f:
      assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
  pipe = FluxPipeline.from_pretrained(demo.FLUX_BASE, dtype=torch.float32)
  images = pipe("a red circle", height=tp.SIZE, width=tp.SIZE, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=demo.FLUX_T5_TOKENS, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert images.shape == (1, tp.SIZE, tp.SIZE, 3) and np.isfinite(images).all()
