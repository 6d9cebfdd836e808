"""Metrics of logged steps: one strict-JSON object per line in WORKDIR/metrics.jsonl, and TensorBoard scalars.

Non-finite values are written as `null` (strict JSON has no NaN). A resumed run first drops the lines of
steps after the checkpoint it resumed from (those steps run again), so every step appears once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from tensorboardX import SummaryWriter


def _json_value(v: float) -> float | None:
  return v if math.isfinite(v) else None


class MetricsWriter:
  """Appends logged steps to `workdir/metrics.jsonl` and TensorBoard; a no-op unless `enabled` (process 0)."""

  def __init__(self, workdir: Path, *, first_step: int, enabled: bool):
    self.path, self.enabled = workdir / "metrics.jsonl", enabled
    if not enabled:
      return
    if self.path.exists():  # keep the steps up to the one this run resumes from
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= first_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _json_value(v) for k, v in metrics.items()} | {"step": step}, allow_nan=False) + "\n")
    self.write_scalars(step, metrics)

  def write_scalars(self, step: int, metrics: dict[str, float]) -> None:
    """TensorBoard only (write's second half): also for numbers that are not the train step's (the judge's)."""
    if not self.enabled:
      return
    for k, v in metrics.items():
      self.tensorboard.add_scalar(k, v, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
