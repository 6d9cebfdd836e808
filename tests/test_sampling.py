"""Sampling against diffusers' StableDiffusionXLPipeline on a micro random SDXL pipeline.

Every test samples the same shapes (8 prompts, 32 x 48 px → 4 x 6 latents, 3 steps), so each sampler
compiles once per guidance mode; 8 prompts shard over conftest's 8 host devices.
"""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import rel_l2
from mapo_jax import sampling
from mapo_jax.models.layers import REMAT_POLICIES
from mapo_jax.pipelines import load_pipeline
from mapo_jax.toy import judging

PROMPTS = ["a cat", "the red dog!", "", "a dog on the red cat", "cat", "dog, dog", "the cat.", "red"]
NEGATIVES = ["blurry", "", "a dog", "ugly cat", "red", "the", "dog", "cat"]
HEIGHT, WIDTH, STEPS = 32, 48, 3  # smaller than the pipeline's 64 px default, and not square


@pytest.fixture(scope="module")
def pipes(micro_sdxl_pipeline_dir):
  from diffusers import StableDiffusionXLPipeline
  ref = StableDiffusionXLPipeline.from_pretrained(micro_sdxl_pipeline_dir)
  ref.set_progress_bar_config(disable=True)
  return ref, load_pipeline(micro_sdxl_pipeline_dir)


def noise(seed=0):
  return np.random.default_rng(seed).standard_normal((len(PROMPTS), HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)


def diffusers_run(ref, sampler, guidance, negatives, latents, output_type):
  """The reference call; prepare_latents multiplies the given unit-variance latents by init_noise_sigma."""
  from diffusers import DDIMScheduler, EulerDiscreteScheduler
  cls = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[sampler]
  ref.scheduler = cls.from_config(ref.scheduler.config)
  with torch.no_grad():
    return ref(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=guidance,
               height=HEIGHT, width=WIDTH, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
               output_type=output_type).images


@pytest.mark.parametrize("sampler,guidance,negatives", [
    ("euler", 5.0, NEGATIVES), ("euler", 1.0, None), ("ddim", 5.0, None), ("ddim", 1.0, None)],
    ids=["euler-cfg-negative", "euler", "ddim-cfg-zeros", "ddim"])
def test_matches_diffusers_pipeline(pipes, sampler, guidance, negatives):
  ref, pipe = pipes
  init = noise()
  images, latents = sampling.generate_images(pipe, PROMPTS, negative_prompts=negatives, steps=STEPS,
                                             guidance=guidance, height=HEIGHT, width=WIDTH, init_latents=init,
                                             sampler=sampler)
  expected = diffusers_run(ref, sampler, guidance, negatives, init, "latent").numpy().transpose(0, 2, 3, 1)
  assert latents.shape == init.shape and latents.dtype == np.float32
  assert rel_l2(latents, expected) <= 1e-4
  assert rel_l2(latents, init) > 0.1  # the model did move the latents
  if negatives is not None:  # decoding too: the PIL images diffusers returns
    expected_images = np.stack([np.asarray(im) for im in diffusers_run(ref, sampler, guidance, negatives, init, "pil")])
    assert images.shape == (len(PROMPTS), HEIGHT, WIDTH, 3) and images.dtype == np.uint8
    diff = np.abs(images.astype(int) - expected_images)
    assert diff.max() <= 1 and diff.mean() < 0.01  # only float rounding at .5 boundaries may differ


def test_sharded_batch_and_split_unet(pipes):
  """8 prompts on 8 devices: latents sharded one per device; (graphdef, state) samples like the module."""
  _, pipe = pipes
  cond, uncond, cfg = pipe.conditioning(PROMPTS, NEGATIVES, height=HEIGHT, width=WIDTH, guidance=5.0)
  assert cfg == 5.0  # SD guides with classifier-free guidance at the --guidance weight
  np.testing.assert_array_equal(cond["time_ids"], np.tile([HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH], (8, 1)))
  np.testing.assert_array_equal(uncond["time_ids"], cond["time_ids"])
  z = sampling.generate_latents(pipe.denoise, pipe.unet, pipe.scheduler_config, cond, uncond, noise(), steps=STEPS, guidance=5.0)
  split = sampling.generate_latents(pipe.denoise, nnx.split(pipe.unet), pipe.scheduler_config, cond, uncond, noise(),
                                    steps=STEPS, guidance=5.0)
  np.testing.assert_array_equal(np.asarray(split), np.asarray(z))
  assert len(z.sharding.device_set) == len(jax.devices())
  assert z.addressable_shards[0].data.shape[0] == len(PROMPTS) // len(jax.devices())
  with pytest.raises(ValueError, match="needs uncond"):
    sampling.generate_latents(pipe.denoise, pipe.unet, pipe.scheduler_config, cond, None, noise(), steps=STEPS, guidance=5.0)


def test_initial_noise_depends_on_seed_and_index_only():
  full = sampling.initial_noise(3, 8, (4, 6, 4))
  np.testing.assert_array_equal(sampling.initial_noise(3, 3, (4, 6, 4), first=5), full[5:])
  assert not np.allclose(sampling.initial_noise(4, 1, (4, 6, 4)), full[:1])
  assert abs(float(full.std()) - 1.0) < 0.1


def test_init_latents_must_fit(pipes):
  _, pipe = pipes
  with pytest.raises(ValueError, match="do not fit"):
    sampling.generate_images(pipe, PROMPTS, steps=STEPS, guidance=5.0, height=64, init_latents=noise())


def test_make_grid():
  images = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
  grid = sampling.make_grid(images, cols=2)
  assert grid.shape == (3 * 2, 2 * 3, 1)
  np.testing.assert_array_equal(grid[0:2, 3:6], images[1])
  np.testing.assert_array_equal(grid[4:6, 0:3], images[4])
  assert not grid[4:6, 3:6].any()  # the empty sixth cell


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_a_model_built_for_training_with_any_remat_policy_samples_the_same_images(policy, micro_sdxl_pipeline_dir):
  """The trainer samples its grids and judged samples with the model it trains (built with config.remat), in
  the split form (graphdef, params, rest): rematerialisation must neither fail inside the sampling loop nor
  change a number. Judged as the trainer judges (toy_world: 2 prompts x 2 samples)."""
  pipe = load_pipeline(micro_sdxl_pipeline_dir, unet_kwargs=dict(remat=policy))
  prompts = ["a red circle", "a blue square"] * 2
  graphdef, params, rest = nnx.split(pipe.unet, nnx.Param, ...)
  images, latents = sampling.generate_images(pipe, prompts, steps=2, guidance=3.0, height=16, width=16,
                                             unet=(graphdef, params, rest))
  baseline = load_pipeline(micro_sdxl_pipeline_dir)
  _, expected = sampling.generate_images(baseline, prompts, steps=2, guidance=3.0, height=16, width=16)
  np.testing.assert_array_equal(latents, expected)
  scores = judging.JUDGES["toy_world"](images, prompts)
  assert scores and all(0.0 <= v <= 1.0 for v in scores.values())
