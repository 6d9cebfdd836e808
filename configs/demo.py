"""The embedded demo: MaPO on a tiny random SDXL-architecture pipeline and 48 synthetic preference pairs
(PIL-drawn 64 px shapes; the preferred image has the colour the caption names). Runs on CPU in minutes.

    python -m mapo_jax.train --config configs/demo.py --workdir /tmp/mapo_demo

The pipeline, the pairs and their encoded cache are created under `demo_assets` on first use
(mapo_jax/demo.py, deterministic); `--config.demo_assets=DIR` puts them elsewhere.
"""
import os
import tempfile

import ml_collections

from mapo_jax.config import base_config


def get_config():
  config = base_config()
  assets = ml_collections.FieldReference(os.path.join(tempfile.gettempdir(), "mapo_jax_demo_assets"))
  config.demo_assets = assets
  config.pipeline = assets + "/pipeline"
  config.data.cache_dir = assets + "/cache"
  config.data.num_threads = 2
  config.resolution = 64

  config.steps = 30
  config.global_batch_size = 8
  config.accum_steps = 2
  config.optim.lr = 1e-4  # 10x the recipe: a visible change in a few dozen steps
  # float32 everywhere, no remat: CPU has no fast bf16, and the tiny model needs no memory savings.
  config.dtype = "float32"
  config.ref_param_dtype = "float32"
  config.remat = "none"

  config.log_every = 5
  config.checkpoint_every = 10
  config.keep_checkpoints = 2
  config.sample_every = 15
  config.sample_prompts = ("a red circle", "a green square", "a blue circle", "a red square")
  config.sample_steps = 4
  config.sample_guidance = 3.0
  config.export_dtype = "fp32"
  return config
