"""Supervised fine-tuning on the preferred images only (the baseline of the MaPO paper): not a published
recipe; everything but the objective as sdxl_mapo.py (optimizer, batch, the fp16-safe VAE, so the two
share one cache).

Target slice: v5p-8 (4 chips, 95 GiB each), as sdxl_mapo.py: 2 micro-batches of 16 pairs per chip, at a peak of
29.57 GiB per chip (`python -m mapo_jax.aot --config configs/sdxl_sft.py --topology v5p-8`; bench/RESULTS.md): one
latent per pair instead of two, so 15 GiB below MaPO's.

    python -m mapo_jax.train --config configs/sdxl_sft.py --workdir /runs/sft \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import SDXL_FP16_FIX_VAE, base_config


def get_config():
  config = base_config()
  config.objective = "sft"
  config.vae = SDXL_FP16_FIX_VAE
  return config
