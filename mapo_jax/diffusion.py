"""Noise schedules, the training-side forward process, and samplers: DDPM (Euler / DDIM) and flow matching.

DDPM formulas follow diffusers (DDPMScheduler, EulerDiscreteScheduler, DDIMScheduler, v0.42) and are checked
against them in tests/test_diffusion.py. Layout is NHWC; DDPM timesteps are integer indices into the
`num_train_timesteps`-long training schedule.

Flow matching (rectified flow, SD3 / FLUX; Esser et al. 2024, arXiv 2403.03206) follows diffusers'
FlowMatchEulerDiscreteScheduler (schedulers/scheduling_flow_match_euler_discrete.py: __init__, set_timesteps,
time_shift, stretch_shift_to_terminal, step), the way FluxPipeline (pipelines/flux/pipeline_flux.py:
calculate_shift, `sigmas=np.linspace(1, 1/n, n)`, `mu` from the packed latents' token count) and
StableDiffusion3Pipeline (no sigmas, `mu` only with use_dynamic_shifting) call it, and the training draws of
examples/dreambooth/train_dreambooth_lora_{flux,sd3}.py with training_utils.py's
compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3. Checked in tests/test_flow_matching.py.
x_sigma = (1 - sigma) x0 + sigma noise, sigma in [0, 1]; the model predicts the velocity noise - x0 and is
called with t = sigma * num_train_timesteps (the pipelines' `timestep`; FLUX's transformer takes t / 1000).
The host-side tables reproduce diffusers' float32 / float64 arithmetic step by step, so they equal its
values bit for bit, not just closely.

Sampling runs the whole denoising loop as one `jax.lax.scan` over per-step tables (timesteps, sigmas or
alphas) computed on the host in numpy from the schedule's static fields, so `sample` can be traced inside
the caller's `jax.jit` (pass model state as a jit argument and close over it in `denoise_fn`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Allowed values of the config keys we act on; anything else raises ValueError naming the key.
_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero", "sigma_min"),
    "timestep_type": ("discrete",),
}
# Options that change the math in ways we do not implement: any truthy value raises ValueError.
_UNSUPPORTED = ("rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "thresholding", "trained_betas")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """A DDPM training schedule plus the scheduler options the samplers read.

  `alphas_cumprod` (T,) float32 is the only pytree leaf; every other field is static (jit cache key).
  Options a scheduler config may leave out are None, and each sampler then applies the default of the
  matching diffusers class (e.g. timestep_spacing: "linspace" for Euler, "leading" for DDIM).
  """
  alphas_cumprod: jax.Array
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None
  steps_offset: int = 0
  interpolation_type: str = "linear"  # Euler
  final_sigmas_type: str = "zero"  # Euler
  set_alpha_to_one: bool | None = None  # DDIM
  clip_sample: bool | None = None  # DDIM
  clip_sample_range: float = 1.0  # DDIM

  @classmethod
  def from_config(cls, cfg: dict[str, Any]) -> NoiseSchedule:
    """Builds a schedule from a diffusers scheduler config dict (scheduler_config.json contents).

    Keys of other scheduler classes (skip_prk_steps, sample_max_value, ...) are ignored; unsupported
    values of the keys that matter raise ValueError naming the key and value.
    """
    for key in _UNSUPPORTED:
      if cfg.get(key):
        raise ValueError(f"scheduler config {key}={cfg[key]!r} is not supported")
    for key, allowed in _CHOICES.items():
      if cfg.get(key) is not None and cfg[key] not in allowed:
        raise ValueError(f"scheduler config {key}={cfg[key]!r} is not supported; expected one of {allowed}")
    # Every field after alphas_cumprod is a config key; a missing or null key keeps the field's default.
    static = {f.name: cfg[f.name] for f in dataclasses.fields(cls)[1:] if cfg.get(f.name) is not None}
    self = cls(alphas_cumprod=None, **static)
    ac = _alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
    return dataclasses.replace(self, alphas_cumprod=jnp.asarray(ac, jnp.float32))

  def alphas_cumprod_np(self) -> np.ndarray:
    """float64 alphas_cumprod rebuilt from the static fields, usable while `self` is being traced."""
    return _alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)

  # Family-neutral tags shared with FlowMatchSchedule, so a train step can branch on the schedule alone.
  @property
  def kind(self) -> str:
    return "ddpm"

  @property
  def is_flow(self) -> bool:
    return False


jax.tree_util.register_dataclass(
    NoiseSchedule, data_fields=["alphas_cumprod"],
    meta_fields=[f.name for f in dataclasses.fields(NoiseSchedule)[1:]])


# ------------------------------------------------------------------------------------------------------
# Flow matching: FlowMatchEulerDiscreteScheduler's configuration.
# ------------------------------------------------------------------------------------------------------
_FLOW_CHOICES = {"time_shift_type": ("exponential", "linear")}
# Sampling variants we do not implement (stochastic_sampling re-noises each step): any truthy value raises.
_FLOW_UNSUPPORTED = ("stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
FLOW_CLASS_NAME = "FlowMatchEulerDiscreteScheduler"


@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
  """FlowMatchEulerDiscreteScheduler's configuration (diffusers' defaults); every field static.

  Frozen and compared / hashed by value, and a pytree with no leaves: passed to a jitted function it is part
  of the compilation key, like NoiseSchedule's static fields. All tables (training sigmas, sampler steps) are
  rebuilt on the host from these fields.
  """
  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  invert_sigmas: bool = False
  shift_terminal: float | None = None
  time_shift_type: str = "exponential"

  @classmethod
  def from_config(cls, cfg: dict[str, Any]) -> FlowMatchSchedule:
    """Builds the schedule from a diffusers scheduler config dict (scheduler_config.json contents).

    Keys of other scheduler classes are ignored; unsupported values of the keys that matter raise
    ValueError naming the key and value. A missing or null key keeps diffusers' default.
    """
    for key in _FLOW_UNSUPPORTED:
      if cfg.get(key):
        raise ValueError(f"scheduler config {key}={cfg[key]!r} is not supported")
    for key, allowed in _FLOW_CHOICES.items():
      if cfg.get(key) is not None and cfg[key] not in allowed:
        raise ValueError(f"scheduler config {key}={cfg[key]!r} is not supported; expected one of {allowed}")
    cast = {int: int, float: float, bool: bool, "int": int, "float": float, "bool": bool}
    fields = {}
    for f in dataclasses.fields(cls):
      if cfg.get(f.name) is None:
        continue
      kind = f.type.split(" |")[0] if isinstance(f.type, str) else f.type
      fields[f.name] = cast.get(kind, lambda v: v)(cfg[f.name])
    self = cls(**fields)
    if self.num_train_timesteps < 1:
      raise ValueError(f"scheduler config num_train_timesteps={self.num_train_timesteps} must be >= 1")
    return self

  @property
  def kind(self) -> str:
    return "flow"

  @property
  def is_flow(self) -> bool:
    return True


jax.tree_util.register_dataclass(
    FlowMatchSchedule, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(FlowMatchSchedule)])

Schedule = NoiseSchedule | FlowMatchSchedule


def is_flow_config(cfg: dict[str, Any]) -> bool:
  """A FlowMatchEulerDiscreteScheduler config: named so, or carrying its `shift` / `use_dynamic_shifting`
  keys (which no DDPM scheduler has)."""
  return cfg.get("_class_name") == FLOW_CLASS_NAME or "shift" in cfg or "use_dynamic_shifting" in cfg


def load_schedule(path: str) -> Schedule:
  """Reads a scheduler_config.json, given as the file, its folder, or a checkpoint root with scheduler/."""
  for candidate in (path, os.path.join(path, "scheduler_config.json"),
                    os.path.join(path, "scheduler", "scheduler_config.json")):
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return as_schedule(json.load(f))
  raise FileNotFoundError(f"no scheduler_config.json at {path}")


def as_schedule(schedule: Schedule | dict[str, Any]) -> Schedule:
  """The one entry point from a config dict: a FlowMatchSchedule for flow-matching configs (see
  `is_flow_config`), else a NoiseSchedule; schedules pass through."""
  if isinstance(schedule, (NoiseSchedule, FlowMatchSchedule)):
    return schedule
  if is_flow_config(schedule):
    return FlowMatchSchedule.from_config(schedule)
  return NoiseSchedule.from_config(schedule)


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule) -> np.ndarray:
  """alphas_cumprod as diffusers' schedulers define it, computed in float64 (diffusers uses float32;
  the two agree to ~1e-6 relative)."""
  n = num_train_timesteps
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, n)
  elif beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2
  elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal cosine, diffusers `betas_for_alpha_bar`
    alpha_bar = lambda t: np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    i = np.arange(n)
    betas = np.minimum(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
  else:
    raise ValueError(f"scheduler config beta_schedule={beta_schedule!r} is not supported")
  return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------------------------------------------
# Training side: forward process q(x_t | x_0) and the regression target.
# ------------------------------------------------------------------------------------------------------
def _per_sample(a, x):
  """Gathered (B,) coefficients reshaped to broadcast against x (B, ...)."""
  return a.reshape(a.shape + (1,) * (x.ndim - 1))


def add_noise(schedule: NoiseSchedule, x0, noise, t):
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPMScheduler.add_noise); t int (B,), x (B, H, W, C).

  Computed in float32, returned in x0's dtype.
  """
  a = _per_sample(schedule.alphas_cumprod[t], x0)
  xt = jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
  return xt.astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0, noise, t):
  """What the model regresses: noise for epsilon, v = sqrt(a_t) noise - sqrt(1 - a_t) x0 for v_prediction
  (DDPMScheduler.get_velocity). Computed in float32."""
  noise = noise.astype(jnp.float32)
  if schedule.prediction_type == "epsilon":
    return noise
  a = _per_sample(schedule.alphas_cumprod[t], x0)
  return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)


