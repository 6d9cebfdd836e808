"""The encoded cache: ArrayRecord shards of fixed-layout records plus `manifest.json`.

A record is one pair: the arrays of `BATCH_KEYS` (plus `SCORE_KEYS` when the source stores reward
scores), each as raw bytes in that order; or one unpaired labelled sample (`UNPAIRED_KEYS`, from the
sources of mapo_jax/data/unpaired.py). Their keys, shapes and dtypes are in the manifest, so reading is a
few `np.frombuffer` calls and needs no pickle. The big arrays (moments, prompt embeddings) are stored in
`cache_dtype` (default float16: half the disk of float32; bfloat16 and float32 also work); the rest
(time_ids, rpo_emb, scores, labels) always float32. A token ids cache (`EncodeSettings.text` "ids", the FLUX and
SD3 families' default: docs/data.md, "Text conditioning at scale") stores each pair's int32 token ids per text
tower (TEXT_IDS_PREFIX + the tower's name) in the prompt embeddings' place, and the train step encodes them.

Shard k holds source rows [k * shard_size, (k + 1) * shard_size); host p of n encodes the shards
with k % n == p. A shard is written under a temporary name and renamed when complete, then its
`shard-*.json` sidecar (counts, layout, and the file's facts: `bytes`, `records`, `crc32`) is written
the same way; a shard whose sidecar exists and whose file still matches it is finished and a re-run
skips it; one that no longer matches is encoded again. Whichever host finds every sidecar present
writes the manifest, whose `shards` entries carry the same facts.

Damage (a bad copy, a full disk, a flipped bit) is found three ways, each naming the shard file:
- at open (`open_records`, which `loader.cached_loader` and `cached_eval_batch` use): each shard's
  size (a stat) and record count (its footer) against the manifest. A truncated ArrayRecord file
  loses its footer and opens as 0 records without an error (array_record 0.8.6), so the size check
  is what catches it even where the count looks plausible.
- at the first bad read: ArrayRecord files are Riegeli records files whose block headers, chunk
  headers and chunk data carry hashes (riegeli/records/records_format.md), so a damaged record
  fails its read; `open_records` turns that into a DamagedShardError naming the shard and record.
- `verify_cache` (`python -m mapo_jax.encode --verify`): the open checks, and unless `full=False`
  every record read, decoded and folded into `crc32` (the CRC-32 of the shard's records' bytes in
  record order, computed while writing: not of the file, whose padding Riegeli does not hash).
Manifests and sidecars written before these facts were recorded still read: their shards are
checked by record count (the entry's `pairs`), and a full check cannot compare checksums.

Out of disk: before each shard after the first, encode checks that the free space of `--out`'s
filesystem is at least the largest shard written so far, and a write that fails with ENOSPC (or
EDQUOT, or EFBIG past a file-size limit) is caught where the writer writes; either stops the run
with an OutOfDiskError (one line: the path, the free space), the half-written temporary removed.
Finished shards stay valid, and a re-run encodes only the missing ones.

`merge_caches` joins caches encoded separately (parts of a dataset, or several datasets) into one
manifest that names the parts' shard files by relative path: nothing is copied unless asked, and
the loader reads a manifest's `shards[*].file` relative to its own folder either way.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import errno
import itertools
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np
from absl import logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from mapo_jax.data import unpaired
from mapo_jax.data.pairs import Counts, prepare_pair, prepare_rows
from mapo_jax.data.sources import SCORE_KEYS, Source, UnpairedFolderSource, UnpairedJsonlSource

# Batch format shared with the train step: moments are NHWC [mean, logvar] on the channel axis.
BATCH_KEYS = ("moments_w", "moments_l", "prompt_embeds", "pooled_prompt_embeds", "time_ids", "rpo_emb")
ENCODED_KEYS = tuple(k for k in BATCH_KEYS if k != "time_ids")  # what an EncodeFn returns
PROMPT_EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
# A cache of token ids (`encode --text ids`: the train step encodes the prompts, docs/data.md "Text conditioning at
# scale") holds, in place of PROMPT_EMBED_KEYS, one int32 row of ids per text tower under "ids_" + the tower's
# model_index name (the same prefix as training/train_step.py TEXT_IDS_PREFIX).
TEXT_IDS_PREFIX = "ids_"
UNPAIRED_KEYS = ("moments", "label", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
# Every key a record can hold, in record order (a pair cache's keys come in BATCH_KEYS order).
_RECORD_KEYS = ("moments_w", "moments_l", "moments", "label", "prompt_embeds", "pooled_prompt_embeds", "time_ids",
                "rpo_emb") + SCORE_KEYS
_BIG_KEYS = ("moments_w", "moments_l", "moments", "prompt_embeds", "pooled_prompt_embeds")
MANIFEST = "manifest.json"

# (pixels_w, pixels_l: (B, R, R, 3) float32 in [-1, 1], captions) -> arrays of ENCODED_KEYS, (B, ...).
# pixels_l may be None (unpaired samples): then there is no moments_l.
EncodeFn = Callable[[np.ndarray, np.ndarray | None, list[str]], Mapping[str, Any]]


def is_text_ids(key: str) -> bool:
  """Whether a batch key holds a text tower's token ids (TEXT_IDS_PREFIX)."""
  return key.startswith(TEXT_IDS_PREFIX)


