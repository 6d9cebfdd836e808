"""The trainer end to end, as a subprocess on the demo config: outputs, exact resume, SIGTERM."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import REPO, run_trainer
from PIL import Image
from safetensors.numpy import load_file

from mapo_jax.toy import judging

UNET_WEIGHTS = "export/unet/diffusion_pytorch_model.safetensors"


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def judged(workdir):
  return [json.loads(line) for line in (workdir / "judge/judge.jsonl").read_text().splitlines()]


def test_demo_leaves_checkpoints_export_judged_samples_and_metrics(demo_run):
  workdir, proc = demo_run
  logged = metrics(workdir)
  assert [m["step"] for m in logged] == list(range(5, 61, 5))
  assert all(np.isfinite(m["loss"]) and m["skipped_steps"] == 0 for m in logged)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["40", "60"]  # keep_checkpoints=2
  records = judged(workdir)
  assert [r["step"] for r in records] == list(range(0, 61, 10))
  grids = sorted(p.name for p in (workdir / "judge").glob("step_*.png"))
  assert grids == [f"step_{s:06d}.png" for s in range(0, 61, 10)]
  before_after = Image.open(workdir / "judge/before_after.png")
  grid = Image.open(workdir / "judge/step_000000.png")
  assert before_after.size == (2 * grid.size[0] + judging.GAP, grid.size[1])
  assert Image.open(workdir / "judge/curve.png").size[0] > 0
  first, last = records[0], records[-1]
  printed = f"filled_rate {first['filled_rate']:.3f} -> {last['filled_rate']:.3f}"
  assert printed in proc.stdout
  assert not (workdir / "samples").exists()  # sample_every=0: the judge's grids show the samples
  assert list((workdir / "tensorboard").iterdir())
  assert (workdir / UNET_WEIGHTS).exists() and (workdir / "export/vae/config.json").exists()
  assert str(workdir / "export") in proc.stdout and str(workdir / "metrics.jsonl") in proc.stdout


def test_stopped_and_resumed_run_is_bit_identical(demo_run, demo_assets, trainer_env, tmp_path):
  reference, _ = demo_run
  # the dashed spelling
  proc = run_trainer(trainer_env(), tmp_path, demo_assets, "--stop-after-step", "12", judge=True)
  assert "stopped after step 12" in proc.stdout
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12"]
  assert not (tmp_path / "export").exists()
  assert [r["step"] for r in judged(tmp_path)] == [0, 10]
  run_trainer(trainer_env(), tmp_path, demo_assets, judge=True)
  assert judged(tmp_path) == judged(reference)  # the same samples judged the same: nothing judged twice
  want, got = load_file(reference / UNET_WEIGHTS), load_file(tmp_path / UNET_WEIGHTS)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Identical losses from the resumed step on (step 12 is logged as the stop step).
  by_step = {m["step"]: m["loss"] for m in metrics(reference)}
  for m in metrics(tmp_path):
    if m["step"] in by_step:
      assert m["loss"] == by_step[m["step"]], m["step"]


def test_the_running_trainer_holds_its_workdir_then_sigterm_checkpoints_and_resumes(demo_assets, trainer_env,
                                                                                   tmp_path):
  """Trainer A runs; trainer B on the same workdir exits at once naming A's pid and writes nothing; SIGTERM
  then makes A checkpoint and exit 0; the workdir resumes from that checkpoint and finishes, loading every
  program from A's compilation cache (config.compile_cache): the cache gains no entry."""
  cache = tmp_path / "xla"
  env = trainer_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # every program cached: counts are exact
  workdir, flag = tmp_path / "run", f"--config.compile_cache={cache}"
  cmd = [sys.executable, "-m", "mapo_jax.train", "--config", f"{REPO}/configs/demo.py", "--workdir", str(workdir),
         f"--config.demo_assets={demo_assets}", flag, "--config.steps=100000", "--config.log_every=1",
         "--config.sample_every=0", "--config.checkpoint_every=100000", "--config.judge="]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not ((workdir / "metrics.jsonl").exists() and metrics(workdir)):  # training has started
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  config_before = (workdir / "config.json").read_text()
  start = time.time()
  second = run_trainer(env, workdir, demo_assets, flag, "--config.steps=3", check=False, timeout=120)
  assert second.returncode == 1 and time.time() - start < 60, second.stderr[-3000:]
  error = second.stderr.strip().splitlines()[-1]
  assert error.startswith("error: ") and "in use by another trainer" in error and f"pid {proc.pid}" in error
  assert (workdir / "config.json").read_text() == config_before  # B wrote nothing
  assert proc.poll() is None  # A goes on
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
  assert len(steps) == 1 and steps[0] >= 1
  stopped = steps[0]
  assert metrics(workdir)[-1]["step"] == stopped
  # The same workdir resumes from that checkpoint and finishes two steps later, compiling nothing new.
  entries = sorted(p.name for p in cache.iterdir())
  resumed = run_trainer(env, workdir, demo_assets, flag, f"--config.steps={stopped + 2}", "--config.log_every=1",
                        "--config.sample_every=0")
  assert sorted(p.name for p in cache.iterdir()) == entries
  assert "compiled the train step in" in resumed.stderr
  assert [m["step"] for m in metrics(workdir)][-2:] == [stopped + 1, stopped + 2]
  assert (workdir / UNET_WEIGHTS).exists()


def test_resume_with_empty_prompts_label_noise_and_eval_is_bit_identical(demo_assets, trainer_env, tmp_path):
  """Per-pair empty prompts and label flips come from the step's key: a run resumed from step 4 retakes
  steps 5 and 6 exactly (weights and logged values), held-out evaluation included. Two short runs: the
  second resumes the first's workdir after its last checkpoint is removed."""
  args = ("--config.data.empty_prompt_prob=0.2", "--config.data.label_noise_prob=0.1", "--config.data.time_ids=fixed",
          "--config.data.eval_pairs=8", "--config.steps=6", "--config.log_every=1", "--config.checkpoint_every=2",
          "--config.keep_checkpoints=3", "--config.sample_every=0")
  run_trainer(trainer_env(), tmp_path, demo_assets, *args)
  first, want = metrics(tmp_path), load_file(tmp_path / UNET_WEIGHTS)
  assert all(0 <= m["eval_accuracy"] <= 1 and np.isfinite(m["eval_loss"]) for m in first)
  assert len({m["eval_loss"] for m in first}) > 1  # the parameters move; the held-out noise does not
  assert {"empty_prompt_fraction", "label_flip_fraction"} <= first[0].keys()
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  run_trainer(trainer_env(), tmp_path, demo_assets, *args)  # resumes from step 4
  got = load_file(tmp_path / UNET_WEIGHTS)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  again = metrics(tmp_path)
  assert [m["step"] for m in again] == [1, 2, 3, 4, 5, 6]
  keys = ("loss", "accuracy", "eval_loss", "eval_accuracy", "empty_prompt_fraction", "label_flip_fraction")
  for old, new in zip(first[4:], again[4:]):
    assert {k: new[k] for k in keys} == {k: old[k] for k in keys}, old["step"]
