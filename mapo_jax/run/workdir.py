"""The training workdir: one trainer at a time (a lock file), each run's config kept beside its checkpoints,
and leftovers of killed runs cleaned up.

- `WorkdirLock`: an exclusive `flock` on WORKDIR/.lock, which records the holder's host and pid. A second
  trainer fails at once naming them. The kernel drops the lock when its process dies, so a lock file left
  by a killed run is taken over (with a warning naming the dead holder). Multi-host: process 0 holds it.
- `record_config`: WORKDIR/config.<first step>.json for every run, and a refusal to resume when the
  objective, the model, the resolution or the data differ from the previous run's (other differences are
  warnings), unless the user allows it.
- `remove_stale_temporaries`: `.NAME.tmp-PID` folders (written, then renamed into place) whose process is
  gone.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from absl import logging

from mapo_jax import config as config_lib

# Config keys that define what a run trains: changing one on resume trains a different thing.
DEFINING_KEYS = ("objective", "pipeline", "reference", "vae", "resolution", "data.mode", "data.cache_dir",
                 "data.source", "data.eval_pairs",  # eval_pairs: which pairs are trained on
                 "lora.rank", "lora.targets",  # the shapes of what trains
                 "scan_blocks")  # the checkpoint's layout: stacked or per-block parameters
# Keys whose default is not the behaviour before they existed: a run recorded without the key ran like this.
BEFORE_THE_KEY = {"scan_blocks": False}


class WorkdirBusyError(RuntimeError):
  """Another live trainer holds the workdir."""


class WorkdirLock:
  def __init__(self, workdir: Path):
    self.path = Path(workdir) / ".lock"
    self.file = None

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    file = open(self.path, "a+")
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = file.read().strip() or "an unknown process"
      file.close()
      raise WorkdirBusyError(f"{self.path.parent} is in use by another trainer ({holder}); "
                             "wait for it to finish or use another --workdir") from None
    file.seek(0)
    previous = file.read().strip()
    if previous:
      logging.warning("taking over the lock of %s, whose trainer (%s) is gone", self.path.parent, previous)
    file.seek(0)
    file.truncate()
    file.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    file.flush()
    self.file = file

  def release(self) -> None:
    if self.file is not None:
      self.file.truncate(0)  # an empty file: released cleanly, nobody to warn about
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()
      self.file = None


def recorded_value(workdir: Path, key: str) -> Any:
  """The newest recorded run's value of config `key` (dotted), with BEFORE_THE_KEY / the defaults for a run
  recorded before the key existed; KeyError for an unknown key."""
  recorded = previous_config(workdir)
  values = {**config_lib.flatten(json.loads(config_lib.base_config().to_json())), **BEFORE_THE_KEY,
            **(config_lib.flatten(recorded[1]) if recorded else {})}
  return values[key]


def previous_config(workdir: Path) -> tuple[Path, dict[str, Any]] | None:
  """The newest run's config (config.<step>.json with the largest step; config.json of older versions)."""
  runs = sorted(((int(m.group(1)), p) for p in Path(workdir).glob("config.*.json")
                 if (m := re.fullmatch(r"config\.(\d+)\.json", p.name))), key=lambda x: x[0])
  path = runs[-1][1] if runs else Path(workdir) / "config.json"
  return (path, json.loads(path.read_text())) if path.is_file() else None


class ConfigChangedError(ValueError):
  """A resume whose config changes what the run trains."""


def check_resume_config(workdir: Path, config: dict[str, Any], *, allow_change: bool) -> None:
  """Compares `config` with the previous run's: a changed DEFINING_KEYS value fails unless `allow_change`;
  every other difference is logged as a warning."""
  previous = previous_config(workdir)
  if previous is None:
    return
  path, old = previous
  # A key the previous run did not record (an older version) ran with its default: new keys default to the
  # behaviour before them (config.lora.rank 0 = a full fine-tune).
  defaults = {**config_lib.flatten(json.loads(config_lib.base_config().to_json())), **BEFORE_THE_KEY}
  old, new = {**defaults, **config_lib.flatten(old)}, config_lib.flatten(config)
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  defining = [k for k in changed if k in DEFINING_KEYS]
  describe = lambda k: f"config.{k}: {old.get(k)!r} -> {new.get(k)!r}"
  if defining and not allow_change:
    raise ConfigChangedError(
        f"resuming {workdir} with a config that changes what it trains ({'; '.join(map(describe, defining))}; "
        f"previous run: {path.name}). Use another --workdir, or pass --allow-config-change to resume anyway.")
  for k in changed:
    logging.warning("resuming with a changed %s", describe(k))


def record_config(workdir: Path, config_json: str, step: int) -> Path:
  """Writes this run's config as WORKDIR/config.<step>.json (the step it starts from) and config.json."""
  path = Path(workdir) / f"config.{step}.json"
  path.write_text(config_json)
  (Path(workdir) / "config.json").write_text(config_json)  # the latest run's, where people look first
  return path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temporaries(folder: Path) -> None:
  """Deletes `.NAME.tmp-PID` entries in `folder` whose process no longer runs (a killed writer's leftovers)."""
  if not Path(folder).is_dir():
    return
  for entry in Path(folder).iterdir():
    m = re.fullmatch(r"\..+\.tmp-(\d+)", entry.name)
    if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
      logging.info("removing %s, left by a killed process", entry)
      shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
