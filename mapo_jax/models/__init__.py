"""Flax NNX models: the conditional UNet, the VAE and the CLIP text towers."""
from mapo_jax.models.unet import UNet2DConditionModel, UNetConfig, init_unet, load_unet, save_unet
from mapo_jax.models.vae import AutoencoderKL, VAEConfig, load_vae, posterior_sample, save_vae
from mapo_jax.models.clip import CLIPTextConfig, CLIPTextModel, load_text_encoder, save_text_encoder