def encoded_keys(encoded: Mapping[str, Any]) -> tuple[str, ...]:
  """The keys an EncodeFn's output carries into a record: ENCODED_KEYS, with the token ids keys in place of
  PROMPT_EMBED_KEYS when it gives ids."""
  ids = sorted(k for k in encoded if is_text_ids(k))
  if not ids:
    return ENCODED_KEYS
  return tuple(k for k in ENCODED_KEYS if k not in PROMPT_EMBED_KEYS) + tuple(ids)


def encode_pairs(encode_fn: EncodeFn, items: list[dict[str, Any]]) -> dict[str, Any]:
  """Prepared pairs -> arrays of ENCODED_KEYS (or their token ids form, `encoded_keys`), plus SCORE_KEYS when the
  pairs carry reward scores (all of them or none: a mix is a ValueError)."""
  stack = lambda key: np.stack([it[key] for it in items])
  encoded = encode_fn(stack("pixels_w"), stack("pixels_l"), [it["caption"] for it in items])
  out = {k: encoded[k] for k in encoded_keys(encoded)}
  scored = sum(SCORE_KEYS[0] in it for it in items)
  if scored not in (0, len(items)):
    raise ValueError(f"{scored} of {len(items)} pairs carry {SCORE_KEYS} and the others do not; a cache "
                     "needs them on every pair or on none")
  if scored:
    out.update({k: stack(k).astype(np.float32) for k in SCORE_KEYS})
  return out


@dataclasses.dataclass(frozen=True)
class RecordKind:
  """How a source's rows become records: `prepare(row, resolution=, seed=, random_crop=)` -> one item (a
  dict with time_ids; None drops the row; BadPair skips it), `encode(encode_fn, items)` -> the batch's
  other arrays."""
  prepare: Callable[..., dict[str, Any] | None]
  encode: Callable[[EncodeFn, list[dict[str, Any]]], Mapping[str, Any]]


PAIRS = RecordKind(prepare_pair, encode_pairs)
SAMPLES = RecordKind(unpaired.prepare_sample, unpaired.encode_samples)


def record_kind(source: Source) -> RecordKind:
  """SAMPLES for the unpaired sources (unpaired labelled samples), else PAIRS."""
  return SAMPLES if isinstance(source, (UnpairedJsonlSource, UnpairedFolderSource)) else PAIRS


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  """Everything that changes the cache's content (so a re-run must match it)."""
  resolution: int
  seed: int = 0  # seeds each pair's flip and random crop
  random_crop: bool = False
  cache_dtype: str = "float16"
  shard_size: int = 1000  # source rows per shard
  text: str = "embeddings"  # "embeddings": the prompt embeddings; "ids": the towers' token ids (TEXT_IDS_PREFIX)
  max_sequence_length: int = 0  # T5 tokens per prompt (FLUX.1, SD3); 0: the family's default

  def pair_kwargs(self) -> dict[str, Any]:
    return {"resolution": self.resolution, "seed": self.seed, "random_crop": self.random_crop}

  def to_json(self) -> dict[str, Any]:
    """The settings as recorded in sidecars and manifests; `text` only when it is "ids" and max_sequence_length
    only when it is set, so that the caches written before they existed keep their identity."""
    out = dataclasses.asdict(self)
    if out["text"] == "embeddings":
      del out["text"]
    if not out["max_sequence_length"]:
      del out["max_sequence_length"]
    return out


