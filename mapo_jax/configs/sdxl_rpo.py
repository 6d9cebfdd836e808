"""Diffusion-RPO on SDXL base 1.0: our construction (docs/objectives.md; no official diffusion code exists):
DPO's reference-relative rewards compared across the pairs of each micro-batch, weighted by the
prompts' cosine similarity (tau 0.5), beta 5000. Everything else as sdxl_dpo.py (the official
Diffusion-DPO SDXL recipe: batch, Adafactor, warmup, steps, 20 % empty prompts, fixed time ids, fp16-safe
VAE); RPO's embedding (rpo_emb) is not swapped with the empty prompt (mapo_jax/training/train_step.py). RPO's B x B
matrix spans one micro-batch (the train step's unit), so larger micro-batches compare more pairs: here 32 pairs
(64 micro-batches of 2048 pairs), whatever the slice, unless accum_steps is changed.

Target slice: v5p-8 (4 chips, 95 GiB each): 8 pairs per chip per micro-batch, at a peak of 29.20 GiB per chip
(`python -m mapo_jax.aot --config configs/sdxl_rpo.py --topology v5p-8`; bench/RESULTS.md). On v5litepod-8
(8 chips, 16 GiB each) the same micro-batch is 4 pairs per chip, which did not fit for DPO (17.61 GiB), whose step
RPO's matches but for the B x B matrix; 2 pairs per chip fit DPO there (12.63 GiB; `--config.accum_steps=128`, not
compiled for RPO), at the cost of comparing 16 pairs instead of 32.

    python -m mapo_jax.train --config configs/sdxl_rpo.py --workdir /runs/rpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from mapo_jax.config import base_config, use_dpo_recipe


def get_config():
  config = use_dpo_recipe(base_config(), objective="rpo")
  config.accum_steps = 64  # 32 pairs per RPO matrix (docstring); v5p-8: 8 pairs per chip
  return config
