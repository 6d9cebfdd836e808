"""Diffusion-DPO on Stable Diffusion 1.5 at 512 px, the official recipe (SalesforceAIResearch/DiffusionDPO):
as sdxl_dpo.py (beta 5000, 2048 pairs, lr 1e-8 x 2048 = 2.048e-5, 500 warmup steps, 2000 steps).

    python -m mapo_jax.train --config configs/sd15_dpo.py --workdir /runs/sd15_dpo \
        --config.pipeline=/models/sd15 --config.data.cache_dir=/data/cache512
"""
from mapo_jax.config import base_config, use_dpo_recipe


def get_config():
  config = use_dpo_recipe(base_config())
  config.resolution = 512
  config.accum_steps = 16  # 8 GPUs x 16 pairs per micro-batch x 16 = 2048
  config.export_dtype = "fp32"  # SD 1.5 checkpoints are usually shared in float32
  return config
