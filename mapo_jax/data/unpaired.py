"""Unpaired labelled samples (Diffusion-KTO): one image, its caption and a label, +1 desirable or -1
undesirable. Their own sources and preparation; the cache and loaders store and read them with the same
machinery as pairs (`SAMPLES`, a `cache.RecordKind`), records of `cache.UNPAIRED_KEYS`.

Sources (docs/data.md):
  FILE.jsonl   one JSON object per line: {"prompt": str, "image": path, "label": 1 | -1}; "caption" is
               accepted in place of "prompt"; relative paths are resolved against the file's folder.
  ROOT/        ROOT/desirable/NAME.png (label +1) and ROOT/undesirable/NAME.png (label -1), each with its
               caption NAME.txt (or NAME.caption) beside the image; rows: desirable names sorted, then
               undesirable names sorted.
A pair dataset can also train KTO directly: the train step takes each pair as two samples (winner +1,
loser -1; `train_step.pairs_as_unpaired`).
"""
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mapo_jax.data.pairs import BadPair, decode_image, flip_and_crop
from mapo_jax.data.sources import (CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, JsonLines, RawRow, _require_rows,
                                     read_caption)

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


def _label(value: Any) -> float | None:
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
    label = _label(obj["label"])
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


def prepare_sample(row: RawRow, *, resolution: int, seed: int, random_crop: bool = False) -> dict[str, Any]:
  """{pixels: (R, R, 3) float32 in [-1, 1], caption, time_ids: (6,) float32, label: float32 +1 / -1},
  resized, flipped and cropped as a pair's images are (`pairs.flip_and_crop`); raises BadPair."""
  if row.problem:
    raise BadPair(f"{row.where}: {row.problem}")
  if not isinstance(row.caption, str):
    raise BadPair(f"{row.where}: caption is {type(row.caption).__name__}, not a string")
  label = _label(row.label_0)
  if label is None:
    raise BadPair(f"{row.where}: label {row.label_0!r} is not 1 or -1")
  image = decode_image(row.jpg_0, row.where, "image")
  (pixels,), time_ids = flip_and_crop([image], row.index, resolution=resolution, seed=seed, random_crop=random_crop)
  return {"pixels": pixels, "caption": row.caption, "time_ids": time_ids, "label": np.float32(label)}


def encode_samples(encode_fn, items: list[dict[str, Any]]) -> dict[str, Any]:
  """Prepared samples -> arrays of the unpaired record keys but time_ids: the encoder's winner branch
  encodes the images (it encodes no losers: `pixels_l` None)."""
  encoded = encode_fn(np.stack([it["pixels"] for it in items]), None, [it["caption"] for it in items])
  return {"moments": encoded["moments_w"], "label": np.array([it["label"] for it in items], np.float32),
          "prompt_embeds": encoded["prompt_embeds"], "pooled_prompt_embeds": encoded["pooled_prompt_embeds"]}
