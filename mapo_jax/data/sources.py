"""Sources of raw preference pairs: Pick-a-Pic-style parquet, a JSONL of image paths, or TFDS.

Every source numbers its rows 0..len-1 in a fixed order and reads any range of them, so hosts can
split the work by row range and a pair's index (which seeds its flip and crop) never depends on
how the work was split. Row-level problems (bad JSON, a missing key) are not raised here: the row
carries them in `problem` and `pairs.prepare_pair` turns them into a skip or a `--strict` error.
Problems with the source as a whole (no files, no rows, a missing column) raise at once.
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
JSONL_KEYS = ("prompt", "chosen", "rejected")  # "caption" is accepted in place of "prompt"


@dataclasses.dataclass(frozen=True)
class RawRow:
  """One row as stored. Images are JPEG bytes, `{"bytes": ...}` structs, paths or HWC uint8 arrays."""
  index: int  # position in the whole source; seeds the pair's flip and crop
  where: str  # "<file> row <n>", for messages
  caption: Any = None
  jpg_0: Any = None
  jpg_1: Any = None
  label_0: Any = None
  label_1: Any = None
  problem: str | None = None  # why the source could not read this row


class Source(Protocol):
  name: str

  def __len__(self) -> int: ...

  def read(self, start: int, stop: int) -> Iterator[RawRow]: ...


def open_source(spec: str) -> Source:
  """`tfds:NAME[:SPLIT]`, a `.jsonl` file, or a `.parquet` file / folder of them."""
  if spec.startswith("tfds:"):
    return TfdsSource(spec.removeprefix("tfds:"))
  if spec.endswith(".jsonl"):
    return JsonlSource(spec)
  return ParquetSource(spec)


def _require_rows(name: str, n: int) -> None:
  if n == 0:
    raise ValueError(f"{name}: empty source (0 rows)")


class ParquetSource:
  """Pick-a-Pic-style parquet: columns caption, jpg_0, jpg_1, label_0, label_1 (others ignored).

  A folder is read recursively in sorted path order. Rows are streamed a few at a time from
  the row groups that overlap the requested range, so no file is ever loaded whole.
  """

  def __init__(self, path: str | Path, read_batch: int = 64):
    self.name = str(path)
    path = Path(path)
    if path.is_dir():
      files = sorted(path.rglob("*.parquet"))
    elif path.exists():
      files = [path]
    else:
      raise FileNotFoundError(f"{path}: no such file or folder")
    if not files:
      raise ValueError(f"{path}: empty source (no .parquet files)")
    self._read_batch = read_batch
    self._files = []  # (file, first global row, row-group sizes)
    total = 0
    for f in files:
      meta = pq.read_metadata(f)
      names = meta.schema.to_arrow_schema().names
      missing = [c for c in COLUMNS if c not in names]
      if missing:
        raise ValueError(f"{f}: missing column(s) {missing}; need {list(COLUMNS)}, found {names}")
      sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
      self._files.append((f, total, sizes))
      total += sum(sizes)
    self._len = total
    _require_rows(self.name, total)

  def __len__(self) -> int:
    return self._len

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    for f, file_start, sizes in self._files:
      group_start = file_start
      for group, size in enumerate(sizes):
        lo, hi = max(start, group_start), min(stop, group_start + size)
        if lo < hi:
          yield from self._read_group(f, file_start, group, group_start, lo, hi)
        group_start += size

  def _read_group(self, f: Path, file_start: int, group: int, index: int, lo: int,
                  hi: int) -> Iterator[RawRow]:
    """Rows lo..hi-1 of row group `group`, whose first row has global index `index`."""
    batches = pq.ParquetFile(f).iter_batches(self._read_batch, row_groups=[group], columns=list(COLUMNS))
    for batch in batches:
      if index + batch.num_rows <= lo:  # skip without converting the image bytes
        index += batch.num_rows
        continue
      for record in batch.to_pylist():
        if lo <= index < hi:
          yield RawRow(index, f"{f} row {index - file_start}", **record)
        index += 1
        if index >= hi:
          return


class JsonlSource:
  """One JSON object per line: {"prompt": str, "chosen": path, "rejected": path}.

  "caption" is accepted in place of "prompt". Relative image paths are resolved against the
  JSONL file's folder. Blank lines are ignored; line numbers in messages are 1-based.
  """

  def __init__(self, path: str | Path):
    self.name = str(path)
    self._path = Path(path)
    self._lines = []  # (byte offset, line number) of each non-blank line
    offset = 0
    with self._path.open("rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          self._lines.append((offset, number))
        offset += len(line)
    _require_rows(self.name, len(self._lines))

  def __len__(self) -> int:
    return len(self._lines)

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    with self._path.open("rb") as f:
      for index in range(start, stop):
        offset, number = self._lines[index]
        f.seek(offset)
        yield self._row(index, f"{self._path} line {number}", f.readline())

  def _row(self, index: int, where: str, line: bytes) -> RawRow:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      return RawRow(index, where, problem=f"invalid JSON ({e})")
    if not isinstance(obj, dict):
      return RawRow(index, where, problem=f"expected a JSON object, got {type(obj).__name__}")
    prompt_key = "prompt" if "prompt" in obj else "caption"
    missing = [k for k in (prompt_key, "chosen", "rejected") if k not in obj]
    if missing:
      return RawRow(index, where, problem=f"missing key(s) {missing}; need {list(JSONL_KEYS)}")
    paths = []
    for key in ("chosen", "rejected"):
      if not isinstance(obj[key], str):
        return RawRow(index, where, problem=f"'{key}' must be a path string, got {obj[key]!r}")
      paths.append(self._path.parent / obj[key])  # an absolute path stays as it is
    return RawRow(index, where, obj[prompt_key], paths[0], paths[1], label_0=1.0, label_1=0.0)


class TfdsSource:
  """A TFDS dataset with the Pick-a-Pic features, read through `tfds.data_source` (random access).

  `spec` is "NAME[:SPLIT]" (split defaults to "train"); TFDS finds data_dir as usual
  (TFDS_DATA_DIR or ~/tensorflow_datasets). Needs the optional `tfds` extra.
  """

  def __init__(self, spec: str):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"tfds:{spec} needs tensorflow-datasets: pip install 'mapo-jax[tfds]'") from e
    name, _, split = spec.partition(":")
    self.name = f"tfds:{name}:{split or 'train'}"
    self._ds = tfds.data_source(name, split=split or "train")
    _require_rows(self.name, len(self._ds))
    missing = [c for c in COLUMNS if c not in self._ds[0]]
    if missing:
      raise ValueError(f"{self.name}: missing feature(s) {missing}; need {list(COLUMNS)}")

  def __len__(self) -> int:
    return len(self._ds)

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    for index in range(start, stop):
      ex = self._ds[index]
      caption = ex["caption"]
      if isinstance(caption, (bytes, np.bytes_)):  # tf.string features come back as bytes
        try:
          caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
          yield RawRow(index, f"{self.name} row {index}", problem=f"caption is not UTF-8 ({e})")
          continue
      yield RawRow(index, f"{self.name} row {index}", caption,
                   *(ex[c] for c in ("jpg_0", "jpg_1", "label_0", "label_1")))