@dataclasses.dataclass(frozen=True)
class RecordLayout:
  """Per-record keys (in record order), shapes and dtypes."""
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, str]

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(self.shapes)

  @classmethod
  def for_batch(cls, batch: Mapping[str, np.ndarray], cache_dtype: str) -> "RecordLayout":
    ids = sorted(k for k in batch if is_text_ids(k))
    keys = []
    for k in _RECORD_KEYS:  # token ids (int32) take the prompt embeddings' place in the record
      keys += [k] if k in batch else []
      keys += ids if k == "pooled_prompt_embeds" else []
    return cls({k: tuple(batch[k].shape[1:]) for k in keys},
               {k: cache_dtype if k in _BIG_KEYS else "int32" if is_text_ids(k) else "float32" for k in keys})

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "RecordLayout":
    return cls({k: tuple(v["shape"]) for k, v in d.items()}, {k: v["dtype"] for k, v in d.items()})

  def to_json(self) -> dict[str, Any]:
    return {k: {"shape": list(self.shapes[k]), "dtype": self.dtypes[k]} for k in self.keys}

  def serialize(self, batch: Mapping[str, np.ndarray]) -> list[bytes]:
    """A batch (leading dim B) -> B records."""
    if set(batch) != set(self.keys):
      raise ValueError(f"a batch with keys {sorted(batch)} does not fit records of {sorted(self.keys)}")
    arrays, n = [], len(batch["time_ids"])
    for k in self.keys:
      a = np.asarray(batch[k])
      if a.shape != (n, *self.shapes[k]):
        raise ValueError(f"{k}: shape {a.shape}, expected {(n, *self.shapes[k])} (batch of {n})")
      with np.errstate(over="ignore"):  # overflow is reported below, with advice
        stored = a.astype(self.dtypes[k])
      if not np.isfinite(stored).all():
        raise ValueError(f"{k}: non-finite values after casting to {self.dtypes[k]} "
                         f"(largest |value| {np.abs(a).max():.4g}); use a wider --cache_dtype")
      arrays.append(stored)
    return [b"".join(a[i].tobytes() for a in arrays) for i in range(n)]

  def deserialize(self, record: bytes) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for k in self.keys:
      dtype, shape = np.dtype(self.dtypes[k]), self.shapes[k]
      count = int(np.prod(shape))
      out[k] = np.frombuffer(record, dtype, count, offset).reshape(shape)
      offset += count * dtype.itemsize
    if offset != len(record):
      raise ValueError(f"record has {len(record)} bytes, the manifest's layout needs {offset}")
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
    raise


def _chunks(rows: Iterable[Any], n: int) -> Iterator[list[Any]]:
  rows = iter(rows)
  while chunk := list(itertools.islice(rows, n)):
    yield chunk


def shard_name(k: int, num_shards: int) -> str:
  return f"shard-{k:05d}-of-{num_shards:05d}"


# --- damaged shards ---------------------------------------------------------------------------------------

SHARD_FACTS = ("bytes", "records", "crc32")  # what a sidecar and a manifest entry record of their shard file
_READ_BLOCK = 64  # records per read when a whole shard is checked (64 SDXL-1024 pairs: ~32 MB)


class DamagedShardError(ValueError):
  """A shard file that does not match what its manifest (or sidecar) records, or a record in it that does not
  read or decode. `file`: the shard's path; `problem`: what differs; `record`: the record's index in the shard,
  where one record is to blame."""

  def __init__(self, file: str | Path, problem: str, record: int | None = None):
    self.file, self.problem, self.record = str(file), problem, record
    folder = Path(file).parent
    super().__init__(f"{file}: {problem}. Re-run the `python -m mapo_jax.encode` command that wrote {folder} (same "
                     f"flags and --out; for a merged cache, then the --merge): it re-encodes only the shards that fail "
                     f"verification (--resume_check full, the default). `python -m mapo_jax.encode --verify --out "
                     f"{folder}` lists every damaged shard")


def _expected_records(entry: Mapping[str, Any]) -> int:
  # Entries from before `records` was recorded: a shard holds one record per kept pair (or sample).
  return entry["records"] if "records" in entry else entry["pairs"]


