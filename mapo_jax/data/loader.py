"""Training input: grain pipelines that yield batches of `BATCH_KEYS`, from the cache or on the fly.

Order of operations (both modes): seeded global shuffle (reshuffled each epoch) -> repeat ->
this process's block of each window (below) -> per-pair read, threaded -> batch of
`batch_size` pairs (per process) -> dtype cast / encode -> optionally a global jax.Array batch
(`make_array_from_process_local_data` with the caller's sharding) with a small prefetch.
Together the processes consume the shuffled stream in contiguous windows of
`batch_size * process_count` pairs (process p the p-th block of each), so a global batch holds the same
pairs in the same order whatever the host count.

Held-out pairs (`holdout` > 0, config.data.eval_pairs): `holdout_split` picks a fixed seeded subset of
the pairs (EVAL_SPLIT_SEED, independent of the run's seed, so runs with other seeds evaluate on the same
pairs); the loaders leave them out of training and `cached_eval_batch` / `onthefly_eval_batch` return
them as one batch. With holdout = 0 the loaders are exactly as without it.

The loader yields VAE posterior moments, not latents: the train step samples latents with its
own RNG. Checkpoint the iterator with grain's Orbax handler:
    it = iter(cached_loader(...))
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), ...))
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it), ...))

The cache is read through `cache.open_records`: opening checks every shard's size and record count
against the manifest, and a record that does not read raises `cache.DamagedShardError` naming the
shard file and the record (see mapo_jax/data/cache.py).
"""
from __future__ import annotations

import concurrent.futures
import functools
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from mapo_jax.data.cache import PAIRS, EncodeFn, encoded_keys, open_records, record_kind
from mapo_jax.data.pairs import Counts, prepare_pair, prepare_rows
from mapo_jax.data.sources import SCORE_KEYS, Source


def cast_floats(batch: dict[str, np.ndarray], dtype: Any) -> dict[str, np.ndarray]:
  """Every floating array cast to `dtype`; integer arrays (a token ids cache's ids) kept as they are."""
  return {k: v.astype(dtype, copy=False) if np.issubdtype(v.dtype, np.floating) else v for k, v in batch.items()}


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global arrays whose leading (pair) axis spans all processes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


EVAL_SPLIT_SEED = 0


