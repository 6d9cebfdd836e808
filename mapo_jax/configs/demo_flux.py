"""The embedded demo on the toy world's FLUX.1 twin: MaPO on velocity errors (docs/objectives.md, "Flow matching").
The twin (mapo_jax/toy/flux_base, built by `python -m mapo_jax.toy.pretrain --family flux`) is a tiny
FluxTransformer2DModel with a CLIP and a T5 tower on the SDXL base's VAE; like that base it outlines nearly every
shape it draws, and the same 512 pairs prefer filled ones. The judge reads 90 samples every 10 steps and writes
WORKDIR/judge/before_after.png and curve.png. CPU, minutes:

    python -m mapo_jax.train --config configs/demo_flux.py --workdir /tmp/mapo_demo_flux

Everything else is configs/demo.py's (batch, steps, learning rate, float32), so the two demos compare. Flow
matching: sigma drawn uniformly, no loss weighting (train_dreambooth_lora_flux.py's defaults), the embedded guidance
3.5 in training and sampling, as the twin was pretrained.
"""
import os
import tempfile

from mapo_jax.configs import demo
from mapo_jax.toy.demo import FLUX_T5_TOKENS


def get_config():
  config = demo.get_config()
  config.demo_base = "flux"
  config.demo_assets = os.path.join(tempfile.gettempdir(), "mapo_jax_demo_flux_assets")  # one base per folder
  config.max_sequence_length = FLUX_T5_TOKENS  # the twin's prompt length (toy/demo.py says why)
  config.flow.weighting_scheme, config.flow.guidance = "none", 3.5
  config.sample_guidance = 3.5  # the embedded guidance (no classifier-free branch), as the twin samples
  return config
