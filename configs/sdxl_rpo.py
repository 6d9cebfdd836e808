"""Diffusion-RPO on SDXL base 1.0: our construction (shared/NOTES.md; no official diffusion code exists):
DPO's reference-relative rewards compared across all pairs of the global batch, weighted by the
prompts' cosine similarity (tau 0.5), beta 5000. Optimizer as sdxl_dpo.py.

    python -m mapo_jax.train --config configs/sdxl_rpo.py --workdir /runs/rpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache
"""
from configs import sdxl_dpo


def get_config():
  config = sdxl_dpo.get_config()
  config.objective = "rpo"
  return config
