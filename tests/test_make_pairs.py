"""`mapo_jax.make_pairs` on the micro SDXL pipeline with a tiny random CLIP reward: pairings, seeds, resume,
and pairs that `mapo_jax.encode` accepts. Sampler shapes as tests/test_sampling.py (8 images of 32 x 48 px,
3 steps), so its compiled loop is reused."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_clip_reward_dir
from mapo_jax import encode, make_pairs, rewards, sampling
from mapo_jax.data.cache import read_manifest
from mapo_jax.pipelines import load_pipeline

PROMPTS = ["a cat", "the red dog", "a dog on the red cat"]
K = 4
SAMPLING = ["--steps", 3, "--guidance", 5, "--height", 32, "--width", 48, "--seed", 11, "--batch-size", 8]


def test_prompt_pairs_rank_gaps_and_pairings():
  # Ranks by score (ties by index): image 1 (0.9), 3 (0.9), 0 (0.3), 2 (0.1); equal scores never pair.
  assert make_pairs.prompt_pairs([0.3, 0.9, 0.1, 0.9]) == [(1, 0, 2), (1, 2, 3), (3, 0, 1), (3, 2, 2), (0, 2, 1)]
  images = lambda name, seed, scores: [{"file": f"{name}{j}", "seed": seed + j, "score": s}
                                      for j, s in enumerate(scores)]
  samples = [{"prompt_index": 0, "prompt": "p", "images": images("", 0, [0.3, 0.9, 0.1, 0.9])},
             {"prompt_index": 1, "prompt": "q", "images": images("q", 9, [5.0, 1.0, 2.0, 4.0])},
             {"prompt_index": 2, "prompt": "r", "images": [{"file": f"r{j}", "seed": j, "score": 1.0} for j in range(4)]}]
  pick = lambda pairing: [(p["chosen"], p["rejected"], p["rank_gap"]) for p in make_pairs.select_pairs(samples, pairing)]
  assert pick("best-worst") == [("1", "2", 3), ("q0", "q1", 3)]  # a prompt whose images all tie gives none
  assert pick("all") == [("1", "0", 2), ("1", "2", 3), ("3", "0", 1), ("3", "2", 2), ("0", "2", 1),
                         ("q0", "q3", 1), ("q0", "q2", 2), ("q0", "q1", 3), ("q3", "q2", 1), ("q3", "q1", 2),
                         ("q2", "q1", 1)]
  # Curriculum: rank gap, largest first, then score gap, largest first.
  assert pick("curriculum") == [("q0", "q1", 3), ("1", "2", 3), ("q0", "q2", 2), ("q3", "q1", 2), ("3", "2", 2),
                                ("1", "0", 2), ("q3", "q2", 1), ("q0", "q3", 1), ("q2", "q1", 1), ("3", "0", 1),
                                ("0", "2", 1)]
  pair = make_pairs.select_pairs(samples, "all")[5]
  assert pair == {"prompt": "q", "chosen": "q0", "rejected": "q3", "score_w": 5.0, "score_l": 4.0, "seed_w": 9,
                  "seed_l": 12, "prompt_index": 1, "rank_gap": 1}


def run(*argv):
  make_pairs.main(make_pairs.parse_flags(["make_pairs", *map(str, argv)]))


@pytest.fixture(scope="module")
def made(micro_sdxl_pipeline_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("make_pairs")
  make_clip_reward_dir(tmp / "reward")
  (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  args = ["--model", micro_sdxl_pipeline_dir, "--prompts", tmp / "prompts.txt", "--per-prompt", K,
          "--reward", f"pickscore={tmp / 'reward'}", "--out", tmp / "out", "--pairing", "all", *SAMPLING]
  run(*args)
  return tmp, args


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_seeds_scores_and_pairs(made, micro_sdxl_pipeline_dir):
  tmp, _ = made
  out = tmp / "out"
  samples = read_jsonl(out / "samples.jsonl")
  assert [r["prompt_index"] for r in samples] == [0, 1, 2] and [r["prompt"] for r in samples] == PROMPTS
  images = {im["file"]: np.asarray(Image.open(out / im["file"])) for r in samples for im in r["images"]}
  assert [im["seed"] for r in samples for im in r["images"]] == [11 + i for i in range(3 * K)]  # seed + p·K + k
  # Each image's seed alone reproduces it, as `generate --seed SEED` would make its first image.
  pipe = load_pipeline(micro_sdxl_pipeline_dir)
  again, _ = sampling.generate_images(pipe, [PROMPTS[1]], steps=3, guidance=5.0, seed=11 + K + 2, height=32, width=48,
                                      batch_size=8)
  np.testing.assert_array_equal(again[0], images[samples[1]["images"][2]["file"]])
  assert len({im.tobytes() for im in images.values()}) == 3 * K  # every seed its own image
  reward = rewards.load_reward("pickscore", tmp / "reward")
  for r in samples:
    got = reward([r["prompt"]] * K, np.stack([images[im["file"]] for im in r["images"]]))
    np.testing.assert_allclose([im["score"] for im in r["images"]], got, rtol=1e-6)
  pairs = read_jsonl(out / "pairs.jsonl")
  assert pairs == make_pairs.select_pairs(samples, "all") and len(pairs) == 3 * K * (K - 1) // 2
  for p in pairs:
    assert p["score_w"] > p["score_l"] and (out / p["chosen"]).is_file() and (out / p["rejected"]).is_file()


def test_encode_accepts_the_pairs(made, micro_sdxl_pipeline_dir):
  tmp, _ = made
  pairs = read_jsonl(tmp / "out" / "pairs.jsonl")
  encode.main(encode.parse_flags(["encode", "--pipeline", str(micro_sdxl_pipeline_dir), "--data",
                                  str(tmp / "out" / "pairs.jsonl"), "--out", str(tmp / "cache"), "--resolution", "32",
                                  "--strict", "--batch_size", "8"]))
  manifest = read_manifest(tmp / "cache")
  assert (manifest["pairs"], manifest["skipped"], manifest["ties_dropped"]) == (len(pairs), 0, 0)


def test_resume_continues_without_duplicates(made):
  tmp, args = made
  out = tmp / "out"
  first = (out / "samples.jsonl").read_text()
  pngs = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
  # As if killed while writing prompt 1's line: prompt 0 complete, a cut line, images of prompt 2 missing.
  lines = first.splitlines(keepends=True)
  (out / "samples.jsonl").write_text(lines[0] + lines[1][:25])
  for p in (out / "images").glob("000002_*.png"):
    p.unlink()
  (out / "pairs.jsonl").unlink()
  run(*[a if a != "all" else "best-worst" for a in args])  # the pairing may change on a re-run
  resumed = read_jsonl(out / "samples.jsonl")
  assert [r["prompt_index"] for r in resumed] == [0, 1, 2]  # once each
  assert resumed == [json.loads(line) for line in first.splitlines()]  # the same seeds give the same images
  assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == pngs
  assert read_jsonl(out / "pairs.jsonl") == make_pairs.select_pairs(resumed, "best-worst")
  run(*args)  # nothing left to sample: only the pairs are rewritten
  assert (out / "samples.jsonl").read_text() == first
  with pytest.raises(ValueError, match=f"{out / 'settings.json'}: .* other settings .*'per_prompt': \\(4, 5\\)"):
    run(*[5 if a == K else a for a in args])


def test_bad_input_errors(made, tmp_path, capsys):
  tmp, args = made
  with pytest.raises(SystemExit):
    run(*[1 if a == K else a for a in args])
  assert "--per-prompt 1: a pair needs at least 2 images per prompt" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run(*[a if not str(a).startswith("pickscore=") else "aesthetic-v9=/x" for a in args])
  assert "unknown kind 'aesthetic-v9'" in capsys.readouterr().err
  (tmp_path / "prompts.csv").write_text("a cat\n")
  with pytest.raises(ValueError, match=f"{tmp_path / 'prompts.csv'}: unknown prompt file format"):
    run(*[tmp_path / "prompts.csv" if a == tmp / "prompts.txt" else a for a in args])
