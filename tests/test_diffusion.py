"""Schedules and samplers against diffusers' own DDPM / Euler / DDIM schedulers (torch, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from mapo_jax import diffusion

SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
CONFIGS = {
    "sdxl": SDXL,
    "trailing": {**SDXL, "timestep_spacing": "trailing", "steps_offset": 0},
    "linspace": {**SDXL, "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"},
    "v_pred": {**SDXL, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
               "set_alpha_to_one": True},
    # Only the betas given: each scheduler class fills in its own defaults (Euler linspace; DDIM leading,
    # clip_sample and set_alpha_to_one on).
    "minimal": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}
TORCH_SCHEDULERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _nhwc(x):
  return np.moveaxis(x.numpy(), 1, -1)


# ---------------------------------------------------------------- schedules and the forward process
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
  cfg = {"beta_schedule": beta_schedule, "beta_start": 0.00085, "beta_end": 0.012}
  expected = DDPMScheduler.from_config(cfg).alphas_cumprod.numpy()
  # diffusers accumulates in float32, we in float64 rounded once: they differ by float32 rounding only.
  np.testing.assert_allclose(diffusion.NoiseSchedule.from_config(cfg).alphas_cumprod, expected, rtol=2e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_and_target_match_diffusers(prediction_type):
  cfg = {**SDXL, "prediction_type": prediction_type}
  schedule, ref = diffusion.NoiseSchedule.from_config(cfg), DDPMScheduler.from_config(cfg)
  r = np.random.default_rng(0)
  x0, noise = r.normal(size=(2, 5, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 1, 420, 998, 999], np.int32)
  xt = jax.jit(diffusion.add_noise)(schedule, x0, noise, t)
  expected = ref.add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t).long())
  np.testing.assert_allclose(xt, _nhwc(expected), rtol=1e-5, atol=1e-5)
  target = jax.jit(diffusion.training_target)(schedule, x0, noise, t)
  if prediction_type == "epsilon":
    np.testing.assert_array_equal(target, noise)
  else:
    expected = ref.get_velocity(_nchw(x0), _nchw(noise), torch.from_numpy(t).long())
    np.testing.assert_allclose(target, _nhwc(expected), rtol=1e-5, atol=1e-5)


def test_add_noise_keeps_bf16_dtype():
  schedule = diffusion.NoiseSchedule.from_config(SDXL)
  x0 = jnp.ones((2, 4, 4, 4), jnp.bfloat16)
  xt = diffusion.add_noise(schedule, x0, jnp.zeros_like(x0), jnp.array([0, 999]))
  assert xt.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(xt[:, 0, 0, 0], np.float32),
                             np.sqrt(schedule.alphas_cumprod[jnp.array([0, 999])]), rtol=1e-2)


def test_sample_timesteps_cover_the_range_uniformly():
  t = diffusion.sample_timesteps(jax.random.key(0), 20000, 10)
  assert t.dtype == jnp.int32 and t.shape == (20000,)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert len(counts) == 10 and counts.min() > 1800 and counts.max() < 2200  # 2000 +- 4.7 sigma


@pytest.mark.parametrize("key,value", [
    ("rescale_betas_zero_snr", True), ("use_karras_sigmas", True), ("thresholding", True),
    ("trained_betas", [0.1, 0.2]), ("beta_schedule", "sigmoid"), ("prediction_type", "sample"),
    ("timestep_spacing", "middle"), ("interpolation_type", "log_linear"), ("final_sigmas_type", "one"),
    ("timestep_type", "continuous"),
])
def test_unsupported_option_raises_naming_the_key(key, value):
  with pytest.raises(ValueError, match=f"{key}={value!r}".replace("[", r"\[").replace("]", r"\]")):
    diffusion.NoiseSchedule.from_config({**SDXL, key: value})


def test_load_schedule_from_checkpoint_root(tmp_path):
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL))
  s = diffusion.load_schedule(str(tmp_path))
  assert (s.steps_offset, s.timestep_spacing, s.set_alpha_to_one) == (1, "leading", False)
  np.testing.assert_array_equal(s.alphas_cumprod, diffusion.NoiseSchedule.from_config(SDXL).alphas_cumprod)


def test_schedule_is_a_pytree_with_static_options():
  s = diffusion.NoiseSchedule.from_config(SDXL)
  leaves, treedef = jax.tree.flatten(s)
  assert len(leaves) == 1 and leaves[0].shape == (1000,)
  assert jax.tree.unflatten(treedef, leaves).timestep_spacing == "leading"


# ---------------------------------------------------------------- sampler tables
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("num_steps", [1, 7, 30])
def test_sampler_tables_match_diffusers(name, num_steps):
  schedule = diffusion.NoiseSchedule.from_config(CONFIGS[name])
  euler = EulerDiscreteScheduler.from_config(CONFIGS[name])
  euler.set_timesteps(num_steps)
  ts, sigmas, init = diffusion.euler_tables(schedule, num_steps)
  np.testing.assert_array_equal(ts, euler.timesteps.numpy())
  np.testing.assert_allclose(sigmas, euler.sigmas.numpy(), rtol=1e-4)  # diffusers' sigmas carry fp32 error
  np.testing.assert_allclose(init, float(euler.init_noise_sigma), rtol=1e-4)

  ddim = DDIMScheduler.from_config(CONFIGS[name])
  ddim.set_timesteps(num_steps)
  ts, alpha, alpha_prev = diffusion.ddim_tables(schedule, num_steps)
  np.testing.assert_array_equal(ts, ddim.timesteps.numpy())
  prev = ts - 1000 // num_steps
  expected_prev = [ddim.alphas_cumprod[p] if p >= 0 else ddim.final_alpha_cumprod for p in prev]
  np.testing.assert_allclose(alpha, ddim.alphas_cumprod[ts].numpy(), rtol=2e-5)
  np.testing.assert_allclose(alpha_prev, np.array(expected_prev, np.float32), rtol=2e-5)


# ---------------------------------------------------------------- samplers, end to end
# A deterministic toy "model", written twice (JAX NHWC, torch NCHW), with a linear part, a timestep-dependent
# part and a part driven by a two-leaf conditioning pytree (so guidance changes the result).
def _toy_jax(x, t, cond):
  gain = 0.9 + 0.05 * cond["gain"][:, None, None, None]
  bias = 0.3 * jnp.sin(t * 0.003)[:, None, None, None]
  return gain * x + bias + 0.5 * cond["shift"][:, None, None, :]


def _toy_torch(x, t, cond):
  gain = 0.9 + 0.05 * cond["gain"][:, None, None, None]
  bias = 0.3 * torch.sin(torch.as_tensor(t, dtype=torch.float32) * 0.003)
  return gain * x + bias + 0.5 * cond["shift"][:, :, None, None]


def _diffusers_loop(sampler, cfg, num_steps, init, cond, uncond, guidance_scale):
  """The denoising loop of diffusers' StableDiffusionXLPipeline, with the toy model."""
  sched = TORCH_SCHEDULERS[sampler].from_config(cfg)
  sched.set_timesteps(num_steps)
  latents = _nchw(init) * sched.init_noise_sigma
  cond = {k: torch.from_numpy(np.asarray(v)) for k, v in cond.items()}
  do_cfg = uncond is not None
  if do_cfg:
    cond = {k: torch.cat([torch.from_numpy(np.asarray(uncond[k])), v]) for k, v in cond.items()}
  for t in sched.timesteps:
    model_in = torch.cat([latents] * 2) if do_cfg else latents
    model_in = sched.scale_model_input(model_in, t)
    out = _toy_torch(model_in, t, cond)
    if do_cfg:
      out_u, out_c = out.chunk(2)
      out = out_u + guidance_scale * (out_c - out_u)
    latents = sched.step(out, t, latents).prev_sample
  return _nhwc(latents)