def _check_shard(path: Path, entry: Mapping[str, Any], recorded_in: str, *, layout: RecordLayout | None,
                 full: bool, first: int | None = None) -> tuple[DamagedShardError | None, dict[str, int]]:
  """Checks the shard file `path` against `entry` (its manifest entry or sidecar, found in `recorded_in`): its size
  and record count, and with `full` every record read (Riegeli checks each chunk's hash), decoded with `layout`, and
  the records' CRC-32. `first`: the shard's first record's index in the cache, for messages.

  Returns (the first problem found or None, the facts measured: bytes and records, and crc32 when `full`)."""
  facts: dict[str, int] = {}
  if not path.exists():
    return DamagedShardError(path, f"missing ({recorded_in} lists it)"), facts
  facts["bytes"] = path.stat().st_size
  if "bytes" in entry and facts["bytes"] != entry["bytes"]:
    return DamagedShardError(path, f"{facts['bytes']} bytes on disk, but {recorded_in} records {entry['bytes']} "
                                   "bytes (truncated, or not the file that was written)"), facts
  try:
    reader = ArrayRecordReader(str(path))
  except RuntimeError as e:  # Riegeli reports a damaged file as RuntimeError
    return DamagedShardError(path, f"cannot be opened ({e})"), facts
  try:
    facts["records"] = reader.num_records()
    if facts["records"] != _expected_records(entry):
      return DamagedShardError(path, f"{facts['records']} records, but {recorded_in} records "
                                     f"{_expected_records(entry)}"), facts
    if not full:
      return None, facts
    crc = 0
    for start in range(0, facts["records"], _READ_BLOCK):
      stop = min(start + _READ_BLOCK, facts["records"])
      try:
        block = reader.read(start, stop)
      except RuntimeError as e:
        return _bad_record(path, reader, range(start, stop), first, e), facts
      for j, record in enumerate(block, start):
        if layout is not None:
          try:
            layout.deserialize(record)
          except ValueError as e:
            return DamagedShardError(path, f"record {j}{_in_cache(first, j)} does not decode ({e})", j), facts
        crc = zlib.crc32(record, crc)
    facts["crc32"] = crc
    if "crc32" in entry and crc != entry["crc32"]:
      return DamagedShardError(path, f"the CRC-32 of its records is {crc:08x}, but {recorded_in} records "
                                     f"{entry['crc32']:08x} (not the file that was written)"), facts
    return None, facts
  finally:
    try:
      reader.close()
    except RuntimeError:
      pass  # a file cut short fails here too (with no message): what was found above says more


def _in_cache(first: int | None, j: int) -> str:
  return "" if first is None else f" (record {first + j} of the cache)"


def _bad_record(path: Path, reader: ArrayRecordReader, block: range, first: int | None,
                error: Exception) -> DamagedShardError:
  """The DamagedShardError of the first record of `block` that does not read (a block read failed)."""
  for j in block:
    try:
      reader.read([j])
    except RuntimeError as e:
      return DamagedShardError(path, f"record {j}{_in_cache(first, j)} does not read ({e})", j)
  return DamagedShardError(path, f"records {block.start}..{block.stop - 1} do not read together ({error})")


_warned_unrecorded: set[str] = set()


class CachedRecords:
  """The records of a finished cache, checked: `len`, and `[i]` -> one record's arrays (record i in the manifest's
  shard order). Opening checks every shard's size and record count against the manifest (a thread per shard, up to
  `num_threads`) and raises the first DamagedShardError; a record that does not read or decode later raises a
  DamagedShardError naming its shard and index. What `loader.cached_loader` and `cached_eval_batch` read through;
  a grain RandomAccessDataSource."""

  def __init__(self, cache_dir: str | Path, *, num_threads: int = 16):
    self.cache_dir = Path(cache_dir)
    self.manifest = read_manifest(cache_dir)
    self.layout = RecordLayout.from_json(self.manifest["record"])
    entries = self.manifest["shards"]
    recorded_in = str(self.cache_dir / MANIFEST)
    if any(not all(f in s for f in SHARD_FACTS) for s in entries) and recorded_in not in _warned_unrecorded:
      _warned_unrecorded.add(recorded_in)
      logging.warning("%s records no shard sizes or checksums (it was written before they were): its shards are "
                      "checked by record count only, and a damaged record shows at its first read. To record them, "
                      "re-run the `python -m mapo_jax.encode` command that wrote it (it reads every shard once)",
                      recorded_in)
    paths = [self.cache_dir / s["file"] for s in entries]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(paths)))) as pool:
      checks = pool.map(lambda ps: _check_shard(*ps, recorded_in, layout=None, full=False), zip(paths, entries))
      for problem, _ in checks:
        if problem:
          raise problem
    kept = [(str(p), _expected_records(s)) for p, s in zip(paths, entries) if _expected_records(s)]
    self.files = [p for p, _ in kept]
    self._starts = [0, *itertools.accumulate(n for _, n in kept)]
    # "path[0:n]": the data source takes the counts just checked instead of opening every file again.
    self._source = ArrayRecordDataSource([f"{p}[0:{n}]" for p, n in kept])

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    i = index.__index__()
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of a cache of {len(self)}")
    try:
      record = self._source[i]
    except (RuntimeError, OSError) as e:  # Riegeli: a hash mismatch; the OS: a read error
      raise self._damaged(i, "does not read", e) from e
    try:
      return self.layout.deserialize(record)
    except ValueError as e:
      raise self._damaged(i, "does not decode", e) from e

  def _damaged(self, i: int, what: str, error: Exception) -> DamagedShardError:
    k = bisect.bisect_right(self._starts, i) - 1
    j = i - self._starts[k]
    return DamagedShardError(self.files[k], f"record {j} (record {i} of the cache) {what} ({error})", j)


