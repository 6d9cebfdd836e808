"""Diffusion-DPO on SDXL base 1.0 (SalesforceAIResearch/DiffusionDPO, Wallace et al. 2023).

The official SDXL run uses beta_dpo 5000 and lr 1e-8 per pair of the effective batch, i.e.
1e-8 x 2048 = 2.048e-5 with `--scale_lr` (batch 1 per GPU x 128 accumulation x 16 GPUs = 2048 pairs),
AdamW, constant schedule after a short warmup, 1024 px. We keep the effective batch of our MaPO recipe
(128 pairs) and the official learning rate per pair, so lr = 128 x 1e-8 = 1.28e-6. The frozen reference
is the starting pipeline.

    python -m mapo_jax.train --config configs/sdxl_dpo.py --workdir /runs/dpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from configs.common import base_config


def get_config():
  config = base_config()
  config.objective = "dpo"
  config.optim.lr = 1e-8 * config.global_batch_size  # official: lr 1e-8 scaled by the effective batch
  config.optim.schedule = "linear_warmup"
  config.optim.warmup_steps = 200
  config.accum_steps = 4  # two UNets per step: 4 pairs per GPU per micro-batch instead of 8
  return config