def _rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sampler_matches_diffusers(sampler, name, guidance_scale):
  r = np.random.default_rng(1)
  b, num_steps = 2, 12
  init = r.normal(size=(b, 8, 8, 4)).astype(np.float32)
  cond = {"shift": r.normal(size=(b, 4)).astype(np.float32), "gain": r.normal(size=(b,)).astype(np.float32)}
  uncond = {"shift": np.zeros((b, 4), np.float32), "gain": np.zeros((b,), np.float32)}
  uncond = uncond if guidance_scale != 1.0 else None
  expected = _diffusers_loop(sampler, CONFIGS[name], num_steps, init, cond, uncond, guidance_scale)
  got = diffusion.sample(_toy_jax, init, CONFIGS[name], num_steps, sampler=sampler,
                         guidance_scale=guidance_scale, cond=cond, uncond=uncond)
  assert got.shape == init.shape and got.dtype == jnp.float32
  assert _rel_l2(got, expected) < 1e-4, _rel_l2(got, expected)


def test_sample_inside_jit_with_traced_guidance_and_model_state():
  """The caller's jit can take model state and guidance as arguments: one compile, any values."""
  r = np.random.default_rng(2)
  init = r.normal(size=(1, 4, 4, 4)).astype(np.float32)
  cond = {"shift": r.normal(size=(1, 4)).astype(np.float32), "gain": np.ones((1,), np.float32)}
  uncond = {"shift": np.zeros((1, 4), np.float32), "gain": np.zeros((1,), np.float32)}
  traces = []

  @jax.jit
  def generate(scale, g):
    traces.append(1)
    fn = lambda x, t, c: scale * _toy_jax(x, t, c)
    return diffusion.sample(fn, init, SDXL, 5, guidance_scale=g, cond=cond, uncond=uncond)

  for g in (3.0, 7.5):
    expected = _diffusers_loop("euler", SDXL, 5, init, cond, uncond, g)
    assert _rel_l2(generate(1.0, g), expected) < 1e-4
  assert len(traces) == 1
  # Guidance 1 on the doubled batch equals the unguided single-batch path.
  unguided = diffusion.sample(_toy_jax, init, SDXL, 5, cond=cond)
  assert _rel_l2(generate(1.0, 1.0), np.asarray(unguided)) < 1e-6


def test_sample_rejects_guidance_without_uncond_and_unknown_sampler():
  init, cond = np.zeros((1, 2, 2, 4), np.float32), {"shift": np.zeros((1, 4)), "gain": np.zeros((1,))}
  with pytest.raises(ValueError, match="uncond"):
    diffusion.sample(_toy_jax, init, SDXL, 2, guidance_scale=5.0, cond=cond)
  with pytest.raises(ValueError, match="sampler='heun'"):
    diffusion.sample(_toy_jax, init, SDXL, 2, sampler="heun", cond=cond)