def open_records(cache_dir: str | Path, *, num_threads: int = 16) -> CachedRecords:
  """A finished cache's records, checked at open and at each read (`CachedRecords`)."""
  return CachedRecords(cache_dir, num_threads=num_threads)


@dataclasses.dataclass
class CacheReport:
  """What `verify_cache` found. `good`, `missing`: shard paths; `bad`: their errors, in shard order; `notes`: what
  could not be checked. `finished`: the cache has its manifest (else the shards were found by their sidecars, and
  `missing` lists those not encoded yet)."""
  cache_dir: str
  full: bool
  finished: bool
  good: list[str]
  bad: list[DamagedShardError]
  missing: list[str]
  notes: list[str]

  @property
  def ok(self) -> bool:
    return self.finished and not self.bad and not self.missing


def verify_cache(cache_dir: str | Path, *, full: bool = True, num_threads: int = 8) -> CacheReport:
  """Checks every shard of a cache: its size and record count against the manifest and, with `full`, every record
  read, decoded and its CRC-32 compared (reads the whole cache; without `full` a stat and a footer read per shard).

  A cache without manifest.json (encode unfinished, or stopped) is checked by its sidecars: the shards they list
  are checked, and the rest reported missing."""
  cache_dir = Path(cache_dir)
  finished = (cache_dir / MANIFEST).exists()
  if finished:
    manifest = read_manifest(cache_dir)
    layout = RecordLayout.from_json(manifest["record"])
    recorded_in = str(cache_dir / MANIFEST)
    firsts = itertools.accumulate((_expected_records(s) for s in manifest["shards"]), initial=0)
    jobs = [(cache_dir / s["file"], s, recorded_in, layout, first) for s, first in zip(manifest["shards"], firsts)]
    missing = []
  else:
    sidecars = sorted(cache_dir.glob("shard-[0-9]*-of-[0-9]*.json"))
    totals = {p.stem.rsplit("-of-", 1)[1] for p in sidecars}
    if len(totals) != 1:
      raise FileNotFoundError(f"{cache_dir}: no {MANIFEST} and " + (
          "no shard sidecars (shard-*.json): not a cache" if not totals else
          f"sidecars of different shard counts ({sorted(totals)}): more than one encode wrote here"))
    num_shards = int(totals.pop())
    jobs, missing = [], []
    for k in range(num_shards):
      sidecar = cache_dir / f"{shard_name(k, num_shards)}.json"
      if not sidecar.exists():
        missing.append(str(cache_dir / f"{shard_name(k, num_shards)}.array_record"))
        continue
      entry = json.loads(sidecar.read_text())
      layout = RecordLayout.from_json(entry["record"]) if entry["record"] else None
      jobs.append((cache_dir / entry["file"], entry, str(sidecar), layout, None))  # cache indices not known yet

  def check(job):
    path, entry, recorded_in, layout, first = job
    return _check_shard(path, entry, recorded_in, layout=layout, full=full, first=first)[0]

  with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(jobs)))) as pool:
    problems = list(pool.map(check, jobs))
  entries = [job[1] for job in jobs]
  notes = []
  if unsized := sum("bytes" not in entry for entry in entries):
    notes.append(f"{unsized} of {len(jobs)} shards have no size recorded (checked by record count)")
  if full and (unsummed := sum("crc32" not in entry for entry in entries)):
    notes.append(f"{unsummed} of {len(jobs)} shards have no checksum recorded (their records were read and "
                 "decoded, not compared)")
  return CacheReport(str(cache_dir), full, finished, good=[str(job[0]) for job, p in zip(jobs, problems) if p is None],
                     bad=[p for p in problems if p is not None], missing=missing, notes=notes)


# --- out of disk ------------------------------------------------------------------------------------------

class OutOfDiskError(OSError):
  """encode ran out of disk space (or hit a quota or file-size limit). Its message is one line: the path, the free
  space, and that a re-run after freeing space encodes only the missing shards."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(error: BaseException) -> str | None:
  """The OS's words for a full disk (quota, file-size limit) if `error` is one, else None. The ArrayRecord writer
  reports a failed write as RuntimeError("write() failed: No space left on device; ..."), with the OS's words."""
  if isinstance(error, OSError) and error.errno in _DISK_FULL:
    return os.strerror(error.errno)
  return next((os.strerror(code) for code in _DISK_FULL if os.strerror(code) in str(error)), None)


def _limit_hint(reason: str) -> str:
  return ": a file-size limit, see `ulimit -f`" if reason == os.strerror(errno.EFBIG) else ""


def _size(n: int) -> str:
  for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n} bytes ({n / scale:.1f} {unit})"
  return f"{n} bytes"


