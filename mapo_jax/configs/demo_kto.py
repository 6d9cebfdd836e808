"""The demo with Diffusion-KTO on unpaired labelled samples (the demo assets' cache_unpaired/: 96 images,
each desirable or not), against the frozen initial model as reference.

    python -m mapo_jax.train --config configs/demo_kto.py --workdir /tmp/mapo_demo_kto
"""
from mapo_jax.configs import demo


def get_config():
  config = demo.get_config()
  config.objective = "kto"
  config.kto.beta = 100.0  # the recipe's 1000 is for real models' error differences; the tiny model's are larger
  config.data.cache_dir = config.get_ref("demo_assets") + "/cache_unpaired"
  config.ema_decay = 0.9
  return config
