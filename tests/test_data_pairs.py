"""Sources and pair rules: swap/tie, resize/crop/time ids, shared flips, bad input."""

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mapo_jax.data import pairs, sources
from mapo_jax.data.sources import RawRow
from test_data_helpers import grey, image_bytes, pick_a_pic_rows, solid, write_jsonl, write_parquet


def row(label_0=1.0, label_1=0.0, jpg_0=None, jpg_1=None, caption="a cat", index=0):
  return RawRow(index, "test.parquet row 0", caption, jpg_0 or solid(50), jpg_1 or solid(200),
                label_0, label_1)


def prepare(r, resolution=8, seed=0, random_crop=False):
  return pairs.prepare_pair(r, resolution=resolution, seed=seed, random_crop=random_crop)


def half_image(w=24, h=16):
  """Left half black, right half white: a horizontal flip is visible."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:, w // 2:] = 255
  return image_bytes(a)


@pytest.mark.parametrize("labels, winner, loser", [((1.0, 0.0), 50, 200), ((0, 1), 200, 50)])
def test_winner_and_swap(labels, winner, loser):
  out = prepare(row(*labels))
  np.testing.assert_allclose(out["pixels_w"], grey(winner), atol=1e-6)
  np.testing.assert_allclose(out["pixels_l"], grey(loser), atol=1e-6)
  assert out["pixels_w"].shape == (8, 8, 3) and out["pixels_w"].dtype == np.float32
  assert out["caption"] == "a cat"


def test_tie_dropped():
  assert prepare(row(0.5, 0.5)) is None


@pytest.mark.parametrize("labels", [(1, 1), (0, 0), (0.3, 0.7), (0.5, 0.0), (None, 1.0), (True, False),
                                    (float("nan"), 1.0), ("1", "0")])
def test_bad_labels(labels):
  with pytest.raises(pairs.BadPair, match=r"test.parquet row 0: .*label"):
    prepare(row(*labels))


def test_non_string_caption():
  with pytest.raises(pairs.BadPair, match=r"row 0: caption is NoneType"):
    prepare(row(caption=None))


@pytest.mark.parametrize("column, value", [("jpg_0", b"not an image"),
                                           ("jpg_1", solid(1, fmt="JPEG")[:200])])  # truncated
def test_corrupt_image(column, value):
  with pytest.raises(pairs.BadPair, match=rf"row 0: cannot decode {column}"):
    prepare(row(**{column: value}))


# Resolution 8: the shorter side 20 -> 8, the longer 30 -> 12 (offset 2) or 34 -> int(13.6) = 13,
# offset round(2.5) = 2 (half to even, as torchvision's CenterCrop).
@pytest.mark.parametrize("w, h, top, left", [(30, 20, 0, 2), (20, 30, 2, 0), (34, 20, 0, 2)])
def test_centre_crop_and_time_ids(w, h, top, left):
  out = prepare(row(jpg_0=solid(9, w, h), jpg_1=solid(9, 50, 70)))
  np.testing.assert_array_equal(out["time_ids"], [h, w, top, left, 8, 8])
  assert out["time_ids"].dtype == np.float32 and out["pixels_l"].shape == (8, 8, 3)


def test_original_size_is_jpg0s_even_when_swapped():
  out = prepare(row(0.0, 1.0, jpg_0=solid(9, 30, 20), jpg_1=solid(9, 40, 40)))
  np.testing.assert_array_equal(out["time_ids"][:2], [20, 30])


def test_random_crop_is_seeded_per_pair():
  big = solid(9, 64, 16)  # resolution 8 -> 32 x 8, so crop_left is in 0..24
  lefts = [prepare(row(jpg_0=big, jpg_1=big, index=i), random_crop=True)["time_ids"][3] for i in range(20)]
  again = [prepare(row(jpg_0=big, jpg_1=big, index=i), random_crop=True)["time_ids"][3] for i in range(20)]
  assert lefts == again and len(set(lefts)) > 5 and 0 <= min(lefts) and max(lefts) <= 24


def test_flip_is_shared_seeded_and_fair():
  img = half_image()
  flips = []
  for i in range(40):
    out = prepare(row(jpg_0=img, jpg_1=img, index=i), seed=3)
    flipped_w = out["pixels_w"][0, 0, 0] > 0  # left edge white
    assert flipped_w == (out["pixels_l"][0, 0, 0] > 0)  # winner and loser flip together
    flips.append(bool(flipped_w))
  same = [bool(prepare(row(jpg_0=img, jpg_1=img, index=i), seed=3)["pixels_w"][0, 0, 0] > 0)
          for i in range(40)]
  other_seed = [bool(prepare(row(jpg_0=img, jpg_1=img, index=i), seed=4)["pixels_w"][0, 0, 0] > 0)
                for i in range(40)]
  assert flips == same and flips != other_seed and 10 <= sum(flips) <= 30


def test_resize_is_bilinear_antialiased():
  # A 1-pixel checkerboard shrunk 4x must average to grey (nearest-neighbour would not).
  a = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
  out = prepare(row(jpg_0=image_bytes(np.stack([a] * 3, -1)), jpg_1=solid(0, 32, 32)))
  np.testing.assert_allclose(out["pixels_w"], 0.0, atol=0.02)


def test_struct_images_and_parquet_streaming(tmp_path):
  rows = pick_a_pic_rows(10)
  (tmp_path / "d").mkdir()
  write_parquet(tmp_path / "d" / "a.parquet", rows[:7], row_group_size=3, struct=True)
  write_parquet(tmp_path / "d" / "b.parquet", rows[7:], row_group_size=2)
  src = sources.open_source(str(tmp_path / "d"))
  assert len(src) == 10
  got = list(src.read(2, 9))
  assert [r.index for r in got] == list(range(2, 9))
  assert got[0].where.endswith("a.parquet row 2") and got[-1].where.endswith("b.parquet row 1")
  out = prepare(got[1])  # row 3: jpg_1 wins, stored as a {bytes, path} struct
  assert got[1].caption == "pair 3"
  np.testing.assert_allclose(out["pixels_w"], grey(35), atol=1e-6)


def test_parquet_whole_source_errors(tmp_path):
  with pytest.raises(ValueError, match="empty source"):
    sources.open_source(str(tmp_path))
  rows = pick_a_pic_rows(2)
  write_parquet(tmp_path / "x.parquet", [{k: v for k, v in r.items() if k != "label_1"} for r in rows])
  with pytest.raises(ValueError, match=r"x.parquet: missing column\(s\) \['label_1'\]"):
    sources.open_source(str(tmp_path / "x.parquet"))
  write_parquet(tmp_path / "x.parquet", rows)
  pq.write_table(pq.read_table(tmp_path / "x.parquet").slice(0, 0), tmp_path / "x.parquet")
  with pytest.raises(ValueError, match="empty source"):
    sources.open_source(str(tmp_path / "x.parquet"))


def test_jsonl_source(tmp_path):
  (tmp_path / "img").mkdir()
  Image.new("RGB", (24, 16), (30, 30, 30)).save(tmp_path / "img" / "good.png")
  Image.new("RGB", (24, 16), (90, 90, 90)).save(tmp_path / "img" / "bad.png")
  write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": "a", "chosen": "img/good.png", "rejected": str(tmp_path / "img" / "bad.png")},
      "",
      {"caption": "b", "chosen": "img/bad.png", "rejected": "img/good.png"},
      "{oops",
      {"prompt": "c", "chosen": "img/good.png"},
      {"prompt": "d", "chosen": "img/missing.png", "rejected": "img/good.png"},
  ])
  src = sources.open_source(str(tmp_path / "pairs.jsonl"))
  assert len(src) == 5
  got = list(src.read(0, 5))
  assert [r.where.rsplit(" ", 1)[1] for r in got] == ["1", "3", "4", "5", "6"]
  a, b = prepare(got[0]), prepare(got[1])
  np.testing.assert_allclose(a["pixels_w"], grey(30), atol=1e-6)
  np.testing.assert_allclose(a["pixels_l"], grey(90), atol=1e-6)
  assert b["caption"] == "b" and np.allclose(b["pixels_w"], grey(90), atol=1e-6)
  for r, message in zip(got[2:], ["line 4: invalid JSON", r"line 5: missing key\(s\) \['rejected'\]",
                                  "line 6: cannot decode jpg_0"]):
    with pytest.raises(pairs.BadPair, match=message):
      prepare(r)


def test_tfds_source(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(ImportError, match=r"mapo-jax\[tfds\]"):
    sources.open_source("tfds:pickapic")

  class FakeTfds:  # tfds.data_source returns a random-access sequence of feature dicts
    @staticmethod
    def data_source(name, split):
      assert (name, split) == ("pickapic", "test")
      return [{"caption": b"pair 0", "jpg_0": np.full((16, 24, 3), 5, np.uint8), "jpg_1": solid(6),
               "label_0": np.float32(1), "label_1": np.float32(0)}]

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTfds)
  got = list(sources.open_source("tfds:pickapic:test").read(0, 1))
  assert got[0].caption == "pair 0" and got[0].where == "tfds:pickapic:test row 0"
  np.testing.assert_allclose(prepare(got[0])["pixels_w"], grey(5), atol=1e-6)
