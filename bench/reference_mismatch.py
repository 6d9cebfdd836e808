"""MaPO's reference-mismatch claim (arXiv 2406.06424), tested in the toy world: every objective, from the same
pretrained base (mapo_jax/toy/base; `--family flux`: its FLUX.1 twin, mapo_jax/toy/flux_base, trained on velocity
errors), on the same pairs, batches and noise, in two regimes:

  mismatch  the pairs prefer filled shapes, which the base draws ~7 % of the time;
  match     the pairs prefer outlined shapes, which the base already draws ~93 % of the time.

    python bench/reference_mismatch.py --out bench/reference_mismatch        # about an hour on 2 CPU cores
    python bench/reference_mismatch.py --family flux --out bench/reference_mismatch_flux

Protocol (mapo_jax/toy/preference.py runs each training):
1. Learning rate, searched evenly: every objective and regime tries every --lrs value on the tuning seed
   (--tune-seed: its own pairs, batches and noise); the chosen rate has the highest final preferred-style
   rate among those whose caption accuracy stays within --max-caption-drop of the base's (ties: the
   smaller rate); if none does, the rate with the best caption accuracy. Nothing else is searched: each
   objective keeps its paper's defaults (mapo_jax/training/objectives.py), SmPO's score scale set for the toy
   scores (toy_preference.TOY_HPARAMS).
2. Evaluation: each objective at its chosen rate on --seeds (pairs, batches and noise differ by seed; every
   objective sees the same ones).
Reported per objective and regime, mean ± standard deviation over the seeds: the preferred-style rate and
caption accuracy after --steps steps (judged on 270 samples, sampling seeds unseen in the curves), and the
steps taken to reach the target rate, halfway from the base's preferred-style rate to 100 % (judged every
--eval-every steps on --curve-samples per caption, default 10: 90 samples). Writes results.json (every run;
an interrupted bench resumes from it), summary.json, table.md and curves.png to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mapo_jax.training import objectives
from mapo_jax.toy import demo, pretrain as toy_pretrain
from mapo_jax.toy import preference as toy_preference

REGIMES = {"mismatch": "filled", "match": "outlined"}  # regime -> the preferred style


def run_key(regime: str, objective: str, lr: float, seed: int) -> str:
  return f"{regime}/{objective}/lr={lr:g}/seed={seed}"


def steps_to(curve: list[dict], rate_key: str, target: float) -> int | None:
  return next((p["step"] for p in curve if p[rate_key] >= target), None)


def choose_lr(results: dict, regime: str, objective: str, lrs: list[float], seed: int, base_accuracy: float,
              max_drop: float) -> float:
  rate_key = f"{REGIMES[regime]}_rate"
  finals = {lr: results[run_key(regime, objective, lr, seed)]["final"] for lr in lrs}
  ok = [lr for lr in lrs if finals[lr]["caption_accuracy"] >= base_accuracy - max_drop]
  if ok:
    return max(ok, key=lambda lr: (finals[lr][rate_key], -lr))
  return max(lrs, key=lambda lr: (finals[lr]["caption_accuracy"], -lr))


def mean_std(values: list[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(results: dict, chosen: dict, regimes, names, seeds, base: dict, base_curve: dict) -> tuple[str, dict]:
  """The markdown table and {regime: {objective: {...}}} of the evaluation runs; `base`: the base judged as
  the final points are, `base_curve`: as the curves' points are (the target comes from it)."""
  lines = ["| regime | objective | lr | preferred-style rate | caption accuracy | steps to target (reached) |",
           "|---|---|---|---|---|---|"]
  summary = {}
  for regime in regimes:
    rate_key = f"{REGIMES[regime]}_rate"
    target = base_curve[rate_key] + (1 - base_curve[rate_key]) / 2
    lines.append(f"| {regime} | *base* | | {base[rate_key]:.3f} | {base['caption_accuracy']:.3f} | "
                 f"target {target:.3f} |")
    for name in names:
      lr = chosen[regime][name]
      runs = [results[run_key(regime, name, lr, s)] for s in seeds]
      rate = mean_std([r["final"][rate_key] for r in runs])
      accuracy = mean_std([r["final"]["caption_accuracy"] for r in runs])
      reached = [steps_to(r["curve"], rate_key, target) for r in runs]
      hit = [s for s in reached if s is not None]
      steps = mean_std(hit) if hit else None
      summary.setdefault(regime, {})[name] = {"lr": lr, "rate": rate, "caption_accuracy": accuracy,
                                               "steps_to_target": reached, "target": target}
      steps_text = f"{steps[0]:.0f} ± {steps[1]:.0f}" if steps else "—"
      lines.append(f"| {regime} | {name} | {lr:g} | {rate[0]:.3f} ± {rate[1]:.3f} | "
                   f"{accuracy[0]:.3f} ± {accuracy[1]:.3f} | {steps_text} ({len(hit)}/{len(runs)}) |")
  return "\n".join(lines), summary


