"""Grain loaders: determinism, epochs, multi-process slicing, Orbax checkpointing, on-the-fly mode."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mapo_jax.data import BATCH_KEYS, cache, loader, sources
from test_data_helpers import fake_encode, pick_a_pic_rows, write_parquet

N = 12  # pairs in the test dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(source, float32 cache dir) of N valid pairs, plus a corrupt row and a tie that get dropped."""
  root = tmp_path_factory.mktemp("data")
  rows = pick_a_pic_rows(N + 2)
  rows[N]["jpg_0"] = b"corrupt"
  rows[N + 1].update(label_0=0.5, label_1=0.5)
  write_parquet(root / "pairs.parquet", rows)
  source = sources.open_source(str(root / "pairs.parquet"))
  settings = cache.EncodeSettings(resolution=16, seed=7, cache_dtype="float32", shard_size=5)
  cache.write_cache(source, root / "cache", fake_encode, settings, pipeline="fake", batch_size=4)
  return source, root / "cache"


def ids(batch):
  return [int(v) for v in np.asarray(batch["pooled_prompt_embeds"])[:, 0]]


def take(it, n):
  return [next(it) for _ in range(n)]


def test_batch_format_and_seeds(data):
  _, cache_dir = data
  first = take(iter(loader.cached_loader(cache_dir, batch_size=4, seed=1, process_index=0, process_count=1)), 6)
  b = first[0]
  assert set(b) == set(BATCH_KEYS)
  assert b["moments_w"].shape == (4, 2, 2, 6) and b["prompt_embeds"].shape == (4, 77, 4)
  assert b["time_ids"].shape == (4, 6) and all(v.dtype == np.float32 for v in b.values())
  same = take(iter(loader.cached_loader(cache_dir, batch_size=4, seed=1, process_index=0, process_count=1)), 6)
  other = take(iter(loader.cached_loader(cache_dir, batch_size=4, seed=2, process_index=0, process_count=1)), 6)
  for x, y in zip(first, same):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert [ids(x) for x in first] != [ids(x) for x in other]
  # Epochs 1 and 2 (batches 0-2, 3-5) each hold every pair once, in different orders.
  epochs = [sum((ids(x) for x in first[e * 3:e * 3 + 3]), []) for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N)) and epochs[0] != epochs[1]


def test_stored_dtype_and_finite_epochs(tmp_path, data):
  source, _ = data
  cache.write_cache(source, tmp_path, fake_encode, cache.EncodeSettings(resolution=16), pipeline="fake")
  batches = list(loader.cached_loader(tmp_path, batch_size=5, seed=0, num_epochs=2, dtype=None,
                                      process_index=0, process_count=1))
  assert len(batches) == 4  # 24 pairs -> 4 full batches; the rest is dropped
  assert batches[0]["moments_w"].dtype == np.float16 and batches[0]["rpo_emb"].dtype == np.float32


def test_two_processes_cover_every_pair_once(data):
  _, cache_dir = data
  per_process = [list(loader.cached_loader(cache_dir, batch_size=2, seed=5, num_epochs=1,
                                           process_index=p, process_count=2)) for p in (0, 1)]
  assert [len(b) for b in per_process] == [3, 3]
  seen = sorted(i for batches in per_process for b in batches for i in ids(b))
  assert seen == list(range(N))
  # Step s of the two processes together is the window [4s, 4s + 4) of the one-process order.
  single = list(loader.cached_loader(cache_dir, batch_size=4, seed=5, num_epochs=1,
                                     process_index=0, process_count=1))
  for step in range(3):
    assert sorted(ids(per_process[0][step]) + ids(per_process[1][step])) == sorted(ids(single[step]))


def test_checkpoint_mid_epoch_restores_exact_continuation(tmp_path, data):
  _, cache_dir = data
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.P("data"))

  def make():
    return iter(loader.cached_loader(cache_dir, batch_size=4, seed=3, sharding=sharding))

  it = make()
  take(it, 2)  # 8 of 12 pairs: mid-epoch
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 4)
    restored = make()
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  got = take(restored, 4)
  assert isinstance(got[0]["moments_w"], jax.Array) and got[0]["moments_w"].sharding == sharding
  for x, y in zip(expected, got):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_onthefly_matches_cache(data, caplog):
  source, cache_dir = data
  kwargs = dict(batch_size=4, seed=7, process_index=0, process_count=1)
  cached = take(iter(loader.cached_loader(cache_dir, **kwargs)), 4)
  fly = take(iter(loader.onthefly_loader(source, fake_encode, resolution=16, **kwargs)), 4)
  assert "pairs.parquet row 12: cannot decode jpg_0" in caplog.text
  for x, y in zip(cached, fly):
    assert set(y) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
      np.testing.assert_allclose(x[k], y[k], atol=1e-6)


def test_onthefly_strict(data):
  source, _ = data
  with pytest.raises(ValueError, match="pairs.parquet row 12: cannot decode jpg_0"):
    loader.onthefly_loader(source, fake_encode, resolution=16, batch_size=4, seed=0, strict=True)

