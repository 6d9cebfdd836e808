"""The optimizer: optax AdamW (or Adafactor) behind global-norm clipping, with a learning-rate schedule."""
from __future__ import annotations

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
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.name == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
  else:
    raise ValueError(f"optim.name={cfg.name!r}; expected one of {OPTIMIZERS}")
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt


def default_config() -> ConfigDict:
  """The official recipes' optimizer: AdamW (0.9, 0.999, 1e-8, wd 1e-2), lr 1e-5 constant, clip 1.0."""
  return ConfigDict(dict(name="adamw", lr=1e-5, schedule="constant", warmup_steps=0, total_steps=2000,
                         b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, clip_norm=1.0))
