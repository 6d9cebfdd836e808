"""Reward scoring for the command lines (evaluate, relabel, make_pairs): flag parsing and batched calls.

The reward models themselves are behind `mapo_jax.rewards.load_reward`; this module only parses the
`KIND=PATH` flags and feeds a scorer images in bounded batches of one size each.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from mapo_jax import rewards

SCORE_BATCH = 64  # images per reward call: bounds device memory whatever the number of images


def rewards_flag(text: str) -> dict[str, str]:
  """--rewards KIND=PATH[,KIND=PATH...] for argparse (an ArgumentTypeError keeps its message)."""
  try:
    return rewards.parse_rewards(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e


def reward_flag(text: str) -> tuple[str, str]:
  """--reward KIND=PATH: exactly one reward, as (kind, path)."""
  specs = rewards_flag(text)
  if len(specs) != 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected one KIND=PATH, got {len(specs)}")
  return next(iter(specs.items()))


def score(reward: rewards.Reward, prompts: Sequence[str], images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """float32 (N,) scores of prompt i with uint8 HWC image i. Images may differ in size (a scorer takes one
  stacked batch): each size is scored in its own batches of at most SCORE_BATCH."""
  if len(prompts) != len(images):
    raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
  out = np.zeros(len(images), np.float32)
  by_shape: dict[tuple, list[int]] = {}
  for i, image in enumerate(images):
    by_shape.setdefault(np.shape(image), []).append(i)
  for idx in by_shape.values():
    for start in range(0, len(idx), SCORE_BATCH):
      chunk = idx[start:start + SCORE_BATCH]
      batch = np.stack([np.asarray(images[i], np.uint8) for i in chunk])
      out[chunk] = np.asarray(reward([prompts[i] for i in chunk], batch), np.float32)
  return out
