"""Time to the first train step, with an empty compilation cache and after a restart (config.compile_cache):
the demo run for one step, stopped, then resumed for one more step, in one command.

    python bench/time_to_first_step.py [--config demo] [--out /tmp/ttfs]

Prints per run: wall seconds from the process start to its first logged step, and the train step's compile
seconds as the trainer reports them ("compiled the train step in X s"); then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def first_step(workdir: Path, cache: Path, config: str, steps: int) -> dict:
  """Runs the trainer until its step `steps` is logged; the process's wall time to that line and the
  compile time it printed."""
  cmd = [sys.executable, "-m", "mapo_jax.train", "--config", config, "--workdir", str(workdir), "--config.judge=",
         "--config.sample_every=0", "--config.log_every=1", f"--config.steps={steps}",
         f"--config.checkpoint_every={steps}", f"--config.compile_cache={cache}",
         f"--config.demo_assets={workdir.parent / 'assets'}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        check=True)
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  compiled = re.search(r"compiled the train step in ([\d.]+) s", proc.stderr)
  return {"wall_s": round(time.perf_counter() - start, 1), "compile_s": float(compiled[1]) if compiled else None,
          "last_step": metrics[-1]["step"]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="demo")
  p.add_argument("--out", type=Path, default=Path("/tmp/mapo_jax_ttfs"))
  args = p.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  args.out.mkdir(parents=True)
  cache, workdir = args.out / "xla", args.out / "run"
  cold = first_step(workdir, cache, args.config, 1)
  entries = len(list(cache.iterdir()))
  warm = first_step(workdir, cache, args.config, 2)  # the restart: resumes step 1's checkpoint, trains step 2
  print(f"cold (empty cache):   {cold['wall_s']:6.1f} s to the first step, train step compiled in {cold['compile_s']} s")
  print(f"restart (warm cache): {warm['wall_s']:6.1f} s to the first step, train step compiled in {warm['compile_s']} s")
  print(json.dumps({"config": args.config, "cold": cold, "restart": warm, "cache_entries": entries,
                    "new_entries_on_restart": len(list(cache.iterdir())) - entries}))


if __name__ == "__main__":
  main()
