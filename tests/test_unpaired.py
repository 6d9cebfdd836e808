"""Unpaired labelled samples (Diffusion-KTO): sources, the cache and loader, reward scores of pairs carried
into batches, and KTO on the demo end to end with an exact resume and an EMA export."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_trainer
from PIL import Image
from safetensors.numpy import load_file

from mapo_jax.data import cache, loader, open_source
from mapo_jax.data.pairs import BadPair
from mapo_jax.data.sources import UnpairedFolderSource, UnpairedJsonlSource
from mapo_jax.data.unpaired import prepare_sample

R = 16  # resolution


def stub_encoder(pixels_w, pixels_l, captions):
  """A deterministic stand-in for the VAE and text towers: moments from 8x8-pooled pixels, embeddings from
  the caption's length (what is cached must be exactly what it returns)."""
  def moments(p):
    pooled = p.reshape(len(p), R // 8, 8, R // 8, 8, 3).mean(axis=(2, 4))
    return np.concatenate([pooled, pooled[..., :1], -pooled, pooled[..., :1] - 1], -1).astype(np.float32)
  n = np.array([len(c) for c in captions], np.float32)
  out = {"moments_w": moments(pixels_w), "prompt_embeds": np.tile(n[:, None, None], (1, 3, 4)),
         "pooled_prompt_embeds": np.tile(n[:, None], (1, 5)), "rpo_emb": np.tile(n[:, None], (1, 5))}
  if pixels_l is not None:
    out["moments_l"] = moments(pixels_l)
  return out


def image(path, value):
  Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)


@pytest.fixture
def samples(tmp_path):
  """Three samples written both as unpaired.jsonl and as desirable/ + undesirable/ folders."""
  rows = [("a red circle", 200, 1), ("a blue square", 30, -1), ("a red square", 120, 1)]
  folder = tmp_path / "folder"
  (folder / "desirable").mkdir(parents=True)
  (folder / "undesirable").mkdir()
  with (tmp_path / "unpaired.jsonl").open("w") as f:
    for i, (caption, value, label) in enumerate(rows):
      image(tmp_path / f"{i}.png", value)
      f.write(json.dumps({"prompt": caption, "image": f"{i}.png", "label": label}) + "\n")
      side = folder / ("desirable" if label == 1 else "undesirable")
      image(side / f"{i}.png", value)
      (side / f"{i}.txt").write_text(caption + "\n")
  return tmp_path, rows


def test_jsonl_and_folder_sources_read_the_same_labelled_samples(samples):
  root, rows = samples
  jsonl, folder = open_source(str(root / "unpaired.jsonl")), open_source(str(root / "folder"))
  assert isinstance(jsonl, UnpairedJsonlSource) and isinstance(folder, UnpairedFolderSource)
  got_jsonl = [(r.caption, r.label_0) for r in jsonl.read(0, len(jsonl))]
  assert got_jsonl == [(c, float(y)) for c, _, y in rows]
  # The folder lists desirable names first, then undesirable ones.
  assert [(r.caption, r.label_0) for r in folder.read(0, 3)] == [got_jsonl[0], got_jsonl[2], got_jsonl[1]]
  sample = prepare_sample(next(jsonl.read(1, 2)), resolution=R, seed=0)
  assert sample["pixels"].shape == (R, R, 3) and sample["label"] == -1.0
  np.testing.assert_allclose(sample["pixels"], 30 / 127.5 - 1, rtol=1e-6)
  np.testing.assert_array_equal(sample["time_ids"][[0, 1, 4, 5]], [20, 24, R, R])


def test_bad_labels_and_missing_captions_name_the_row(samples):
  root, _ = samples
  (root / "bad.jsonl").write_text(json.dumps({"prompt": "x", "image": "0.png", "label": 0}) + "\n")
  row = next(open_source(str(root / "bad.jsonl")).read(0, 1))
  with pytest.raises(BadPair, match=r"bad.jsonl line 1: 'label' must be 1 \(desirable\) or -1"):
    prepare_sample(row, resolution=R, seed=0)
  (root / "folder" / "desirable" / "0.txt").unlink()
  row = next(open_source(str(root / "folder")).read(0, 1))
  with pytest.raises(BadPair, match="desirable/0.png: no caption file 0.txt"):
    prepare_sample(row, resolution=R, seed=0)


