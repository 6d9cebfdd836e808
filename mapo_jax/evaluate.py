"""Compare two models on a prompt set: preference-reward win rate and mean scores, and CLIP score.

    python -m mapo_jax.evaluate --model-a BASE --model-b ALIGNED --reward PICKSCORE_DIR
        --prompts prompts.txt --out OUT [--clip CLIP_DIR] [--seed 0] [--steps 50] [--guidance 5]
        [--height H --width W] [--negative-prompt TEXT] [--sampler euler|ddim] [--batch-size 8]

--lora-b FILE: a LoRA file (diffusers or kohya) applied to model B's UNet, so B = A + LoRA needs no export.
--model-a / --model-b: as `mapo_jax.generate --model` (a diffusers pipeline folder, or a workdir with
export/). Both sample every prompt from the same noise (image i from (--seed, i)), so the images differ
by the model only. --reward: a transformers CLIPModel folder (safetensors weights, tokenizer files and
preprocessor_config.json; PickScore: yuvalkirstain/PickScore_v1 plus the processor files of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K); reward = logit_scale.exp() * cos(image, text), as PickScore.
--clip: a CLIPModel folder for the CLIP text-image score 100 * max(cos, 0), torchmetrics' CLIPScore
(e.g. openai/clip-vit-large-patch14); without it, that score uses the reward folder's CLIP embeddings.
Win rate of B: the fraction of prompts where B scores higher than A, a tie counting one half.
Writes OUT/results.json (settings, summary, per-prompt scores), OUT/results.md (the same as tables),
OUT/a/NNNN.png, OUT/b/NNNN.png, and OUT/side_by_side.png (A left, B right, the first 16 prompts).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from absl import app, logging
from absl.flags import argparse_flags
from PIL import Image

from mapo_jax import generate, sampling
from mapo_jax.models.reward import RewardModel, load_reward_model

METRICS = {"reward": "reward", "clip_score": "CLIP score"}
GRID_ROWS = 16


def win_rate(scores_a, scores_b) -> float:
  """Fraction of prompts where B scores higher than A; a tie counts one half."""
  a, b = np.asarray(scores_a), np.asarray(scores_b)
  return float(np.mean((b > a) + 0.5 * (b == a)))


def sample(model: str, prompts: list[str], args: argparse.Namespace, lora: str | None = None) -> np.ndarray:
  pipe = generate.load_model(model, lora)
  negatives = None if args.negative_prompt is None else [args.negative_prompt] * len(prompts)
  images, _ = sampling.generate_images(
      pipe, prompts, negative_prompts=negatives, steps=args.steps, guidance=args.guidance, seed=args.seed,
      height=args.height, width=args.width, sampler=args.sampler, batch_size=args.batch_size)
  return images


def score(reward: RewardModel, clip: RewardModel, prompts: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
  out = reward(prompts, images)
  return {"reward": out["score"], "clip_score": (out if clip is reward else clip(prompts, images))["clip_score"]}


def markdown(results: dict) -> str:
  s, summary = results["settings"], results["summary"]
  lines = [f"# A: `{s['model_a']}` vs B: `{s['model_b']}`", "",
           f"{len(results['per_prompt'])} prompts; seed {s['seed']}, {s['steps']} {s['sampler']} steps, "
           f"guidance {s['guidance']}, {s['height']}x{s['width']} px; reward `{s['reward']}`, CLIP `{s['clip']}`.",
           "", "| metric | mean A | mean B | B win rate (ties ½) |", "|---|---|---|---|"]
  lines += [f"| {METRICS[m]} | {v['mean_a']:.4f} | {v['mean_b']:.4f} | {v['win_rate_b']:.4f} |"
            for m, v in summary.items()]
  lines += ["", "| # | prompt | reward A | reward B | CLIP A | CLIP B |", "|---|---|---|---|---|---|"]
  cell = lambda text: text.replace("|", "\\|")  # a literal | would end the table cell
  lines += [f"| {i} | {cell(r['prompt'])} | {r['reward_a']:.4f} | {r['reward_b']:.4f} | "
            f"{r['clip_score_a']:.4f} | {r['clip_score_b']:.4f} |" for i, r in enumerate(results["per_prompt"])]
  return "\n".join(lines) + "\n"


def parse_flags(argv: list[str]) -> argparse.Namespace:
  p = argparse_flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model-a", "--model_a", dest="model_a", required=True, help="baseline model folder")
  p.add_argument("--model-b", "--model_b", dest="model_b", required=True, help="compared (e.g. aligned) model")
  p.add_argument("--lora-b", "--lora_b", dest="lora_b", help="LoRA file applied to model B (e.g. B = A + LoRA)")
  p.add_argument("--reward", required=True, help="CLIPModel folder of the preference reward (PickScore, HPS)")
  p.add_argument("--clip", help="CLIPModel folder for the CLIP score (default: --reward)")
  p.add_argument("--prompts", required=True, help="text file, one prompt per line")
  p.add_argument("--out", required=True, help="output folder")
  generate.add_sampling_flags(p)
  return p.parse_args(argv[1:])


def main(args: argparse.Namespace) -> None:
  prompts = generate.read_prompts(args.prompts)
  out = Path(args.out)
  images = {}
  for name in ("a", "b"):  # one pipeline in memory at a time
    images[name] = sample(getattr(args, f"model_{name}"), prompts, args, args.lora_b if name == "b" else None)
    generate.save_images(images[name], out / name)
  reward = load_reward_model(args.reward)
  clip = reward if args.clip is None else load_reward_model(args.clip)
  scores = {name: score(reward, clip, prompts, images[name]) for name in images}

  settings = {k: getattr(args, k) for k in ("model_a", "model_b", "lora_b", "reward", "seed", "steps", "guidance",
                                            "negative_prompt", "sampler")}
  settings |= {"clip": args.clip or args.reward, "height": int(images["a"].shape[1]),
               "width": int(images["a"].shape[2])}
  summary = {m: {"mean_a": float(scores["a"][m].mean()), "mean_b": float(scores["b"][m].mean()),
                 "win_rate_b": win_rate(scores["a"][m], scores["b"][m])} for m in METRICS}
  per_prompt = [{"prompt": p, **{f"{m}_{n}": float(scores[n][m][i]) for m in METRICS for n in ("a", "b")}}
                for i, p in enumerate(prompts)]
  results = {"settings": settings, "summary": summary, "per_prompt": per_prompt}
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (out / "results.md").write_text(markdown(results))
  rows = min(len(prompts), GRID_ROWS)
  pairs = np.stack([images["a"][:rows], images["b"][:rows]], axis=1).reshape(2 * rows, *images["a"].shape[1:])
  Image.fromarray(sampling.make_grid(pairs, cols=2)).save(out / "side_by_side.png")
  logging.info("B win rate %.4f (reward), mean reward A %.4f, B %.4f; wrote %s", summary["reward"]["win_rate_b"],
               summary["reward"]["mean_a"], summary["reward"]["mean_b"], out)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
