"""Sources of raw preference pairs: Pick-a-Pic-style parquet or Arrow, JSONL, HPDv2-style ranked
JSON, preference folders, or TFDS. docs/data.md shows each format with an example.

Every source numbers its rows 0..len-1 in a fixed order and reads any range of them, so hosts can
split the work by row range and a pair's index (which seeds its flip and crop) never depends on
how the work was split. Row-level problems (bad JSON, a missing key) are not raised here: the row
carries them in `problem` and `pairs.prepare_pair` turns them into a skip or a `--strict` error.
Problems with the source as a whole (no files, no rows, a missing column) raise at once.

`open_source(spec)` picks the source from the spec; options follow the path as `?key=value&flag`:
  tfds:NAME[:SPLIT]           TfdsSource
  FILE.jsonl                  JsonlSource: {"prompt", "chosen", "rejected"} per line
  FILE.json[?best_worst][&images=DIR]
                              RankedSource: HPDv2-style list of {"prompt", "image_path": [...],
                              "rank": [...]} (1 = best), or {"human_preference": [...]} (1 = preferred)
  FILE.arrow, or a folder with state.json / dataset_dict.json / *.arrow [?split=NAME]
                              ArrowSource: `datasets.save_to_disk` output or HF cache Arrow files
  a folder with w/ and l/     PreferenceFolderSource: w/NAME.png, l/NAME.png, NAME.txt caption
  FILE.jsonl of {"prompt", "image", "label"}, or a folder with desirable/ and undesirable/
                              unpaired labelled samples (Diffusion-KTO): UnpairedJsonlSource, UnpairedFolderSource
  anything else               ParquetSource: a .parquet file or a folder of them
"""

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
JSONL_KEYS = ("prompt", "chosen", "rejected")  # "caption" is accepted in place of "prompt"
SCORE_KEYS = ("score_w", "score_l")  # optional JSONL fields: the pair's reward scores


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
  scores: tuple[float, float] | None = None  # stored reward scores of jpg_0 and jpg_1 (SmPO), if any


class Source(Protocol):
  name: str

  def __len__(self) -> int: ...

  def read(self, start: int, stop: int) -> Iterator[RawRow]: ...


def parse_spec(spec: str) -> tuple[str, dict[str, str | bool]]:
  """`PATH?key=value&flag` -> (PATH, {key: value, flag: True}); an existing path is taken whole."""
  path, sep, query = spec.rpartition("?")
  if not sep or Path(spec).exists():
    return spec, {}
  options = {}
  for item in filter(None, query.split("&")):
    key, eq, value = item.partition("=")
    options[key] = value if eq else True
  return path, options


def _flag(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("1", "true", "yes"):
    return True
  if str(value).lower() in ("0", "false", "no"):
    return False
  raise ValueError(f"expected a boolean option, got {value!r}")


def _is_arrow_folder(path: Path) -> bool:
  # Not dataset_info.json alone: Hub snapshots of parquet datasets may carry one too.
  return (path / "state.json").exists() or (path / "dataset_dict.json").exists() or any(path.glob("*.arrow"))


def open_source(spec: str, **options: Any) -> Source:
  """The source for `spec` (see the module docstring); `options` add to or override the spec's."""
  if spec.startswith("tfds:"):
    kind, path, allowed = TfdsSource, spec.removeprefix("tfds:"), ()
    spec_options = {}
  else:
    path, spec_options = parse_spec(spec)
    p = Path(path)
    if path.endswith(".jsonl") and is_unpaired_jsonl(p):
      kind, allowed = UnpairedJsonlSource, ()
    elif p.is_dir() and is_unpaired_folder(p):
      kind, allowed = UnpairedFolderSource, ()
    elif path.endswith(".jsonl"):
      kind, allowed = JsonlSource, ()
    elif path.endswith(".json"):
      kind, allowed = RankedSource, RankedSource.OPTIONS
    elif path.endswith(".arrow") or (p.is_dir() and _is_arrow_folder(p)):
      kind, allowed = ArrowSource, ArrowSource.OPTIONS
    elif p.is_dir() and (p / "w").is_dir() and (p / "l").is_dir():
      kind, allowed = PreferenceFolderSource, ()
    else:
      kind, allowed = ParquetSource, ()
  options = spec_options | options
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"{spec}: option(s) {unknown} do not apply to a {kind.__name__}; "
                     f"it takes {list(allowed) or 'none'}")
  return kind(path, **options)


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


