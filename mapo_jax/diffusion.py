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

The train step sees either schedule type through four functions that dispatch on it (`training_times`,
`noisy_latents`, `regression_target`, `loss_weights`): DDPM's integer t ~ U{0..T-1}, q(x_t | x_0), epsilon or v
target and min-SNR weights; flow matching's sigma draws and loss weights of the scripts' `--weighting_scheme`
(`FlowTraining`), x_sigma and the velocity target.

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
    # JSON may give 3 for 3.0: cast to the field's type (annotations are strings here) so equal configs
    # make equal, equally hashed schedules.
    cast = {"int": int, "float": float, "bool": bool, "str": str}
    self = cls(**{f.name: cast[f.type.split(" |")[0]](cfg[f.name]) for f in dataclasses.fields(cls)
                  if cfg.get(f.name) is not None})
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


def flow_add_noise(x0, noise, sigma):
  """x_sigma = (1 - sigma) x0 + sigma noise, sigma (B,) or scalar (FlowMatchEulerDiscreteScheduler.scale_noise,
  and `noisy_model_input` in train_dreambooth_lora_flux.py / _sd3.py). Computed in float32, returned in
  x0's dtype."""
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma = _per_sample(sigma, x0) if sigma.ndim else sigma
  xt = (1.0 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
  return xt.astype(x0.dtype)


def flow_target(x0, noise):
  """The velocity the model regresses: noise - x0 (`target` in train_dreambooth_lora_flux.py / _sd3.py
  without precondition_outputs). float32."""
  return noise.astype(jnp.float32) - x0.astype(jnp.float32)


# Names of diffusers' `weighting_scheme` (the scripts' --weighting_scheme choices) plus "uniform": the three
# that are not "logit_normal" or "mode" draw u uniformly (compute_density_for_timestep_sampling's else).
FLOW_DENSITIES = ("uniform", "logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


def flow_density(key, batch: int, density: str = "logit_normal", *, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
  """u in [0, 1] float32 (batch,) as diffusers' training_utils.compute_density_for_timestep_sampling draws it:
  "logit_normal": sigmoid(N(logit_mean, logit_std^2)); "mode": u ~ U[0, 1) mapped by
  1 - u - mode_scale (cos^2(pi u / 2) - 1 + u) (SD3 paper eq. 20); else U[0, 1). Unknown names raise
  (diffusers silently falls back to uniform) so a typo cannot change the training distribution."""
  if density not in FLOW_DENSITIES:
    raise ValueError(f"density={density!r}; expected one of {FLOW_DENSITIES}")
  if density == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,), jnp.float32))
  u = jax.random.uniform(key, (batch,), jnp.float32)
  return _mode_map(u, mode_scale) if density == "mode" else u


def _mode_map(u, mode_scale):
  """SD3's "mode" density as a map of u ~ U[0, 1): decreasing (so invertible) for mode_scale < 1 / (pi/2 - 1)."""
  return 1 - u - mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)


def flow_lookup(schedule: FlowMatchSchedule | dict[str, Any], u):
  """(sigmas, timesteps) float32 at u (B,) in [0, 1], as the training scripts pick them: index = (u * T).long()
  into the tables of a FlowMatchEulerDiscreteScheduler built from the config with no set_timesteps call
  (`flow_train_tables`). The index is clipped to [0, T - 1]: diffusers would fail on u = 1 (a sigmoid that
  rounds to 1 in float32, or the mode map at u = 0)."""
  s = _flow(schedule)
  train_t, train_s = flow_train_tables(s)
  T = s.num_train_timesteps
  # float32 product then truncation toward zero, as torch's `(u * T).long()` on float32 u.
  index = jnp.clip((jnp.asarray(u, jnp.float32) * T).astype(jnp.int32), 0, T - 1)
  return jnp.asarray(train_s)[index], jnp.asarray(train_t)[index]


