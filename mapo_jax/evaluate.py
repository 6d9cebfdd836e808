"""Compare two models on a prompt set with reward models: the papers' table of mean scores and win rates.

    python -m mapo_jax.evaluate --model-a BASE --model-b TUNED [--lora-b F]
        --rewards pickscore=DIR,hps=FILE,aesthetic=FILE,clip=DIR --prompts FILE --out OUT
        [--seed 0] [--steps 50] [--guidance 5] [--height H --width W] [--negative-prompt TEXT] [--sampler euler|ddim] [--batch-size 8]

--lora-b FILE: a LoRA file (diffusers or kohya) applied to model B's UNet, so B = A + LoRA needs no export.
--model-a / --model-b: as `mapo_jax.generate --model` (a diffusers pipeline folder, or a workdir with
export/). Both sample every prompt from the same noise (image i from (--seed, i)), so the images differ by
the model only and the comparison is paired. --rewards: KIND=PATH items (`mapo_jax.rewards.load_reward`).
--prompts: a PartiPrompts .tsv, an HPS v2 benchmark style .json or a folder of them, a Pick-a-Pic parquet
(unique captions) or a .txt, one prompt per line (`mapo_jax.rewards.prompts`).

For each reward: the mean ± standard error of each model's scores, and the win rate of B over A (the share
of prompts where B scores higher, a tie counting one half) with a 95 % percentile bootstrap interval over
prompts (BOOTSTRAP_SAMPLES resamples, seed BOOTSTRAP_SEED: reruns give the same interval); per category too
when the prompt set has categories. docs/evaluation.md gives the formulas.
Writes OUT/results.json (settings, summary, per-prompt scores), OUT/results.md (the same as tables),
OUT/a/NNNN.png, OUT/b/NNNN.png, and OUT/side_by_side.png (A left, B right, the first 16 prompts).
--update-card: also writes the tables (without the per-prompt rows) into the model card (README.md) of model B
(of the LoRA file's folder with --lora-b), as a section that a re-run with the same model A and prompt set
replaces; a folder without a card gets a minimal one (mapo_jax/run/card.py, docs/model_cards.md).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from absl import app, logging
from PIL import Image

from mapo_jax import cli, generate, rewards, sampling
from mapo_jax.rewards import scoring
from mapo_jax.run import card
from mapo_jax.rewards.prompts import FORMATS, read_prompt_set

GRID_ROWS = 16
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


def wins(scores_a, scores_b) -> np.ndarray:
  """Per prompt: 1 where B scores higher than A, 0.5 for a tie, 0 where A scores higher."""
  a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  return (b > a) + 0.5 * (b == a)


def win_rate(scores_a, scores_b) -> float:
  """Fraction of prompts where B scores higher than A; a tie counts one half."""
  return float(np.mean(wins(scores_a, scores_b)))


def bootstrap_interval(scores_a, scores_b, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of `win_rate` over prompts (Efron & Tibshirani 1993, ch. 13).

  Each resample draws n prompts with replacement and takes their mean win (1, ½ or 0). That mean depends
  only on how many wins, ties and losses were drawn, so the counts are drawn directly: multinomial(n,
  observed shares), the same distribution as resampling the prompts, in O(samples) memory.
  """
  w = wins(scores_a, scores_b)
  n = len(w)
  shares = [np.mean(w == 1.0), np.mean(w == 0.5), np.mean(w == 0.0)]
  counts = np.random.default_rng(seed).multinomial(n, shares, size=samples)
  rates = (counts[:, 0] + 0.5 * counts[:, 1]) / n
  lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def mean_and_se(scores) -> tuple[float, float]:
  """Mean and its standard error std(ddof=1) / sqrt(n) (0 for one score)."""
  x = np.asarray(scores, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def compare(scores_a, scores_b) -> dict:
  """One row of the table: mean ± SE of A and of B, B's win rate and its 95 % bootstrap interval."""
  (mean_a, se_a), (mean_b, se_b) = mean_and_se(scores_a), mean_and_se(scores_b)
  return {"n": len(scores_a), "mean_a": mean_a, "se_a": se_a, "mean_b": mean_b, "se_b": se_b,
          "win_rate_b": win_rate(scores_a, scores_b),
          "win_rate_b_ci95": list(bootstrap_interval(scores_a, scores_b))}


def summarize(scores: dict[str, dict[str, np.ndarray]], categories: list[str] | None) -> dict:
  """{reward kind: compare(...) of all prompts, with "categories": {name: compare(...)} if there are any}."""
  summary = {}
  for kind, s in scores.items():
    summary[kind] = compare(s["a"], s["b"])
    if categories is not None:
      cats = np.asarray(categories)
      summary[kind]["categories"] = {c: compare(s["a"][cats == c], s["b"][cats == c])
                                     for c in dict.fromkeys(categories)}
  return summary


def sample(model: str, prompts: list[str], args: argparse.Namespace, lora: str | None = None) -> np.ndarray:
  pipe = generate.load_model(model, lora, max_sequence_length=args.max_sequence_length)
  negatives = None if args.negative_prompt is None else [args.negative_prompt] * len(prompts)
  images, _ = sampling.generate_images(
      pipe, prompts, negative_prompts=negatives, steps=args.steps, guidance=args.guidance, seed=args.seed,
      height=args.height, width=args.width, sampler=args.sampler, batch_size=args.batch_size, true_cfg=args.true_cfg)
  return images


def _row(label: str, r: dict) -> str:
  lo, hi = r["win_rate_b_ci95"]
  return (f"| {label} | {r['n']} | {r['mean_a']:.4f} ± {r['se_a']:.4f} | {r['mean_b']:.4f} ± {r['se_b']:.4f} | "
          f"{r['win_rate_b']:.3f} [{lo:.3f}, {hi:.3f}] |")


def markdown(results: dict, *, per_prompt: bool = True) -> str:
  """results.md: the summary table, per category where there are categories, then (with `per_prompt`) each
  prompt's scores."""
  s, summary = results["settings"], results["summary"]
  cell = lambda text: str(text).replace("|", "\\|")  # a literal | would end the table cell
  lines = [f"# A: `{s['model_a']}` vs B: `{s['model_b']}`", "",
           (f"{len(results['per_prompt'])} prompts from `{s['prompts']}`; seed {s['seed']}, {s['steps']} "
            f"{s['sampler']} steps, guidance {s['guidance']}, {s['height']}x{s['width']} px. Mean ± standard error; "
            f"win rate of B over A (ties ½) with its 95 % bootstrap interval ({BOOTSTRAP_SAMPLES} resamples of "
            "the prompts)."), "", "| reward | prompts | A | B | B win rate [95 % CI] |", "|---|---|---|---|---|"]
  lines += [_row(f"{kind} (`{cell(s['rewards'][kind])}`)", r) for kind, r in summary.items()]
  if any("categories" in r for r in summary.values()):
    lines += ["", "## Per category", "", "| reward / category | prompts | A | B | B win rate [95 % CI] |",
              "|---|---|---|---|---|"]
    lines += [_row(f"{kind} / {cell(c)}", rc) for kind, r in summary.items() for c, rc in r["categories"].items()]
  if not per_prompt:
    return "\n".join(lines) + "\n"
  kinds = list(summary)
  lines += ["", "| # | prompt | " + " | ".join(f"{k} A | {k} B" for k in kinds) + " |",
            "|---|---|" + "---|---|" * len(kinds)]
  lines += [f"| {i} | {cell(r['prompt'])} | " + " | ".join(f"{r[f'{k}_a']:.4f} | {r[f'{k}_b']:.4f}" for k in kinds)
            + " |" for i, r in enumerate(results["per_prompt"])]
  return "\n".join(lines) + "\n"


def parse_flags(argv: list[str]) -> argparse.Namespace:
  p = cli.parser(__doc__)
  p.add_argument("--model-a", "--model_a", dest="model_a", required=True, help="baseline model folder")
  p.add_argument("--model-b", "--model_b", dest="model_b", required=True, help="compared (e.g. aligned) model")
  p.add_argument("--lora-b", "--lora_b", dest="lora_b", help="LoRA file applied to model B (e.g. B = A + LoRA)")
  p.add_argument("--rewards", required=True, type=scoring.rewards_flag,
                 help="KIND=PATH[,KIND=PATH...], e.g. pickscore=DIR,hps=FILE,aesthetic=FILE,clip=DIR")
  p.add_argument("--prompts", required=True, help=f"prompt set: {FORMATS}")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--update-card", "--update_card", dest="update_card", action="store_true",
                 help="write the result tables into model B's model card (README.md; with --lora-b the LoRA "
                 "file's folder), replacing the section of an earlier run on the same model A and prompts")
  generate.add_sampling_flags(p)
  return cli.parse(p, argv)


