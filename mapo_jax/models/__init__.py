"""Flax NNX models: the conditional UNet, the VAE and the CLIP text towers."""
from mapo_jax.models.unet import UNet2DConditionModel, UNetConfig, load_unet, save_unet
