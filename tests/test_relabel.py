"""`mapo_jax.relabel` with a tiny random CLIP reward: the flips and drops follow transformers' scores of each
pair's images, and the output is in the input's format (read back through the sources `encode` uses)."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_clip_reward_dir
from mapo_jax import relabel, rewards
from mapo_jax.data import pairs, sources

CAPTIONS = ["a cat", "the red dog", "a dog on the red cat", "red", "dog, dog", "the cat.", "cat", "a red dog"]
# Human winner per pair: image 0, image 1, or a tie (None); two sizes, so pairs mix image shapes.
HUMAN = [0, 1, 0, None, 1, 0, 1, 0]
# A score is logit_scale.exp() = e³ ≈ 20 times a float32 cosine; the two preprocessors' float32 resampling and the
# two float32 towers move the cosine by a few 1e-6 at most, so the score by ≤ 20 · 5e-6 = 1e-4, whatever its size
# (a relative bound fails on scores near 0).
SCORE_ATOL = 1e-4


def reference_score(model_dir, caption, image):
  """transformers: CLIPImageProcessorPil + tokenizer + CLIPModel; PickScore = logit_scale.exp() * cos."""
  import torch
  from transformers import AutoTokenizer
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  path, model = model_dir
  pixels = CLIPImageProcessorPil.from_pretrained(path)(images=[image], return_tensors="pt")["pixel_values"]
  text = AutoTokenizer.from_pretrained(path)([caption], return_tensors="pt")
  with torch.no_grad():
    return float(model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                       pixel_values=pixels).logits_per_image[0, 0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The reward folder, the pairs' images (uint8) and their reference scores, and a margin between two gaps."""
  root = tmp_path_factory.mktemp("relabel")
  model_dir = (root / "reward", make_clip_reward_dir(root / "reward"))
  rng = np.random.default_rng(0)
  images = [[rng.integers(0, 256, (32, 40) if (i + j) % 3 else (48, 36), dtype=np.uint8)[..., None]
             * np.array([1, 1, 1], np.uint8) // rng.integers(1, 4, 3).astype(np.uint8) for j in range(2)]
            for i in range(len(CAPTIONS))]
  scores = np.array([[reference_score(model_dir, c, im) for im in pair] for c, pair in zip(CAPTIONS, images)])
  gaps = np.sort(np.abs(scores[:, 0] - scores[:, 1]))
  # float32 scores agree with the reference to ~1e-5 relative: every decision must be far from ambiguous.
  assert gaps[0] > 1e-3 * np.abs(scores).max() and np.min(np.diff(gaps)) > 1e-3 * np.abs(scores).max()
  margin = float(gaps[1:3].mean())  # drops the two closest pairs
  return root, model_dir, images, scores, margin


def expected(scores, margin, rows=None):
  """Per row: kept?, the reward's winner (0/1); and the counts relabel reports (over `rows`, default all)."""
  rows = range(len(CAPTIONS)) if rows is None else rows
  d = scores[:, 0] - scores[:, 1]
  keep, winner = np.abs(d) > margin, np.where(d > 0, 0, 1)
  decisive = [i for i in rows if HUMAN[i] is not None]
  return keep, winner, {"agreement": np.mean([winner[i] == HUMAN[i] for i in decisive]),
                        "flipped": sum(keep[i] and winner[i] != HUMAN[i] for i in decisive),
                        "dropped_ties": int(sum(~keep[i] for i in rows))}


def png(array, path=None):
  if path is not None:
    Image.fromarray(array).save(path)
    return path
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def load(model_dir):
  return rewards.load_reward("pickscore", model_dir[0])


def test_jsonl_soft_margin_and_paths(setup):
  root, model_dir, images, scores, margin = setup
  src = root / "jsonl_src"
  (src / "img").mkdir(parents=True)
  lines = []
  for i, (caption, pair) in enumerate(zip(CAPTIONS, images)):
    if HUMAN[i] is None:
      continue  # JSONL has no ties
    files = [png(im, src / "img" / f"{i}_{j}.png").relative_to(src).as_posix() for j, im in enumerate(pair)]
    key = "caption" if i == 2 else "prompt"  # both are accepted
    lines.append(json.dumps({key: caption, "chosen": files[HUMAN[i]], "rejected": files[1 - HUMAN[i]], "id": i,
                             "score_w": 99.0, "score_l": -99.0}))  # stale scores, replaced
  lines.insert(3, json.dumps({"prompt": "gone", "chosen": "img/missing.png", "rejected": "img/0_0.png"}))
  (src / "pairs.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
  out = root / "jsonl_out" / "sub" / "relabelled.jsonl"
  stats = relabel.relabel(str(src / "pairs.jsonl"), load(model_dir), out, soft=True, margin=margin)

  rows = [i for i in range(len(CAPTIONS)) if HUMAN[i] is not None]
  keep, winner, counts = expected(scores, margin, rows)
  assert stats["agreement"] == pytest.approx(counts["agreement"], abs=1e-12)
  assert {k: stats[k] for k in ("flipped", "dropped_ties", "skipped", "human_decisive", "kept")} == {
      "flipped": counts["flipped"], "dropped_ties": counts["dropped_ties"], "skipped": 1, "human_decisive": len(rows),
      "kept": int(keep[rows].sum())}
  written = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in written] == [i for i in rows if keep[i]]
  for r in written:
    i = r["id"]
    assert os.path.samefile(out.parent / r["chosen"], src / "img" / f"{i}_{winner[i]}.png")
    assert os.path.samefile(out.parent / r["rejected"], src / "img" / f"{i}_{1 - winner[i]}.png")
    np.testing.assert_allclose([r["score_w"], r["score_l"]], [scores[i, winner[i]], scores[i, 1 - winner[i]]],
                               rtol=0, atol=SCORE_ATOL)
  # What encode reads: every row a pair, winner first.
  source = sources.open_source(str(out))
  for row in source.read(0, len(source)):
    pair = pairs.prepare_pair(row, resolution=32, seed=0)
    assert pair["caption"] == CAPTIONS[written[row.index]["id"]]


def test_parquet_folder_labels_ties_and_stale_scores(setup):
  root, model_dir, images, scores, margin = setup
  src = root / "parquet_src"
  (src / "data").mkdir(parents=True)
  labels = {0: (1.0, 0.0), 1: (0.0, 1.0), None: (0.5, 0.5)}
  table = {"caption": CAPTIONS, "jpg_0": [png(p[0]) for p in images], "jpg_1": [png(p[1]) for p in images],
           "label_0": [labels[h][0] for h in HUMAN], "label_1": [labels[h][1] for h in HUMAN],
           "best_image_uid": [f"uid{i}" for i in range(8)], "score_w": [1.0] * 8}
  pq.write_table(pa.table({k: v[:5] for k, v in table.items()}), src / "data" / "train-0.parquet")
  pq.write_table(pa.table({k: v[5:] for k, v in table.items()}), src / "data" / "train-1.parquet")
  out = root / "parquet_out"
  stats = relabel.relabel(str(src), load(model_dir), out, margin=margin)
  keep, winner, counts = expected(scores, margin)
  assert {k: stats[k] for k in counts} == pytest.approx(counts, abs=1e-12)
  assert stats["human_ties"] == 1 and stats["human_ties_kept"] == int(keep[3])
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["data", "data/train-0.parquet",
                                                                           "data/train-1.parquet"]
  got = pa.concat_tables([pq.read_table(out / "data" / f"train-{k}.parquet") for k in (0, 1)]).to_pydict()
  kept = [i for i in range(8) if keep[i]]
  assert got["best_image_uid"] == [f"uid{i}" for i in kept] and "score_w" not in got  # no --soft: stale scores go
  assert got["label_0"] == [float(winner[i] == 0) for i in kept]
  assert got["label_1"] == [float(winner[i] == 1) for i in kept]
  assert got["jpg_0"] == [table["jpg_0"][i] for i in kept]


def test_arrow_save_to_disk_and_preference_folder(setup):
  import datasets
  root, model_dir, images, scores, _ = setup
  keep, winner, _ = expected(scores, 0.0)
  assert keep.all()
  decisive = [i for i in range(8) if HUMAN[i] is not None]
  src = root / "disk_src"
  datasets.Dataset.from_dict({"caption": CAPTIONS, "jpg_0": [png(p[0]) for p in images],
                              "jpg_1": [png(p[1]) for p in images], "label_0": [1.0] * 8,
                              "label_1": [0.0] * 8}).save_to_disk(str(src))
  stats = relabel.relabel(str(src), load(model_dir), root / "disk_out", soft=True)
  assert stats["flipped"] == sum(winner == 1)
  back = datasets.load_from_disk(str(root / "disk_out"))
  assert back["label_0"] == [float(w == 0) for w in winner]
  np.testing.assert_allclose(back["score_w"], scores[np.arange(8), winner], rtol=0, atol=SCORE_ATOL)
  assert len(sources.open_source(str(root / "disk_out"))) == 8

  folder = root / "folder_src"
  for side in ("w", "l"):
    (folder / side).mkdir(parents=True)
  for i in decisive:
    png(images[i][HUMAN[i]], folder / "w" / f"p{i}.png")
    png(images[i][1 - HUMAN[i]], folder / "l" / f"p{i}.png")
    (folder / f"p{i}.txt").write_text(CAPTIONS[i])
  stats = relabel.relabel(str(folder), load(model_dir), root / "folder_out")
  assert stats["flipped"] == sum(winner[i] != HUMAN[i] for i in decisive)
  for i in decisive:
    np.testing.assert_array_equal(np.asarray(Image.open(root / "folder_out" / "w" / f"p{i}.png")), images[i][winner[i]])
    assert (root / "folder_out" / f"p{i}.txt").read_text().strip() == CAPTIONS[i]
  with pytest.raises(ValueError, match=f"{folder}: a w/ \\+ l/ preference folder has no per-pair fields"):
    relabel.relabel(str(folder), load(model_dir), root / "folder_soft", soft=True)


def test_refusals_name_the_file(tmp_path, capsys):
  ranked = tmp_path / "ranked.json"
  ranked.write_text(json.dumps([{"prompt": "a", "image_path": ["0.png", "1.png"], "rank": [1, 2]}]))
  with pytest.raises(ValueError, match=f"{ranked}: relabel cannot write a RankedSource back"):
    relabel.relabel(str(ranked), None, tmp_path / "out.json")  # refused before any scoring
  jsonl = tmp_path / "pairs.jsonl"
  jsonl.write_text(json.dumps({"prompt": "a", "chosen": "0.png", "rejected": "1.png"}) + "\n")
  with pytest.raises(ValueError, match=f"--out {tmp_path / 'out.parquet'}: the source {jsonl} is a .jsonl file"):
    relabel.relabel(str(jsonl), None, tmp_path / "out.parquet")
  (tmp_path / "exists.jsonl").write_text("")
  with pytest.raises(FileExistsError, match="exists.jsonl exists"):
    relabel.relabel(str(ranked), None, tmp_path / "exists.jsonl")
  for spec, message in (("clip=/x,pickscore=/y", "expected one KIND=PATH, got 2"),
                        ("nosuchreward=/x", "unknown kind 'nosuchreward'")):
    with pytest.raises(SystemExit):
      relabel.parse_flags(["relabel", "--data", "d.jsonl", "--out", "o.jsonl", "--reward", spec])
    assert message in capsys.readouterr().err