def holdout_split(num_pairs: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, held-out indices), each sorted: `holdout` of range(num_pairs) chosen by a fixed
  seeded permutation, and the rest."""
  if not 0 <= holdout < num_pairs:
    raise ValueError(f"cannot hold out {holdout} of {num_pairs} pairs for evaluation (config.data.eval_pairs)")
  perm = np.random.default_rng(EVAL_SPLIT_SEED).permutation(num_pairs)
  return np.sort(perm[holdout:]), np.sort(perm[:holdout])


def _training_subset(ds: grain.MapDataset, holdout: int) -> grain.MapDataset:
  if not holdout:
    return ds
  train, _ = holdout_split(len(ds), holdout)
  return grain.MapDataset.range(len(train)).map(lambda i: ds[int(train[i])])


def _batches(ds: grain.MapDataset, prepare, finish, *, batch_size: int, seed: int,
             num_epochs: int | None, sharding: jax.sharding.Sharding | None,
             process_index: int | None, process_count: int | None, num_threads: int) -> grain.IterDataset:
  if process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  global_batch = batch_size * process_count
  if len(ds) < global_batch:
    raise ValueError(f"{len(ds)} pairs cannot fill one global batch of {global_batch}")
  ds = ds.shuffle(seed).repeat(num_epochs)
  if num_epochs is not None:  # every process must take the same number of steps
    ds = ds[:len(ds) // global_batch * global_batch]
  # Process p reads pairs [p * b, (p + 1) * b) of each window of global_batch pairs, so the global batch
  # (process blocks in order) is the one-process batch pair for pair, and per-position random draws match.
  stream = ds
  ds = grain.MapDataset.range(len(stream) // process_count).map(
      lambda k: stream[k // batch_size * global_batch + process_index * batch_size + k % batch_size])
  ds = ds.map(prepare)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(2 * batch_size, num_threads)))
  ds = ds.batch(batch_size, drop_remainder=True).map(finish)
  if sharding is not None:
    ds = ds.map(functools.partial(to_global, sharding=sharding))
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
  return ds


def cached_loader(cache_dir: str | Path, *, batch_size: int, seed: int, num_epochs: int | None = None,
                  dtype: Any = np.float32, sharding: jax.sharding.Sharding | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 8, holdout: int = 0) -> grain.IterDataset:
  """Batches of `BATCH_KEYS` from a cache written by `python -m mapo_jax.encode`.

  holdout: pairs left out for evaluation (`holdout_split`; `cached_eval_batch` returns them).
  batch_size: pairs per process. dtype: every floating array is cast to it (default float32); None keeps
  the stored dtypes (cache_dtype for the big arrays, float32 for time_ids and rpo_emb). Token ids (a token ids
  cache) stay int32.
  sharding: if given, yields global jax.Arrays; else per-process numpy arrays.
  process_index/count: default to jax's; pass them to build one process's view explicitly.
  """
  records = open_records(cache_dir)  # checked at open; a bad record raises naming its shard

  def finish(batch):
    return batch if dtype is None else cast_floats(batch, dtype)

  return _batches(_training_subset(grain.MapDataset.source(records), holdout), lambda record: record, finish,
                  batch_size=batch_size,
                  seed=seed, num_epochs=num_epochs, sharding=sharding, process_index=process_index,
                  process_count=process_count, num_threads=num_threads)


def onthefly_loader(source: Source, encode_fn: EncodeFn, *, resolution: int, batch_size: int, seed: int,
                    random_crop: bool = False, strict: bool = False, num_epochs: int | None = None,
                    sharding: jax.sharding.Sharding | None = None, process_index: int | None = None,
                    process_count: int | None = None, num_threads: int = 8, holdout: int = 0) -> grain.IterDataset:
  """Like `cached_loader` (float32 arrays), but decodes and encodes every pair each time it is read.

  For small datasets: every row is read into memory and checked once up front (ties dropped,
  bad rows skipped and logged, or raised with `strict`), so all processes agree on the pairs.
  Flips and crops are seeded by (seed, row index) exactly as in the cache.
  """
  if record_kind(source) is not PAIRS:
    raise ValueError(f"{source.name} holds unpaired samples: encode it (python -m mapo_jax.encode) and train "
                     "from the cache (config.data.mode='cached')")
  pair_kwargs = {"resolution": resolution, "seed": seed, "random_crop": random_crop}
  counts = Counts()
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    kept = prepare_rows(list(source.read(0, len(source))), pool, counts, strict=strict, **pair_kwargs)
  logging.info("%s: %s", source.name, counts)
  if not kept:
    raise ValueError(f"{source.name}: no usable pairs ({counts})")

  def finish(batch):
    encoded = encode_fn(batch["pixels_w"], batch["pixels_l"], [str(c) for c in batch["caption"]])
    encoded = jax.device_get({k: encoded[k] for k in encoded_keys(encoded)})
    return (cast_floats({k: np.asarray(v) for k, v in encoded.items()}, np.float32) | {"time_ids": batch["time_ids"]}
            | {k: np.asarray(batch[k], np.float32) for k in SCORE_KEYS if k in batch})

  return _batches(_training_subset(grain.MapDataset.source([row for row, _ in kept]), holdout),
                  functools.partial(prepare_pair, **pair_kwargs), finish, batch_size=batch_size,
                  seed=seed, num_epochs=num_epochs, sharding=sharding, process_index=process_index,
                  process_count=process_count, num_threads=num_threads)


def cached_eval_batch(cache_dir: str | Path, holdout: int) -> dict[str, np.ndarray]:
  """The `holdout` pairs `cached_loader(..., holdout=holdout)` leaves out, as one float32 batch (token ids stay
  int32; every process reads all of them)."""
  records = open_records(cache_dir)
  _, held = holdout_split(len(records), holdout)
  pairs = [records[int(i)] for i in held]
  return cast_floats({k: np.stack([p[k] for p in pairs]) for k in records.layout.keys}, np.float32)


def onthefly_eval_batch(source: Source, encode_fn: EncodeFn, holdout: int, *, resolution: int, seed: int,
                        random_crop: bool = False, strict: bool = False, num_threads: int = 8) -> dict[str, np.ndarray]:
  """The `holdout` pairs `onthefly_loader(..., holdout=holdout)` leaves out, encoded once, as one batch."""
  pair_kwargs = {"resolution": resolution, "seed": seed, "random_crop": random_crop}
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    kept = prepare_rows(list(source.read(0, len(source))), pool, Counts(), strict=strict, **pair_kwargs)
  _, held = holdout_split(len(kept), holdout)
  pairs = [kept[int(i)][1] for i in held]
  stack = lambda key: np.stack([p[key] for p in pairs])
  encoded = jax.device_get(dict(encode_fn(stack("pixels_w"), stack("pixels_l"), [p["caption"] for p in pairs])))
  return (cast_floats({k: np.asarray(encoded[k]) for k in encoded_keys(encoded)}, np.float32)
          | {"time_ids": stack("time_ids").astype(np.float32)})
