"""Supervised fine-tuning on the preferred images only (the baseline of the MaPO paper): not a published
recipe; everything but the objective as sdxl_mapo.py (optimizer, batch, the fp16-safe VAE, so the two
share one cache).

    python -m mapo_jax.train --config configs/sdxl_sft.py --workdir /runs/sft \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import SDXL_FP16_FIX_VAE, base_config


def get_config():
  config = base_config()
  config.objective = "sft"
  config.vae = SDXL_FP16_FIX_VAE
  return config