def update_card(args: argparse.Namespace, results: dict) -> Path:
  """Puts the result tables into model B's card (`card.put_section`), keyed by model A and the prompt set, so a
  re-run replaces its own section. B = --model-b, or the LoRA file's folder with --lora-b (then --model-b is
  that card's base)."""
  folder = Path(args.lora_b).parent if args.lora_b else generate.resolve_pipeline(args.model_b)
  base = generate.resolve_pipeline(args.model_b) if args.lora_b else None
  key = card.section_key(os.path.abspath(args.model_a), os.path.abspath(args.prompts))
  text = (card.shift_headings(markdown(results, per_prompt=False))
          + f"\n\nWritten by `mapo_jax.evaluate --update-card`; per-prompt scores: `{os.path.abspath(args.out)}`.")
  return card.put_section(folder, f"evaluation-{key}", text, base=base, adapter=bool(args.lora_b))


def main(args: argparse.Namespace) -> None:
  prompt_set = read_prompt_set(args.prompts)
  prompts = prompt_set.prompts
  out = Path(args.out)
  images = {}
  for name in ("a", "b"):  # one pipeline in memory at a time
    images[name] = sample(getattr(args, f"model_{name}"), prompts, args, args.lora_b if name == "b" else None)
    generate.save_images(images[name], out / name)
  scores = {}
  for kind, path in args.rewards.items():  # one reward model in memory at a time
    reward = rewards.load_reward(kind, path)
    scores[kind] = {name: scoring.score(reward, prompts, images[name]) for name in images}
    del reward

  settings = {k: getattr(args, k) for k in ("model_a", "model_b", "lora_b", "rewards", "prompts", "seed", "steps",
                                            "guidance", "negative_prompt", "sampler", "max_sequence_length")}
  settings |= {"height": int(images["a"].shape[1]), "width": int(images["a"].shape[2]),
               "bootstrap_samples": BOOTSTRAP_SAMPLES, "bootstrap_seed": BOOTSTRAP_SEED}
  summary = summarize(scores, prompt_set.categories)
  per_prompt = [{"prompt": p, **({} if prompt_set.categories is None else {"category": prompt_set.categories[i]}),
                 **{f"{k}_{n}": float(scores[k][n][i]) for k in scores for n in ("a", "b")}}
                for i, p in enumerate(prompts)]
  results = {"settings": settings, "summary": summary, "per_prompt": per_prompt}
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (out / "results.md").write_text(markdown(results))
  if args.update_card:
    logging.info("wrote the results into %s", update_card(args, results))
  rows = min(len(prompts), GRID_ROWS)
  pairs = np.stack([images["a"][:rows], images["b"][:rows]], axis=1).reshape(2 * rows, *images["a"].shape[1:])
  Image.fromarray(sampling.make_grid(pairs, cols=2)).save(out / "side_by_side.png")
  for kind, r in summary.items():
    logging.info("%s: A %.4f ± %.4f, B %.4f ± %.4f, B win rate %.3f [%.3f, %.3f]", kind, r["mean_a"], r["se_a"],
                 r["mean_b"], r["se_b"], r["win_rate_b"], *r["win_rate_b_ci95"])
  logging.info("wrote %s", out)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