def _free_bytes(out_dir: Path) -> int | None:
  try:
    return shutil.disk_usage(out_dir).free
  except OSError:
    return None


def _out_of_disk(what: str, out_dir: Path, num_shards: int, detail: str = "") -> OutOfDiskError:
  """`what`: the path and the cause; `detail`: said after the free space."""
  free = _free_bytes(out_dir)
  done = sum((out_dir / f"{shard_name(k, num_shards)}.json").exists() for k in range(num_shards))
  return OutOfDiskError(f"{what}: {'?' if free is None else _size(free)} free on its filesystem{detail}. The {done} "
                        f"of {num_shards} shards finished so far are valid; free space (or use another --out), then "
                        "re-run the same command: it encodes only the missing shards")


# --- writing ----------------------------------------------------------------------------------------------

def write_cache(source: Source, out_dir: str | Path, encode_fn: EncodeFn, settings: EncodeSettings, *,
                pipeline: str, vae: str = "", batch_size: int = 8, strict: bool = False, process_index: int = 0,
                process_count: int = 1, num_threads: int | None = None,
                resume_check: str = "full") -> dict[str, Any] | None:
  """Encodes this host's unfinished shards; returns the manifest once every shard is done, else None.

  `vae`: the VAE folder that encodes (absolute path), or "" for the pipeline's own vae/; recorded in the
  manifest so the trainer can refuse a cache encoded by another VAE than its config.vae. Pairs, or the
  unpaired samples of an unpaired source (`record_kind`).

  `resume_check`: how this host's finished shards are checked before they are skipped; one that fails is
  encoded again. "full": size, record count, every record read and decoded, CRC-32 (reads them all); "size":
  size and record count. Raises OutOfDiskError when the disk fills (see the module docstring)."""
  if resume_check not in ("full", "size"):
    raise ValueError(f"resume_check={resume_check!r}; expected 'full' or 'size'")
  kind = record_kind(source)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  num_shards = -(-len(source) // settings.shard_size)
  identity = {"source": source.name, "source_rows": len(source), "pipeline": pipeline, "vae": vae,
              "settings": settings.to_json()}
  mine = range(process_index, num_shards, process_count)
  finished = {}
  for k in mine:
    sidecar = out_dir / f"{shard_name(k, num_shards)}.json"
    if not sidecar.exists():
      continue
    done = json.loads(sidecar.read_text())
    # .get: sidecars written before `vae` was recorded were encoded by the pipeline's VAE ("").
    if (seen := {key: done.get(key, "") for key in identity}) != identity:
      raise ValueError(f"{sidecar} was encoded with {seen}, this run asks for {identity}; "
                       "use another --out or delete the old cache")
    finished[k] = done
  finished = _recheck(out_dir, num_shards, finished, full=resume_check == "full", num_threads=num_threads)
  todo = [k for k in mine if k not in finished]
  for k in todo:  # what a killed run of this host left: useless, and it takes space
    for tmp in out_dir.glob(f".{shard_name(k, num_shards)}.*"):
      tmp.unlink(missing_ok=True)
  largest = max((s.get("bytes", 0) for s in finished.values()), default=0)

  def write_shard(k, pool, progress):
    name = shard_name(k, num_shards)
    final, tmp = out_dir / f"{name}.array_record", out_dir / f".{name}.array_record.tmp"
    free = _free_bytes(out_dir)
    if largest and free is not None and free < largest:
      raise _out_of_disk(f"not enough disk space to encode {final}", out_dir, num_shards,
                         f", less than the largest shard so far ({_size(largest)})")
    counts, layout, crc, records = Counts(), None, 0, 0

    def write(encoded, time_ids):
      nonlocal layout, crc, records
      batch = {key: np.asarray(v) for key, v in jax.device_get(dict(encoded)).items()} | {"time_ids": time_ids}
      layout = layout or RecordLayout.for_batch(batch, settings.cache_dtype)
      for record in layout.serialize(batch):
        writer.write(record)
        crc = zlib.crc32(record, crc)
        records += 1

    try:
      writer = ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")  # group_size 1: cheap random reads
      try:
        pending = None  # the previous batch: fetching it waits for the device, so it is written one batch late
        start = k * settings.shard_size
        for rows in _chunks(source.read(start, min(start + settings.shard_size, len(source))), batch_size):
          items = [item for _, item in prepare_rows(rows, pool, counts, strict=strict, prepare=kind.prepare,
                                                    **settings.pair_kwargs())]
          if pending:
            write(*pending)
            pending = None
          if items:
            pending = kind.encode(encode_fn, items), np.stack([it["time_ids"] for it in items])
          progress.update(len(rows))
          progress.set_postfix(skipped=counts.skipped, ties=counts.ties_dropped, refresh=False)
        if pending:
          write(*pending)
      except BaseException:
        try:
          writer.close()
        except RuntimeError:
          pass  # the error that stopped the writing says more
        raise
      writer.close()  # the writer writes in the background: a full disk shows here
      os.replace(tmp, final)
    except BaseException as e:
      tmp.unlink(missing_ok=True)  # never left for a shard: nothing reads it, and it takes space
      if reason := _disk_full(e):
        raise _out_of_disk(f"out of disk space writing {final} ({reason}{_limit_hint(reason)})", out_dir,
                           num_shards, " (the half-written file removed)") from e
      raise
    sidecar = identity | dataclasses.asdict(counts) | {"file": final.name, "record": layout and layout.to_json(),
                                                      "bytes": final.stat().st_size, "records": records, "crc32": crc}
    try:
      _write_json_atomic(out_dir / f"{name}.json", sidecar)
    except OSError as e:
      if reason := _disk_full(e):
        final.unlink(missing_ok=True)  # without its sidecar it is not finished: free its space
        raise _out_of_disk(f"out of disk space writing {out_dir / f'{name}.json'} ({reason}{_limit_hint(reason)})",
                           out_dir, num_shards, f" (its shard {final.name} removed)") from e
      raise
    return sidecar["bytes"]

  rows_todo = sum(min(settings.shard_size, len(source) - k * settings.shard_size) for k in todo)
  with (concurrent.futures.ThreadPoolExecutor(num_threads) as pool,
        tqdm(total=rows_todo, unit="pair", desc=f"encode (host {process_index}/{process_count})",
             smoothing=0.1) as progress):
    for k in todo:
      largest = max(largest, write_shard(k, pool, progress))
  try:
    return _maybe_write_manifest(out_dir, num_shards, identity)
  except OSError as e:
    if reason := _disk_full(e):
      raise _out_of_disk(f"out of disk space writing {out_dir / MANIFEST} ({reason}{_limit_hint(reason)})", out_dir,
                         num_shards) from e
    raise


def _recheck(out_dir: Path, num_shards: int, finished: dict[int, dict[str, Any]], *, full: bool,
             num_threads: int | None) -> dict[int, dict[str, Any]]:
  """The finished shards whose files still match their sidecars. The others' sidecars and files are removed: those
  shards are encoded again, and a damaged file is worth nothing but the space it takes. Sidecars from before the
  shard facts were recorded get the facts measured here."""
  if not finished:
    return finished
  logging.info("checking %d finished shards (%s)", len(finished),
               "reading every record" if full else "sizes and record counts")

  def check(k):
    entry = finished[k]
    layout = RecordLayout.from_json(entry["record"]) if entry["record"] else None
    return _check_shard(out_dir / entry["file"], entry, str(out_dir / f"{shard_name(k, num_shards)}.json"),
                        layout=layout, full=full)

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    results = dict(zip(finished, pool.map(check, finished)))
  kept = {}
  for k, (problem, facts) in results.items():
    sidecar = out_dir / f"{shard_name(k, num_shards)}.json"
    if problem:
      logging.warning("%s: %s; encoding it again", problem.file, problem.problem)
      sidecar.unlink()  # first: a shard without its sidecar is unfinished, whatever happens next
      (out_dir / finished[k]["file"]).unlink(missing_ok=True)
      continue
    kept[k] = finished[k]
    if missing := {f: v for f, v in facts.items() if f not in kept[k]}:
      kept[k] = kept[k] | missing
      try:
        _write_json_atomic(sidecar, kept[k])
      except OSError as e:  # the facts are a convenience: the shard itself was found good
        logging.warning("could not record %s in %s: %s", sorted(missing), sidecar, e)
  return kept


def _maybe_write_manifest(out_dir: Path, num_shards: int, identity: dict[str, Any]) -> dict[str, Any] | None:
  sidecars = [out_dir / f"{shard_name(k, num_shards)}.json" for k in range(num_shards)]
  if not all(p.exists() for p in sidecars):
    return None  # another host is still encoding; the last one to finish writes the manifest
  shards = [json.loads(p.read_text()) for p in sidecars]
  layouts = {json.dumps(s["record"]) for s in shards if s["record"]}
  if not layouts:
    raise ValueError(f"{identity['source']}: no usable pairs "
                     f"({sum(s['ties_dropped'] for s in shards)} ties, {sum(s['skipped'] for s in shards)} skipped)")
  if len(layouts) > 1:
    raise ValueError(f"{out_dir}: shards disagree on the record layout: {sorted(layouts)}")
  counts = ("rows", "pairs", "ties_dropped", "skipped")
  manifest = {c: sum(s[c] for s in shards) for c in counts} | identity | {
      "record": json.loads(layouts.pop()),
      "shards": [{"file": s["file"]} | {c: s[c] for c in counts} | {f: s[f] for f in SHARD_FACTS if f in s}
                 for s in shards]}
  _write_json_atomic(out_dir / MANIFEST, manifest)
  return manifest


def encoded_vae(manifest: Mapping[str, Any]) -> str:
  """The VAE folder a cache was encoded with; "" = its pipeline's own vae/ (also caches from before it was
  recorded)."""
  return manifest.get("vae") or ""


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
  path = Path(cache_dir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: run `python -m mapo_jax.encode` (on every host) first")
  return json.loads(path.read_text())


# What must agree for records of two caches to be mixed in one batch (shard_size only groups rows). `text` is
# recorded for token ids caches only (EncodeSettings.to_json): absent, it reads as None on both sides.
_MERGE_SETTINGS = tuple(f.name for f in dataclasses.fields(EncodeSettings) if f.name != "shard_size")
_COUNTS = ("rows", "pairs", "ties_dropped", "skipped")


def merge_caches(parts: Iterable[str | Path], out_dir: str | Path, *, copy: bool = False) -> dict[str, Any]:
  """One manifest in `out_dir` over the finished caches `parts`; returns it.

  The parts must share the pipeline, the record layout and every EncodeSettings field but
  shard_size; the first mismatch raises naming the part and the key. By default the manifest
  refers to the parts' shard files by paths relative to `out_dir` (no copy: keep the parts where
  they are, or move them together with `out_dir`). With `copy`, the shard files are hard-linked
  into `out_dir` (copied where a link is impossible, e.g. across file systems), so it stands alone.
  A merged cache can itself be a part.
  """
  out_dir, parts = Path(out_dir), [Path(p) for p in parts]
  if not parts:
    raise ValueError("merge_caches: no parts given")
  seen = {}
  for part in parts:
    key = os.path.realpath(part)
    if key in seen:
      raise ValueError(f"{part}: given twice (also as {seen[key]})")
    seen[key] = part
  if os.path.realpath(out_dir) in seen:
    raise ValueError(f"{out_dir}: the output cannot be one of the parts")
  manifests = [read_manifest(p) for p in parts]
  first = manifests[0]
  record_keys = list(BATCH_KEYS) + sorted({k for m in manifests for k in m["record"] if is_text_ids(k)})

  def fields(m):  # settings first: a different resolution also changes the record shapes
    return ([(f"settings.{k}", m["settings"].get(k)) for k in _MERGE_SETTINGS]
            + [("pipeline", m["pipeline"]), ("vae", encoded_vae(m))]
            + [(f"record.{k}", m["record"].get(k)) for k in record_keys])

  for part, m in zip(parts[1:], manifests[1:]):
    for (key, want), (_, got) in zip(fields(first), fields(m)):
      if got != want:
        raise ValueError(f"{part}: {key} is {got!r} but {parts[0]} has {want!r}; only caches encoded with "
                         "the same pipeline and settings can be merged")
  out_dir.mkdir(parents=True, exist_ok=True)
  shards = []
  for n, (part, m) in enumerate(zip(parts, manifests)):
    for shard in m["shards"]:
      src = part / shard["file"]
      if not src.exists():
        raise FileNotFoundError(f"{part}: shard file {src} is missing")
      if "bytes" in shard and (size := src.stat().st_size) != shard["bytes"]:  # a stat: the rest is verify's job
        raise DamagedShardError(src, f"{size} bytes on disk, but {part / MANIFEST} records {shard['bytes']} bytes "
                                     "(truncated, or not the file that was written)")
      if copy:
        dst = out_dir / f"part-{n:03d}-{src.name}"
        if dst.exists():
          dst.unlink()
        try:
          os.link(src, dst)
        except OSError:
          shutil.copyfile(src, dst)
        file = dst.name
      else:
        file = os.path.relpath(os.path.abspath(src), os.path.abspath(out_dir))
      shards.append(shard | {"file": file})
  manifest = {c: sum(m[c] for m in manifests) for c in _COUNTS} | {
      "source": f"merge of {len(parts)} caches", "source_rows": sum(m["source_rows"] for m in manifests),
      "pipeline": first["pipeline"], "vae": encoded_vae(first), "settings": first["settings"], "record": first["record"],
      "shards": shards,
      "parts": [{"dir": os.path.relpath(os.path.abspath(p), os.path.abspath(out_dir)), "source": m["source"],
                 "source_rows": m["source_rows"]} | {c: m[c] for c in _COUNTS} for p, m in zip(parts, manifests)]}
  _write_json_atomic(out_dir / MANIFEST, manifest)
  return manifest
