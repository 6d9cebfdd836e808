"""Orbax checkpoints of the training state and the data iterator: asynchronous, atomic, resharding.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
  params  the trainable UNet parameters (float32 master copy), alone so export can read just them;
  train   optimizer state, step, RNG key data and the skipped-update count;
  data    the grain iterator's position (one small JSON file per process).
Saves are asynchronous: the arrays are copied off the devices, then written by a background thread
while training continues. Orbax writes each step into a temporary folder and renames it when every
process has finished, so a crash during a save leaves the previous checkpoints intact (the temporary
folder is ignored and cleaned up by the next run). Restores read into an abstract target that carries
the *current* shardings, so a checkpoint written on one mesh or device count loads onto another.

Pure-dict parameters index lists by int (`down_blocks[0]`); flax's `to_state_dict` turns every key
into a string for saving and `from_state_dict` puts the target's keys back: the one place keys change.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import serialization

from mapo_jax import sharding
from mapo_jax.train_step import TrainState

CHECKPOINTS = "checkpoints"  # the trainer's checkpoint folder inside its workdir


abstract_like = sharding.with_shardings  # restore targets: shapes, dtypes and the current shardings


def _train_part(state: TrainState) -> dict[str, Any]:
  return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng, "skipped": state.skipped}


class Checkpointer:
  """Saves and restores (TrainState, data iterator) under `directory`, keeping the newest `keep`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator=None) -> None:
    """Starts an asynchronous save and returns once the arrays are off the devices (they may be donated)."""
    items = dict(params=ocp.args.StandardSave(serialization.to_state_dict(state.params)),
                 train=ocp.args.StandardSave(serialization.to_state_dict(_train_part(state))))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: TrainState, data_iterator=None) -> TrainState:
    """The state of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings) says; the
    data iterator, if given, is moved to its saved position in place."""
    items = dict(params=ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.params)),
                 train=ocp.args.StandardRestore(serialization.to_state_dict(_train_part(abstract_state))))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = serialization.from_state_dict(_train_part(abstract_state), restored["train"])
    return TrainState(params=serialization.from_state_dict(abstract_state.params, restored["params"]), **train)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the trainable parameters (export): no optimizer state or data iterator is read."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(serialization.to_state_dict(abstract_params))))
    return serialization.from_state_dict(abstract_params, restored["params"])

  def wait(self) -> None:
    """Blocks until the last save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
