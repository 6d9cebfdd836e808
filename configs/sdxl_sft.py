"""Supervised fine-tuning on the preferred images only (the baseline of the MaPO paper), MaPO's optimizer.

    python -m mapo_jax.train --config configs/sdxl_sft.py --workdir /runs/sft \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.objective = "sft"
  return config
