"""Reward models behind one interface: `load_reward(kind, path)` → a scorer of (prompts, uint8 images).

    scorer = load_reward("pickscore", "/ckpt/PickScore_v1")
    scores = scorer(["a red circle", ...], images)   # images: uint8 (N, H, W, 3) → float32 (N,)

Command lines name rewards as `kind=PATH` items separated by commas (`parse_rewards`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Reward(Protocol):
  kind: str

  def __call__(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
    """Score of prompt i with image i, float32 (N,), for uint8 images (N, H, W, 3)."""


class _CLIPReward:
  """A transformers CLIPModel folder: `pickscore` = logit_scale.exp() * cos, `clip` = 100 * max(cos, 0)."""

  def __init__(self, kind: str, path: str | os.PathLike):
    from mapo_jax.models.reward import load_reward_model
    self.kind, self.model = kind, load_reward_model(path)

  def __call__(self, prompts, images):
    out = self.model(list(prompts), np.asarray(images))
    return np.asarray(out["score" if self.kind == "pickscore" else "clip_score"], np.float32)


LOADERS: dict[str, Callable[[str | os.PathLike], Reward]] = {
    "pickscore": lambda path: _CLIPReward("pickscore", path),
    "clip": lambda path: _CLIPReward("clip", path),
}


def load_reward(kind: str, path: str | os.PathLike) -> Reward:
  if kind not in LOADERS:
    raise ValueError(f"reward kind {kind!r} (for {path}); expected one of {sorted(LOADERS)}")
  return LOADERS[kind](path)


def parse_rewards(spec: str) -> dict[str, str]:
  """'pickscore=DIR,hps=FILE' → {"pickscore": "DIR", "hps": "FILE"}, kinds checked, in the given order."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    kind, sep, path = item.partition("=")
    if not sep or not path:
      raise ValueError(f"reward {item!r}: expected KIND=PATH, e.g. pickscore=/ckpt/PickScore_v1")
    if kind not in LOADERS:
      raise ValueError(f"reward {item!r}: unknown kind {kind!r}; expected one of {sorted(LOADERS)}")
    if kind in out:
      raise ValueError(f"reward kind {kind!r} given twice in {spec!r}")
    out[kind] = path
  if not out:
    raise ValueError(f"no rewards in {spec!r}; expected KIND=PATH[,KIND=PATH...]")
  return out
