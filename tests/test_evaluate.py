"""The CLIP reward model against transformers' CLIPModel, and `python -m mapo_jax.evaluate` end to end."""
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_clip_reward_dir, make_micro_sdxl_pipeline, rel_l2
from mapo_jax import evaluate
from mapo_jax.rewards.clip import load_reward_model, preprocess

PROMPTS = ["a cat", "the red dog!", "a dog on the red | cat", "red", "dog, dog", "the cat."]  # padded to 8


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
  """A tiny random transformers CLIPModel folder (tokenizer, preprocessor_config.json); returns (path, model)."""
  path = tmp_path_factory.mktemp("reward")
  return path, make_clip_reward_dir(path)


def reference_scores(reward_dir, prompts, images):
  """transformers: CLIPImageProcessorPil + tokenizer (padding to the longest, with its attention mask) + CLIPModel."""
  from transformers import AutoTokenizer
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  path, model = reward_dir
  pixels = CLIPImageProcessorPil.from_pretrained(path)(images=list(images), return_tensors="pt")["pixel_values"]
  text = AutoTokenizer.from_pretrained(path)(list(prompts), padding=True, return_tensors="pt")
  with torch.no_grad():
    out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
    # get_*_features: the projections before CLIPModel.forward normalises them
    text_embeds = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output
    image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
  cosine = (out.image_embeds * out.text_embeds).sum(-1)  # forward's embeddings are normalised
  return {"score": out.logits_per_image.diagonal().numpy(), "cosine": cosine.numpy(), "pixels": pixels.numpy(),
          "image_embeds": image_embeds.numpy(), "text_embeds": text_embeds.numpy()}


def test_reward_model_matches_transformers(reward_dir):
  path, model = reward_dir
  reward = load_reward_model(path)
  rng = np.random.default_rng(0)
  for shape in ((5, 32, 48, 3), (5, 50, 36, 3)):  # wide and tall: resize then crop
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    ref = reference_scores(reward_dir, PROMPTS[:5], images)
    pixels = preprocess(images, reward.processor_config)
    np.testing.assert_allclose(pixels, ref["pixels"].transpose(0, 2, 3, 1), atol=1e-6)
    out = reward(PROMPTS[:5], images, batch_size=8)
    assert rel_l2(out["score"], ref["score"]) <= 1e-5
    assert rel_l2(out["cosine"], ref["cosine"]) <= 1e-5
    np.testing.assert_allclose(out["clip_score"], 100 * np.maximum(ref["cosine"], 0), rtol=1e-4, atol=1e-4)
  ids = reward.tokenizer(PROMPTS[:5], padding="max_length", max_length=77, return_tensors="np")["input_ids"]
  text, image = jax.jit(lambda i, p: (reward.model.text_embeds(i), reward.model.image_embeds(p)))(ids, pixels)
  assert rel_l2(text, ref["text_embeds"]) <= 1e-5 and rel_l2(image, ref["image_embeds"]) <= 1e-5
  # Legacy integer sizes (PickScore's processor file) mean shortest edge and square crop.
  legacy = {**reward.processor_config, "size": 40, "crop_size": 32}
  np.testing.assert_array_equal(preprocess(images, legacy), pixels)


def test_win_rate_counts_ties_as_half():
  assert evaluate.win_rate([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 5.0]) == 0.625  # 1 + ½ + 0 + 1 of 4
  assert evaluate.win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5


def test_bootstrap_interval_known_answers():
  a = np.arange(20.0)
  assert evaluate.bootstrap_interval(a, a + 1) == (1.0, 1.0)  # B always higher: every resample wins all
  assert evaluate.bootstrap_interval(a, a - 1) == (0.0, 0.0)
  assert evaluate.bootstrap_interval(a, a) == (0.5, 0.5)  # all ties
  # 14 wins of 20: a resample's win count is Binomial(20, 0.7), so the 95 % percentile interval is that
  # distribution's 2.5 % and 97.5 % quantiles over 20. np.quantile of 10 000 draws lands on them exactly when
  # the binomial CDF steps across 0.025 (0.975) with 4 Monte Carlo standard errors (0.0016 each) to spare.
  from scipy import stats
  n, p, tol = 20, 0.7, 4 * np.sqrt(0.025 * 0.975 / evaluate.BOOTSTRAP_SAMPLES)
  lo, hi = stats.binom.ppf([0.025, 0.975], n, p)
  cdf = lambda k: stats.binom.cdf(k, n, p)
  assert cdf(lo - 1) < 0.025 - tol and cdf(lo) > 0.025 + tol and cdf(hi - 1) < 0.975 - tol and cdf(hi) > 0.975 + tol
  b = a + np.where(np.arange(n) < 14, 1.0, -1.0)
  assert evaluate.bootstrap_interval(a, b) == (lo / n, hi / n)
  # 14 wins and 6 ties: rate = (wins + ½ (20 − wins)) / 20 = ½ + wins / 40, wins ~ Binomial(20, 0.7).
  b = a + np.where(np.arange(n) < 14, 1.0, 0.0)
  assert evaluate.bootstrap_interval(a, b) == (0.5 + lo / 40, 0.5 + hi / 40)
  shuffled = np.random.default_rng(1).permutation(n)  # resamples prompts: their order does not matter
  assert evaluate.bootstrap_interval(a[shuffled], b[shuffled]) == evaluate.bootstrap_interval(a, b)


