"""Orbax checkpoints of the training state and the data iterator: asynchronous, atomic, resharding.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three or four items:
  params  the trainable UNet parameters (float32 master copy), alone so export can read just them;
  ema     their exponential moving average, when the run keeps one (config.ema_decay >= 0), sharded and
          read like params (`export --ema`);
  train   optimizer state, step, RNG key data and the skipped-update count;
  data    the grain iterator's position (one small JSON file per process).
Saves are asynchronous: the arrays are copied off the devices, then written by a background thread
while training continues. Orbax writes each step into a temporary folder and renames it when every
process has finished, so a crash during a save leaves the previous checkpoints intact (the temporary
folder is ignored and cleaned up by the next run). Restores read into an abstract target that carries
the *current* shardings, so a checkpoint written on one mesh or device count loads onto another.

A checkpoint that fails to restore (truncated or corrupt files) is moved aside to
`checkpoints/corrupt/<step>` (never deleted) and the next-newest one is tried (`restore_latest`). A save
that fails (full disk, read-only folder) raises `CheckpointSaveError` from the next `check()`, `save()` or
`wait()`; the trainer stops there, and the previous checkpoints stay intact.

Pure-dict parameters index lists by int (`down_blocks[0]`); flax's `to_state_dict` turns every key
into a string for saving and `from_state_dict` puts the target's keys back: the one place keys change.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from mapo_jax import sharding
from mapo_jax.training.train_step import TrainState

CHECKPOINTS = "checkpoints"  # the trainer's checkpoint folder inside its workdir
CORRUPT = "corrupt"  # where checkpoints that fail to restore are moved, inside CHECKPOINTS
EMA = "ema"  # the checkpoint item holding the parameters' moving average


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written."""


class NoGoodCheckpointError(RuntimeError):
  """Every checkpoint in the folder failed to restore."""


abstract_like = sharding.with_shardings  # restore targets: shapes, dtypes and the current shardings


HEAP_ARENAS = 2  # glibc malloc arenas for the whole trainer process (glibc's default: 8 per core)
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def limit_heap_arenas(arenas: int = HEAP_ARENAS) -> None:
  """Caps glibc's malloc arenas (mallopt M_ARENA_MAX, as MALLOC_ARENA_MAX=2 does), before the trainer starts its
  threads. Each thread that meets a busy arena gets one of its own, up to 8 per core, and memory freed in one is
  reused only there: orbax's writer threads, started anew for every asynchronous save, then spread a run's
  transient buffers over many arenas, and resident memory creeps up by arenas' worth (bench/RESULTS.md, "Soak").
  The host side of a step is a few threads; two arenas serve it."""
  try:
    ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def release_freed_memory() -> None:
  """Hands the memory freed since the last call back to the OS (glibc's malloc_trim). Each asynchronous save
  copies the state to host buffers in orbax's writer threads, and glibc keeps what they free in its arenas: the
  demo checkpointing every 100 steps held 1240-1310 MiB resident without this and 1000-1045 MiB with it
  (bench/RESULTS.md, "Soak")."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


class _FileSpec(dict):
  """`tensorstore.KvStore.Spec` of a plain local-file spec, {"driver": "file", "path": p}, resolved in Python:
  TensorStore resolves it to itself. A dict, so it also opens wherever a Spec does."""

  def to_json(self) -> dict:
    return dict(self)


class _KvStore:
  """tensorstore.KvStore, except that `Spec` of a plain file spec resolves in Python (`_FileSpec`)."""

  def __init__(self, kvstore: Any):
    self._kvstore = kvstore

  def __getattr__(self, name: str) -> Any:
    return getattr(self._kvstore, name)

  def Spec(self, spec: Any) -> Any:  # TensorStore's name
    if isinstance(spec, dict) and set(spec) == {"driver", "path"} and spec["driver"] == "file":
      return _FileSpec(spec)
    return self._kvstore.Spec(spec)


class _TensorStore:
  """The tensorstore module as orbax's tensorstore_utils sees it: the same but for `_KvStore`."""

  def __init__(self, module: Any):
    self._module = module
    self.KvStore = _KvStore(module.KvStore)  # TensorStore's name

  def __getattr__(self, name: str) -> Any:
    return getattr(self._module, name)


