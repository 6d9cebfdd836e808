"""Data-path throughput on this machine, as JSON lines: encoding into the cache, then the cached loader.

    JAX_PLATFORMS=cpu python bench/data_throughput.py [--pipeline DIR] [--pairs 64] [--resolution 512]

Makes a Pick-a-Pic-style parquet of random-noise JPEGs (noise is the slowest case for the JPEG
decoder). Without --pipeline the encoder is a stand-in that returns SDXL-shaped arrays at once,
so "encode" measures the host side alone: parquet read, decode, resize, flip, crop, serialise,
write. With --pipeline it includes the VAE and text towers. "cached_loader" reads the cache
back through grain (shuffle, threaded reads, batching, cast to float32) without a train step.
"""

import io
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags
from PIL import Image

from mapo_jax.data import EncodeSettings, cached_loader, open_source, write_cache
from mapo_jax.encode import make_encoder
from mapo_jax.pipelines import family, load_pipeline

_PIPELINE = flags.DEFINE_string("pipeline", None, "pipeline folder; default: a stand-in encoder (no model).")
_PAIRS = flags.DEFINE_integer("pairs", 64, "pairs to encode.")
_RESOLUTION = flags.DEFINE_integer("resolution", 512, "training resolution.")
_IMAGE_SIZE = flags.DEFINE_list("image_size", ["640", "512"], "source image width,height.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "pairs per encoder call and per loader batch.")
_LOADER_BATCHES = flags.DEFINE_integer("loader_batches", 40, "loader batches to time (after 2 warm-up batches).")


def make_parquet(path: Path, n: int, w: int, h: int) -> None:
  rng = np.random.default_rng(0)

  def jpeg():
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()

  pq.write_table(pa.table({"caption": [f"a photo of thing {i}" for i in range(n)],
                           "jpg_0": [jpeg() for _ in range(n)], "jpg_1": [jpeg() for _ in range(n)],
                           "label_0": [float(i % 2) for i in range(n)],
                           "label_1": [float(1 - i % 2) for i in range(n)]}), path, row_group_size=32)


def stand_in_encoder(resolution: int):
  """SDXL shapes (latent 4 ch, 77 x 2048 tokens, pooled 1280) with no model work."""
  rng = np.random.default_rng(0)
  latent = rng.standard_normal((resolution // 8, resolution // 8, 8), np.float32)
  tokens = rng.standard_normal((77, 2048), np.float32)
  pooled = rng.standard_normal((1280,), np.float32)

  def encode(pixels_w, pixels_l, captions):
    b = len(captions)
    return {"moments_w": np.broadcast_to(latent, (b, *latent.shape)),
            "moments_l": np.broadcast_to(latent, (b, *latent.shape)),
            "prompt_embeds": np.broadcast_to(tokens, (b, *tokens.shape)),
            "pooled_prompt_embeds": np.broadcast_to(pooled, (b, 1280)),
            "rpo_emb": np.broadcast_to(pooled, (b, 1280))}

  return encode


def main(argv):
  del argv
  w, h = (int(v) for v in _IMAGE_SIZE.value)
  common = {"resolution": _RESOLUTION.value, "image_size": [w, h], "batch_size": _BATCH_SIZE.value,
            "device": str(jax.devices()[0].platform)}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    make_parquet(tmp / "pairs.parquet", _PAIRS.value, w, h)
    source = open_source(str(tmp / "pairs.parquet"))
    if _PIPELINE.value:
      encode_fn = make_encoder(load_pipeline(_PIPELINE.value, components=family(_PIPELINE.value).FROZEN))
      encode_fn(*(np.zeros((_BATCH_SIZE.value, _RESOLUTION.value, _RESOLUTION.value, 3), np.float32),) * 2,
                [""] * _BATCH_SIZE.value)  # compile outside the timed run
    else:
      encode_fn = stand_in_encoder(_RESOLUTION.value)
    start = time.perf_counter()
    manifest = write_cache(source, tmp / "cache", encode_fn, EncodeSettings(_RESOLUTION.value),
                           pipeline=_PIPELINE.value or "stand-in", batch_size=_BATCH_SIZE.value)
    seconds = time.perf_counter() - start
    print(json.dumps({"bench": "encode", "encoder": _PIPELINE.value or "stand-in", "pairs": manifest["pairs"],
                      "seconds": round(seconds, 3), "pairs_per_s": round(manifest["pairs"] / seconds, 2)} | common))

    it = iter(cached_loader(tmp / "cache", batch_size=_BATCH_SIZE.value, seed=0, process_index=0,
                            process_count=1))
    for _ in range(2):
      next(it)
    start = time.perf_counter()
    for _ in range(_LOADER_BATCHES.value):
      next(it)
    seconds = time.perf_counter() - start
    pairs = _LOADER_BATCHES.value * _BATCH_SIZE.value
    record_mb = sum(np.prod(v["shape"]) * np.dtype(v["dtype"]).itemsize
                    for v in manifest["record"].values()) / 2**20
    print(json.dumps({"bench": "cached_loader", "pairs": pairs, "seconds": round(seconds, 3),
                      "pairs_per_s": round(pairs / seconds, 2), "record_mib": round(record_mb, 3)} | common))


if __name__ == "__main__":
  app.run(main)