def sample_timesteps(key, batch: int, num_train_timesteps: int = 1000):
  """t ~ U{0, ..., T-1}, int32 (batch,)."""
  return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)


# ------------------------------------------------------------------------------------------------------
# Sampler tables, built on the host as diffusers' set_timesteps builds them.
# ------------------------------------------------------------------------------------------------------
def _spacing(s: NoiseSchedule, num_steps: int, default: str, integer: bool) -> np.ndarray:
  """Inference timesteps, descending (arXiv 2305.08891 table 2, as diffusers set_timesteps)."""
  T, spacing = s.num_train_timesteps, s.timestep_spacing or default
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, num_steps)[::-1]
    return ts.round().astype(np.int64) if integer else ts.astype(np.float32)
  if spacing == "leading":
    ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1] + s.steps_offset
  else:  # trailing
    ts = np.arange(T, 0, -T / num_steps).round() - 1
  return ts.astype(np.int64 if integer else np.float32)


def euler_tables(schedule: NoiseSchedule, num_steps: int):
  """(timesteps (n,) float32, sigmas (n+1,) float32, init_noise_sigma) as EulerDiscreteScheduler computes
  them: sigma(t) = sqrt((1 - a_t) / a_t) linearly interpolated at fractional t, then a final 0 (or the
  smallest training sigma for final_sigmas_type="sigma_min")."""
  ac = schedule.alphas_cumprod_np()
  train_sigmas = np.sqrt((1 - ac) / ac)
  ts = _spacing(schedule, num_steps, "linspace", integer=False)
  sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
  last = train_sigmas[0] if schedule.final_sigmas_type == "sigma_min" else 0.0
  sigmas = np.append(sigmas, last).astype(np.float32)
  # diffusers' init_noise_sigma: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading.
  init = float(sigmas.max())
  if (schedule.timestep_spacing or "linspace") == "leading":
    init = math.sqrt(init**2 + 1)
  return ts, sigmas, init