def avoid_tensorstore_json_leaks() -> None:
  """TensorStore 0.1.86 never frees what it builds when it converts JSON to Python objects (each call's dicts,
  lists and strings stay allocated). orbax (0.12) makes two such calls on every save, and a run saves thousands of
  times, so both are avoided here; what orbax writes and reads is unchanged:
  - Byte counters: around every array write and read orbax reads TensorStore's counters
    (`tensorstore_utils.get_tensorstore_raw_bytes`, through `experimental_collect_matching_metrics`) only to log
    throughput. With no counter (None) it skips that log line and its jax.monitoring scalars. The demo
    checkpointing every 100 steps grew by 5.9 MiB per 1000 steps from this alone (bench/RESULTS.md, "Soak").
  - Spec resolution: for every array it writes, orbax resolves its local folder's file spec to JSON
    (`ts.KvStore.Spec(spec).to_json()`, about 280 bytes kept per call) only to see that the driver is "file" and
    to reuse that JSON, which equals the spec. `_TensorStore` does this in Python for plain file specs; every
    other spec (gcs, ocdbt) still goes to TensorStore.
  tests/test_checkpoint.py counts what repeated saves leave allocated."""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils
  except ImportError:  # another orbax layout: nothing to avoid
    return
  if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
    tensorstore_utils.get_tensorstore_raw_bytes = lambda direction=None: None
  if hasattr(tensorstore_utils, "ts") and not isinstance(tensorstore_utils.ts, _TensorStore):
    tensorstore_utils.ts = _TensorStore(tensorstore_utils.ts)


def _train_part(state: TrainState) -> dict[str, Any]:
  return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng, "skipped": state.skipped}


class CheckpointStalledError(CheckpointSaveError):
  """A save that has not finished within the save timeout: the storage stopped answering."""


