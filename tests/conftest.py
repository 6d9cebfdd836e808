"""Shared fixtures: tiny random diffusers/transformers models saved with `save_pretrained`."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

# Tiny UNet configs with the block layouts of the real checkpoints (SDXL base, SD 1.5, SD 2.1).
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[32, 64, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3], cross_attention_dim=48,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, upcast_attention=False)
TINY_SD15_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=40, norm_num_groups=8)
TINY_SD2_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[2, 4, 4], cross_attention_dim=40, use_linear_projection=True, upcast_attention=True,
    norm_num_groups=8)


def perturb_(module, seed=0, scale=0.05):
  """Adds noise to every torch parameter so zero-initialised layers (e.g. proj_out) matter."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return module


def make_diffusers_unet(config, path, seed=0):
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  model = perturb_(UNet2DConditionModel(**config), seed).eval()
  model.save_pretrained(path)
  return model


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def tiny_sdxl_unet_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_sdxl_unet")
  make_diffusers_unet(TINY_SDXL_UNET, path)
  return path