def plot(results: dict, chosen: dict, regimes, names, seeds, path: Path) -> None:
  fig, axes = plt.subplots(2, len(regimes), figsize=(6 * len(regimes), 7), squeeze=False, sharex=True)
  for col, regime in enumerate(regimes):
    rate_key = f"{REGIMES[regime]}_rate"
    for name in names:
      curves = [results[run_key(regime, name, chosen[regime][name], s)]["curve"] for s in seeds]
      steps = [p["step"] for p in curves[0]]
      for row, key in enumerate((rate_key, "caption_accuracy")):
        values = np.array([[p[key] for p in c] for c in curves])
        line, = axes[row, col].plot(steps, values.mean(0), label=name)
        axes[row, col].fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.12)
    axes[0, col].set_title(f"{regime}: preferred style {REGIMES[regime]}")
    axes[0, col].set_ylabel(f"{REGIMES[regime]} rate")
    axes[1, col].set_ylabel("caption accuracy")
    axes[1, col].set_xlabel("step")
    for row in (0, 1):
      axes[row, col].set_ylim(0, 1.02)
      axes[row, col].grid(alpha=0.3)
  axes[0, -1].legend(fontsize=8, ncol=2)
  fig.suptitle("mean over seeds (band: min..max), judged on 90 fixed-seed samples")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--family", choices=sorted(demo.BASES), default="sdxl",
                      help="the toy base: sdxl (mapo_jax/toy/base) or its FLUX.1 twin (mapo_jax/toy/flux_base)")
  parser.add_argument("--pipeline", type=Path, default=None, help="another base folder (default: --family's)")
  parser.add_argument("--objectives", nargs="+", default=sorted(objectives.OBJECTIVES),
                      choices=sorted(objectives.OBJECTIVES))
  parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
  parser.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 2e-4, 3e-4, 1e-3])
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--tune-seed", type=int, default=100)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch", type=int, default=16, help="pairs per step")
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--curve-samples", type=int, default=10, help="samples per caption at each curve point")
  parser.add_argument("--max-caption-drop", type=float, default=0.05)
  args = parser.parse_args(argv)
  if args.tune_seed in args.seeds:
    parser.error(f"--tune-seed {args.tune_seed} is also an evaluation seed")
  args.out.mkdir(parents=True, exist_ok=True)
  results_path = args.out / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  start = time.time()
  log = lambda message: print(f"[{time.time() - start:7.1f} s] {message}", flush=True)
  aligner = toy_preference.Aligner(demo.load_toy(args.pipeline or demo.BASES[args.family]), batch=args.batch)

  def run(regime, name, lr, seed):
    key = run_key(regime, name, lr, seed)
    if key not in results:
      r = aligner.run(name, preferred=REGIMES[regime], lr=lr, steps=args.steps, seed=seed,
                      eval_every=args.eval_every, per_caption=args.curve_samples)
      results[key] = {"curve": r.curve, "final": r.final}
      results_path.write_text(json.dumps(results, indent=1) + "\n")
      log(f"{key}: final {json.dumps({k: round(v, 3) for k, v in r.final.items()})}")
    return results[key]

  # The base, judged as the curves' points are (every run's step 0) and as their final points are.
  base, _ = toy_pretrain.judge_samples(aligner.pipe, per_caption=args.curve_samples, seed=0)
  base_final, _ = toy_pretrain.judge_samples(aligner.pipe, per_caption=30, seed=1)
  chosen = {}
  for regime in args.regimes:
    for name in args.objectives:
      if len(args.lrs) == 1:  # nothing to choose: no tuning runs
        chosen.setdefault(regime, {})[name] = args.lrs[0]
        continue
      for lr in args.lrs:
        run(regime, name, lr, args.tune_seed)
      chosen.setdefault(regime, {})[name] = choose_lr(results, regime, name, args.lrs, args.tune_seed,
                                                       base_final["caption_accuracy"], args.max_caption_drop)
      log(f"{regime}/{name}: chose lr {chosen[regime][name]:g}")
  for regime in args.regimes:
    for name in args.objectives:
      for seed in args.seeds:
        run(regime, name, chosen[regime][name], seed)
  table, summary = summarize(results, chosen, args.regimes, args.objectives, args.seeds, base_final, base)
  (args.out / "table.md").write_text(table + "\n")
  (args.out / "summary.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in vars(args).items()},
                                                      "base": base_final, "base_curve_point": {"step": 0, **base},
                                                      "chosen_lr": chosen, "summary": summary}, indent=1) + "\n")
  plot(results, chosen, args.regimes, args.objectives, args.seeds, args.out / "curves.png")
  print(table)
  log(f"wrote {args.out}/table.md, summary.json, curves.png")


if __name__ == "__main__":
  sys.exit(main())
