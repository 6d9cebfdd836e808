"""The demo assets: written without torch/diffusers, deterministic, and loadable by diffusers."""
import hashlib

import numpy as np
import pyarrow.parquet as pq

from mapo_jax import demo


def digest(path):
  return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


def test_assets_are_deterministic_and_load_in_diffusers(demo_assets, tmp_path):
  import torch
  from diffusers import StableDiffusionXLPipeline
  again = tmp_path / "pipeline"
  demo.write_pipeline(again)
  assert digest(again) == digest(demo_assets / "pipeline")
  table = pq.read_table(demo_assets / "pairs.parquet").to_pydict()
  assert len(table["caption"]) == demo.NUM_PAIRS and set(table["label_0"]) == {0.0, 1.0}
  pipe = StableDiffusionXLPipeline.from_pretrained(demo_assets / "pipeline")
  images = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
