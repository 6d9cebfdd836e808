"""MaPO on SDXL base 1.0, the official recipe (mapo-t2i/mapo): lr 1e-5 constant, beta 0.1, 2000 steps,
128 pairs per step (8 per GPU x 2 accumulation x 8 GPUs), clip 1.0, AdamW, 1024 px.

    python -m mapo_jax.encode --pipeline /models/sdxl-base --data /data/pickapic --out /data/cache --resolution 1024
    python -m mapo_jax.train --config configs/sdxl_mapo.py --workdir /runs/mapo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import base_config


def get_config():
  return base_config()
