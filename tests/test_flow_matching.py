"""Flow matching (mapo_jax/diffusion.py) against diffusers itself: FlowMatchEulerDiscreteScheduler's
set_timesteps and step, FluxPipeline's / StableDiffusion3Pipeline's calculate_shift, and training_utils'
compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3 with the draws of
examples/dreambooth/train_dreambooth_lora_{flux,sd3}.py (written out here, since the examples are not
installed: `indices = (u * T).long()`, `timesteps[indices]`, get_sigmas, (1 - sigma) x0 + sigma noise,
target noise - x0).

The host tables repeat diffusers' float32 / float64 arithmetic operation for operation, so they are compared
for equality. The samplers run float32 in JAX against float32 torch: rel L2 <= 1e-5.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from conftest import rel_l2
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
  compute_density_for_timestep_sampling,
  compute_loss_weighting_for_sd3,
)

from mapo_jax import diffusion

FLUX_DEV = {  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
SD35 = {  # stabilityai/stable-diffusion-3.5-large scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000, "shift": 3.0,
}
# Options the published configs leave at their defaults.
VARIANTS = {
    "flux_linear_shift": {**FLUX_DEV, "time_shift_type": "linear"},
    "sd35_shift_terminal": {**SD35, "shift_terminal": 0.1},
    "sd3_dynamic": {**SD35, "use_dynamic_shifting": True, "max_shift": 1.4},
    "inverted_terminal": {**FLUX_DEV, "invert_sigmas": True, "shift_terminal": 0.02},
    "short_t": {"num_train_timesteps": 100, "shift": 1.7},  # no _class_name: picked by its `shift` key
}
RESOLUTIONS = (256, 512, 1024)  # px; image tokens (res / 16)^2: VAE /8, then 2x2 patches
STEPS = (1, 4, 28, 50)


def _flux_mu(ref: FlowMatchEulerDiscreteScheduler, image_seq_len):
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift
  c = ref.config  # FluxPipeline.__call__'s config.get defaults
  return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def _sd3_mu(ref: FlowMatchEulerDiscreteScheduler, image_seq_len):
  """StableDiffusion3Pipeline.__call__: mu only with use_dynamic_shifting (its own config.get defaults)."""
  from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
  )
  c = ref.config
  if not c.get("use_dynamic_shifting", None):
    return None
  return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.16))


def _reference_tables(cfg, num_steps, image_seq_len, pipeline):
  """scheduler.timesteps / sigmas after set_timesteps called as `pipeline`'s __call__ calls it
  (through retrieve_timesteps: with custom sigmas, num_inference_steps is not passed)."""
  ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
  if pipeline == "flux":
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=_flux_mu(ref, image_seq_len))
  else:
    mu = _sd3_mu(ref, image_seq_len)
    ref.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
  return ref.timesteps.numpy(), ref.sigmas.numpy()


def _ours(cfg, num_steps, image_seq_len, pipeline):
  sigmas = diffusion.linear_sigmas(num_steps) if pipeline == "flux" else None
  return diffusion.flow_sigmas(cfg, num_steps, image_seq_len=image_seq_len, sigmas=sigmas)


# ---------------------------------------------------------------- schedule construction and dispatch
def test_as_schedule_dispatch_and_static_schedule(tmp_path):
  flux = diffusion.as_schedule(FLUX_DEV)
  assert isinstance(flux, diffusion.FlowMatchSchedule) and flux.is_flow and flux.kind == "flow"
  assert (flux.shift, flux.use_dynamic_shifting, flux.max_image_seq_len) == (3.0, True, 4096)
  assert flux.num_train_timesteps == 1000
  assert isinstance(diffusion.as_schedule(VARIANTS["short_t"]), diffusion.FlowMatchSchedule)
  assert isinstance(diffusion.as_schedule({"use_dynamic_shifting": False}), diffusion.FlowMatchSchedule)
  ddpm = diffusion.as_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
  assert isinstance(ddpm, diffusion.NoiseSchedule) and not ddpm.is_flow and ddpm.kind == "ddpm"
  assert ddpm.num_train_timesteps == 1000
  assert diffusion.as_schedule(flux) is flux
  # Value semantics: equal configs (3 vs 3.0 in JSON) give equal, equally hashed schedules; no pytree leaves.
  again = diffusion.as_schedule({**FLUX_DEV, "shift": 3, "num_train_timesteps": 1000.0})
  assert again == flux and hash(again) == hash(flux)
  assert jax.tree.leaves(flux) == [] and jax.tree.unflatten(jax.tree.structure(flux), []) == flux
  # diffusers' own defaults where the config is silent.
  ref = FlowMatchEulerDiscreteScheduler.from_config(SD35).config
  sd35 = diffusion.as_schedule(SD35)
  for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "invert_sigmas",
              "shift_terminal", "time_shift_type", "use_dynamic_shifting"):
    assert getattr(sd35, key) == ref[key], key
  # load_schedule reads a flow-matching checkpoint too.
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLUX_DEV))
  assert diffusion.load_schedule(str(tmp_path)) == flux


@pytest.mark.parametrize("key,value", [("stochastic_sampling", True), ("use_karras_sigmas", True),
                                       ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                                       ("time_shift_type", "cosine")])
def test_unsupported_config_values_fail_naming_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    diffusion.as_schedule({**FLUX_DEV, key: value})


# ---------------------------------------------------------------- inference tables
def test_calculate_shift_matches_both_pipelines():
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
  from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift as sd3_shift,
  )
  for n in (16, 256, 1024, 4096, 9000):
    args = (n, 256, 4096, 0.5, 1.15)
    assert diffusion.calculate_shift(*args) == flux_shift(*args) == sd3_shift(*args)
    args = (n, 128, 2048, 0.25, 1.4)
    assert diffusion.calculate_shift(*args) == flux_shift(*args)


@pytest.mark.parametrize("name,pipeline", [("flux_dev", "flux"), ("sd35", "sd3"), ("flux_dev", "sd3"),
                                           ("sd35", "flux")])
@pytest.mark.parametrize("res", RESOLUTIONS)
def test_flow_sigmas_match_set_timesteps(name, pipeline, res):
  """The published configs as their own pipeline calls set_timesteps (and each under the other's call)."""
  cfg = {"flux_dev": FLUX_DEV, "sd35": SD35}[name]
  for n in STEPS:
    ts, sigmas = _ours(cfg, n, (res // 16) ** 2, pipeline)
    ref_ts, ref_sigmas = _reference_tables(cfg, n, (res // 16) ** 2, pipeline)
    assert ts.dtype == sigmas.dtype == np.float32 and ts.shape == (n,) and sigmas.shape == (n + 1,)
    np.testing.assert_array_equal(ts, ref_ts, err_msg=f"timesteps n={n}")
    np.testing.assert_array_equal(sigmas, ref_sigmas, err_msg=f"sigmas n={n}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_flow_sigmas_match_set_timesteps_variants(name):
  """Linear time shift, shift_terminal, dynamic shifting in SD3's call, invert_sigmas, another T."""
  cfg = VARIANTS[name]
  for pipeline in ("flux", "sd3"):
    for res in RESOLUTIONS:
      # diffusers returns NaN sigmas for shift_terminal with one step from sigma 1; we raise instead.
      for n in STEPS[1:] if cfg.get("shift_terminal") else STEPS:
        got = _ours(cfg, n, (res // 16) ** 2, pipeline)
        for a, b in zip(got, _reference_tables(cfg, n, (res // 16) ** 2, pipeline)):
          np.testing.assert_array_equal(a, b, err_msg=f"{pipeline} res={res} n={n}")
  if cfg.get("shift_terminal"):
    with pytest.raises(ValueError, match="shift_terminal"):
      _ours(cfg, 1, 256, "flux")


def test_flow_sigmas_needs_image_seq_len_with_dynamic_shifting():
  with pytest.raises(ValueError, match="image_seq_len"):
    diffusion.flow_sigmas(FLUX_DEV, 4)
  # An explicit mu (StableDiffusion3Pipeline's `mu` argument) is used as given.
  ref = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
  ref.set_timesteps(6, mu=0.9)
  _, sigmas = diffusion.flow_sigmas(FLUX_DEV, 6, mu=0.9)
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())


# ---------------------------------------------------------------- sampling
def _toy_jax(x, t, c):
  """A fixed analytic velocity, affine in x with t- and cond-dependent terms."""
  s = (t / 1000.0)[:, None, None, None]
  return (-0.6 + 0.4 * s * c["gain"][:, None, None, None]) * x + (1 - s) * c["shift"][:, None, None, :]


def _toy_torch(x, t, c):
  s = (t / 1000.0)[:, None, None, None]
  gain, shift = torch.from_numpy(c["gain"]), torch.from_numpy(c["shift"])
  return (-0.6 + 0.4 * s * gain[:, None, None, None]) * x + (1 - s) * shift[:, None, None, :]


def _diffusers_loop(cfg, pipeline, num_steps, image_seq_len, init, cond, uncond, g):
  """The denoising loop of FluxPipeline / StableDiffusion3Pipeline around scheduler.step (NHWC is fine:
  the scheduler is elementwise); the toy model gets `timestep` = the scheduler's t."""
  ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
  if pipeline == "flux":
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=_flux_mu(ref, image_seq_len))
  else:
    mu = _sd3_mu(ref, image_seq_len)
    ref.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
  x = torch.from_numpy(init)
  for t in ref.timesteps:
    if uncond is None:
      v = _toy_torch(x, t.expand(x.shape[0]), cond)
    else:
      both = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}
      v_u, v_c = _toy_torch(torch.cat([x, x]), t.expand(2 * x.shape[0]), both).chunk(2)
      v = v_u + g * (v_c - v_u)
    x = ref.step(v, t, x, return_dict=False)[0]
  return x.numpy()


@pytest.fixture(scope="module")
def inputs():
  r = np.random.default_rng(0)
  b = 2
  init = r.normal(size=(b, 8, 8, 4)).astype(np.float32)
  cond = {"shift": r.normal(size=(b, 4)).astype(np.float32), "gain": r.normal(size=(b,)).astype(np.float32)}
  uncond = {"shift": np.zeros((b, 4), np.float32), "gain": np.zeros((b,), np.float32)}
  return init, cond, uncond


@jax.jit
def _jit_sample(schedule, init, cond, uncond, g):
  """The schedule as a jit argument (no leaves: part of the cache key), as sampling.generate_latents does."""
  return diffusion.sample(_toy_jax, init, schedule, 10, guidance_scale=g, cond=cond, uncond=uncond,
                          sigmas=diffusion.linear_sigmas(10) if schedule.use_dynamic_shifting else None)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@pytest.mark.parametrize("name,pipeline", [("flux_dev", "flux"), ("sd35", "sd3")])
def test_euler_sampling_matches_diffusers(inputs, name, pipeline, guidance_scale):
  cfg = {"flux_dev": FLUX_DEV, "sd35": SD35}[name]
  init, cond, uncond = inputs
  uncond = uncond if guidance_scale != 1.0 else None
  # 8x8 latents, patch 2: 16 image tokens, the image_seq_len computed from the latents' shape.
  expected = _diffusers_loop(cfg, pipeline, 10, 16, init, cond, uncond, guidance_scale)
  sigmas = diffusion.linear_sigmas(10) if pipeline == "flux" else None
  got = diffusion.sample(_toy_jax, init, cfg, 10, guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                         sigmas=sigmas)
  assert got.shape == init.shape and got.dtype == jnp.float32
  assert rel_l2(got, expected) < 1e-5, rel_l2(got, expected)
  if uncond is not None:  # the schedule as a jit argument, guidance traced
    got = _jit_sample(diffusion.as_schedule(cfg), init, cond, uncond, jnp.float32(guidance_scale))
    assert rel_l2(got, expected) < 1e-5, rel_l2(got, expected)


def test_sampling_image_seq_len_override_and_packed_latents(inputs):
  """An explicit image_seq_len (a 1024 px image's 4096 tokens) sets FLUX's shift; (B, N, C) latents count N."""
  init, cond, _ = inputs
  expected = _diffusers_loop(FLUX_DEV, "flux", 6, 4096, init, cond, None, 1.0)
  got = diffusion.sample(_toy_jax, init, FLUX_DEV, 6, cond=cond, image_seq_len=4096,
                         sigmas=diffusion.linear_sigmas(6))
  assert rel_l2(got, expected) < 1e-5, rel_l2(got, expected)
  assert diffusion._image_seq_len((2, 64, 4), 2) == 64 and diffusion._image_seq_len((2, 6, 10, 4), 2) == 15


def test_sampling_rejects_unsupported_samplers_and_ddpm_sigmas(inputs):
  init, cond, _ = inputs
  with pytest.raises(ValueError, match="sampler='ddim'"):
    diffusion.sample(_toy_jax, init, SD35, 2, sampler="ddim", cond=cond)
  ddpm = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
  with pytest.raises(ValueError, match="sigmas"):
    diffusion.sample(_toy_jax, init, ddpm, 2, cond=cond, sigmas=diffusion.linear_sigmas(2))


# ---------------------------------------------------------------- training draws
def _mode_inverse(v, s):
  """u with 1 - u - s (cos^2(pi u / 2) - 1 + u) = v, by bisection (the map decreases on [0, 1])."""
  lo, hi = np.zeros_like(v), np.ones_like(v)
  f = lambda u: 1 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
  for _ in range(60):
    mid = (lo + hi) / 2
    above = f(mid) > v  # root lies to the right
    lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
  return (lo + hi) / 2


CDFS = {  # exact CDFs of u under each density
    "uniform": lambda u, **_: u,
    "logit_normal": lambda u, logit_mean, logit_std, **_: scipy.stats.norm.cdf(
        (np.log(u) - np.log1p(-u) - logit_mean) / logit_std),
    "mode": lambda u, mode_scale, **_: 1 - _mode_inverse(u, mode_scale),
}


@pytest.mark.parametrize("density,params", [
    ("uniform", {}), ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
    ("logit_normal", {"logit_mean": 0.4, "logit_std": 0.7}), ("mode", {"mode_scale": 1.29}),
    ("mode", {"mode_scale": 0.5})])
def test_densities_follow_their_cdfs(density, params):
  u = np.asarray(diffusion.flow_density(jax.random.key(3), 20000, density, **params), np.float64)
  assert u.min() >= 0 and u.max() <= 1
  full = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29} | params
  ks = scipy.stats.kstest(u, lambda x: CDFS[density](x, **full))
  assert ks.pvalue > 1e-3, ks


def test_uniform_fallbacks_and_mode_map_match_diffusers():
  """compute_density_for_timestep_sampling draws torch.rand for "none" / "sigma_sqrt" / "cosmap", and "mode"
  maps that same draw as `_mode_map` does."""
  raw = lambda: torch.rand(512, generator=torch.Generator().manual_seed(7))
  for name in ("none", "sigma_sqrt", "cosmap"):
    got = compute_density_for_timestep_sampling(name, 512, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(got.numpy(), raw().numpy())
    key = jax.random.key(1)
    np.testing.assert_array_equal(diffusion.flow_density(key, 64, name), diffusion.flow_density(key, 64, "uniform"))
  mode = compute_density_for_timestep_sampling("mode", 512, mode_scale=1.29,
                                               generator=torch.Generator().manual_seed(7))
  np.testing.assert_allclose(diffusion._mode_map(jnp.asarray(raw().numpy()), 1.29), mode.numpy(),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="density='gaussian'"):
    diffusion.flow_density(jax.random.key(0), 4, "gaussian")


def _script_lookup(cfg, u):
  """train_dreambooth_lora_flux.py / _sd3.py: a scheduler from the config (no set_timesteps), then
  indices = (u * T).long(), timesteps[indices], and get_sigmas' search of each timestep."""
  ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
  indices = (torch.from_numpy(u) * ref.config.num_train_timesteps).long()
  timesteps = ref.timesteps[indices]
  step_indices = [(ref.timesteps == t).nonzero().item() for t in timesteps]
  return ref.sigmas[step_indices].flatten().numpy(), timesteps.numpy()


@pytest.mark.parametrize("cfg", [FLUX_DEV, SD35, VARIANTS["short_t"]], ids=["flux_dev", "sd35", "short_t"])
def test_training_grid_lookup_matches_scripts(cfg):
  """Dynamic shifting: training sigmas unshifted (FLUX); static: shifted by `shift` (SD3.5)."""
  T = cfg["num_train_timesteps"]
  r = np.random.default_rng(4)
  u = np.concatenate([r.random(200), np.arange(T) / T, [0.0, 1e-7, 0.5 / T, 1 - 1e-7, 1 - 0.5 / T]])
  u = u.astype(np.float32)
  sigmas, timesteps = jax.jit(diffusion.flow_lookup)(diffusion.as_schedule(cfg), u)
  ref_sigmas, ref_timesteps = _script_lookup(cfg, u)
  np.testing.assert_array_equal(sigmas, ref_sigmas)
  np.testing.assert_array_equal(timesteps, ref_timesteps)
  # u = 1 (diffusers: index T, out of range) takes the last entry.
  last_sigma, last_t = diffusion.flow_lookup(cfg, np.ones(1, np.float32))
  assert last_sigma[0] == ref_sigmas[np.argmax(u)] and last_t[0] == ref_timesteps[np.argmax(u)]
  # sample_flow_sigmas = flow_lookup of flow_density with the same key.
  key = jax.random.key(5)
  s, t = diffusion.sample_flow_sigmas(key, 64, cfg, density="mode", mode_scale=1.0)
  s2, t2 = diffusion.flow_lookup(cfg, diffusion.flow_density(key, 64, "mode", mode_scale=1.0))
  assert s.shape == t.shape == (64,) and s.dtype == t.dtype == jnp.float32
  np.testing.assert_array_equal(s, s2)
  np.testing.assert_array_equal(t, t2)
  np.testing.assert_allclose(t, s * T, rtol=1e-6)


def test_loss_weights_match_diffusers():
  sigmas = np.array(diffusion.flow_lookup(SD35, np.linspace(0, 0.999, 101, dtype=np.float32))[0])
  for scheme in ("sigma_sqrt", "cosmap", "none", "logit_normal", "mode"):
    expected = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    got = diffusion.flow_loss_weights(sigmas, scheme)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=scheme)
  with pytest.raises(ValueError, match="scheme='sqrt'"):
    diffusion.flow_loss_weights(sigmas, "sqrt")


def test_forward_process_and_target_match_scripts():
  cfg = SD35
  ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
  r = np.random.default_rng(6)
  x0, noise = r.normal(size=(2, 3, 6, 6, 4)).astype(np.float32)
  u = np.array([0.0, 0.2, 0.77], np.float32)
  sigmas, timesteps = diffusion.flow_lookup(cfg, u)
  xt = jax.jit(diffusion.flow_add_noise)(x0, noise, sigmas)
  # The scripts' formula, and the scheduler's own forward process (scale_noise at the same timesteps).
  s = torch.from_numpy(np.array(sigmas))[:, None, None, None]
  x0_t, noise_t = torch.from_numpy(x0), torch.from_numpy(noise)
  np.testing.assert_allclose(xt, ((1.0 - s) * x0_t + s * noise_t).numpy(), rtol=1e-6, atol=1e-6)
  scaled = ref.scale_noise(x0_t, torch.from_numpy(np.array(timesteps)), noise_t)
  np.testing.assert_allclose(xt, scaled.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(diffusion.flow_target(x0, noise), (noise_t - x0_t).numpy(), rtol=1e-6, atol=1e-6)
  # bf16 latents: float32 arithmetic, result in the input's dtype; a scalar sigma broadcasts.
  x0_low = jnp.asarray(x0, jnp.bfloat16)
  low = diffusion.flow_add_noise(x0_low, noise, 0.25)
  assert low.dtype == jnp.bfloat16
  # Only the final rounding to bfloat16 (half an ulp: at most 2^-8 relative, 8 significant bits) separates
  # it from float32 arithmetic.
  exact = 0.75 * np.asarray(x0_low, np.float32) + 0.25 * noise
  np.testing.assert_allclose(np.asarray(low, np.float32), exact, rtol=2.0**-8, atol=1e-30)
  assert diffusion.flow_target(jnp.asarray(x0, jnp.bfloat16), noise).dtype == jnp.float32


def test_flow_functions_reject_ddpm_schedules():
  ddpm = {"beta_schedule": "linear"}
  with pytest.raises(ValueError, match="flow-matching"):
    diffusion.flow_sigmas(ddpm, 4)
  with pytest.raises(ValueError, match="flow-matching"):
    diffusion.sample_flow_sigmas(jax.random.key(0), 2, ddpm)