def read_caption(path: Path) -> tuple[str | None, str | None]:
  """(the caption file's stripped text, None), or (None, why it could not be read)."""
  try:
    return path.read_text(encoding="utf-8").strip(), None
  except (OSError, UnicodeDecodeError) as e:
    return None, f"cannot read {path} ({e})"


class JsonLines:
  """Random access to the non-blank lines of a JSON-lines file. A subclass turns each line's object into a
  RawRow (`_object_row`); a line that is not a JSON object becomes a RawRow with its problem, named by file
  and 1-based line number."""

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
    return self._object_row(index, where, obj, "prompt" if "prompt" in obj else "caption")

  def _object_row(self, index: int, where: str, obj: dict, prompt_key: str) -> RawRow:
    raise NotImplementedError


class JsonlSource(JsonLines):
  """One JSON object per line: {"prompt": str, "chosen": path, "rejected": path}, optionally with the
  pair's reward scores {"score_w": number, "score_l": number} (both or neither; `mapo_jax.relabel --soft`
  writes them; SmPO reads them).

  "caption" is accepted in place of "prompt". Relative image paths are resolved against the
  JSONL file's folder. Blank lines are ignored; line numbers in messages are 1-based.
  """

  def _object_row(self, index: int, where: str, obj: dict, prompt_key: str) -> RawRow:
    missing = [k for k in (prompt_key, "chosen", "rejected") if k not in obj]
    if missing:
      return RawRow(index, where, problem=f"missing key(s) {missing}; need {list(JSONL_KEYS)}")
    paths = []
    for key in ("chosen", "rejected"):
      if not isinstance(obj[key], str):
        return RawRow(index, where, problem=f"'{key}' must be a path string, got {obj[key]!r}")
      paths.append(self._path.parent / obj[key])  # an absolute path stays as it is
    scores = None
    given = [k for k in SCORE_KEYS if k in obj]
    if given:
      if len(given) != 2:
        return RawRow(index, where, problem=f"has {given[0]!r} without {[k for k in SCORE_KEYS if k not in given][0]!r}")
      bad = [k for k in SCORE_KEYS if isinstance(obj[k], bool) or not isinstance(obj[k], (int, float))
             or not math.isfinite(obj[k])]
      if bad:
        return RawRow(index, where, problem=f"'{bad[0]}' must be a finite number, got {obj[bad[0]]!r}")
      scores = (float(obj["score_w"]), float(obj["score_l"]))
    return RawRow(index, where, obj[prompt_key], paths[0], paths[1], label_0=1.0, label_1=0.0, scores=scores)


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


def _open_arrow(f: Path) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
  """An Arrow IPC file ("Feather v2", starts with ARROW1) or stream (what `datasets` writes), memory-mapped
  so reading a batch maps its buffers instead of copying them."""
  source = pa.memory_map(str(f))
  if source.read(6) == b"ARROW1":
    source.seek(0)
    return pa.ipc.open_file(source)
  source.seek(0)
  return pa.ipc.open_stream(source)


def _arrow_batches(f: Path) -> Iterator[pa.RecordBatch]:
  reader = _open_arrow(f)
  if isinstance(reader, pa.ipc.RecordBatchFileReader):
    yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
  else:
    yield from reader


