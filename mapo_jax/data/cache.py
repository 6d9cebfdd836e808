"""The encoded cache: ArrayRecord shards of fixed-layout records plus `manifest.json`.

A record is one pair: the arrays of `BATCH_KEYS` (plus `SCORE_KEYS` when the source stores reward
scores), each as raw bytes in that order; or one unpaired labelled sample (`UNPAIRED_KEYS`, from the
sources of mapo_jax/data/unpaired.py). Their keys, shapes and dtypes are in the manifest, so reading is a
few `np.frombuffer` calls and needs no pickle. The big arrays (moments, prompt embeddings) are stored in
`cache_dtype` (default float16: half the disk of float32; bfloat16 and float32 also work); the rest
(time_ids, rpo_emb, scores, labels) always float32.

Shard k holds source rows [k * shard_size, (k + 1) * shard_size); host p of n encodes the shards
with k % n == p. A shard is written under a temporary name and renamed when complete, then its
`shard-*.json` sidecar (counts and layout) is written the same way; a shard whose sidecar exists
is finished and a re-run skips it. Whichever host finds every sidecar present writes the manifest.

`merge_caches` joins caches encoded separately (parts of a dataset, or several datasets) into one
manifest that names the parts' shard files by relative path: nothing is copied unless asked, and
the loader reads a manifest's `shards[*].file` relative to its own folder either way.
"""

import concurrent.futures
import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy)
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from mapo_jax.data import unpaired
from mapo_jax.data.pairs import Counts, prepare_pair, prepare_rows
from mapo_jax.data.sources import SCORE_KEYS, Source, UnpairedFolderSource, UnpairedJsonlSource

# Batch format shared with the train step: moments are NHWC [mean, logvar] on the channel axis.
BATCH_KEYS = ("moments_w", "moments_l", "prompt_embeds", "pooled_prompt_embeds", "time_ids", "rpo_emb")
ENCODED_KEYS = tuple(k for k in BATCH_KEYS if k != "time_ids")  # what an EncodeFn returns
UNPAIRED_KEYS = ("moments", "label", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
# Every key a record can hold, in record order (a pair cache's keys come in BATCH_KEYS order).
_RECORD_KEYS = ("moments_w", "moments_l", "moments", "label", "prompt_embeds", "pooled_prompt_embeds", "time_ids",
                "rpo_emb") + SCORE_KEYS
_BIG_KEYS = ("moments_w", "moments_l", "moments", "prompt_embeds", "pooled_prompt_embeds")
MANIFEST = "manifest.json"

# (pixels_w, pixels_l: (B, R, R, 3) float32 in [-1, 1], captions) -> arrays of ENCODED_KEYS, (B, ...).
# pixels_l may be None (unpaired samples): then there is no moments_l.
EncodeFn = Callable[[np.ndarray, np.ndarray | None, list[str]], Mapping[str, Any]]


def encode_pairs(encode_fn: EncodeFn, items: list[dict[str, Any]]) -> dict[str, Any]:
  """Prepared pairs -> arrays of ENCODED_KEYS, plus SCORE_KEYS when the pairs carry reward scores (all of
  them or none: a mix is a ValueError)."""
  stack = lambda key: np.stack([it[key] for it in items])
  encoded = encode_fn(stack("pixels_w"), stack("pixels_l"), [it["caption"] for it in items])
  out = {k: encoded[k] for k in ENCODED_KEYS}
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

  def pair_kwargs(self) -> dict[str, Any]:
    return {"resolution": self.resolution, "seed": self.seed, "random_crop": self.random_crop}


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
    keys = [k for k in _RECORD_KEYS if k in batch]
    return cls({k: tuple(batch[k].shape[1:]) for k in keys},
               {k: cache_dtype if k in _BIG_KEYS else "float32" for k in keys})

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
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def _chunks(rows: Iterable[Any], n: int) -> Iterator[list[Any]]:
  rows = iter(rows)
  while chunk := list(itertools.islice(rows, n)):
    yield chunk


def shard_name(k: int, num_shards: int) -> str:
  return f"shard-{k:05d}-of-{num_shards:05d}"


def write_cache(source: Source, out_dir: str | Path, encode_fn: EncodeFn, settings: EncodeSettings, *,
                pipeline: str, vae: str = "", batch_size: int = 8, strict: bool = False, process_index: int = 0,
                process_count: int = 1, num_threads: int | None = None) -> dict[str, Any] | None:
  """Encodes this host's unfinished shards; returns the manifest once every shard is done, else None.

  `vae`: the VAE folder that encodes (absolute path), or "" for the pipeline's own vae/; recorded in the
  manifest so the trainer can refuse a cache encoded by another VAE than its config.vae. Pairs, or the
  unpaired samples of an unpaired source (`record_kind`)."""
  kind = record_kind(source)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  num_shards = -(-len(source) // settings.shard_size)
  identity = {"source": source.name, "source_rows": len(source), "pipeline": pipeline, "vae": vae,
              "settings": dataclasses.asdict(settings)}
  todo = []
  for k in range(process_index, num_shards, process_count):
    sidecar = out_dir / f"{shard_name(k, num_shards)}.json"
    if not sidecar.exists():
      todo.append(k)
    # .get: sidecars written before `vae` was recorded were encoded by the pipeline's VAE ("").
    elif (done := {key: json.loads(sidecar.read_text()).get(key, "") for key in identity}) != identity:
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


def encoded_vae(manifest: Mapping[str, Any]) -> str:
  """The VAE folder a cache was encoded with; "" = its pipeline's own vae/ (also caches from before it was
  recorded)."""
  return manifest.get("vae") or ""


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
  path = Path(cache_dir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: run `python -m mapo_jax.encode` (on every host) first")
  return json.loads(path.read_text())


# What must agree for records of two caches to be mixed in one batch (shard_size only groups rows).
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
  def fields(m):  # settings first: a different resolution also changes the record shapes
    return ([(f"settings.{k}", m["settings"].get(k)) for k in _MERGE_SETTINGS]
            + [("pipeline", m["pipeline"]), ("vae", encoded_vae(m))]
            + [(f"record.{k}", m["record"].get(k)) for k in BATCH_KEYS])

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
