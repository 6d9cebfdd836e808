"""Diffusion-DPO on SDXL base 1.0, the official recipe (SalesforceAIResearch/DiffusionDPO launchers):
beta_dpo 5000, effective batch 2048 pairs, `--learning_rate=1e-8 --scale_lr` (lr x effective batch =
2.048e-5), constant_with_warmup with 500 warmup steps, 2000 steps, AdamW, 1024 px. The frozen reference
is the starting pipeline (`reference` = "" means the same folder).

    python -m mapo_jax.train --config configs/sdxl_dpo.py --workdir /runs/dpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.objective = "dpo"
  config.global_batch_size = 2048
  config.accum_steps = 64  # 8 GPUs x 4 pairs per micro-batch x 64 = 2048
  config.optim.lr = 1e-8 * config.global_batch_size  # official --scale_lr: 1e-8 per pair
  config.optim.schedule = "linear_warmup"  # = constant_with_warmup
  config.optim.warmup_steps = 500
  return config
