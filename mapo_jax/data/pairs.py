"""Pair rules and image preprocessing (docs/data.md): raw row -> winner/loser pixels + time ids.

label_0 == label_1 == 0.5 is a tie and is dropped; label_0 == 0 swaps the pair (jpg_1 wins); any
other labels, a non-string caption or an undecodable image make the row bad (`BadPair`, message
names the file and row). jpg_1 is resized to jpg_0's size, both are resized so the shorter side
is `resolution`, flipped together with p = 0.5, and cropped (centre, or random) to a square.
The flip and random crop are drawn from a generator seeded by (seed, row index), so a pair is
processed identically whichever host, batch or mode (cache or on the fly) handles it.
"""

import concurrent.futures
import dataclasses
import io
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from mapo_jax.data.sources import RawRow

# The reference trainers bring jpg_1 to jpg_0's size with PIL's default resize filter (bicubic).
_MATCH_SIZE_FILTER = Image.Resampling.BICUBIC
# PIL's bilinear resize widens its kernel when shrinking, i.e. it is antialiased.
_RESIZE_FILTER = Image.Resampling.BILINEAR


class BadPair(ValueError):
  """A row that cannot become a correct pair; the message starts with the file and row."""


@dataclasses.dataclass
class Counts:
  rows: int = 0
  pairs: int = 0
  ties_dropped: int = 0
  skipped: int = 0


def _winner_is_jpg1(row: RawRow) -> bool | None:
  """True if jpg_1 wins, False if jpg_0 wins, None for a tie; raises BadPair otherwise."""
  labels = []
  for name in ("label_0", "label_1"):
    value = getattr(row, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
      raise BadPair(f"{row.where}: {name}={value!r} is not a number in {{0, 0.5, 1}}")
    labels.append(float(value))
  if labels == [1.0, 0.0]:
    return False
  if labels == [0.0, 1.0]:
    return True
  if labels == [0.5, 0.5]:
    return None
  raise BadPair(f"{row.where}: labels (label_0, label_1) = {tuple(labels)}; "
                "expected (1, 0), (0, 1) or the tie (0.5, 0.5)")


def decode_image(value: Any, where: str, column: str) -> Image.Image:
  """JPEG bytes, a `{"bytes": ..., "path": ...}` struct, a path or an HWC uint8 array -> fully decoded RGB."""
  try:
    if isinstance(value, dict):  # HF's Image feature: {"bytes", "path"}; bytes is None for a file on disk
      value = value["bytes"] if value.get("bytes") is not None else Path(value["path"])
    if isinstance(value, np.ndarray):
      return Image.fromarray(value).convert("RGB")
    source = value if isinstance(value, Path) else io.BytesIO(value)
    with Image.open(source) as image:
      return image.convert("RGB")  # convert() decodes every pixel, so truncation raises here
  except Exception as e:  # PIL raises many types for bad data; all mean "this row is bad"
    raise BadPair(f"{where}: cannot decode {column} ({type(e).__name__}: {e})") from e


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Shorter side -> size; the longer side is truncated like torchvision's Resize(int)."""
  w, h = image.size
  new = (int(size * w / h), size) if h <= w else (size, int(size * h / w))
  return image.resize(new, _RESIZE_FILTER)


def prepare_pair(row: RawRow, *, resolution: int, seed: int,
                 random_crop: bool = False) -> dict[str, Any] | None:
  """Returns {pixels_w, pixels_l: (R, R, 3) float32 in [-1, 1], caption, time_ids: (6,) float32}.

  Returns None for a tie; raises BadPair for a row that cannot be used.
  time_ids = [orig_H, orig_W, crop_top, crop_left, R, R], orig = jpg_0's size, crop offsets in
  the resized (and possibly flipped) image, as the reference SDXL trainers record them.
  """
  if row.problem:
    raise BadPair(f"{row.where}: {row.problem}")
  swap = _winner_is_jpg1(row)
  if swap is None:
    return None
  if not isinstance(row.caption, str):
    raise BadPair(f"{row.where}: caption is {type(row.caption).__name__}, not a string")
  image_0 = decode_image(row.jpg_0, row.where, "jpg_0")
  image_1 = decode_image(row.jpg_1, row.where, "jpg_1")
  if image_1.size != image_0.size:
    image_1 = image_1.resize(image_0.size, _MATCH_SIZE_FILTER)
  images = [image_1, image_0] if swap else [image_0, image_1]
  pixels, time_ids = flip_and_crop(images, row.index, resolution=resolution, seed=seed, random_crop=random_crop)
  out = {"pixels_w": pixels[0], "pixels_l": pixels[1], "caption": row.caption, "time_ids": time_ids}
  if row.scores is not None:  # stored reward scores, in jpg_0, jpg_1 order (SmPO's soft labels)
    score_w, score_l = row.scores[::-1] if swap else row.scores
    out["score_w"], out["score_l"] = np.float32(score_w), np.float32(score_l)
  return out


def flip_and_crop(images: Sequence[Image.Image], index: int, *, resolution: int, seed: int,
                  random_crop: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
  """Images of one size -> ((R, R, 3) float32 pixels in [-1, 1] each, time_ids). Resized so the shorter
  side is R, flipped together with p = 0.5 and cropped (centre, or random) to a square, with the draws
  seeded by (seed, index); time_ids = [orig_H, orig_W, crop_top, crop_left, R, R], orig = images[0]'s."""
  orig_w, orig_h = images[0].size
  rng = np.random.default_rng([seed, index])
  flip = rng.random() < 0.5
  images = [resize_shorter_side(im, resolution) for im in images]
  if flip:
    images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
  w, h = images[0].size
  if random_crop:
    top, left = int(rng.integers(h - resolution + 1)), int(rng.integers(w - resolution + 1))
  else:
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
  box = (left, top, left + resolution, top + resolution)
  pixels = [np.asarray(im.crop(box), np.float32) / 127.5 - 1.0 for im in images]
  return pixels, np.array([orig_h, orig_w, top, left, resolution, resolution], np.float32)


def prepare_rows(rows: Sequence[RawRow], pool: concurrent.futures.Executor, counts: Counts, *,
                 strict: bool, prepare=None, **kwargs) -> list[tuple[RawRow, dict[str, Any]]]:
  """Prepares rows in parallel (PIL releases the GIL) and keeps the usable ones, in order.
  `prepare` (default `prepare_pair`) turns one row into its arrays, None for a tie, or raises BadPair.

  Ties are dropped and bad rows skipped with a warning, both counted in `counts`;
  with `strict` the first bad row (in row order) raises instead.
  """
  prepare = prepare or prepare_pair

  def attempt(row):
    try:
      return prepare(row, **kwargs)
    except BadPair as e:
      return e

  kept = []
  for row, result in zip(rows, pool.map(attempt, rows)):
    counts.rows += 1
    if isinstance(result, BadPair):
      if strict:
        raise result
      logging.warning("skipped %s", result)
      counts.skipped += 1
    elif result is None:
      counts.ties_dropped += 1
    else:
      counts.pairs += 1
      kept.append((row, result))
  return kept
