"""Diffusion-DPO on SDXL base 1.0, the official recipe (SalesforceAIResearch/DiffusionDPO launchers):
beta_dpo 5000, effective batch 2048 pairs, `--learning_rate=1e-8 --scale_lr` (lr x effective batch =
2.048e-5), constant_with_warmup with 500 warmup steps, 2000 steps, AdamW, 1024 px. The frozen reference
is the starting pipeline (`reference` = "" means the same folder).

    python -m mapo_jax.train --config configs/sdxl_dpo.py --workdir /runs/dpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import base_config, use_dpo_recipe


def get_config():
  config = use_dpo_recipe(base_config())
  config.accum_steps = 64  # 8 GPUs x 4 pairs per micro-batch x 64 = 2048
  return config
