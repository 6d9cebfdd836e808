"""MaPO changes what the pretrained toy bases draw (issue 17; the FLUX.1 twin: issue 29): from a shipped base
(mapo_jax/toy/base, ~5 % filled; its flow-matching twin mapo_jax/toy/flux_base, ~7 %), MaPO on pairs that prefer
filled shapes raises the judged filled rate by a margin the seeds make significant, and caption accuracy stays
within a few points.

The run is bench/reference_mismatch.py's own (the mismatch regime, MaPO at its tuned rate, 3 seeds, each with
its own pairs, batches and noise), in a subprocess with XLA's default optimisation (the suite's fast-compile
flags make 300 training steps slow). Each final model is judged on 30 samples per caption (270 images,
sampling seed 1), as is the base. The judge is right on drawn images (tests/test_toy_world.py).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, XLA_CACHE
from scipy import stats

SEEDS = (0, 1, 2)
# Per base: MaPO's rate as the bench tuned it, its steps, and the rise of the filled rate claimed at 99 %
# (bench/RESULTS.md, "Reference mismatch in the toy world"). The twin's captions limit its rate to 3e-5 (at 1e-4 they
# fall 11 points), where the bench measured a rise of 0.25 +- 0.03 over 3 seeds: the claim is less than half of it.
RUNS = {"sdxl": ("1e-4", "100", 0.2), "flux": ("3e-5", "100", 0.1)}
# The bases themselves, judged on 270 samples on seeds their builds' metrics.json did not use: they follow their
# captions and keep the world's bias (trained on 10 % filled). Issue 17's bar for the SDXL base, 80 % (96.7 %
# measured); for the twin, its measured 83.9 % (180 samples) less 3.5 standard errors of the difference between
# that rate and a 270-sample one (3.5 x 0.035).
CAPTION_BARS = {"sdxl": 0.80, "flux": 0.71}
BASE_FILLED_AT_MOST = 0.20
CAPTION_POINTS = 0.05  # "within a few points": a 270-sample rate near 0.95 (SDXL) has a standard error of 0.013,
# near 0.84 (the twin) 0.022; the mean of 3 seeds, 1.7x less


@pytest.mark.parametrize("family", sorted(RUNS))
def test_mapo_raises_the_filled_rate_significantly_and_keeps_captions(tmp_path, family):
  LR, STEPS, MARGIN = RUNS[family]  # the filled rate must rise by MARGIN, at 99 % one-sided confidence
  cmd = [sys.executable, os.path.join(REPO, "bench", "reference_mismatch.py"), "--out", str(tmp_path),
         "--family", family,
         "--objectives", "mapo", "--regimes", "mismatch", "--lrs", LR, "--steps", STEPS, "--eval-every", STEPS,
         "--curve-samples", "1",  # the test reads the final points only
         "--seeds", *map(str, SEEDS)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO,
         "JAX_COMPILATION_CACHE_DIR": XLA_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  base = json.loads((tmp_path / "summary.json").read_text())["base"]
  assert base["caption_accuracy"] >= CAPTION_BARS[family] and base["filled_rate"] <= BASE_FILLED_AT_MOST, base
  results = json.loads((tmp_path / "results.json").read_text())
  finals = [results[f"mismatch/mapo/lr={float(LR):g}/seed={s}"]["final"] for s in SEEDS]
  gain = np.array([f["filled_rate"] - base["filled_rate"] for f in finals])
  # One-sided t bound over the seeds: mean - t(0.99, n-1) * sd / sqrt(n) must clear the margin.
  lower = gain.mean() - stats.t.ppf(0.99, len(SEEDS) - 1) * gain.std(ddof=1) / np.sqrt(len(SEEDS))
  assert lower >= MARGIN, (base, finals)
  drop = base["caption_accuracy"] - np.mean([f["caption_accuracy"] for f in finals])
  assert drop <= CAPTION_POINTS, (base, finals)