def ddim_tables(schedule: NoiseSchedule, num_steps: int):
  """(timesteps (n,) int64, alpha_t (n,), alpha_prev (n,)) as DDIMScheduler computes them.

  Like diffusers, the previous timestep is t - T // n whatever the spacing; below 0 it uses
  final_alpha_cumprod = 1 if set_alpha_to_one (default True) else alphas_cumprod[0].
  """
  T = schedule.num_train_timesteps
  if num_steps > T:
    raise ValueError(f"num_steps={num_steps} > num_train_timesteps={T}")
  ac = schedule.alphas_cumprod_np()
  ts = _spacing(schedule, num_steps, "leading", integer=True)
  prev = ts - T // num_steps
  final = 1.0 if schedule.set_alpha_to_one in (None, True) else ac[0]
  alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
  return ts, ac[ts].astype(np.float32), alpha_prev.astype(np.float32)


# ------------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------------
def _guided_model(denoise_fn, cond, uncond, guidance_scale):
  """model(x, t) with classifier-free guidance as diffusers pipelines do it: one call on the doubled batch
  [uncond; cond], then uncond + g * (cond - uncond). Without `uncond` the model runs on `cond` only."""
  if uncond is None:
    return lambda x, t: denoise_fn(x, jnp.full(x.shape[:1], t, jnp.float32), cond).astype(jnp.float32)
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)

  def model(x, t):
    x2 = jnp.concatenate([x, x])
    out = denoise_fn(x2, jnp.full(x2.shape[:1], t, jnp.float32), both).astype(jnp.float32)
    out_u, out_c = jnp.split(out, 2)
    return out_u + guidance_scale * (out_c - out_u)

  return model


