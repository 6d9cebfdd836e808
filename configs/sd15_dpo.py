"""Diffusion-DPO on Stable Diffusion 1.5 at 512 px (SalesforceAIResearch/DiffusionDPO): beta_dpo 5000, lr
1e-8 per pair of the effective batch (official: 2048 pairs -> 2.048e-5; here 128 pairs -> 1.28e-6).

    python -m mapo_jax.train --config configs/sd15_dpo.py --workdir /runs/sd15_dpo \
        --config.pipeline=/models/sd15 --config.data.cache_dir=/data/cache512
"""
from configs import sdxl_dpo


def get_config():
  config = sdxl_dpo.get_config()
  config.resolution = 512
  config.accum_steps = 2
  config.export_dtype = "fp32"
  return config
