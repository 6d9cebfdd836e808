"""Diffusion-RPO on SDXL base 1.0: our construction (docs/objectives.md; no official diffusion code exists):
DPO's reference-relative rewards compared across the pairs of each micro-batch, weighted by the
prompts' cosine similarity (tau 0.5), beta 5000. Everything else as sdxl_dpo.py (the official
Diffusion-DPO SDXL recipe: batch, Adafactor, warmup, steps, 20 % empty prompts, fixed time ids, fp16-safe
VAE); RPO's embedding (rpo_emb) is not swapped with the empty prompt (mapo_jax/training/train_step.py). RPO's B x B
matrix spans one micro-batch (the train step's unit), so larger micro-batches compare more pairs.

    python -m mapo_jax.train --config configs/sdxl_rpo.py --workdir /runs/rpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import base_config, use_dpo_recipe


def get_config():
  config = use_dpo_recipe(base_config(), objective="rpo")
  config.accum_steps = 64
  return config
