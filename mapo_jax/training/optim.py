"""The optimizer: optax AdamW (or Adafactor) behind global-norm clipping, with a learning-rate schedule.

Adafactor is transformers' `Adafactor(params, lr=lr, weight_decay=wd, clip_threshold=1.0,
scale_parameter=False, relative_step=False)` as the official Diffusion-DPO trainer calls it for SDXL
(SalesforceAIResearch/DiffusionDPO train.py), built from optax's parts:
- second moments: grad² + 1e-30 (transformers' eps[0]), decayed by beta2_t = 1 − t^−0.8 at update t = 1,
  2, ... (transformers' decay_rate −0.8; optax's decay_rate 0.8 with offset 0 gives the same beta2_t);
  row/column-factored for matrices, as transformers factors every tensor of rank >= 2;
- the update divided by max(1, RMS(update) / 1.0) per tensor (clip_threshold 1.0 = optax clip_by_block_rms);
- no parameter scaling, no relative step, no first moment (beta1 None): lr comes from the schedule;
- decoupled weight decay scaled by the learning rate: p -= lr · (update + wd · p). optax.adafactor adds
  `weight_decay_rate · p` after the learning rate (a decay of wd per step, not lr · wd), so the chain is
  built here with the decay before the learning rate.
Differences that remain: transformers factors the last two axes of every tensor of rank >= 2, optax the
two largest axes of tensors whose two largest axes are both >= MIN_DIM_TO_FACTOR (128). For linear
weights that is the same pair of axes (rank-1 second-moment estimate over in x out); for conv kernels
transformers (OIHW) factors the 3 x 3 spatial axes and optax (HWIO) the channel axes, and tensors with
an axis < 128 (conv_in, conv_out) keep full second moments here. transformers' eps[1] (1e-3) only floors
the parameter scale, which is off.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

SCHEDULES = ("constant", "linear_warmup", "cosine")
OPTIMIZERS = ("adamw", "adafactor")


def learning_rate(cfg: ConfigDict) -> optax.Schedule:
  """constant; linear_warmup (0 → lr over warmup_steps, then lr); cosine (warmup, then cosine to 0 at total_steps)."""
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.lr)
  if cfg.schedule == "linear_warmup":
    return optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.total_steps)
  raise ValueError(f"optim.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")


def make_optimizer(cfg: ConfigDict) -> optax.GradientTransformation:
  """`cfg`: name, lr, schedule, warmup_steps, total_steps, b1, b2, eps, weight_decay, clip_norm."""
  lr = learning_rate(cfg)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mu_dtype=jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None)
  elif cfg.name == "adafactor":
    opt = adafactor(lr, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"optim.name={cfg.name!r}; expected one of {OPTIMIZERS}")
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt


MIN_DIM_TO_FACTOR = 128  # optax.adafactor's min_dim_size_to_factor


def adafactor(lr: optax.ScalarOrSchedule, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """transformers' Adafactor(lr=lr, weight_decay=weight_decay, clip_threshold=1.0, scale_parameter=False,
  relative_step=False) in optax parts (module docstring: what maps and what differs)."""
  return optax.chain(
      optax.scale_by_factored_rms(factored=True, decay_rate=0.8, step_offset=0,
                                  min_dim_size_to_factor=MIN_DIM_TO_FACTOR, epsilon=1e-30),
      optax.clip_by_block_rms(1.0),
      optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
      optax.scale_by_learning_rate(lr))


def default_config() -> ConfigDict:
  """The official recipes' optimizer: AdamW (0.9, 0.999, 1e-8, wd 1e-2), lr 1e-5 constant, clip 1.0.

  mu_dtype: AdamW's first moment's dtype ("" = the parameters', float32; "bfloat16" halves it, as optax's
  `mu_dtype`). offload: the optimizer state in host memory between steps (`train_step.create_sharded_state`)."""
  return ConfigDict(dict(name="adamw", lr=1e-5, schedule="constant", warmup_steps=0, total_steps=2000,
                         b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, clip_norm=1.0, mu_dtype="",
                         offload=False))
