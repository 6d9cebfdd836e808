"""Generate images with a diffusers pipeline folder or a trained model's export.

    python -m mapo_jax.generate --model DIR --prompt "a red cat" --out OUT
    python -m mapo_jax.generate --model DIR --prompts prompts.txt --out OUT [--steps 50] [--guidance 5]
        [--seed 0] [--height 1024 --width 1024] [--negative-prompt TEXT] [--sampler euler|ddim]
        [--init-latents noise.npy] [--output-latents latents.npy] [--batch-size 8]
        [--lora FILE [--lora-scale S]]

--model: a diffusers pipeline folder (model_index.json; any family of mapo_jax/pipelines/), or a training workdir whose
export/ holds one. A workdir without export/ is refused: export it first with `python -m mapo_jax.export`.
--prompts: a text file, one prompt per line (blank lines skipped).
--lora: a LoRA file for the UNet, diffusers (pytorch_lora_weights.safetensors, what export writes) or kohya
(`lora_unet_*`) format, applied with weight --lora-scale (default 1: as trained); see docs/lora.md.
Writes OUT/0000.png, OUT/0001.png, ... (one per prompt, in order), OUT/grid.png and OUT/metadata.json
(the settings, and the prompt of each file). Without --init-latents, image i starts from noise drawn
from (--seed, i), whatever the batching. --init-latents: (N, H/8, W/8, C) float32 NHWC unit-variance
noise, C the VAE's latent channels (4 for SD / SDXL, 16 for SD3 / FLUX), one per prompt (it sets the size),
to compare with other implementations from the same noise (diffusers: pass it as NCHW `latents=`, packed for
FLUX; the pipeline scales it by the scheduler's init_noise_sigma). --output-latents: the final latents
(N, H/8, W/8, C) float32 NHWC, unpacked, before VAE decoding.
Flags take dashes (--init-latents) or underscores (--init_latents).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
from absl import app, logging
from PIL import Image

from mapo_jax.training import lora as lora_lib
from mapo_jax import cli, sampling
from mapo_jax.pipelines import load_pipeline, text_options


def resolve_pipeline(path: str | os.PathLike) -> Path:
  """The diffusers pipeline folder `path` names: itself, or a training workdir's export/."""
  path = Path(path)
  for folder in (path, path / "export"):
    if (folder / "model_index.json").is_file():
      return folder
  if (path / "export" / lora_lib.DIFFUSERS_FILE).is_file():
    raise FileNotFoundError(f"{path} is a LoRA run: its export is {path / 'export' / lora_lib.DIFFUSERS_FILE}; sample "
                            "it with --model BASE_PIPELINE --lora that file")
  raise FileNotFoundError(
      f"{path} is not a diffusers pipeline folder (no model_index.json), nor a training workdir with an exported "
      f"pipeline in {path / 'export'}. To sample a training workdir or checkpoint, export it first with "
      "`python -m mapo_jax.export`, which writes the pipeline to WORKDIR/export/.")


def load_model(model: str | os.PathLike, lora: str | os.PathLike | None = None, lora_scale: float = 1.0,
               max_sequence_length: int = 0):
  """The pipeline `model` names (`resolve_pipeline`), with the LoRA file `lora` on its UNet at weight
  `lora_scale`, its prompts at `max_sequence_length` T5 tokens (0: the family's default): the one way generate,
  evaluate and make_pairs load what they sample."""
  folder = resolve_pipeline(model)
  try:
    options = text_options(folder, max_sequence_length)
  except ValueError as e:
    raise ValueError(f"--max-sequence-length {max_sequence_length}: {e}") from None
  pipe = load_pipeline(folder, **options)
  if lora is not None:
    lora_lib.load_into(pipe.denoiser, lora, scale=lora_scale)
  return pipe


def read_prompts(path: str | os.PathLike) -> list[str]:
  """One prompt per line; blank lines are skipped."""
  prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