def sample_flow_sigmas(key, batch: int, schedule: FlowMatchSchedule | dict[str, Any], *,
                       density: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29):
  """Training draws for flow matching: (sigmas (B,), timesteps (B,)) float32, timesteps = sigma * T as the
  model's t. `flow_density` (compute_density_for_timestep_sampling) then `flow_lookup` (the scripts'
  `indices`, `timesteps[indices]`, get_sigmas), as train_dreambooth_lora_flux.py / _sd3.py do."""
  u = flow_density(key, batch, density, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
  return flow_lookup(schedule, u)


# Loss weighting schemes: diffusers' weighting_scheme names; all but "sigma_sqrt" and "cosmap" weigh 1.
FLOW_WEIGHTINGS = FLOW_DENSITIES


def flow_loss_weights(sigmas, scheme: str = "none"):
  """Per-sample loss weights float32 as diffusers' training_utils.compute_loss_weighting_for_sd3:
  "sigma_sqrt": sigma^-2, "cosmap": 2 / (pi (1 - 2 sigma + 2 sigma^2)), the other names 1. Unknown names
  raise (diffusers returns 1)."""
  if scheme not in FLOW_WEIGHTINGS:
    raise ValueError(f"weighting scheme={scheme!r}; expected one of {FLOW_WEIGHTINGS}")
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if scheme == "sigma_sqrt":
    return sigmas**-2.0
  if scheme == "cosmap":
    return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
  return jnp.ones_like(sigmas)


# ------------------------------------------------------------------------------------------------------
# The training step's view of either schedule type: draw training times, noise latents, the regression target
# and per-sample loss weights. Each dispatches on the schedule's type, so the train step has one code path.
# ------------------------------------------------------------------------------------------------------
FLOW_WEIGHTED = ("sigma_sqrt", "cosmap")  # the weighting schemes whose loss weights are not all 1


@dataclasses.dataclass(frozen=True)
class FlowTraining:
  """How flow-matching training draws sigma and weighs its per-sample losses, as diffusers' training scripts
  (train_dreambooth_lora_flux.py / _sd3.py) drive both from one `--weighting_scheme`: "logit_normal" and "mode"
  shape the density of u and weigh 1; "sigma_sqrt" and "cosmap" draw u uniformly and weigh the losses; "none"
  (and "uniform") do neither. `logit_mean`, `logit_std`, `mode_scale`: the scripts' flags of the same names
  (defaults 0, 1, 1.29). The scripts' defaults differ: FLUX "none", SD3 "logit_normal" (config.flow)."""
  weighting_scheme: str = "none"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29

  def __post_init__(self):
    if self.weighting_scheme not in FLOW_WEIGHTINGS:
      raise ValueError(f"weighting_scheme={self.weighting_scheme!r}; expected one of {FLOW_WEIGHTINGS}")


def training_times(key, batch: int, schedule: Schedule | int, flow: FlowTraining | None = None) -> dict[str, jax.Array]:
  """One training time per sample, (batch,) each. DDPM: {"t": int32 t ~ U{0, ..., T-1}} (`schedule` may be T
  alone). Flow matching: {"t": sigma * T float32, "sigma": sigma float32}, u drawn by `flow`'s density and looked
  up as the training scripts do (`sample_flow_sigmas`). "t" is always the model's time (what `denoise` takes)."""
  if isinstance(schedule, FlowMatchSchedule):
    flow = flow or FlowTraining()
    sigma, t = sample_flow_sigmas(key, batch, schedule, density=flow.weighting_scheme, logit_mean=flow.logit_mean,
                                  logit_std=flow.logit_std, mode_scale=flow.mode_scale)
    return {"t": t, "sigma": sigma}
  return {"t": sample_timesteps(key, batch, schedule if isinstance(schedule, int) else schedule.num_train_timesteps)}


def noisy_latents(schedule: Schedule, x0, noise, times: dict[str, jax.Array]):
  """The forward process at `times` (`training_times`' dict): DDPM `add_noise` at t, flow matching
  (1 - sigma) x0 + sigma noise (`flow_add_noise`)."""
  if schedule.is_flow:
    return flow_add_noise(x0, noise, times["sigma"])
  return add_noise(schedule, x0, noise, times["t"])


def regression_target(schedule: Schedule, x0, noise, times: dict[str, jax.Array]):
  """What the model regresses, float32: DDPM `training_target` (epsilon or v), flow matching the velocity
  noise - x0 (`flow_target`)."""
  if schedule.is_flow:
    return flow_target(x0, noise)
  return training_target(schedule, x0, noise, times["t"])


def min_snr_weights(schedule: NoiseSchedule, t, gamma: float):
  """Min-SNR-gamma loss weights (Hang et al., arXiv 2303.09556; diffusers' training scripts, `--snr_gamma`):
  min(SNR(t), gamma) / SNR(t) for epsilon targets, min(SNR(t), gamma) / (SNR(t) + 1) for v targets, with
  SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]). float32, shape of t. DDPM schedules only."""
  a = schedule.alphas_cumprod[t].astype(jnp.float32)
  snr = a / (1.0 - a)
  clipped = jnp.minimum(snr, gamma)
  return clipped / (snr + 1.0) if schedule.prediction_type == "v_prediction" else clipped / snr


def loss_weights(schedule: Schedule, times: dict[str, jax.Array], *, min_snr_gamma: float = 0.0,
                 flow: FlowTraining | None = None):
  """Per-sample loss weights float32 (B,), or None where every weight is 1 (nothing to multiply). DDPM: min-SNR-
  gamma weights when min_snr_gamma > 0. Flow matching: `flow_loss_weights` of flow's scheme (sigma_sqrt, cosmap);
  min-SNR, defined by the DDPM schedule's alphas, is refused there."""
  if schedule.is_flow:
    if min_snr_gamma > 0:
      raise ValueError("min_snr_gamma weighs by a DDPM schedule's SNR; a flow-matching schedule weighs by its "
                       "weighting_scheme")
    scheme = (flow or FlowTraining()).weighting_scheme
    return flow_loss_weights(times["sigma"], scheme) if scheme in FLOW_WEIGHTED else None
  return min_snr_weights(schedule, times["t"], min_snr_gamma) if min_snr_gamma > 0 else None


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


def _flow(schedule) -> FlowMatchSchedule:
  s = as_schedule(schedule)
  if not s.is_flow:
    raise ValueError(f"expected a flow-matching schedule, got a {s.kind} one")
  return s


def _static_shift(sigmas, shift):
  """shift * sigma / (1 + (shift - 1) * sigma) (SD3 paper eq. 23), in sigmas' float dtype as diffusers."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


@functools.lru_cache(maxsize=16)
def flow_train_tables(schedule: FlowMatchSchedule) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps (T,), sigmas (T,)) float32, descending: FlowMatchEulerDiscreteScheduler.__init__'s tables.

  sigma = (T, ..., 1) / T, shifted by the static `shift` unless use_dynamic_shifting (then the training
  sigmas are not shifted at all: diffusers shifts only at set_timesteps); timesteps = sigma * T. Computed in
  float32 like diffusers' torch code. Read-only arrays (cached).
  """
  T = schedule.num_train_timesteps
  sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
  if not schedule.use_dynamic_shifting:
    sigmas = _static_shift(sigmas, schedule.shift)
  timesteps = sigmas * np.float32(T)
  for a in (sigmas, timesteps):
    a.flags.writeable = False
  return timesteps, sigmas


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
  """mu, linear in the image token count through (base_seq_len, base_shift) and (max_seq_len, max_shift)
  (diffusers' pipelines/flux/pipeline_flux.py calculate_shift; the same in the SD3 pipeline)."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  b = base_shift - m * base_seq_len
  return image_seq_len * m + b


def linear_sigmas(num_steps: int) -> np.ndarray:
  """FluxPipeline's default `sigmas`: np.linspace(1.0, 1 / n, n), before set_timesteps shifts them."""
  return np.linspace(1.0, 1 / num_steps, num_steps)


def flow_sigmas(schedule: FlowMatchSchedule | dict[str, Any], num_steps: int, *, image_seq_len: int | None = None,
                sigmas=None, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps (n,), sigmas (n+1,)) float32 as FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps,
  sigmas=sigmas, mu=mu) leaves scheduler.timesteps / scheduler.sigmas.

  Pipelines: FluxPipeline passes `sigmas=linear_sigmas(n)` and mu = calculate_shift(image_seq_len, ...)
  from the config (image_seq_len = packed latent tokens, (H/16) (W/16) for an H x W image);
  StableDiffusion3Pipeline passes no sigmas, and mu only with use_dynamic_shifting. Here `mu`, when not
  given, comes from `image_seq_len` and the config's base/max values; it is needed (and used) only with
  use_dynamic_shifting. Without `sigmas` the schedule starts from set_timesteps' default
  linspace(sigma_max, sigma_min, n) of the __init__ table (already shifted once when the shift is static,
  so SD3's static shift applies twice, exactly as in diffusers). Then: the static or dynamic
  (time_shift_type) shift, shift_terminal's stretch, invert_sigmas, and the final 0 (1 if inverted).
  Arithmetic follows diffusers' dtypes: float64 numpy for its own grid, float32 for given `sigmas`.
  """
  s = _flow(schedule)
  T = s.num_train_timesteps
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  if s.use_dynamic_shifting and mu is None:
    if image_seq_len is None:
      raise ValueError("use_dynamic_shifting needs image_seq_len (or mu)")
    mu = calculate_shift(image_seq_len, s.base_image_seq_len, s.max_image_seq_len, s.base_shift, s.max_shift)
  if sigmas is None:
    _, train = flow_train_tables(s)
    sig = np.linspace(float(train[0]) * T, float(train[-1]) * T, num_steps) / T  # float64
  else:
    sig = np.asarray(sigmas).astype(np.float32)
    if sig.shape != (num_steps,):
      raise ValueError(f"sigmas has shape {sig.shape}; expected ({num_steps},)")
  if s.use_dynamic_shifting:  # time_shift(mu, 1.0, sigmas): exponential or linear in mu
    c = math.exp(mu) if s.time_shift_type == "exponential" else mu
    sig = c / (c + (1 / sig - 1) ** 1.0)
  else:
    sig = _static_shift(sig, s.shift)
  if s.shift_terminal:  # stretch_shift_to_terminal: the last sigma becomes shift_terminal
    one_minus = 1 - sig
    if one_minus[-1] == 0:  # diffusers returns NaN sigmas here (one step from sigma 1)
      raise ValueError(f"shift_terminal={s.shift_terminal} needs a last sigma below 1; got num_steps={num_steps}")
    sig = 1 - one_minus / (one_minus[-1] / (1 - s.shift_terminal))
  sig = sig.astype(np.float32)
  last = np.float32(0.0)
  if s.invert_sigmas:  # Mochi: sigmas 1 - sigma, ending at 1
    sig, last = 1 - sig, np.float32(1.0)
  timesteps = sig * np.float32(T)
  return timesteps, np.append(sig, last).astype(np.float32)


def _image_seq_len(shape, patch_size: int) -> int:
  """Image tokens of the latents: (H / p) (W / p) for NHWC latents (SD3Pipeline's formula; FluxPipeline's
  packed latents.shape[1] is the same count for p = 2), or N for already packed (B, N, C) latents."""
  if len(shape) == 3:
    return int(shape[1])
  if len(shape) != 4:
    raise ValueError(f"latents of shape {shape}: pass image_seq_len")
  return (shape[1] // patch_size) * (shape[2] // patch_size)


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


def sample(denoise_fn: Callable, init_latents, schedule: Schedule | dict[str, Any], num_steps: int, *,
           sampler: str = "euler", guidance_scale=1.0, cond, uncond=None, image_seq_len: int | None = None,
           patch_size: int = 2, sigmas=None):
  """Deterministic sampling: diffusers' Euler (s_churn = 0) or DDIM (eta = 0) update for a DDPM schedule, or
  FlowMatchEulerDiscreteScheduler.step (x + (sigma_next - sigma) v) for a flow-matching one. The schedule's
  type picks the family.

  Args:
    denoise_fn: `(latents (N, H, W, C), t float32 (N,), cond) -> model output` (N, H, W, C), epsilon or v
      as the schedule's prediction_type says, or the flow velocity (noise - x0) for a FlowMatchSchedule, whose
      t is sigma * num_train_timesteps (the pipelines' `timestep`). N is twice the batch under guidance.
    init_latents: unit-variance Gaussian noise (B, H, W, C). Multiplied here by the sampler's
      init_noise_sigma, as diffusers pipelines do in prepare_latents (1 for DDIM and flow matching;
      sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing, for Euler).
    schedule: a NoiseSchedule, a FlowMatchSchedule, or a diffusers scheduler config dict (`as_schedule`).
    num_steps: number of denoising steps (static).
    sampler: "euler" (EulerDiscreteScheduler, SDXL's default; FlowMatchEulerDiscreteScheduler, the only
      flow-matching sampler) or "ddim" (DDIMScheduler, DDPM only).
    guidance_scale: classifier-free guidance weight g; may be traced. Used only when `uncond` is given.
    cond: pytree of arrays with leading batch dim B, passed to denoise_fn.
    uncond: pytree like `cond` (e.g. empty-prompt embeddings). When given, the model runs once per step on
      the doubled batch [uncond; cond]. Leave it None for no guidance (diffusers skips CFG at g <= 1).
    image_seq_len: flow matching with use_dynamic_shifting only (ignored otherwise): the image token count
      that sets the shift mu. Default: computed from the latents' static shape, (H // patch_size) *
      (W // patch_size), which is both SD3's and FLUX's count for their patch size 2 (or N for packed
      (B, N, C) latents).
    patch_size: the transformer's patch size, for the default image_seq_len.
    sigmas: flow matching only: custom sigmas (n,) on the host, as a pipeline's `sigmas` argument; FluxPipeline
      passes `linear_sigmas(n)`, StableDiffusion3Pipeline None (see `flow_sigmas`).

  Returns:
    Final latents (B, H, W, C) float32.
  """
  s = as_schedule(schedule)
  if uncond is None and isinstance(guidance_scale, (int, float)) and guidance_scale != 1.0:
    raise ValueError(f"guidance_scale={guidance_scale} needs uncond")
  model = _guided_model(denoise_fn, cond, uncond, guidance_scale)
  x = jnp.asarray(init_latents, jnp.float32)
  if s.is_flow:
    if sampler != "euler":
      raise ValueError(f"sampler={sampler!r} is not supported by a flow-matching schedule; expected 'euler'")
    if image_seq_len is None and s.use_dynamic_shifting:
      image_seq_len = _image_seq_len(x.shape, patch_size)
    ts, sig = flow_sigmas(s, num_steps, image_seq_len=image_seq_len, sigmas=sigmas)

    def flow_step(x, xs):  # FlowMatchEulerDiscreteScheduler.step, stochastic_sampling off; init sigma 1
      t, sigma, sigma_next = xs
      return x + (sigma_next - sigma) * model(x, t), None

    x, _ = jax.lax.scan(flow_step, x, jax.tree.map(jnp.asarray, (ts, sig[:-1], sig[1:])))
    return x
  if sigmas is not None:
    raise ValueError("sigmas is supported for flow-matching schedules only")
  v_pred = s.prediction_type == "v_prediction"

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
