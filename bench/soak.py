"""Soak: the demo trained for many steps while being killed (kill -9) and restarted at random points, against
the same run uninterrupted. Passes when every restart resumed from its last checkpoint, the final weights equal
the uninterrupted run's bit for bit, and the trainer's resident memory grows by less than 1 MiB per 1000 steps
after warm-up, over the uninterrupted run's `host_rss_mib` (logged every 100 steps, after freed heap is handed
back). The slope that decides is Theil-Sen's (the median of the pairwise slopes): a sample that catches a transient
allocation (a save or a prefetch in flight) and is back at the floor by the next one does not move it, while a leak
raises the floor. The least-squares slope is printed beside it.

    python bench/soak.py [--steps 5000] [--kills 5] [--seed 0] [--out /tmp/soak]

CPU, about an hour for the default 5000 steps on 2 cores (two runs). Prints one JSON line with the result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "export/unet/diffusion_pytorch_model.safetensors"
WARMUP = 1000  # steps whose memory growth (compile caches, allocator pools) is not a leak


def command(workdir: Path, args) -> list[str]:
  return [sys.executable, "-m", "mapo_jax.train", "--config", "demo", "--workdir", str(workdir),
          f"--config.demo_assets={args.out / 'assets'}", f"--config.steps={args.steps}", "--config.judge=",
          "--config.sample_every=0", "--config.log_every=100", "--config.checkpoint_every=100",
          f"--config.compile_cache={args.out / 'xla'}"]


def logged(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def soak(args) -> dict:
  workdir, rng = args.out / "soak", random.Random(args.seed)
  kill_at = sorted(rng.sample(range(150, args.steps - 50), args.kills))  # steps after which to kill
  restarts, env = [], {**os.environ, "JAX_PLATFORMS": "cpu"}
  for target in kill_at + [None]:
    before = max((int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), default=0) \
        if (workdir / "checkpoints").is_dir() else 0
    # The trainer's stderr goes to a file: a pipe nobody reads fills with its progress bar, and the trainer then
    # blocks on the write.
    log_path = args.out / f"segment_{len(restarts)}.log"
    with open(log_path, "w") as log:
      proc = subprocess.Popen(command(workdir, args), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    tail = lambda: log_path.read_text()[-3000:]
    if target is None:
      if proc.wait() != 0:
        raise RuntimeError(f"the last segment failed:\n{tail()}")
      restarts.append({"resumed_from": before, "killed_after": None})
      break
    while not (logged(workdir) and logged(workdir)[-1]["step"] >= target):
      if proc.poll() is not None:
        raise RuntimeError(f"the trainer exited {proc.returncode} before step {target}:\n{tail()}")
      time.sleep(0.5 + rng.random())  # a random moment past the target: mid-step, mid-save or mid-log
    proc.kill()
    proc.wait()
    restarts.append({"resumed_from": before, "killed_after": logged(workdir)[-1]["step"]})
  return {"restarts": restarts}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=5000)
  p.add_argument("--kills", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=Path, default=Path("/tmp/mapo_jax_soak"))
  args = p.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  straight = args.out / "straight"
  if not (straight / WEIGHTS).exists():
    subprocess.run(command(straight, args), env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
  result = soak(args)
  want, got = load_file(straight / WEIGHTS), load_file(args.out / "soak" / WEIGHTS)
  identical = want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  rss = [(m["step"], m["host_rss_mib"]) for m in logged(straight) if m["step"] >= WARMUP]
  steps, mib = np.array(rss, float).T
  slope = float(stats.theilslopes(mib, steps)[0]) * 1000  # MiB per 1000 steps
  least_squares = float(np.polyfit(steps, mib, 1)[0]) * 1000
  resumed = all(r["resumed_from"] >= 100 * (r_prev["killed_after"] // 100) - 100
                for r_prev, r in zip(result["restarts"], result["restarts"][1:]))
  result.update(steps=args.steps, identical_weights=identical, rss_mib_per_1000_steps=round(slope, 3),
                rss_least_squares_mib_per_1000_steps=round(least_squares, 3),
                rss_first_mib=round(float(mib[0]), 1), rss_last_mib=round(float(mib[-1]), 1), every_restart_resumed=resumed,
                passed=bool(identical and resumed and slope < 1.0), seconds=round(time.time() - start))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