def test_mean_and_standard_error():
  x = np.array([1.0, 2.0, 4.0, 8.0])
  mean, se = evaluate.mean_and_se(x)
  assert mean == 3.75 and se == pytest.approx(np.sqrt(((x - 3.75) ** 2).sum() / 3 / 4), rel=1e-12)
  assert evaluate.mean_and_se([2.5]) == (2.5, 0.0)


CATEGORIES = ["Animals", "Animals", "Abstract", "Abstract", "Animals", "World Knowledge"]
REWARDS = ("pickscore", "clip")


@pytest.fixture(scope="module")
def evaluated(micro_sdxl_pipeline_dir, reward_dir, tmp_path_factory):
  """evaluate on a PartiPrompts .tsv with two rewards: A = the micro pipeline, B = another random one; then B = A."""
  tmp = tmp_path_factory.mktemp("evaluate")
  make_micro_sdxl_pipeline(tmp / "model_b", seed=1)
  (tmp / "parti.tsv").write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(
      f"{p}\t{c}\tBasic\t\n" for p, c in zip(PROMPTS, CATEGORIES)))
  common = ["--rewards", f"pickscore={reward_dir[0]},clip={reward_dir[0]}", "--prompts", tmp / "parti.tsv",
            "--steps", 3, "--guidance", 5, "--height", 32, "--width", 48, "--seed", 3]
  for name, model_b in (("ab", tmp / "model_b"), ("aa", micro_sdxl_pipeline_dir)):
    argv = ["--model-a", micro_sdxl_pipeline_dir, "--model-b", model_b, "--out", tmp / name, *common]
    evaluate.main(evaluate.parse_flags(["evaluate", *map(str, argv)]))
  return tmp


def test_evaluate_scores_match_transformers(evaluated, reward_dir):
  results = json.loads((evaluated / "ab" / "results.json").read_text())
  assert [r["prompt"] for r in results["per_prompt"]] == PROMPTS
  assert [r["category"] for r in results["per_prompt"]] == CATEGORIES
  ours = {}
  for name in ("a", "b"):
    images = np.stack([np.asarray(Image.open(evaluated / "ab" / name / f"{i:04d}.png")) for i in range(len(PROMPTS))])
    assert images.shape == (len(PROMPTS), 32, 48, 3)
    ref = reference_scores(reward_dir, PROMPTS, images)
    ours[name] = {k: np.array([r[f"{k}_{name}"] for r in results["per_prompt"]]) for k in REWARDS}
    assert rel_l2(ours[name]["pickscore"], ref["score"]) <= 1e-5
    np.testing.assert_allclose(ours[name]["clip"], 100 * np.maximum(ref["cosine"], 0), rtol=1e-4, atol=1e-4)
  cats = np.array(CATEGORIES)
  for k in REWARDS:
    a, b = ours["a"][k], ours["b"][k]
    row = results["summary"][k]
    assert row["n"] == 6 and row["mean_a"] == pytest.approx(a.mean(), rel=1e-6)
    assert row["se_b"] == pytest.approx(b.std(ddof=1) / np.sqrt(6), rel=1e-6)
    assert row["win_rate_b"] == sum(1.0 if y > x else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / 6
    assert tuple(row["win_rate_b_ci95"]) == evaluate.bootstrap_interval(a, b)
    assert row["win_rate_b_ci95"][0] <= row["win_rate_b"] <= row["win_rate_b_ci95"][1]
    assert list(row["categories"]) == ["Animals", "Abstract", "World Knowledge"]
    for c, rc in row["categories"].items():
      assert rc == json.loads(json.dumps(evaluate.compare(a[cats == c], b[cats == c])))
  assert results["settings"]["rewards"] == {k: str(reward_dir[0]) for k in REWARDS}
  grid = np.asarray(Image.open(evaluated / "ab" / "side_by_side.png"))
  assert grid.shape == (len(PROMPTS) * 32, 2 * 48, 3)
  np.testing.assert_array_equal(grid[32:64, 48:], np.asarray(Image.open(evaluated / "ab" / "b" / "0001.png")))
  md = (evaluated / "ab" / "results.md").read_text()
  r = results["summary"]["pickscore"]
  assert (f"| {r['mean_a']:.4f} ± {r['se_a']:.4f} | {r['mean_b']:.4f} ± {r['se_b']:.4f} | {r['win_rate_b']:.3f} "
          f"[{r['win_rate_b_ci95'][0]:.3f}, {r['win_rate_b_ci95'][1]:.3f}] |") in md
  assert "| clip / World Knowledge | 1 |" in md and r"red \| cat" in md


def test_evaluate_is_deterministic_and_ties_count_half(evaluated):
  ab = json.loads((evaluated / "ab" / "results.json").read_text())
  aa = json.loads((evaluated / "aa" / "results.json").read_text())
  for k in REWARDS:
    assert aa["summary"][k]["mean_a"] == aa["summary"][k]["mean_b"] == ab["summary"][k]["mean_a"]
    assert aa["summary"][k]["win_rate_b"] == 0.5 and aa["summary"][k]["win_rate_b_ci95"] == [0.5, 0.5]  # all ties
  assert ab["summary"]["pickscore"]["mean_a"] != ab["summary"]["pickscore"]["mean_b"]


def test_evaluate_flag_errors(tmp_path, capsys):
  base = ["evaluate", "--model-a", "A", "--model-b", "B", "--prompts", "p.txt", "--out", str(tmp_path)]
  for spec, message in (("nosuchreward=/x", "unknown kind 'nosuchreward'"), ("pickscore", "expected KIND=PATH")):
    with pytest.raises(SystemExit):
      evaluate.parse_flags([*base, "--rewards", spec])
    assert message in capsys.readouterr().err
