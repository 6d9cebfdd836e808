"""The embedded demo: MaPO on the pretrained toy world (docs/toy_world.md). The base, a tiny SDXL-architecture
pipeline (mapo_jax/toy/base), draws the shape and colour its caption names but outlines ~93 % of them; the
512 preference pairs prefer filled shapes. Every 10 steps the toy world's judge reads 90 samples on fixed
seeds; the run writes WORKDIR/judge/before_after.png and curve.png and prints the numbers. CPU, minutes:

    python -m mapo_jax.train --config configs/demo.py --workdir /tmp/mapo_demo

The pipeline copy, the pairs and their encoded cache are created under `demo_assets` on first use
(mapo_jax/toy/demo.py, deterministic); `--config.demo_assets=DIR` puts them elsewhere.
"""
import os
import tempfile

import ml_collections

from mapo_jax.config import base_config

CAPTIONS = tuple(f"a {color} {shape}" for shape in ("circle", "square", "triangle") for color in ("red", "green", "blue"))


def get_config():
  config = base_config()
  assets = ml_collections.FieldReference(os.path.join(tempfile.gettempdir(), "mapo_jax_demo_assets"))
  config.demo_assets = assets
  config.pipeline = assets + "/pipeline"
  config.data.cache_dir = assets + "/cache"
  config.data.num_threads = 2
  config.data.empty_prompt_prob = 0.1  # as the base was pretrained, so guidance keeps its unconditional model
  config.resolution = 32

  config.steps = 60
  config.global_batch_size = 16
  config.accum_steps = 2
  config.optim.lr = 1e-4  # 10x the recipe: a visible change in a few dozen steps (bench/RESULTS.md)
  config.optim.schedule = "linear_warmup"
  config.optim.warmup_steps = 10
  # float32 everywhere, no remat: CPU has no fast bf16, and the tiny model needs no memory savings.
  config.dtype = "float32"
  config.ref_param_dtype = "float32"
  config.remat = "none"

  config.log_every = 5
  config.checkpoint_every = 20
  config.keep_checkpoints = 2
  config.sample_every = 0  # the judge's grids show the samples
  config.sample_steps = 20  # the toy base's sampling settings (mapo_jax/toy/pretrain.py)
  config.sample_guidance = 3.0
  config.judge = "toy_world"
  config.judge_every = 10
  config.judge_prompts = CAPTIONS
  config.judge_samples_per_prompt = 10
  config.export_dtype = "fp32"
  return config
