"""The CLIP reward model against transformers' CLIPModel, and `python -m mapo_jax.evaluate` end to end."""
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_clip_tokenizer, make_micro_sdxl_pipeline, perturb_, rel_l2
from mapo_jax import evaluate
from mapo_jax.models.reward import load_reward_model, preprocess

PROMPTS = ["a cat", "the red dog!", "a dog on the red | cat", "red", "dog, dog", "the cat."]  # padded to 8


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
  """A tiny random transformers CLIPModel folder (tokenizer, preprocessor_config.json); returns (path, model)."""
  from transformers import CLIPConfig, CLIPModel
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  path = tmp_path_factory.mktemp("reward")
  tokenizer = make_clip_tokenizer(path)
  tokenizer.save_pretrained(path)
  ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
             pad_token_id=tokenizer.pad_token_id)
  config = CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, **ids),
      vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                         image_size=32, patch_size=8, hidden_act="gelu"),
      projection_dim=12, logit_scale_init_value=3.0)
  torch.manual_seed(0)
  model = perturb_(CLIPModel(config)).eval()
  model.save_pretrained(path)
  # Resize to a 40 px shorter side, then centre crop 32: both steps move pixels.
  CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                        image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]).save_pretrained(path)
  return path, model


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


@pytest.fixture(scope="module")
def evaluated(micro_sdxl_pipeline_dir, reward_dir, tmp_path_factory):
  """evaluate: A = the micro pipeline, B = another random one; then B = A."""
  tmp = tmp_path_factory.mktemp("evaluate")
  make_micro_sdxl_pipeline(tmp / "model_b", seed=1)
  (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  common = ["--reward", reward_dir[0], "--prompts", tmp / "prompts.txt", "--steps", 3, "--guidance", 5,
            "--height", 32, "--width", 48, "--seed", 3]
  for name, model_b in (("ab", tmp / "model_b"), ("aa", micro_sdxl_pipeline_dir)):
    argv = ["--model-a", micro_sdxl_pipeline_dir, "--model-b", model_b, "--out", tmp / name, *common]
    evaluate.main(evaluate.parse_flags(["evaluate", *map(str, argv)]))
  return tmp


def test_evaluate_scores_match_transformers(evaluated, reward_dir):
  results = json.loads((evaluated / "ab" / "results.json").read_text())
  assert [r["prompt"] for r in results["per_prompt"]] == PROMPTS
  for name in ("a", "b"):
    images = np.stack([np.asarray(Image.open(evaluated / "ab" / name / f"{i:04d}.png")) for i in range(len(PROMPTS))])
    assert images.shape == (len(PROMPTS), 32, 48, 3)
    ref = reference_scores(reward_dir, PROMPTS, images)
    ours = {m: np.array([r[f"{m}_{name}"] for r in results["per_prompt"]]) for m in evaluate.METRICS}
    assert rel_l2(ours["reward"], ref["score"]) <= 1e-5
    np.testing.assert_allclose(ours["clip_score"], 100 * np.maximum(ref["cosine"], 0), rtol=1e-4, atol=1e-4)
    for m in evaluate.METRICS:
      assert results["summary"][m][f"mean_{name}"] == pytest.approx(ours[m].mean(), rel=1e-6)
  per = {m: [(r[f"{m}_a"], r[f"{m}_b"]) for r in results["per_prompt"]] for m in evaluate.METRICS}
  for m in evaluate.METRICS:
    wins = sum(1.0 if b > a else 0.5 if a == b else 0.0 for a, b in per[m])
    assert results["summary"][m]["win_rate_b"] == wins / len(PROMPTS)
  assert results["settings"]["clip"] == str(reward_dir[0])  # no --clip: the reward folder
  grid = np.asarray(Image.open(evaluated / "ab" / "side_by_side.png"))
  assert grid.shape == (len(PROMPTS) * 32, 2 * 48, 3)
  np.testing.assert_array_equal(grid[32:64, 48:], np.asarray(Image.open(evaluated / "ab" / "b" / "0001.png")))
  md = (evaluated / "ab" / "results.md").read_text()
  assert f"| reward | {results['summary']['reward']['mean_a']:.4f} |" in md and r"red \| cat" in md


def test_evaluate_is_deterministic_and_ties_count_half(evaluated):
  ab = json.loads((evaluated / "ab" / "results.json").read_text())
  aa = json.loads((evaluated / "aa" / "results.json").read_text())
  for m in evaluate.METRICS:
    assert aa["summary"][m]["mean_a"] == aa["summary"][m]["mean_b"] == ab["summary"][m]["mean_a"]
    assert aa["summary"][m]["win_rate_b"] == 0.5  # every prompt a tie
  assert ab["summary"]["reward"]["mean_a"] != ab["summary"]["reward"]["mean_b"]
