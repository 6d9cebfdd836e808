"""MaPO on Stable Diffusion 1.5 at 512 px (one text tower; the UNet takes no pooled embedding or time ids).
Not a published recipe (MaPO's is SDXL only): sdxl_mapo.py's values with SD 1.5's own VAE.

    python -m mapo_jax.encode --pipeline /models/sd15 --data /data/pickapic --out /data/cache512 --resolution 512
    python -m mapo_jax.train --config configs/sd15_mapo.py --workdir /runs/sd15_mapo \
        --config.pipeline=/models/sd15 --config.data.cache_dir=/data/cache512

Target slice: v5litepod-8 (8 chips, 16 GiB each), 16 pairs per chip as written. On v5litepod-4 the 128 pairs in one
micro-batch (32 per chip) need at least 17.07 GiB per chip; with `--config.accum_steps=2` (16 per chip) they fit at
11.96 GiB (`python -m mapo_jax.aot --config configs/sd15_mapo.py --topology v5litepod-4 --max-batch`; bench/RESULTS.md).
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.resolution = 512
  config.accum_steps = 1  # 16 pairs per GPU fit at 512 px
  config.export_dtype = "fp32"  # SD 1.5 checkpoints are usually shared in float32
  return config
