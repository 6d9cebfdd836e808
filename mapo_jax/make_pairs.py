"""Preference pairs from prompts alone: sample K images per prompt, score them with a reward, pair them.

    python -m mapo_jax.make_pairs --model BASE --prompts FILE --per-prompt K --reward pickscore=DIR --out DST
        [--pairing best-worst|all|curriculum] [--seed 0] [--steps 50] [--guidance 5] [--height H --width W]
        [--negative-prompt TEXT] [--sampler euler|ddim] [--batch-size 8]

--model: as `mapo_jax.generate --model`. --prompts: any prompt set of `mapo_jax.rewards.prompts`. Image k of prompt p
(both counted from 0) has its own seed, --seed + p·K + k, and starts from the noise `mapo_jax.generate
--seed SEED` gives its first image, so `generate --prompt P --seed SEED` (same size, steps, guidance,
sampler) reproduces it. Sampling runs through `mapo_jax.sampling` over all devices (and processes: then
every process runs the same command, DST on a filesystem they all see; process 0 writes).

DST holds:
  settings.json   what the samples depend on; a re-run with other settings is refused
  images/PPPPPP_K.png
  samples.jsonl   one line per finished prompt: {"prompt_index", "prompt", ["category",] "images": [{"file",
                  "seed", "score"}, ...]}, appended after the prompt's images are written
  pairs.jsonl     the pairs, in `mapo_jax.encode`'s JSONL format: {"prompt", "chosen", "rejected", "score_w",
                  "score_l", "seed_w", "seed_l", "prompt_index", "rank_gap"}; rewritten from samples.jsonl at
                  the end of every run
A re-run continues where the last stopped: prompts in samples.jsonl are not sampled again (a line cut short
by a crash is discarded, and that prompt redone). Pairings (two images with equal scores never pair):
  best-worst  one pair per prompt: its highest-scoring image against its lowest (Diffusion-DPO's
              AI-feedback setting, the Salesforce trainer's choice-model relabelling)
  all         every two images of a prompt with different scores: K(K-1)/2 pairs per prompt
  curriculum  the pairs of `all`, easy first, as Curriculum-DPO (Croitoru et al., arXiv 2405.13637) orders
              them: images ranked by score within their prompt; a pair's difficulty is its rank difference
              (far apart = easy); pairs sorted by rank difference, largest first (then score gap, largest
              first). `rank_gap` is stored so the paper's difficulty batches (stages) can be cut from the file.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np
from absl import app, logging
from PIL import Image

from mapo_jax import cli, generate, rewards, sampling
from mapo_jax.rewards import scoring
from mapo_jax.rewards.prompts import FORMATS, read_prompt_set

PAIRINGS = ("best-worst", "all", "curriculum")
SETTINGS = ("model", "prompts", "per_prompt", "reward", "seed", "steps", "guidance", "height", "width",
            "negative_prompt", "sampler")


def image_seed(seed: int, prompt_index: int, k: int, per_prompt: int) -> int:
  return seed + prompt_index * per_prompt + k


def prompt_pairs(scores: list[float]) -> list[tuple[int, int, int]]:
  """(winner, loser, rank gap) for every two images of one prompt with different scores. Ranks: 0 = the
  highest score; equal scores are ordered by image index (they never pair with each other)."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  rank = {image: r for r, image in enumerate(order)}
  return [(w, l, rank[l] - rank[w]) for a, w in enumerate(order) for l in order[a + 1:] if scores[w] > scores[l]]


def select_pairs(samples: list[dict], pairing: str) -> list[dict]:
  """The pairs of `pairing` from samples.jsonl records (sorted by prompt index)."""
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing={pairing!r}; expected one of {PAIRINGS}")
  pairs = []
  for record in samples:
    images = record["images"]
    found = prompt_pairs([im["score"] for im in images])
    if pairing == "best-worst" and found:  # the largest rank gap: the best image against the worst
      found = [max(found, key=lambda p: p[2])]
    for w, l, gap in found:
      pairs.append({"prompt": record["prompt"], "chosen": images[w]["file"], "rejected": images[l]["file"],
                    "score_w": images[w]["score"], "score_l": images[l]["score"], "seed_w": images[w]["seed"],
                    "seed_l": images[l]["seed"], "prompt_index": record["prompt_index"], "rank_gap": gap})
  if pairing == "curriculum":  # stable: equal keys keep prompt order
    pairs.sort(key=lambda p: (-p["rank_gap"], -(p["score_w"] - p["score_l"])))
  return pairs


def read_samples(path: Path, *, repair: bool) -> list[dict]:
  """The complete lines of samples.jsonl; a last line cut short by a crash is dropped (and, with `repair`,
  cut from the file so the next append starts on a fresh line)."""
  if not path.exists():
    return []
  data = path.read_bytes()
  end = data.rfind(b"\n") + 1
  if end < len(data) and repair:
    logging.warning("%s: discarding an incomplete last line (an interrupted run); its prompt is redone", path)
    with path.open("r+b") as f:
      f.truncate(end)
  return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def check_settings(out: Path, settings: dict) -> None:
  """Writes DST/settings.json, or refuses a re-run whose samples would not match the finished ones."""
  path = out / "settings.json"
  if path.exists():
    old = json.loads(path.read_text())
    changed = {k: (old.get(k), settings[k]) for k in settings if old.get(k) != settings[k]}
    if changed:
      raise ValueError(f"{path}: {out} was made with other settings {changed} (recorded, now); use a new --out")
  else:
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".settings.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)