def sample(denoise_fn: Callable, init_latents, schedule: NoiseSchedule | dict[str, Any], num_steps: int, *,
           sampler: str = "euler", guidance_scale=1.0, cond, uncond=None):
  """Deterministic sampling with diffusers' Euler (s_churn = 0) or DDIM (eta = 0) update.

  Args:
    denoise_fn: `(latents (N, H, W, C), t float32 (N,), cond) -> model output` (N, H, W, C), epsilon or v
      as the schedule's prediction_type says. N is twice the batch under guidance.
    init_latents: unit-variance Gaussian noise (B, H, W, C). Multiplied here by the sampler's
      init_noise_sigma, as diffusers pipelines do in prepare_latents (1 for DDIM; sigma_max, or
      sqrt(sigma_max^2 + 1) for "leading" spacing, for Euler).
    schedule: a NoiseSchedule or a diffusers scheduler config dict.
    num_steps: number of denoising steps (static).
    sampler: "euler" (EulerDiscreteScheduler, SDXL's default) or "ddim" (DDIMScheduler).
    guidance_scale: classifier-free guidance weight g; may be traced. Used only when `uncond` is given.
    cond: pytree of arrays with leading batch dim B, passed to denoise_fn.
    uncond: pytree like `cond` (e.g. empty-prompt embeddings). When given, the model runs once per step on
      the doubled batch [uncond; cond]. Leave it None for no guidance (diffusers skips CFG at g <= 1).

  Returns:
    Final latents (B, H, W, C) float32.
  """
  s = as_schedule(schedule)
  if uncond is None and isinstance(guidance_scale, (int, float)) and guidance_scale != 1.0:
    raise ValueError(f"guidance_scale={guidance_scale} needs uncond")
  model = _guided_model(denoise_fn, cond, uncond, guidance_scale)
  v_pred = s.prediction_type == "v_prediction"
  x = jnp.asarray(init_latents, jnp.float32)

  if sampler == "euler":
    ts, sigmas, init_sigma = euler_tables(s, num_steps)

    def step(x, xs):  # EulerDiscreteScheduler.scale_model_input + step
      t, sigma, sigma_next = xs
      out = model(x / jnp.sqrt(sigma**2 + 1), t)
      x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1) if v_pred else x - sigma * out
      return x + (x - x0) / sigma * (sigma_next - sigma), None

    xs = (ts, sigmas[:-1], sigmas[1:])
    x = x * init_sigma
  elif sampler == "ddim":
    ts, alpha, alpha_prev = ddim_tables(s, num_steps)
    clip = s.clip_sample in (None, True)  # DDIMScheduler's default is clip_sample=True

    def step(x, xs):  # DDIMScheduler.step with eta = 0, use_clipped_model_output = False
      t, a, a_prev = xs
      out = model(x, t)
      if v_pred:
        x0, eps = jnp.sqrt(a) * x - jnp.sqrt(1 - a) * out, jnp.sqrt(a) * out + jnp.sqrt(1 - a) * x
      else:
        x0, eps = (x - jnp.sqrt(1 - a) * out) / jnp.sqrt(a), out
      if clip:
        x0 = jnp.clip(x0, -s.clip_sample_range, s.clip_sample_range)
      return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps, None

    xs = (ts.astype(np.float32), alpha, alpha_prev)
  else:
    raise ValueError(f"sampler={sampler!r}; expected 'euler' or 'ddim'")

  x, _ = jax.lax.scan(step, x, jax.tree.map(jnp.asarray, xs))
  return x