def test_unpaired_cache_and_loader_carry_moments_and_labels(samples, tmp_path):
  root, rows = samples
  source = open_source(str(root / "unpaired.jsonl"))
  manifest = cache.write_cache(source, tmp_path / "cache", stub_encoder, cache.EncodeSettings(resolution=R),
                               pipeline="stub", batch_size=2)
  assert list(manifest["record"]) == list(cache.UNPAIRED_KEYS) and manifest["pairs"] == 3
  batch = next(iter(loader.cached_loader(tmp_path / "cache", batch_size=3, seed=0, process_index=0,
                                         process_count=1, num_threads=1)))
  assert set(batch) == set(cache.UNPAIRED_KEYS)
  prepared = [prepare_sample(r, resolution=R, seed=0) for r in source.read(0, 3)]
  want = stub_encoder(np.stack([p["pixels"] for p in prepared]), None, [p["caption"] for p in prepared])
  order = np.argsort(batch["pooled_prompt_embeds"][:, 0] * 10 + batch["label"])  # shuffled: match by content
  want_order = np.argsort(want["pooled_prompt_embeds"][:, 0] * 10 + np.array([y for *_, y in rows]))
  np.testing.assert_array_equal(batch["label"][order], np.array([y for *_, y in rows], np.float32)[want_order])
  # float16 storage of the moments: within half an ulp of float16.
  np.testing.assert_allclose(batch["moments"][order], want["moments_w"][want_order], rtol=2 ** -11, atol=1e-7)
  with pytest.raises(ValueError, match="unpaired samples.*data.mode='cached'"):
    loader.onthefly_loader(source, stub_encoder, resolution=R, batch_size=1, seed=0)


def test_pair_scores_are_cached_and_batched(tmp_path):
  lines = []
  for i, (sw, sl) in enumerate([(21.5, 20.0), (19.0, 22.25)]):
    image(tmp_path / f"w{i}.png", 40 * i + 10)
    image(tmp_path / f"l{i}.png", 40 * i + 30)
    lines.append({"prompt": "p" * (i + 1), "chosen": f"w{i}.png", "rejected": f"l{i}.png", "score_w": sw, "score_l": sl})
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  cache.write_cache(open_source(str(tmp_path / "pairs.jsonl")), tmp_path / "cache", stub_encoder,
                    cache.EncodeSettings(resolution=R), pipeline="stub", batch_size=2)
  batch = loader.cached_eval_batch(tmp_path / "cache", 1)
  assert set(batch) == set(cache.BATCH_KEYS) | {"score_w", "score_l"}
  full = next(iter(loader.cached_loader(tmp_path / "cache", batch_size=2, seed=0, process_index=0, process_count=1,
                                        num_threads=1)))
  by_caption = {int(round(c)): (w, l) for c, w, l in zip(full["pooled_prompt_embeds"][:, 0], full["score_w"],
                                                          full["score_l"])}
  assert by_caption == {1: (21.5, 20.0), 2: (19.0, 22.25)}
  assert batch["score_w"].dtype == np.float32
  # One score without the other is a row problem naming the missing key.
  half = {k: v for k, v in lines[0].items() if k != "score_w"}
  (tmp_path / "half.jsonl").write_text(json.dumps(half) + "\n")
  row = next(open_source(str(tmp_path / "half.jsonl")).read(0, 1))
  assert row.problem == "has 'score_l' without 'score_w'"


def test_kto_on_unpaired_demo_resumes_bit_identically_and_exports_the_ema(demo_assets, trainer_env, tmp_path):
  args = ("--config.steps=10", "--config.sample_every=0")
  full, part = tmp_path / "full", tmp_path / "part"
  run_trainer(trainer_env(), full, demo_assets, *args, config="configs/demo_kto.py")
  logged = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(m["loss"]) and m["skipped_steps"] == 0 and "kl" in m for m in logged)
  proc = run_trainer(trainer_env(), part, demo_assets, *args, "--stop-after-step", "6", config="configs/demo_kto.py")
  assert "stopped after step 6" in proc.stdout
  run_trainer(trainer_env(), part, demo_assets, *args, config="configs/demo_kto.py")
  weights = "export/unet/diffusion_pytorch_model.safetensors"
  want, got = load_file(full / weights), load_file(part / weights)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The EMA (decay 0.9 in configs/demo_kto.py) resumed bit-identically too, and export --ema writes it.
  for workdir in (full, part):
    subprocess.run([sys.executable, "-m", "mapo_jax.export", "--checkpoint", str(workdir), "--base",
                    str(demo_assets / "pipeline"), "--out", str(workdir / "ema_export"), "--unet-only", "--ema"],
                   env=trainer_env(), cwd=REPO, check=True, capture_output=True, text=True)
  ema_full, ema_part = (load_file(w / "ema_export/diffusion_pytorch_model.safetensors") for w in (full, part))
  for k in ema_full:
    np.testing.assert_array_equal(ema_part[k], ema_full[k], err_msg=k)
  assert any(not np.array_equal(ema_full[k], want[k]) for k in want)  # the average is not the last weights
