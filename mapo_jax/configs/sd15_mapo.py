"""MaPO on Stable Diffusion 1.5 at 512 px (one text tower; the UNet takes no pooled embedding or time ids).
Not a published recipe (MaPO's is SDXL only): sdxl_mapo.py's values with SD 1.5's own VAE.

    python -m mapo_jax.encode --pipeline /models/sd15 --data /data/pickapic --out /data/cache512 --resolution 512
    python -m mapo_jax.train --config configs/sd15_mapo.py --workdir /runs/sd15_mapo \
        --config.pipeline=/models/sd15 --config.data.cache_dir=/data/cache512
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.resolution = 512
  config.accum_steps = 1  # 16 pairs per GPU fit at 512 px
  config.export_dtype = "fp32"  # SD 1.5 checkpoints are usually shared in float32
  return config