class ArrowSource:
  """Pick-a-Pic columns (caption, jpg_0, jpg_1, label_0, label_1; others ignored) in Arrow files.

  `path` is one .arrow file, a `datasets.save_to_disk` folder (state.json lists its data-*.arrow
  files in order), a saved DatasetDict (dataset_dict.json; `split` picks a split, default "train"),
  or any folder of .arrow files, such as a `datasets` cache folder, read in sorted name order
  (`split` then keeps the files named like "NAME-SPLIT-00000-of-00009.arrow" or "NAME-SPLIT.arrow").
  Read with pyarrow alone: the `datasets` package is not needed. Files are memory-mapped and a read
  converts only the requested rows, so no file is loaded whole. A dataset that was `select`ed or
  shuffled and not yet saved keeps an indices mapping this source does not apply: `save_to_disk`
  writes the rows in their selected order, so read its output.
  """

  OPTIONS = ("split",)

  def __init__(self, path: str | Path, split: str | None = None, read_batch: int = 64):
    path = Path(path)
    self.name = str(path) + (f"?split={split}" if split else "")
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file or folder")
    files = self._files_of(path, split)
    if not files:
      raise ValueError(f"{self.name}: empty source (no .arrow files)")
    self._read_batch = read_batch
    self._files = []  # (file, first global row, record-batch sizes)
    total = 0
    for f in files:
      names = _open_arrow(f).schema.names
      missing = [c for c in COLUMNS if c not in names]
      if missing:
        raise ValueError(f"{f}: missing column(s) {missing}; need {list(COLUMNS)}, found {names}")
      sizes = [b.num_rows for b in _arrow_batches(f)]  # mapped, not read: cheap even for big files
      self._files.append((f, total, sizes))
      total += sum(sizes)
    self._len = total
    _require_rows(self.name, total)

  @staticmethod
  def _files_of(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
      if split:
        raise ValueError(f"{path}: split={split} needs a folder, not one .arrow file")
      return [path]
    if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: one folder per split
      splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
      split = split or "train"
      if split not in splits:
        raise ValueError(f"{path}: no split {split!r}; it has {splits} (pick one with ?split=NAME)")
      return ArrowSource._files_of(path / split, None)
    if (path / "state.json").exists():  # Dataset.save_to_disk
      if split:
        raise ValueError(f"{path}: a single saved split; drop ?split={split}")
      state = json.loads((path / "state.json").read_text())
      return [path / d["filename"] for d in state["_data_files"]]
    files = sorted(path.glob("*.arrow"))
    if split:  # the `datasets` cache names its files "<builder>-<split>[-<k>-of-<n>].arrow"
      files = [f for f in files if f"-{split}-" in f.name or f.name.endswith(f"-{split}.arrow")]
    return files

  def __len__(self) -> int:
    return self._len

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    for f, file_start, sizes in self._files:
      if file_start >= stop or file_start + sum(sizes) <= start:
        continue
      index = file_start
      for batch in _arrow_batches(f):  # skipping a mapped batch costs no I/O beyond its header
        lo, hi = max(start, index), min(stop, index + batch.num_rows)
        for a in range(lo, hi, self._read_batch):
          b = min(a + self._read_batch, hi)
          records = batch.select(list(COLUMNS)).slice(a - index, b - a).to_pylist()
          for i, record in enumerate(records, start=a):
            yield RawRow(i, f"{f} row {i - file_start}", **record)
        index += batch.num_rows
        if index >= stop:
          break


class RankedSource:
  """HPDv2-style ranked sets in one JSON file: a list of entries, each one prompt and several images.

      [{"prompt": "a cat", "image_path": ["0.jpg", "1.jpg", "2.jpg"], "rank": [2, 1, 3]}, ...]

  "rank" is the human rank of each image, 1 = best (HPDv2's test.json); in its place
  "human_preference" scores each image, higher = preferred (HPDv2's train.json: [1, 0] or [0, 1]).
  "file_path" is accepted in place of "image_path" and "caption" in place of "prompt".
  Every two images of an entry (i < j) are one row: the better-ranked image wins; equal ranks make a
  tie row (dropped by the pair rules, and counted). With `best_worst` an entry gives one row, its
  best image (the first, if several share the best rank) against its worst (likewise).
  Relative image paths are resolved against `images` if given, else against the folder named like
  the JSON file beside it if there is one (HPDv2 ships train.json with train/), else the JSON's folder.
  A malformed entry is one row that carries the problem.
  """

  OPTIONS = ("best_worst", "images")

  def __init__(self, path: str | Path, best_worst: bool | str = False, images: str | Path | None = None):
    self._path = Path(path)
    best_worst = _flag(best_worst)
    options = (["best_worst"] if best_worst else []) + ([f"images={images}"] if images else [])
    self.name = str(path) + ("?" + "&".join(options) if options else "")  # the cache compares names
    if images is None:
      beside = self._path.with_suffix("")
      images = beside if beside.is_dir() else self._path.parent
    self._images = Path(images)
    with self._path.open("rb") as f:
      entries = json.load(f)
    if not isinstance(entries, list):
      raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    self._entries = entries
    rows = []  # (entry, i, j): images i and j of the entry; i == j == -1 for a malformed entry
    for n, entry in enumerate(entries):
      ranks = self._ranks(entry)
      if isinstance(ranks, str):
        rows.append((n, -1, -1))
      elif best_worst:
        best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
        rows.append((n, *sorted((best, worst))) if best != worst else (n, 0, 1))
      else:
        rows.extend((n, i, j) for i in range(len(ranks)) for j in range(i + 1, len(ranks)))
    self._rows = np.array(rows, np.int64).reshape(-1, 3)
    _require_rows(self.name, len(self._rows))

  @staticmethod
  def _ranks(entry: Any) -> list[float] | str:
    """Lower is better; or why the entry is malformed."""
    if not isinstance(entry, dict):
      return f"expected a JSON object, got {type(entry).__name__}"
    image_key = "image_path" if "image_path" in entry else "file_path"
    rank_key = "rank" if "rank" in entry else "human_preference"
    missing = [k for k in ("prompt" if "prompt" in entry else "caption", image_key, rank_key) if k not in entry]
    if missing:
      return f"missing key(s) {missing}; need prompt, image_path and rank (or human_preference)"
    images, scores = entry[image_key], entry[rank_key]
    if not isinstance(images, list) or not isinstance(scores, list) or len(images) != len(scores):
      return f"'{image_key}' and '{rank_key}' must be lists of the same length"
    if len(images) < 2:
      return f"{len(images)} image(s); a ranked set needs at least 2"
    if not all(isinstance(x, str) for x in images):
      return f"'{image_key}' must hold path strings"
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
      return f"'{rank_key}' must hold numbers, got {scores!r}"
    return [float(x) if rank_key == "rank" else -float(x) for x in scores]

  def __len__(self) -> int:
    return len(self._rows)

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    for index in range(start, stop):
      n, i, j = (int(x) for x in self._rows[index])
      entry = self._entries[n]
      if i < 0:
        yield RawRow(index, f"{self._path} entry {n}", problem=self._ranks(entry))
        continue
      ranks = self._ranks(entry)
      labels = (1.0, 0.0) if ranks[i] < ranks[j] else (0.0, 1.0) if ranks[i] > ranks[j] else (0.5, 0.5)
      images = entry["image_path" if "image_path" in entry else "file_path"]
      yield RawRow(index, f"{self._path} entry {n} images ({i}, {j})",
                   entry["prompt"] if "prompt" in entry else entry["caption"],
                   self._images / images[i], self._images / images[j], *labels)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")


class PreferenceFolderSource:
  """A folder of preference pairs named alike, after the layout of kohya-ss/sd-scripts PR #1427:

      ROOT/w/NAME.png   the preferred image (any of IMAGE_EXTENSIONS, any case)
      ROOT/l/NAME.jpg   the rejected image
      ROOT/NAME.txt     the caption (or ROOT/w/NAME.txt, or .caption in place of .txt, as kohya)

  Rows are the names in w/ or l/, sorted. A name without its other image or caption, or with two
  images of the same name, is a row that carries the problem. Captions are stripped of surrounding
  whitespace.
  """

  def __init__(self, path: str | Path):
    self.name = str(path)
    self._root = Path(path)
    found: dict[str, dict[str, list[Path]]] = {}
    for side in ("w", "l"):
      for f in (self._root / side).iterdir():
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
          found.setdefault(f.stem, {"w": [], "l": []})[side].append(f)
    self._names = sorted(found)
    self._found = found
    _require_rows(self.name, len(self._names))

  def __len__(self) -> int:
    return len(self._names)

  def _caption(self, name: str) -> Path | None:
    for folder in (self._root, self._root / "w"):
      for ext in CAPTION_EXTENSIONS:
        if (folder / f"{name}{ext}").is_file():
          return folder / f"{name}{ext}"
    return None

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    for index in range(start, stop):
      name = self._names[index]
      where = f"{self._root} pair {name!r}"
      sides = self._found[name]
      problem = next((f"{len(sides[s])} images named {name!r} in {s}/ (need exactly 1: "
                      f"{sorted(p.name for p in sides[s])})" for s in ("w", "l") if len(sides[s]) != 1), None)
      caption_file = self._caption(name)
      if problem is None and caption_file is None:
        problem = f"no caption file {name}.txt (looked in {self._root} and w/)"
      if problem:
        yield RawRow(index, where, problem=problem)
        continue
      caption, problem = read_caption(caption_file)
      if problem:
        yield RawRow(index, where, problem=problem)
        continue
      yield RawRow(index, where, caption, sides["w"][0], sides["l"][0], label_0=1.0, label_1=0.0)


# Unpaired labelled samples (Diffusion-KTO; their preparation is mapo_jax/data/unpaired.py).
UNPAIRED_JSONL_KEYS = ("prompt", "image", "label")
LABELS = (1, -1)
FOLDERS = {"desirable": 1.0, "undesirable": -1.0}


def is_unpaired_jsonl(path: Path) -> bool:
  """Whether the first non-blank line of a JSONL file is an unpaired sample (has "image" and "label")."""
  with path.open("rb") as f:
    for line in f:
      if line.strip():
        try:
          obj = json.loads(line)
        except json.JSONDecodeError:
          return False  # the pair source reports the bad line
        return isinstance(obj, dict) and "image" in obj and "label" in obj
  return False


def is_unpaired_folder(path: Path) -> bool:
  return all((path / name).is_dir() for name in FOLDERS)


def label_value(value: Any) -> float | None:
  """An unpaired sample's label as float +1 / -1, or None when it is neither."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in LABELS:
    return None
  return float(value)


class UnpairedJsonlSource(JsonLines):
  """{"prompt", "image", "label"} per line (module docstring). Row problems (bad JSON, a missing key, a
  label other than 1 / -1) travel with the row, as for pairs."""

  def _object_row(self, index: int, where: str, obj: dict, prompt_key: str) -> RawRow:
    missing = [k for k in (prompt_key, "image", "label") if k not in obj]
    if missing:
      return RawRow(index, where, problem=f"missing key(s) {missing}; need {list(UNPAIRED_JSONL_KEYS)}")
    if not isinstance(obj["image"], str):
      return RawRow(index, where, problem=f"'image' must be a path string, got {obj['image']!r}")
    label = label_value(obj["label"])
    if label is None:
      return RawRow(index, where, problem=f"'label' must be 1 (desirable) or -1 (undesirable), got {obj['label']!r}")
    return RawRow(index, where, obj[prompt_key], self._path.parent / obj["image"], label_0=label)


class UnpairedFolderSource:
  """ROOT/desirable/ and ROOT/undesirable/ images with NAME.txt captions beside them (module docstring)."""

  def __init__(self, path: str | Path):
    self.name = str(path)
    self._root = Path(path)
    self._rows = [(folder, f) for folder in FOLDERS
                  for f in sorted((self._root / folder).iterdir(), key=lambda f: f.name)
                  if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    _require_rows(self.name, len(self._rows))

  def __len__(self) -> int:
    return len(self._rows)

  def read(self, start: int, stop: int) -> Iterator[RawRow]:
    for index in range(start, stop):
      folder, image = self._rows[index]
      where = f"{self._root} {folder}/{image.name}"
      caption_file = next((image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()),
                          None)
      if caption_file is None:
        yield RawRow(index, where, problem=f"no caption file {image.stem}.txt beside the image")
        continue
      caption, problem = read_caption(caption_file)
      if problem:
        yield RawRow(index, where, problem=problem)
        continue
      yield RawRow(index, where, caption, image, label_0=FOLDERS[folder])