def write_pairs(out: Path, pairing: str) -> list[dict]:
  samples = sorted(read_samples(out / "samples.jsonl", repair=False), key=lambda r: r["prompt_index"])
  pairs = select_pairs(samples, pairing)
  tmp = out / f".pairs.jsonl.tmp-{os.getpid()}"
  tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  os.replace(tmp, out / "pairs.jsonl")
  return pairs


def per_prompt_count(text: str) -> int:
  k = int(text)
  if k < 2:
    raise argparse.ArgumentTypeError(f"--per-prompt {k}: a pair needs at least 2 images per prompt")
  return k


def parse_flags(argv: list[str]) -> argparse.Namespace:
  p = cli.parser(__doc__)
  p.add_argument("--model", required=True, help="diffusers pipeline folder, or a workdir with export/")
  p.add_argument("--prompts", required=True, help=f"prompt set: {FORMATS}")
  p.add_argument("--per-prompt", "--per_prompt", dest="per_prompt", required=True, type=per_prompt_count,
                 help="images sampled per prompt (K >= 2)")
  p.add_argument("--reward", required=True, type=scoring.reward_flag, help="KIND=PATH, e.g. pickscore=DIR")
  p.add_argument("--out", required=True, help="output folder (a re-run with the same flags resumes it)")
  p.add_argument("--pairing", default="best-worst", choices=PAIRINGS, help="which pairs of each prompt's images")
  generate.add_sampling_flags(p)
  return cli.parse(p, argv)


def main(args: argparse.Namespace) -> None:
  prompt_set = read_prompt_set(args.prompts)
  prompts, k = prompt_set.prompts, args.per_prompt
  out = Path(args.out)
  model = generate.resolve_pipeline(args.model)
  kind, reward_path = args.reward
  settings = {key: getattr(args, key) for key in SETTINGS} | {  # absolute: a re-run may start elsewhere
      "model": str(model.resolve()), "prompts": str(Path(args.prompts).resolve()),
      "reward": f"{kind}={Path(reward_path).resolve()}"}
  if args.max_sequence_length:  # recorded only when set: earlier outputs keep their settings
    settings["max_sequence_length"] = args.max_sequence_length
  writer = jax.process_index() == 0
  if writer:
    check_settings(out, settings)
  done = {r["prompt_index"]: r for r in read_samples(out / "samples.jsonl", repair=writer)}
  for i, record in done.items():
    if i >= len(prompts) or record["prompt"] != prompts[i]:
      raise ValueError(f"{out / 'samples.jsonl'}: prompt {i} was {record['prompt']!r}, but {args.prompts} now "
                       f"has {prompts[i] if i < len(prompts) else 'no such prompt'!r}; use a new --out")
  todo = [i for i in range(len(prompts)) if i not in done]
  logging.info("%d of %d prompts done; sampling %d images for each of the %d left", len(done), len(prompts), k,
               len(todo))
  if todo:
    pipe = generate.load_model(model, max_sequence_length=args.max_sequence_length)
    f = pipe.vae_scale_factor
    height, width = args.height or sampling.default_size(pipe)[0], args.width or sampling.default_size(pipe)[1]
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    shape = (height // f, width // f, pipe.latent_channels)
    reward = rewards.load_reward(kind, reward_path)
    (out / "images").mkdir(parents=True, exist_ok=True)
    chunk = max(1, args.batch_size // k)  # prompts per round: about one sampler batch of images
    for start in range(0, len(todo), chunk):
      indices = todo[start:start + chunk]
      texts = [prompts[i] for i in indices for _ in range(k)]
      seeds = [image_seed(args.seed, i, j, k) for i in indices for j in range(k)]
      noise = np.concatenate([np.asarray(sampling.initial_noise(s, 1, shape)) for s in seeds])
      negatives = None if args.negative_prompt is None else [args.negative_prompt] * len(texts)
      images, _ = sampling.generate_images(pipe, texts, negative_prompts=negatives, steps=args.steps,
                                           guidance=args.guidance, init_latents=noise, sampler=args.sampler,
                                           batch_size=args.batch_size, true_cfg=args.true_cfg)
      scores = scoring.score(reward, texts, images)
      if not writer:
        continue
      with (out / "samples.jsonl").open("a") as log:
        for n, i in enumerate(indices):
          record = {"prompt_index": i, "prompt": prompts[i], "images": []}
          if prompt_set.categories is not None:
            record["category"] = prompt_set.categories[i]
          for j in range(k):
            name = f"images/{i:06d}_{j}.png"
            Image.fromarray(images[n * k + j]).save(out / name)
            record["images"].append({"file": name, "seed": seeds[n * k + j], "score": float(scores[n * k + j])})
          log.write(json.dumps(record) + "\n")  # one write per prompt, after its images: the unit of resume
          log.flush()
          os.fsync(log.fileno())
      logging.info("prompts done: %d of %d", len(done) + start + len(indices), len(prompts))
  if writer:
    pairs = write_pairs(out, args.pairing)
    logging.info("wrote %d %s pairs to %s", len(pairs), args.pairing, out / "pairs.jsonl")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
