"""Where a run's numbers and pictures go: one strict-JSON object per logged step in WORKDIR/metrics.jsonl,
TensorBoard (scalars and images, tensorboardX) and, when config.wandb.project is set, Weights & Biases.

Non-finite values are written as `null` (strict JSON has no NaN). A resumed run first drops the lines of
steps after the checkpoint it resumed from (those steps run again), so every step appears once. W&B keeps
one run per workdir: its id lives in WORKDIR/wandb/run_id and a restart resumes it; the last step it was
sent lives in WORKDIR/wandb/last_step, and a resumed run sends nothing at or before that step (the resume
retakes those steps bit for bit, and W&B keeps a step's first values), so no step reaches W&B twice.
Only process 0 writes (`enabled`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def _import_summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it is installed, only
  to accept torch tensors (we log numpy), and that import took 2-5 s of every trainer's start-up (more than JAX's).
  While sys.modules["torch"] is None, `import torch` raises ModuleNotFoundError, which tensorboardX expects."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _import_summary_writer()

WANDB_MODES = ("online", "offline")


def _json_value(v: float) -> float | None:
  return v if math.isfinite(v) else None


class Wandb:
  """The run's W&B run (wandb imported only here: an optional extra, `pip install mapo-jax[wandb]`)."""

  def __init__(self, workdir: Path, settings: Any, config: dict, first_step: int):
    try:
      import wandb
    except ImportError:
      raise ImportError("config.wandb.project is set, but wandb is not installed: pip install 'mapo-jax[wandb]' "
                        "(or pip install wandb)") from None
    self.wandb, self.folder = wandb, workdir / "wandb"
    self.folder.mkdir(parents=True, exist_ok=True)
    id_file, self.step_file = self.folder / "run_id", self.folder / "last_step"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    sent = int(self.step_file.read_text()) if self.step_file.exists() else -1
    self.skip_through = max(sent, first_step if first_step > 0 else -1)  # a resume retakes steps after first_step
    self.last = self.skip_through
    self.run = wandb.init(project=settings.project, entity=settings.entity or None, name=settings.name or None,
                          tags=list(settings.tags) or None, mode=settings.mode, dir=str(workdir), id=run_id,
                          resume="allow", config=config)

  def log(self, step: int, data: dict[str, Any]) -> None:
    if step <= self.skip_through:
      return
    self.run.log(data, step=step)
    if step > self.last:
      self.last = step
      self.step_file.write_text(f"{step}\n")

  def image(self, array: np.ndarray, caption: str | None = None):
    return self.wandb.Image(array, caption=caption)

  def close(self) -> None:
    self.run.finish()


class MetricsWriter:
  """Appends logged steps to `workdir/metrics.jsonl`, TensorBoard and W&B; a no-op unless `enabled` (process 0).

  `wandb`: config.wandb (W&B is off when its project is ""); `config`: the resolved config W&B records."""

  def __init__(self, workdir: Path, *, first_step: int, enabled: bool, wandb=None, config: dict | None = None):
    self.path, self.enabled, self.wandb = workdir / "metrics.jsonl", enabled, None
    if not enabled:
      return
    if self.path.exists():  # keep the steps up to the one this run resumes from
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= first_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
    if wandb is not None and wandb.project:
      os.environ.setdefault("WANDB_SILENT", "true")
      self.wandb = Wandb(workdir, wandb, config or {}, first_step)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _json_value(v) for k, v in metrics.items()} | {"step": step}, allow_nan=False) + "\n")
    self.write_scalars(step, metrics)

  def write_scalars(self, step: int, metrics: dict[str, float]) -> None:
    """TensorBoard and W&B only (write's second half): also for numbers that are not the train step's (the judge's)."""
    if not self.enabled:
      return
    for k, v in metrics.items():
      self.tensorboard.add_scalar(k, v, step)
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log(step, dict(metrics))

  def write_image(self, step: int, tag: str, image: np.ndarray, caption: str | None = None) -> None:
    """An (H, W, 3) uint8 image (a sample grid, a judge grid) to TensorBoard and W&B at `step`."""
    if not self.enabled:
      return
    self.tensorboard.add_image(tag, np.asarray(image), step, dataformats="HWC")
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log(step, {tag: self.wandb.image(image, caption)})

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
      if self.wandb is not None:
        self.wandb.close()
