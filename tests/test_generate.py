"""`python -m mapo_jax.generate` (its main, in-process, so the sampler compiled by test_sampling is reused)."""
import json

import numpy as np
import pytest
from PIL import Image

from mapo_jax import generate, sampling
from mapo_jax.pipelines import load_pipeline

PROMPTS = ["a cat", "the red dog!", "a dog on the red cat", "cat", "dog, dog", "the cat.", "red", "zebra"]
SIZE = ["--steps", "3", "--guidance", "5", "--negative-prompt", "blurry"]


def run(*argv):
  generate.main(generate.parse_flags(["generate", *map(str, argv)]))


@pytest.fixture(scope="module")
def seeded(micro_sdxl_pipeline_dir, tmp_path_factory):
  """One CLI run from --seed 7 at 32 x 48 px; 8 prompts (and a blank line) in a file."""
  tmp = tmp_path_factory.mktemp("generate")
  (tmp / "prompts.txt").write_text("\n".join(PROMPTS[:3] + [""] + PROMPTS[3:]) + "\n")
  run("--model", micro_sdxl_pipeline_dir, "--prompts", tmp / "prompts.txt", "--out", tmp / "out", *SIZE,
      "--seed", 7, "--height", 32, "--width", 48, "--output-latents", tmp / "latents.npy")
  return tmp


def test_writes_pngs_grid_and_the_samplers_latents(seeded, micro_sdxl_pipeline_dir):
  out = seeded / "out"
  names = [f"{i:04d}.png" for i in range(8)]
  assert sorted(p.name for p in out.iterdir()) == sorted(names + ["grid.png", "metadata.json"])
  images, latents = sampling.generate_images(load_pipeline(micro_sdxl_pipeline_dir), PROMPTS,
                                             negative_prompts=["blurry"] * 8, steps=3, guidance=5.0, seed=7,
                                             height=32, width=48)
  np.testing.assert_array_equal(np.load(seeded / "latents.npy"), latents)
  written = np.stack([np.asarray(Image.open(out / name)) for name in names])
  np.testing.assert_array_equal(written, images)
  grid = np.asarray(Image.open(out / "grid.png"))  # 3 x 3 cells, the last one empty
  assert grid.shape == (3 * 32, 3 * 48, 3)
  np.testing.assert_array_equal(grid[64:96, 48:96], images[7])
  assert not grid[64:, 96:].any()
  metadata = json.loads((out / "metadata.json").read_text())
  assert [m["prompt"] for m in metadata["images"]] == PROMPTS
  assert (metadata["height"], metadata["width"], metadata["seed"], metadata["steps"]) == (32, 48, 7, 3)


def test_init_latents_reproduce_the_seeded_run(seeded, micro_sdxl_pipeline_dir):
  np.save(seeded / "noise.npy", np.asarray(sampling.initial_noise(7, 8, (4, 6, 4))))
  # underscore spellings; the size comes from the latents
  run("--model", micro_sdxl_pipeline_dir, "--prompts", seeded / "prompts.txt", "--out", seeded / "again", *SIZE,
      "--seed", 123, "--init_latents", seeded / "noise.npy", "--output_latents", seeded / "again.npy")
  np.testing.assert_array_equal(np.load(seeded / "again.npy"), np.load(seeded / "latents.npy"))
  for name in ("0000.png", "0007.png", "grid.png"):
    np.testing.assert_array_equal(np.asarray(Image.open(seeded / "again" / name)),
                                  np.asarray(Image.open(seeded / "out" / name)))


def test_model_folder_resolution(micro_sdxl_pipeline_dir, tmp_path):
  assert generate.resolve_pipeline(micro_sdxl_pipeline_dir) == micro_sdxl_pipeline_dir
  with pytest.raises(ValueError, match="^--max-sequence-length 8: .* whose prompts have no T5 tokens"):
    generate.load_model(micro_sdxl_pipeline_dir, max_sequence_length=8)
  (tmp_path / "workdir").mkdir()
  (tmp_path / "workdir" / "export").symlink_to(micro_sdxl_pipeline_dir)
  assert generate.resolve_pipeline(tmp_path / "workdir") == tmp_path / "workdir" / "export"
  (tmp_path / "unexported" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="python -m mapo_jax.export"):
    generate.resolve_pipeline(tmp_path / "unexported")


def test_flags():
  args = generate.parse_flags(["generate", "--model", "m", "--prompt", "a cat", "--out", "o"])
  assert (args.steps, args.guidance, args.sampler, args.seed, args.negative_prompt) == (50, None, "euler", 0, None)
  assert args.max_sequence_length == 0  # the family's T5 length
  with pytest.raises(SystemExit):
    generate.parse_flags(["generate", "--model", "m", "--prompt", "a", "--prompts", "f", "--out", "o"])
  with pytest.raises(SystemExit):
    generate.parse_flags(["generate", "--model", "m", "--prompt", "a", "--out", "o", "--sampler", "heun"])
