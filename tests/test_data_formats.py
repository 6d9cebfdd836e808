"""Every source format, written here in its real layout, then encoded (fake encoder) and loaded; merged caches."""

import json
import os
import sys
import types

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mapo_jax import encode
from mapo_jax.data import cache, loader, pairs, sources
from test_data_helpers import fake_encode, grey, pick_a_pic_rows, read_cache, write_parquet

SETTINGS = cache.EncodeSettings(resolution=16, shard_size=4)


def encode_and_load(source, out, *, counts, strict=False):
  """Encodes `source` to `out`, checks the manifest's counts, and reads every pair back through the loader.

  Returns the records in source order as (pair id, winner grey, loser grey) from the fake encoder's moments.
  """
  manifest = cache.write_cache(source, out, fake_encode, SETTINGS, pipeline="fake", batch_size=3, strict=strict)
  assert {k: manifest[k] for k in counts} == counts
  records = read_cache(out)[1]
  got = [(int(r["pooled_prompt_embeds"][0]), *(float(r[k][..., :3].mean()) for k in ("moments_w", "moments_l")))
         for r in records]
  batches = list(loader.cached_loader(out, batch_size=1, seed=0, num_epochs=1, process_index=0, process_count=1))
  assert sorted(int(b["pooled_prompt_embeds"][0, 0]) for b in batches) == sorted(g[0] for g in got)
  return got


def assert_pairs(got, expected, atol=1e-3):
  """expected: (pair id, winner grey level, loser grey level) per kept pair, in source order."""
  assert [g[0] for g in got] == [e[0] for e in expected]
  np.testing.assert_allclose([g[1:] for g in got], [(grey(w), grey(l)) for _, w, l in expected], atol=atol)


# ---- Arrow: `datasets.save_to_disk` output and plain Arrow IPC files -------------------------------------------

def messy_pick_a_pic(n=6):
  """Pick-a-Pic rows with an extra column; row 2 is a tie, row 4 has a corrupt jpg_0."""
  rows = pick_a_pic_rows(n)
  rows[2].update(label_0=0.5, label_1=0.5)
  rows[4]["jpg_0"] = b"corrupt"
  for i, r in enumerate(rows):
    r["best_image_uid"] = f"uid-{i}"
  return rows