def save_images(images: np.ndarray, out: Path) -> list[str]:
  """Writes OUT/0000.png, ... and OUT/grid.png (about square); returns the file names, in order."""
  out.mkdir(parents=True, exist_ok=True)
  names = [f"{i:04d}.png" for i in range(len(images))]
  for name, image in zip(names, images):
    Image.fromarray(image).save(out / name)
  Image.fromarray(sampling.make_grid(images, math.ceil(math.sqrt(len(images))))).save(out / "grid.png")
  return names


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} must be >= 1")
  return value


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
  """Flags shared with mapo_jax.evaluate and make_pairs. Defaults are diffusers' (per family for guidance)."""
  p.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
  p.add_argument("--guidance", type=float, default=None, help="guidance: the classifier-free weight (SD, SDXL, SD3; "
                 "<= 1: none), or FLUX-dev's guidance embedding (default: the family's, as diffusers: SDXL 5, SD 1.x/2.x "
                 "7.5, SD3 7, FLUX-dev 3.5, FLUX-schnell none)")
  p.add_argument("--true-cfg", "--true_cfg", dest="true_cfg", type=float, default=1.0,
                 help="FLUX only: true classifier-free guidance weight with --negative-prompt (diffusers' "
                 "true_cfg_scale; 1: off)")
  p.add_argument("--seed", type=int, default=0, help="image i starts from noise drawn from (seed, i)")
  p.add_argument("--height", type=int, help="pixels (default: the UNet's sample_size x 8)")
  p.add_argument("--width", type=int, help="pixels (default: the UNet's sample_size x 8)")
  p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt",
                 help="for every prompt (default: none; SDXL then uses zero embeddings)")
  p.add_argument("--sampler", default="euler", choices=sampling.SAMPLERS, help="Euler discrete or DDIM (eta 0)")
  p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=8,
                 help="prompts per sampler call (the last batch is padded)")
  p.add_argument("--max-sequence-length", "--max_sequence_length", dest="max_sequence_length", type=int, default=0,
                 help="FLUX / SD3 only: T5 tokens per prompt, as the pipelines' max_sequence_length (default 0: the "
                 "family's, 512 FLUX and 256 SD3); a model trained at another length samples best at that one")


def parse_flags(argv: list[str]) -> argparse.Namespace:
  # argparse rather than absl's global flags: the contract is dashed names, which absl flags lack.
  p = cli.parser(__doc__)
  p.add_argument("--model", required=True, help="diffusers pipeline folder, or a workdir with export/")
  prompts = p.add_mutually_exclusive_group(required=True)
  prompts.add_argument("--prompt", help="one prompt")
  prompts.add_argument("--prompts", help="text file, one prompt per line")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--lora", help="LoRA file (diffusers or kohya format) applied to the denoiser")
  p.add_argument("--lora-scale", "--lora_scale", dest="lora_scale", type=float, default=1.0,
                 help="the LoRA's weight (1: as trained)")
  add_sampling_flags(p)
  p.add_argument("--init-latents", "--init_latents", dest="init_latents",
                 help=".npy of (N, H/8, W/8, C) float32 NHWC unit-variance initial noise")
  p.add_argument("--output-latents", "--output_latents", dest="output_latents",
                 help=".npy to save the final (N, H/8, W/8, C) NHWC latents to, before decoding")
  return cli.parse(p, argv)


def main(args: argparse.Namespace) -> None:
  prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
  model = resolve_pipeline(args.model)
  pipe = load_model(model, args.lora, args.lora_scale, args.max_sequence_length)
  init = None if args.init_latents is None else np.load(args.init_latents)
  negatives = None if args.negative_prompt is None else [args.negative_prompt] * len(prompts)
  images, latents = sampling.generate_images(
      pipe, prompts, negative_prompts=negatives, steps=args.steps, guidance=args.guidance, seed=args.seed,
      height=args.height, width=args.width, init_latents=init, sampler=args.sampler, batch_size=args.batch_size,
      true_cfg=args.true_cfg)
  out = Path(args.out)
  names = save_images(images, out)
  if args.output_latents:
    np.save(args.output_latents, latents)
  settings = {k: getattr(args, k) for k in ("steps", "guidance", "true_cfg", "seed", "negative_prompt", "sampler",
                                            "init_latents", "lora", "lora_scale", "max_sequence_length")}
  metadata = {"model": str(model), **settings, "height": int(images.shape[1]), "width": int(images.shape[2]),
              "images": [{"file": name, "prompt": prompt} for name, prompt in zip(names, prompts)]}
  (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
  logging.info("wrote %d images and grid.png to %s", len(images), out)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
