"""Shared helpers for the data tests: tiny images, parquet/JSONL writers and a stand-in encoder."""

import io
import json

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mapo_jax.data import cache

EMBED_TOKENS, EMBED_DIM, POOLED_DIM = 77, 4, 3


def image_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
  """HWC uint8 -> encoded bytes (PNG is lossless, so pixel values can be checked exactly)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def solid(value: int, w: int = 24, h: int = 16, fmt: str = "PNG") -> bytes:
  return image_bytes(np.full((h, w, 3), value, np.uint8), fmt)


def pick_a_pic_rows(n: int, w: int = 24, h: int = 16) -> list[dict]:
  """n valid rows; row i's winner is solid grey 10 * i + 5 and its loser 10 * i + 6 (as uint8),
  alternating which column holds the winner; captions are "pair i"."""
  rows = []
  for i in range(n):
    win, lose = solid(10 * i + 5, w, h), solid(10 * i + 6, w, h)
    if i % 2:
      rows.append({"caption": f"pair {i}", "jpg_0": lose, "jpg_1": win, "label_0": 0.0, "label_1": 1.0})
    else:
      rows.append({"caption": f"pair {i}", "jpg_0": win, "jpg_1": lose, "label_0": 1.0, "label_1": 0.0})
  return rows


def write_parquet(path, rows: list[dict], row_group_size: int = 4, struct: bool = False) -> None:
  """Pick-a-Pic-style parquet; `struct` stores images as {bytes, path} like HF's Image feature."""
  columns = {k: [r[k] for r in rows] for k in rows[0]}
  if struct:
    for k in ("jpg_0", "jpg_1"):
      columns[k] = [{"bytes": b, "path": None} for b in columns[k]]
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def write_jsonl(path, lines: list) -> None:
  path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def pair_id(caption: str) -> int:
  return int(caption.split()[-1])


def fake_encode(pixels_w, pixels_l, captions):
  """Stand-in for the VAE and text towers, cheap and easy to check: moments = 8x8 average pools
  of the pixels as mean and minus that as logvar; every embedding carries the pair id."""
  def moments(x):
    b, h, w, c = x.shape
    mean = x.reshape(b, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))
    return np.concatenate([mean, -mean], axis=-1)

  ids = np.array([pair_id(c) for c in captions], np.float32)
  pooled = np.stack([ids, ids + 0.5, -ids], axis=1)
  return {"moments_w": moments(pixels_w), "moments_l": moments(pixels_l),
          "prompt_embeds": np.broadcast_to(ids[:, None, None], (len(ids), EMBED_TOKENS, EMBED_DIM)),
          "pooled_prompt_embeds": pooled, "rpo_emb": pooled}


def read_cache(out_dir):
  """(manifest, records in shard order) of a finished cache."""
  manifest = cache.read_manifest(out_dir)
  layout = cache.RecordLayout.from_json(manifest["record"])
  files = [str(out_dir / s["file"]) for s in manifest["shards"] if s["pairs"]]
  return manifest, [layout.deserialize(r) for r in grain.sources.ArrayRecordDataSource(files)]


def grey(value: int) -> float:
  """The [-1, 1] pixel value of a uint8 grey level."""
  return value / 127.5 - 1.0
