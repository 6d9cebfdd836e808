"""The shipped toy-world pipelines (mapo_jax/toy/base/ and its FLUX.1 twin mapo_jax/toy/flux_base/, built by
`python -m mapo_jax.toy.pretrain [--family flux]`): the VAE reconstructs the world so that the judge still reads it,
the samples follow their captions and keep the world's bias, and diffusers samples from both."""
import numpy as np
import pytest

from mapo_jax.toy import pretrain as tp
from mapo_jax.toy import demo
from mapo_jax.models import load_vae


def test_shipped_vae_reconstructs_the_world():
  accuracy = tp.reconstruction_accuracy(load_vae(demo.BASE / "vae"), n=150, seed=123)  # drawings not trained on
  assert min(accuracy.values()) >= 0.98, accuracy


# Caption-correct bars on 90 samples: issue 17's 80 % for the SDXL base (96.7 % measured); for the twin, its
# measured 83.9 % (metrics.json, 180 samples) less 3.5 standard errors of a 90-sample rate there (3.5 x 0.039).
CAPTION_BARS = {"sdxl": 0.80, "flux": 0.70}


@pytest.mark.parametrize("base", sorted(CAPTION_BARS))
def test_shipped_base_follows_captions_and_rarely_fills(base):
  # Each base's sampling settings (20 Euler steps; guidance 3, or the twin's embedded 3.5), 10 samples per caption
  # on seeds the build's metrics.json did not use. Both bases trained on 10 % filled shapes.
  scores, _ = tp.judge_samples(demo.load_toy(demo.BASES[base]), per_caption=10, seed=7)
  assert scores["caption_accuracy"] >= CAPTION_BARS[base], scores
  assert scores["filled_rate"] <= 0.20, scores


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