def test_save_to_disk_folder_and_dataset_dict(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  rows = messy_pick_a_pic()
  ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
  # jpg_1 as HF's Image feature (a {bytes, path} struct), as a user's re-cast copy would store it.
  ds = ds.cast_column("jpg_1", datasets.Image(decode=False))
  ds.save_to_disk(str(tmp_path / "pickapic"), num_shards=2)
  datasets.DatasetDict({"train": ds, "validation_unique": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dd"))
  monkeypatch.setitem(sys.modules, "datasets", None)  # reading needs pyarrow only

  src = sources.open_source(str(tmp_path / "pickapic"))
  assert isinstance(src, sources.ArrowSource) and len(src) == 6
  assert [r.where.rsplit("/", 1)[1] for r in src.read(2, 4)] == ["data-00000-of-00002.arrow row 2",
                                                                  "data-00001-of-00002.arrow row 0"]
  got = encode_and_load(src, tmp_path / "cache", counts={"rows": 6, "pairs": 4, "ties_dropped": 1, "skipped": 1})
  assert_pairs(got, [(i, 10 * i + 5, 10 * i + 6) for i in (0, 1, 3, 5)])

  assert len(sources.open_source(str(tmp_path / "dd"))) == 6  # the "train" split by default
  val = sources.open_source(f"{tmp_path / 'dd'}?split=validation_unique")
  assert len(val) == 2 and val.name.endswith("?split=validation_unique")
  with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'validation_unique'\]"):
    sources.open_source(f"{tmp_path / 'dd'}?split=test")
  with pytest.raises(pairs.BadPair, match=r"data-00001-of-00002.arrow row 1: cannot decode jpg_0"):
    cache.write_cache(src, tmp_path / "strict", fake_encode, SETTINGS, pipeline="fake", strict=True)


def test_arrow_ipc_files_and_cache_folder(tmp_path):
  """The two Arrow IPC flavours written by pyarrow: the file format and the stream format (the `datasets` cache's)."""
  rows = messy_pick_a_pic(8)
  table = pa.Table.from_pylist(rows)
  with pa.ipc.new_file(str(tmp_path / "pairs.arrow"), table.schema) as w:
    for batch in table.to_batches(max_chunksize=3):
      w.write_batch(batch)
  src = sources.open_source(str(tmp_path / "pairs.arrow"))
  assert len(src) == 8
  got = list(src.read(2, 7))  # crosses batches [0, 3), [3, 6), [6, 8)
  assert [r.index for r in got] == [2, 3, 4, 5, 6] and [r.caption for r in got] == [f"pair {i}" for i in range(2, 7)]
  assert got[-1].where.endswith("pairs.arrow row 6")

  folder = tmp_path / "hf_cache"
  folder.mkdir()
  for name, part in (("pickapic_v2-train-00000-of-00002", rows[:5]), ("pickapic_v2-train-00001-of-00002", rows[5:]),
                     ("pickapic_v2-test", rows[:1])):
    t = pa.Table.from_pylist(part)
    with pa.ipc.new_stream(str(folder / f"{name}.arrow"), t.schema) as w:
      w.write_table(t, max_chunksize=2)
  assert len(sources.open_source(str(folder))) == 9
  train = sources.open_source(f"{folder}?split=train")
  assert len(train) == 8
  got = encode_and_load(train, tmp_path / "cache", counts={"pairs": 6, "ties_dropped": 1, "skipped": 1})
  assert_pairs(got, [(i, 10 * i + 5, 10 * i + 6) for i in (0, 1, 3, 5, 6, 7)])

  # HF's Image feature keeps only the path of an image it did not embed.
  Image.new("RGB", (24, 16), (77,) * 3).save(tmp_path / "on_disk.png")
  row = sources.RawRow(0, "x row 0", "pair 0", {"bytes": None, "path": str(tmp_path / "on_disk.png")}, rows[0]["jpg_1"],
                       1.0, 0.0)
  np.testing.assert_allclose(pairs.prepare_pair(row, resolution=16, seed=0)["pixels_w"], grey(77), atol=1e-6)

  with pa.ipc.new_file(str(tmp_path / "bad.arrow"), table.drop_columns(["label_1"]).schema) as w:
    w.write_table(table.drop_columns(["label_1"]))
  with pytest.raises(ValueError, match=r"bad.arrow: missing column\(s\) \['label_1'\]"):
    sources.open_source(str(tmp_path / "bad.arrow"))


# ---- HPDv2-style ranked JSON -----------------------------------------------------------------------------------

def level(entry, k):
  """Grey level of image k of entry `entry`."""
  return 40 * entry + 10 * k + 5


def write_hpd(root):
  """train.json beside train/ (HPDv2's layout): 5 entries -> 9 rows, 6 pairs, 1 tie, 2 bad."""
  (root / "train").mkdir()
  entries = []
  for n, count in enumerate([3, 2, 3, 2, 2]):
    names = [f"{n:03d}_{k}.jpg" if k % 2 else f"{n:03d}_{k}.png" for k in range(count)]
    for k, name in enumerate(names):
      Image.new("RGB", (24, 16), (level(n, k),) * 3).save(root / "train" / name)
    entries.append({"prompt": f"set {n}", "image_path": names})
  entries[0]["rank"] = [2, 1, 3]
  entries[1]["human_preference"] = [0, 1]  # train.json style: 1 = preferred
  entries[2]["rank"] = [1, 1, 2]  # images 0 and 1 tie
  entries[3]["rank"] = [1, 2, 3]  # 3 ranks for 2 images
  entries[4]["rank"] = [2, 1]
  entries[4]["image_path"][1] = "missing.png"
  (root / "train.json").write_text(json.dumps(entries))
  return root / "train.json"


def test_ranked_json_every_pair(tmp_path):
  src = sources.open_source(str(write_hpd(tmp_path)))
  assert isinstance(src, sources.RankedSource) and len(src) == 9
  rows = list(src.read(0, 9))
  assert rows[1].where.endswith("train.json entry 0 images (0, 2)") and (rows[1].label_0, rows[1].label_1) == (1, 0)
  with pytest.raises(pairs.BadPair, match=r"entry 3: 'image_path' and 'rank' must be lists of the same length"):
    pairs.prepare_pair(rows[7], resolution=16, seed=0)
  got = encode_and_load(src, tmp_path / "cache", counts={"rows": 9, "pairs": 6, "ties_dropped": 1, "skipped": 2})
  # Winner = better (lower) rank, or the preferred image; JPEG keeps a solid grey within a level or so.
  assert_pairs(got, [(0, level(0, 1), level(0, 0)), (0, level(0, 0), level(0, 2)), (0, level(0, 1), level(0, 2)),
                     (1, level(1, 1), level(1, 0)), (2, level(2, 0), level(2, 2)), (2, level(2, 1), level(2, 2))],
               atol=0.02)


def test_ranked_json_best_worst_and_options(tmp_path, monkeypatch):
  path = write_hpd(tmp_path)
  # The CLI flag, with the fake encoder standing in for the pipeline's.
  monkeypatch.setattr(encode, "load_pipeline", lambda *args, **kwargs: None)
  monkeypatch.setattr(encode, "family", lambda path: types.SimpleNamespace(FROZEN=(), resolution_multiple=lambda p: 8))
  monkeypatch.setattr(encode, "make_encoder", lambda pipe, **kwargs: fake_encode)
  encode.main(encode.parse_flags(["encode", "--pipeline", "fake", "--data", str(path), "--best_worst",
                                  "--out", str(tmp_path / "cli"), "--resolution", "16"]))
  cli = cache.read_manifest(tmp_path / "cli")
  assert cli["source"] == f"{path}?best_worst" and (cli["pairs"], cli["skipped"]) == (3, 2)
  src = sources.open_source(f"{path}?best_worst")
  same = sources.open_source(str(path), best_worst=True)  # what `encode --best_worst` passes
  assert len(src) == len(same) == 5 and src.name == same.name == f"{path}?best_worst"
  got = encode_and_load(src, tmp_path / "cache", counts={"rows": 5, "pairs": 3, "ties_dropped": 0, "skipped": 2})
  assert_pairs(got, [(0, level(0, 1), level(0, 2)), (1, level(1, 1), level(1, 0)), (2, level(2, 0), level(2, 2))],
               atol=0.02)
  # images=DIR: paths relative to another folder (here a copy named unlike the JSON).
  os.rename(tmp_path / "train", tmp_path / "imgs")
  other = sources.open_source(f"{path}?images={tmp_path / 'imgs'}&best_worst=1")
  assert pairs.prepare_pair(next(other.read(0, 1)), resolution=16, seed=0) is not None
  with pytest.raises(ValueError, match=r"option\(s\) \['best_worst'\] do not apply to a ParquetSource"):
    write_parquet(tmp_path / "p.parquet", pick_a_pic_rows(2))
    sources.open_source(str(tmp_path / "p.parquet"), best_worst=True)
  with pytest.raises(ValueError, match=r"option\(s\) \['bogus'\] do not apply to a RankedSource; "
                                       r"it takes \['best_worst', 'images'\]"):
    sources.open_source(f"{path}?bogus")


# ---- Preference folders (w/, l/, captions) ---------------------------------------------------------------------

def test_preference_folder(tmp_path):
  root = tmp_path / "prefs"
  for side in ("w", "l"):
    (root / side).mkdir(parents=True)
  files = {"a0": ("png", "png"), "b1": ("jpg", "JPG"), "c2": ("webp", "png"), "d3": ("png", None),
           "e4": ("png", "png"), "f5": ("png", "png")}
  for name, (w_ext, l_ext) in files.items():
    i = int(name[1])
    Image.new("RGB", (24, 16), (10 * i + 5,) * 3).save(root / "w" / f"{name}.{w_ext}")
    if l_ext:
      Image.new("RGB", (24, 16), (10 * i + 6,) * 3).save(root / "l" / f"{name}.{l_ext}",
                                                         format="PNG" if l_ext == "png" else "JPEG")
  Image.new("RGB", (24, 16)).save(root / "l" / "e4.jpg")  # two l/ images named e4
  for name in ("a0", "c2", "d3", "e4"):
    (root / f"{name}.txt").write_text(f"pair {name[1]}\n")
  (root / "w" / "b1.caption").write_text("pair 1")  # kohya's caption beside the image
  src = sources.open_source(str(root))
  assert isinstance(src, sources.PreferenceFolderSource) and len(src) == 6
  rows = list(src.read(0, 6))
  assert rows[0].caption == "pair 0" and rows[1].caption == "pair 1"
  for r, message in zip(rows[3:], [r"pair 'd3': 0 images named 'd3' in l/", r"pair 'e4': 2 images named 'e4' in l/",
                                   r"pair 'f5': no caption file f5.txt"]):
    with pytest.raises(pairs.BadPair, match=message):
      pairs.prepare_pair(r, resolution=16, seed=0)
  got = encode_and_load(src, tmp_path / "cache", counts={"rows": 6, "pairs": 3, "ties_dropped": 0, "skipped": 3})
  assert_pairs(got, [(i, 10 * i + 5, 10 * i + 6) for i in range(3)], atol=0.02)
  fly = list(loader.onthefly_loader(src, fake_encode, resolution=16, batch_size=3, seed=0, num_epochs=1,
                                    process_index=0, process_count=1))
  assert sorted(fly[0]["pooled_prompt_embeds"][:, 0]) == [0, 1, 2]
  with pytest.raises(pairs.BadPair, match="pair 'd3'"):
    loader.onthefly_loader(src, fake_encode, resolution=16, batch_size=3, seed=0, strict=True)


# ---- Merged caches ---------------------------------------------------------------------------------------------

@pytest.fixture
def parts(tmp_path):
  """Two caches of disjoint Pick-a-Pic parquet parts (5 + 4 rows, a tie in the second), 2 rows a shard."""
  rows = pick_a_pic_rows(9)
  rows[6].update(label_0=0.5, label_1=0.5)
  out = []
  for name, part in (("a", rows[:5]), ("b", rows[5:])):
    write_parquet(tmp_path / f"{name}.parquet", part)
    cache.write_cache(sources.open_source(str(tmp_path / f"{name}.parquet")), tmp_path / f"part_{name}", fake_encode,
                      cache.EncodeSettings(resolution=16, shard_size=2 if name == "a" else 3), pipeline="fake")
    out.append(tmp_path / f"part_{name}")
  return out


def loaded_ids(cache_dir):
  return sorted(int(v) for b in loader.cached_loader(cache_dir, batch_size=1, seed=0, num_epochs=1, process_index=0,
                                                     process_count=1) for v in b["pooled_prompt_embeds"][:, 0])


def test_merge_cli_refers_to_parts(tmp_path, parts):
  out = tmp_path / "merged"
  encode.main(encode.parse_flags(["encode", "--merge", *map(str, parts), "--out", str(out)]))
  manifest = cache.read_manifest(out)
  assert {k: manifest[k] for k in ("rows", "pairs", "ties_dropped", "skipped", "source_rows")} == {
      "rows": 9, "pairs": 8, "ties_dropped": 1, "skipped": 0, "source_rows": 9}
  assert manifest["shards"][0]["file"] == "../part_a/shard-00000-of-00003.array_record"
  assert [p["dir"] for p in manifest["parts"]] == ["../part_a", "../part_b"]
  assert manifest["settings"]["resolution"] == 16
  assert not list(out.glob("*.array_record"))  # nothing copied
  assert loaded_ids(out) == [0, 1, 2, 3, 4, 5, 7, 8] and len(loaded_ids(out)) == manifest["pairs"]
  # A merged cache can be a part; --copy_shards makes a cache that outlives its parts.
  cache.write_cache(sources.open_source(str(tmp_path / "a.parquet")), tmp_path / "part_c", fake_encode,
                    cache.EncodeSettings(resolution=16), pipeline="fake")
  alone = tmp_path / "alone"
  cache.merge_caches([out, tmp_path / "part_c"], alone, copy=True)
  for p in (*parts, tmp_path / "part_c"):
    for f in p.glob("*.array_record"):
      f.unlink()
  assert loaded_ids(alone) == sorted([0, 1, 2, 3, 4, 5, 7, 8] + [0, 1, 2, 3, 4])


def test_merge_mismatches(tmp_path, parts):
  src = sources.open_source(str(tmp_path / "a.parquet"))

  def part(name, settings=cache.EncodeSettings(resolution=16), pipeline="fake", encode_fn=fake_encode):
    cache.write_cache(src, tmp_path / name, encode_fn, settings, pipeline=pipeline)
    return tmp_path / name

  def wider(pw, pl, captions):
    out = fake_encode(pw, pl, captions)
    return out | {"prompt_embeds": np.concatenate([out["prompt_embeds"]] * 2, axis=-1)}

  for other, message in ((part("res8", cache.EncodeSettings(resolution=8)), r"res8: settings.resolution is 8 but "),
                         (part("bf16", cache.EncodeSettings(resolution=16, cache_dtype="bfloat16")),
                          r"bf16: settings.cache_dtype is 'bfloat16' but "),
                         (part("pipe", pipeline="other"), r"pipe: pipeline is 'other' but "),
                         (part("wide", encode_fn=wider),
                          r"wide: record.prompt_embeds is .*'shape': \[77, 8\].* but .*part_a has")):
    with pytest.raises(ValueError, match=message):
      cache.merge_caches([parts[0], other], tmp_path / "m")
  with pytest.raises(ValueError, match="given twice"):
    cache.merge_caches([parts[0], parts[1], parts[0]], tmp_path / "m")
  (tmp_path / "unfinished").mkdir()
  with pytest.raises(FileNotFoundError, match=r"unfinished/manifest.json not found"):
    cache.merge_caches([parts[0], tmp_path / "unfinished"], tmp_path / "m")
  with pytest.raises(SystemExit):
    encode.parse_flags(["encode", "--merge", str(parts[0]), "--out", "x", "--data", "y.parquet"])
