"""Judging a run's samples as it trains (config.judge): a judge reads images sampled for fixed prompts on fixed
seeds and returns numbers, so a run shows what preference training does to what the model draws.

    config.judge = "toy_world"          # a name in JUDGES
    config.judge_every = 10             # steps; the base (step 0) and the last step are always judged
    config.judge_prompts = (...)        # each sampled judge_samples_per_prompt times
The trainer (mapo_jax/train.py) writes, under WORKDIR/judge/:
  judge.jsonl       one record per judged step: {"step", <the judge's numbers>}
  step_NNNNNN.png   the judged samples, a row per prompt
  curve.png         the judge's numbers against the step
  before_after.png  the first and the last judged samples side by side (same prompts, same seeds)
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mapo_jax.toy import world as toy_world
from mapo_jax.sampling import make_grid

# (uint8 images (N, H, W, 3), the N prompts they were sampled for) -> {name: number}
Judge = Callable[[np.ndarray, Sequence[str]], dict[str, float]]
JUDGES: dict[str, Judge] = {"toy_world": toy_world.score}  # the toy world's judge (docs/toy_world.md)
GAP = 8  # px of white between the two grids of before_after.png


class JudgeLog:
  """WORKDIR/judge/: records and grids; on resume, drops the records of steps after `first_step` (they run
  again), as mapo_jax.run.metrics does. A no-op unless `enabled` (process 0)."""

  def __init__(self, workdir: Path, *, first_step: int, enabled: bool):
    self.folder, self.enabled = workdir / "judge", enabled
    self.path = self.folder / "judge.jsonl"
    if enabled:
      self.folder.mkdir(parents=True, exist_ok=True)
      kept = [r for r in self.records() if r["step"] <= first_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def records(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def grid_path(self, step: int) -> Path:
    return self.folder / f"step_{step:06d}.png"

  def write(self, step: int, scores: dict[str, float], images: np.ndarray, cols: int) -> None:
    if not self.enabled:
      return
    Image.fromarray(make_grid(images, cols)).save(self.grid_path(step))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scores}) + "\n")

  def finish(self) -> tuple[dict, dict] | None:
    """Writes curve.png and before_after.png; returns the (first, last) records, or None if none."""
    records = self.records()
    if not self.enabled or not records:
      return None
    plot_curve(records, self.folder / "curve.png")
    first, last = records[0], records[-1]
    before, after = (np.asarray(Image.open(self.grid_path(r["step"]))) for r in (first, last))
    side_by_side(before, after).save(self.folder / "before_after.png")
    return first, last


def side_by_side(before: np.ndarray, after: np.ndarray) -> Image.Image:
  gap = np.full((before.shape[0], GAP, 3), 255, np.uint8)
  return Image.fromarray(np.concatenate([before, gap, after], axis=1))


def plot_curve(records: list[dict], path: Path) -> None:
  """Each number of the records against the step, on [0, 1] (the judge's numbers are rates)."""
  import matplotlib  # here, not at the top: the config imports this module for JUDGES
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.2))
  steps = [r["step"] for r in records]
  for key in (k for k in records[0] if k != "step"):
    ax.plot(steps, [r[key] for r in records], marker="o", markersize=3, label=key.replace("_", " "))
  ax.set_xlabel("step")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