class Checkpointer:
  """Saves and restores (TrainState, data iterator) under `directory`, keeping the newest `keep`.

  `save_timeout_s`: a save still in flight after this long raises CheckpointStalledError from `check`, `save`
  or `wait` (a stalled network file system never answers: waiting on it would hang the run, and, multi-host,
  every other host with it). The stalled save is abandoned, never waited for again; the checkpoints before
  it stay as they were (orbax commits a step by renaming its temporary folder when the write is complete)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, save_timeout_s: float = 900.0):
    self.directory = Path(os.path.abspath(directory))
    avoid_tensorstore_json_leaks()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.save_timeout_s = save_timeout_s
    self._saving: tuple[int, float] | None = None  # (step, time.monotonic() at its start) of the save in flight
    self.abandoned = False  # a save stalled, or waits for a lost process: never waited for again
    self._closed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator=None) -> None:
    """Starts an asynchronous save and returns once the arrays are off the devices (they may be donated).
    Raises CheckpointSaveError if this save, or the previous one, failed."""
    items = dict(params=ocp.args.StandardSave(serialization.to_state_dict(state.params)),
                 train=ocp.args.StandardSave(serialization.to_state_dict(_train_part(state))))
    if state.ema is not None:
      items[EMA] = ocp.args.StandardSave(serialization.to_state_dict(state.ema))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._wait_bounded()  # orbax would block on the previous save, however long it stalls
    self._raising(f"the checkpoint of step {step}",
                  lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True))
    self._saving = (step, time.monotonic())

  def check(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has failed, CheckpointStalledError if it has run
    past the save timeout (cheap: call it every step)."""
    self._raising("the last checkpoint", self.manager.check_for_errors)
    if self._saving is not None:
      if not self.manager.is_saving_in_progress():
        self._saving = None
        release_freed_memory()
      elif time.monotonic() - self._saving[1] > self.save_timeout_s:
        self._stalled()

  def _stalled(self) -> None:
    step, start = self._saving
    self.abandoned = True
    raise CheckpointStalledError(
        f"saving step {step} to {self.directory} has not finished after {time.monotonic() - start:.0f} s "
        f"(config.save_timeout_s={self.save_timeout_s:g}): the storage stopped answering. Step {step} is "
        f"abandoned; the checkpoints before it are intact (newest: {self._committed()})")

  def _committed(self) -> str:
    steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    saving = self._saving[0] if self._saving else None
    steps = [s for s in steps if s != saving]
    return f"step {steps[-1]}" if steps else "none"

  def _wait_bounded(self) -> None:
    """Waits for the save in flight, up to the save timeout from its start; CheckpointStalledError after."""
    while self._saving is not None and self.manager.is_saving_in_progress():
      if time.monotonic() - self._saving[1] > self.save_timeout_s:
        self._stalled()
      time.sleep(0.05)
    self._saving = None

  def _raising(self, what: str, fn) -> None:
    try:
      fn()
    except Exception as e:  # orbax re-raises the writer thread's error as is: OSError, ValueError, ...
      raise CheckpointSaveError(f"saving {what} to {self.directory} failed: {type(e).__name__}: {e}") from e

  def restore_latest(self, abstract_state: TrainState, data_iterator=None) -> TrainState | None:
    """The newest checkpoint that restores (None when there is none). One that fails is logged in one
    line, moved to CHECKPOINTS/corrupt/<step> and the next-newest is tried; NoGoodCheckpointError when
    all fail."""
    failed = []
    while (step := self.latest_step()) is not None:
      if abstract_state.ema is not None and not (self.directory / str(step) / EMA).is_dir():
        # A run that turned an EMA on: not damage, so the checkpoint is not moved aside.
        raise ValueError(f"checkpoint {step} in {self.directory} holds no EMA, but this run keeps one "
                         "(config.ema_decay >= 0): resume with config.ema_decay=-1, or use a new workdir")
      try:
        return self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # any read or decode error of a damaged checkpoint
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        aside = self.directory / CORRUPT / str(step)
        logging.error("checkpoint %d in %s does not restore (%s); moved to %s", step, self.directory, reason, aside)
        aside.parent.mkdir(exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(self.directory / str(step), aside)
        self.manager.reload()
        failed.append(f"step {step}: {reason}")
    if failed:
      raise NoGoodCheckpointError(f"no checkpoint in {self.directory} restores (moved to {CORRUPT}/): "
                                  + "; ".join(failed))
    return None

  def restore(self, step: int, abstract_state: TrainState, data_iterator=None) -> TrainState:
    """The state of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings) says; the
    data iterator, if given, is moved to its saved position in place."""
    items = dict(params=ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.params)),
                 train=ocp.args.StandardRestore(serialization.to_state_dict(_train_part(abstract_state))))
    if abstract_state.ema is not None:
      items[EMA] = ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.ema))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = serialization.from_state_dict(_train_part(abstract_state), restored["train"])
    ema = None if abstract_state.ema is None else serialization.from_state_dict(abstract_state.ema, restored[EMA])
    return TrainState(params=serialization.from_state_dict(abstract_state.params, restored["params"]), ema=ema,
                      **train)

  def restore_params(self, step: int, abstract_params: Any, item: str = "params") -> Any:
    """Only the trainable parameters (export), or with item="ema" their moving average: no optimizer
    state or data iterator is read. A checkpoint without that item raises FileNotFoundError."""
    if not (self.directory / str(step) / item).is_dir():  # orbax writes each item into its own folder
      raise FileNotFoundError(f"checkpoint {step} in {self.directory} holds no {item!r} item"
                              + (" (the run kept no EMA: config.ema_decay < 0)" if item == EMA else ""))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(serialization.to_state_dict(abstract_params))}))
    return serialization.from_state_dict(abstract_params, restored[item])

  def wait(self) -> None:
    """Blocks until the last save is committed; CheckpointSaveError if it failed, CheckpointStalledError if it
    does not finish within the save timeout."""
    self._wait_bounded()
    self._raising("the last checkpoint", self.manager.wait_until_finished)

  def finish_or_abandon(self) -> None:
    """After an error in the loop: lets the save in flight commit (within the save timeout); one that fails
    or stalls is abandoned (orbax never renames its temporary folder into a checkpoint), so the previous
    checkpoints stay as they were."""
    if self.abandoned:
      return
    try:
      self.wait()
    except Exception as e:  # the save in flight failed too; the error being raised says more
      logging.error("the checkpoint save in flight was abandoned: %s: %s", type(e).__name__, str(e).splitlines()[0])

  def close(self) -> None:
    """Closes the manager; after a stalled save, nothing (closing waits for the save, which never ends)."""
    if not self.abandoned and not self._closed:
      self.manager.close()
      self._closed = True
