"""Unpaired labelled samples (Diffusion-KTO): one image, its caption and a label, +1 desirable or -1
undesirable. Their own sources and preparation; the cache and loaders store and read them with the same
machinery as pairs (`SAMPLES`, a `cache.RecordKind`), records of `cache.UNPAIRED_KEYS`.

Their sources (`sources.UnpairedJsonlSource`, `sources.UnpairedFolderSource`; docs/data.md):
  FILE.jsonl   one JSON object per line: {"prompt": str, "image": path, "label": 1 | -1}; "caption" is
               accepted in place of "prompt"; relative paths are resolved against the file's folder.
  ROOT/        ROOT/desirable/NAME.png (label +1) and ROOT/undesirable/NAME.png (label -1), each with its
               caption NAME.txt (or NAME.caption) beside the image; rows: desirable names sorted, then
               undesirable names sorted.
A pair dataset can also train KTO directly: the train step takes each pair as two samples (winner +1,
loser -1; `train_step.pairs_as_unpaired`).
"""
from typing import Any

import numpy as np

from mapo_jax.data.pairs import BadPair, decode_image, flip_and_crop
from mapo_jax.data.sources import RawRow, label_value

def prepare_sample(row: RawRow, *, resolution: int, seed: int, random_crop: bool = False) -> dict[str, Any]:
  """{pixels: (R, R, 3) float32 in [-1, 1], caption, time_ids: (6,) float32, label: float32 +1 / -1},
  resized, flipped and cropped as a pair's images are (`pairs.flip_and_crop`); raises BadPair."""
  if row.problem:
    raise BadPair(f"{row.where}: {row.problem}")
  if not isinstance(row.caption, str):
    raise BadPair(f"{row.where}: caption is {type(row.caption).__name__}, not a string")
  label = label_value(row.label_0)
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
