"""The encoded cache: ArrayRecord shards of fixed-layout records plus `manifest.json`.

A record is one pair: the arrays of `BATCH_KEYS`, each as raw bytes in that order; their shapes and
dtypes are in the manifest, so reading is a few `np.frombuffer` calls and needs no pickle.
The four big arrays are stored in `cache_dtype` (default float16: half the disk of float32;
bfloat16 and float32 also work); `time_ids` and `rpo_emb` are always float32.

Shard k holds source rows [k * shard_size, (k + 1) * shard_size); host p of n encodes the shards
with k % n == p. A shard is written under a temporary name and renamed when complete, then its
`shard-*.json` sidecar (counts and layout) is written the same way; a shard whose sidecar exists
is finished and a re-run skips it. Whichever host finds every sidecar present writes the manifest.
"""

import concurrent.futures
import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from mapo_jax.data.pairs import Counts, prepare_rows
from mapo_jax.data.sources import Source

# Batch format shared with the train step: moments are NHWC [mean, logvar] on the channel axis.
BATCH_KEYS = ("moments_w", "moments_l", "prompt_embeds", "pooled_prompt_embeds", "time_ids", "rpo_emb")
ENCODED_KEYS = tuple(k for k in BATCH_KEYS if k != "time_ids")  # what an EncodeFn returns
_BIG_KEYS = ("moments_w", "moments_l", "prompt_embeds", "pooled_prompt_embeds")
MANIFEST = "manifest.json"

# (pixels_w, pixels_l: (B, R, R, 3) float32 in [-1, 1], captions) -> arrays of ENCODED_KEYS, (B, ...).
EncodeFn = Callable[[np.ndarray, np.ndarray, list[str]], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  """Everything that changes the cache's content (so a re-run must match it)."""
  resolution: int
  seed: int = 0  # seeds each pair's flip and random crop
  random_crop: bool = False
  cache_dtype: str = "float16"
  shard_size: int = 1000  # source rows per shard

  def pair_kwargs(self) -> dict[str, Any]:
    return {"resolution": self.resolution, "seed": self.seed, "random_crop": self.random_crop}


@dataclasses.dataclass(frozen=True)
class RecordLayout:
  """Per-pair shape and dtype of every key in BATCH_KEYS."""
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, str]

  @classmethod
  def for_batch(cls, batch: Mapping[str, np.ndarray], cache_dtype: str) -> "RecordLayout":
    return cls({k: tuple(batch[k].shape[1:]) for k in BATCH_KEYS},
               {k: cache_dtype if k in _BIG_KEYS else "float32" for k in BATCH_KEYS})

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "RecordLayout":
    return cls({k: tuple(d[k]["shape"]) for k in BATCH_KEYS}, {k: d[k]["dtype"] for k in BATCH_KEYS})

  def to_json(self) -> dict[str, Any]:
    return {k: {"shape": list(self.shapes[k]), "dtype": self.dtypes[k]} for k in BATCH_KEYS}

  def serialize(self, batch: Mapping[str, np.ndarray]) -> list[bytes]:
    """A batch (leading dim B) -> B records."""
    arrays, n = [], len(batch["time_ids"])
    for k in BATCH_KEYS:
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
    for k in BATCH_KEYS:
      dtype, shape = np.dtype(self.dtypes[k]), self.shapes[k]
      count = int(np.prod(shape))
      out[k] = np.frombuffer(record, dtype, count, offset).reshape(shape)
      offset += count * dtype.itemsize
    if offset != len(record):
      raise ValueError(f"record has {len(record)} bytes, the manifest's layout needs {offset}")
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def _chunks(rows: Iterable[Any], n: int) -> Iterator[list[Any]]:
  rows = iter(rows)
  while chunk := list(itertools.islice(rows, n)):
    yield chunk


def shard_name(k: int, num_shards: int) -> str:
  return f"shard-{k:05d}-of-{num_shards:05d}"


def write_cache(source: Source, out_dir: str | Path, encode_fn: EncodeFn, settings: EncodeSettings, *,
                pipeline: str, batch_size: int = 8, strict: bool = False, process_index: int = 0,
                process_count: int = 1, num_threads: int | None = None) -> dict[str, Any] | None:
  """Encodes this host's unfinished shards; returns the manifest once every shard is done, else None."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  num_shards = -(-len(source) // settings.shard_size)
  identity = {"source": source.name, "source_rows": len(source), "pipeline": pipeline,
              "settings": dataclasses.asdict(settings)}
  todo = []
  for k in range(process_index, num_shards, process_count):
    sidecar = out_dir / f"{shard_name(k, num_shards)}.json"
    if not sidecar.exists():
      todo.append(k)
    elif (done := {key: json.loads(sidecar.read_text())[key] for key in identity}) != identity:
      raise ValueError(f"{sidecar} was encoded with {done}, this run asks for {identity}; "
                       "use another --out or delete the old cache")

  def write_shard(k, pool, progress):
    name = shard_name(k, num_shards)
    tmp = out_dir / f".{name}.array_record.tmp"
    counts, layout = Counts(), None

    def write(encoded, time_ids):
      nonlocal layout
      batch = {key: np.asarray(v) for key, v in jax.device_get(dict(encoded)).items()} | {"time_ids": time_ids}
      layout = layout or RecordLayout.for_batch(batch, settings.cache_dtype)
      for record in layout.serialize(batch):
        writer.write(record)

    writer = ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")  # group_size 1: cheap random reads
    try:
      pending = None  # the previous batch: fetching it waits for the device, so it is written one batch late
      start = k * settings.shard_size
      for rows in _chunks(source.read(start, min(start + settings.shard_size, len(source))), batch_size):
        pairs = [pair for _, pair in prepare_rows(rows, pool, counts, strict=strict, **settings.pair_kwargs())]
        if pending:
          write(*pending)
          pending = None
        if pairs:
          stacked = {key: np.stack([p[key] for p in pairs]) for key in ("pixels_w", "pixels_l", "time_ids")}
          encoded = encode_fn(stacked["pixels_w"], stacked["pixels_l"], [p["caption"] for p in pairs])
          pending = encoded, stacked["time_ids"]
        progress.update(len(rows))
        progress.set_postfix(skipped=counts.skipped, ties=counts.ties_dropped, refresh=False)
      if pending:
        write(*pending)
    finally:
      writer.close()
    os.replace(tmp, out_dir / f"{name}.array_record")
    _write_json_atomic(out_dir / f"{name}.json", identity | dataclasses.asdict(counts) | {
        "file": f"{name}.array_record", "record": layout and layout.to_json()})

  rows_todo = sum(min(settings.shard_size, len(source) - k * settings.shard_size) for k in todo)
  with (concurrent.futures.ThreadPoolExecutor(num_threads) as pool,
        tqdm(total=rows_todo, unit="pair", desc=f"encode (host {process_index}/{process_count})",
             smoothing=0.1) as progress):
    for k in todo:
      write_shard(k, pool, progress)
  return _maybe_write_manifest(out_dir, num_shards, identity)


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
      "shards": [{"file": s["file"]} | {c: s[c] for c in counts} for s in shards]}
  _write_json_atomic(out_dir / MANIFEST, manifest)
  return manifest


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
  path = Path(cache_dir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: run `python -m mapo_jax.encode` (on every host) first")
  return json.loads(path.read_text())
