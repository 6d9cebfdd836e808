"""One latent space for training and sampling: a VAE config with latents_mean / latents_std (and shift)
normalises the training latents and denormalises the sampler's, both through pipelines.sd.Latents."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_VAE
from flax import nnx

from mapo_jax import sampling
from mapo_jax.toy.demo import random_model
from mapo_jax.models.vae import AutoencoderKL, save_vae
from mapo_jax.pipelines import load_pipeline
from mapo_jax.pipelines.sd import Latents
from mapo_jax.training.train_step import training_latents

MEAN, STD = [0.5, -0.25, 0.1, 0.3], [2.0, 0.5, 1.5, 0.8]


@pytest.mark.parametrize("extra", [dict(latents_mean=MEAN, latents_std=STD), dict(shift_factor=0.0609),
                                   dict()], ids=["mean-std", "shift", "scale-only"])
def test_encode_to_training_latent_to_decode_round_trips(extra, demo_assets, tmp_path):
  config = {**TINY_VAE, **extra, "force_upcast": False}
  vae = random_model(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), seed=3)
  # The trainer reads the record from the pipeline folder's vae/config.json without loading the VAE;
  # the sampler from the loaded VAE. Both must agree.
  pipeline = tmp_path / "pipeline"
  shutil.copytree(demo_assets / "pipeline", pipeline, ignore=shutil.ignore_patterns("vae"))
  save_vae(vae, pipeline / "vae")
  from_folder = load_pipeline(pipeline, components=("scheduler",)).latents
  loaded = load_pipeline(pipeline, components=("vae",))
  assert from_folder == loaded.latents == Latents.from_vae_config(json.loads((pipeline / "vae/config.json").read_text()))

  images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  mean, logvar = loaded.vae.encode(jnp.asarray(images))
  moments = jnp.concatenate([mean, logvar], axis=-1)
  # The training latent at eps = 0 (the posterior mean), as the train step computes it ...
  z = training_latents({"moments_w": moments}, {"eps_w": jnp.zeros_like(mean)}, from_folder, ("moments_w",))
  # ... is diffusers' training-script normalisation of the VAE latent ...
  m = np.asarray(extra.get("latents_mean", [0.0] * 4)) + extra.get("shift_factor", 0.0)
  s = np.asarray(extra.get("latents_std", [1.0] * 4))
  want = (np.asarray(mean) - m) * TINY_VAE["scaling_factor"] / s
  np.testing.assert_allclose(np.asarray(z), want, rtol=1e-6, atol=1e-6)
  # ... and the sampler's decode of it is the VAE's decode of the original latent: the same space.
  decoded = np.asarray(sampling.decode(loaded.vae, loaded.latents, z)).astype(np.int16)
  direct = np.asarray(loaded.vae.decode(mean), np.float32)
  direct = np.round(np.clip(direct * 0.5 + 0.5, 0, 1) * 255).astype(np.int16)
  # float32 rounding of z·std/scale + mean can move a pixel across a uint8 rounding edge, no further.
  assert np.abs(decoded - direct).max() <= 1 and np.mean(decoded != direct) < 1e-2
