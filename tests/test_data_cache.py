"""The encoded cache: records, manifest counts, bad input, resume, host split."""

import json

import numpy as np
import pytest

from mapo_jax.data import cache, pairs, sources
from test_data_helpers import fake_encode, grey, pair_id, pick_a_pic_rows, read_cache, write_parquet

SETTINGS = cache.EncodeSettings(resolution=16, shard_size=4)


def messy_rows():
  """10 rows: 6 valid pairs, 2 ties, a corrupt image (row 4) and a non-string caption (row 7)."""
  rows = pick_a_pic_rows(10, w=24, h=16)
  rows[2].update(label_0=0.5, label_1=0.5)
  rows[5].update(label_0=0.5, label_1=0.5)
  rows[4]["jpg_1"] = b"\xff\xd8 garbage"
  rows[7]["caption"] = None
  return rows


@pytest.fixture
def messy_source(tmp_path):
  write_parquet(tmp_path / "messy.parquet", messy_rows(), row_group_size=3)
  return sources.open_source(str(tmp_path / "messy.parquet"))


def test_records_and_manifest(tmp_path, messy_source, caplog):
  out = tmp_path / "cache"
  manifest = cache.write_cache(messy_source, out, fake_encode, SETTINGS, pipeline="fake", batch_size=3)
  assert manifest == json.loads((out / "manifest.json").read_text())
  assert {k: manifest[k] for k in ("rows", "pairs", "ties_dropped", "skipped")} == {
      "rows": 10, "pairs": 6, "ties_dropped": 2, "skipped": 2}
  assert [s["pairs"] for s in manifest["shards"]] == [3, 1, 2]
  assert manifest["record"]["moments_w"] == {"shape": [2, 2, 6], "dtype": "float16"}
  assert manifest["record"]["prompt_embeds"] == {"shape": [77, 4], "dtype": "float16"}
  assert manifest["record"]["time_ids"] == {"shape": [6], "dtype": "float32"}
  assert manifest["pipeline"] == "fake" and manifest["settings"]["resolution"] == 16
  assert "messy.parquet row 4: cannot decode jpg_1" in caplog.text
  assert "messy.parquet row 7: caption is NoneType" in caplog.text

  records = read_cache(out)[1]
  ids = [int(r["pooled_prompt_embeds"][0]) for r in records]
  assert ids == [0, 1, 3, 6, 8, 9]
  for i, r in zip(ids, records):  # the winner (grey 10i+5) is first whichever column held it
    np.testing.assert_allclose(r["moments_w"][..., :3], grey(10 * i + 5), atol=1e-3)
    np.testing.assert_allclose(r["moments_l"][..., 3:], -grey(10 * i + 6), atol=1e-3)
    np.testing.assert_array_equal(r["time_ids"], [16, 24, 0, 4, 16, 16])
    assert r["moments_w"].dtype == np.float16 and r["rpo_emb"].dtype == np.float32


def test_strict_stops_at_first_bad_row(tmp_path, messy_source):
  with pytest.raises(pairs.BadPair, match=r"messy.parquet row 4: cannot decode jpg_1"):
    cache.write_cache(messy_source, tmp_path / "c", fake_encode, SETTINGS, pipeline="fake", strict=True)
  assert not (tmp_path / "c" / "manifest.json").exists()


def test_no_usable_pairs(tmp_path):
  rows = pick_a_pic_rows(3)
  for r in rows:
    r.update(label_0=0.5, label_1=0.5)
  write_parquet(tmp_path / "ties.parquet", rows)
  with pytest.raises(ValueError, match=r"no usable pairs \(3 ties, 0 skipped\)"):
    cache.write_cache(sources.open_source(str(tmp_path / "ties.parquet")), tmp_path / "c", fake_encode,
                      SETTINGS, pipeline="fake")


def test_out_of_range_for_float16(tmp_path, messy_source):
  def huge(*args):
    return fake_encode(*args) | {"prompt_embeds": np.full((len(args[2]), 77, 4), 1e6, np.float32)}

  with pytest.raises(ValueError, match="prompt_embeds: non-finite values after casting to float16"):
    cache.write_cache(messy_source, tmp_path / "c", huge, SETTINGS, pipeline="fake")


def test_rerun_skips_finished_shards(tmp_path, messy_source):
  out = tmp_path / "cache"
  first = cache.write_cache(messy_source, out, fake_encode, SETTINGS, pipeline="fake")
  (out / "shard-00001-of-00003.json").unlink()  # as if the run died while writing shard 1
  (out / "manifest.json").unlink()
  seen = []

  def counting_encode(pw, pl, captions):
    seen.extend(pair_id(c) for c in captions)
    return fake_encode(pw, pl, captions)

  again = cache.write_cache(messy_source, out, counting_encode, SETTINGS, pipeline="fake")
  assert seen == [6] and again == first  # only shard 1 (rows 4..7) was encoded again
  with pytest.raises(ValueError, match="use another --out"):
    cache.write_cache(messy_source, out, fake_encode, cache.EncodeSettings(resolution=8, shard_size=4),
                      pipeline="fake")


def test_hosts_split_shards(tmp_path, messy_source):
  out = tmp_path / "cache"
  assert cache.write_cache(messy_source, out, fake_encode, SETTINGS, pipeline="fake",
                           process_index=1, process_count=2) is None  # host 0's shards are missing
  assert sorted(p.name for p in out.glob("*.json")) == ["shard-00001-of-00003.json"]
  manifest = cache.write_cache(messy_source, out, fake_encode, SETTINGS, pipeline="fake",
                               process_index=0, process_count=2)
  single = cache.write_cache(messy_source, tmp_path / "one", fake_encode, SETTINGS, pipeline="fake")
  assert manifest == single
  assert [int(r["pooled_prompt_embeds"][0]) for r in read_cache(out)[1]] == [0, 1, 3, 6, 8, 9]


def test_layout_round_trip_bfloat16():
  batch = fake_encode(np.zeros((2, 16, 16, 3), np.float32) + 0.25, np.zeros((2, 16, 16, 3), np.float32),
                      ["pair 3", "pair 4"]) | {"time_ids": np.arange(12, dtype=np.float32).reshape(2, 6)}
  layout = cache.RecordLayout.for_batch(batch, "bfloat16")
  records = layout.serialize(batch)
  assert len(records[0]) == 2 * (2 * 2 * 6 * 2) + 77 * 4 * 2 + 3 * 2 + 6 * 4 + 3 * 4
  back = layout.deserialize(records[1])
  assert back["moments_l"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(back["time_ids"], [6, 7, 8, 9, 10, 11])
  np.testing.assert_array_equal(back["pooled_prompt_embeds"].astype(np.float32), [4, 4.5, -4])
  with pytest.raises(ValueError, match="manifest's layout needs"):
    layout.deserialize(records[1] + b"\0")
