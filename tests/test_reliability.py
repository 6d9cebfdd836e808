"""Faults and misuse: one trainer per workdir, corrupt checkpoints skipped, failed saves stop the run,
diverged runs export nothing, clear errors before anything loads, and resumes that keep their history."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from conftest import CACHE_FLAG, REPO, run_trainer
from test_checkpoint import sharded_state

from mapo_jax.toy import demo
from mapo_jax.run.checkpoint import CORRUPT, Checkpointer, NoGoodCheckpointError, abstract_like
from mapo_jax.run.metrics import MetricsWriter
from mapo_jax.run.workdir import WorkdirBusyError, WorkdirLock, remove_stale_temporaries


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# --- one trainer per workdir -----------------------------------------------------------------------

def test_a_second_trainer_on_a_workdir_exits_at_once_naming_the_holder(demo_assets, trainer_env, tmp_path):
  lock = WorkdirLock(tmp_path)
  lock.acquire()  # this test process plays the first trainer
  try:
    proc = run_trainer(trainer_env(), tmp_path, demo_assets, check=False, timeout=120)
  finally:
    lock.release()
  assert proc.returncode == 1
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("error: ") and f"pid {os.getpid()}" in error and "in use by another trainer" in error
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
  (tmp_path / ".lock").write_text(f"host somewhere pid {dead_pid()}\n")  # a killed trainer's lock file
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
    WorkdirLock(tmp_path).acquire()  # a second open file description: as another process would
  lock.release()
  WorkdirLock(tmp_path).acquire()


# --- checkpoints --------------------------------------------------------------------------------------

def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_previous_one_restores(tmp_path):
  state, shardings = sharded_state((1, 1, 1), seed=0)
  checkpointer = Checkpointer(tmp_path, keep=3)
  for step in (1, 2):
    checkpointer.save(step, state.replace(step=jax.numpy.int32(step)))
    checkpointer.wait()
  data = max((p for p in (tmp_path / "2" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated, as by a full disk or a bad copy
  restored = checkpointer.restore_latest(abstract_like(state, shardings))
  assert int(restored.step) == 1
  assert (tmp_path / CORRUPT / "2").is_dir() and not (tmp_path / "2").exists()  # kept, never deleted
  assert checkpointer.all_steps() == [1]
  # With every checkpoint bad, a clear error.
  data = max((p for p in (tmp_path / "1" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(b"")
  with pytest.raises(NoGoodCheckpointError, match="step 1"):
    checkpointer.restore_latest(abstract_like(state, shardings))
  checkpointer.close()


FULL_DISK = textwrap.dedent("""
    import resource, sys
    import jax
    import jax.numpy as jnp
    from mapo_jax.run.checkpoint import CheckpointSaveError, Checkpointer
    from mapo_jax.training.train_step import TrainState
    def state(value):  # random values: constant arrays would compress to nothing
      w = jax.random.normal(jax.random.key(value), (1_000_000,)).at[-1].set(value)
      return TrainState(step=jnp.int32(value), params={"w": [w]}, opt_state=(), rng=jnp.zeros(2, jnp.uint32),
                        skipped=jnp.int32(0))
    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, state(1))
    checkpointer.wait()
    # From here on no file may grow past 64 KiB, as on a full disk (Python ignores SIGXFSZ: writes fail EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    try:
      checkpointer.save(2, state(2))
      checkpointer.wait()
    except CheckpointSaveError as e:
      print("CheckpointSaveError:", e)
""")


def test_a_failed_save_raises_and_leaves_the_previous_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "CheckpointSaveError: saving the" in proc.stdout and "File too large" in proc.stdout
  checkpointer = Checkpointer(tmp_path)
  assert checkpointer.all_steps() == [1]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpointer.restore_params(1, {"w": [jax.ShapeDtypeStruct((1_000_000,), np.float32, sharding=device)]})
  assert float(params["w"][0][-1]) == 1.0
  checkpointer.close()


def test_the_trainer_stops_at_once_when_a_save_fails(demo_run, demo_assets, trainer_env, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(demo_run[0], workdir)
  steps = lambda: {p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
  before = steps()
  cmd = [sys.executable, "-m", "mapo_jax.train", "--config", f"{REPO}/configs/demo.py", "--workdir", str(workdir),
         f"--config.demo_assets={demo_assets}", CACHE_FLAG, "--config.steps=80", "--config.sample_every=0",
         "--config.judge="]
  # No file may grow past 64 KiB, as on a full disk: `ulimit -f` (Python ignores SIGXFSZ, writes fail EFBIG).
  proc = subprocess.run(["bash", "-c", 'ulimit -f 64 && exec "$@"', "bash", *cmd], env=trainer_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  error = proc.stderr.strip().splitlines()[-1]
  assert "error: saving the last checkpoint to" in error and "File too large" in error
  assert "Traceback" not in proc.stderr
  # 40 and 60 untouched; the failed save's temporary folder is never renamed into a checkpoint (orbax
  # removes it at the next start).
  assert steps() == before
  assert Checkpointer(workdir / "checkpoints").latest_step() == 60


# --- divergence and sampling crashes --------------------------------------------------------------------

STALL = """
import os, pathlib, time
_rename, _replace = os.rename, os.replace
def _stall(original):
  def call(src, dst, *args, **kwargs):  # the commit of one checkpoint step never returns, as on a hung mount
    if pathlib.Path(dst).name == os.environ["STALL_STEP"] and "orbax-checkpoint-tmp" in str(src):
      time.sleep(3600)
    return original(src, dst, *args, **kwargs)
  return call
os.rename, os.replace = _stall(_rename), _stall(_replace)
"""


def test_a_stalled_save_stops_the_run_within_the_save_timeout(demo_assets, trainer_env, tmp_path):
  """The workdir stops answering during the save of step 4 (a test-side hook in the trainer process: the
  commit's rename never returns, as on a hung GCS-FUSE or NFS mount). The run stops with one line naming the
  path within config.save_timeout_s of the save's start, and step 2 stays the intact newest checkpoint."""
  hook = tmp_path / "hook"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(STALL)
  env = trainer_env(STALL_STEP="4")
  env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
  workdir = tmp_path / "run"
  start = time.time()
  proc = run_trainer(env, workdir, demo_assets, "--config.steps=8", "--config.checkpoint_every=2",
                     "--config.save_timeout_s=5", "--config.sample_every=0", check=False, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("error: saving step 4 to ") and str(workdir / "checkpoints") in error
  assert "config.save_timeout_s=5" in error and "newest: step 2" in error
  assert time.time() - start < 240
  checkpointer = Checkpointer(workdir / "checkpoints")
  assert checkpointer.latest_step() == 2 and checkpointer.all_steps() == [2]
  checkpointer.close()
  resumed = run_trainer(trainer_env(), workdir, demo_assets, "--config.steps=3", "--config.sample_every=0")
  assert "compiled the train step" in resumed.stderr  # step 2 restored and trained on


def test_a_diverged_run_stops_with_an_error_and_exports_nothing(demo_assets, trainer_env, tmp_path):
  proc = run_trainer(trainer_env(), tmp_path, demo_assets, "--config.optim.lr=1e6", "--config.sample_every=0",
                     "--config.log_every=1", check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "the run diverged" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "export").exists() and "done:" not in proc.stdout
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # More than 10 % of the (at most 100) steps so far skipped: stopped as soon as a check saw 11.
  assert logged[-1]["skipped_steps"] == 11 and logged[-1]["step"] < 30


def test_a_crash_while_sampling_keeps_that_steps_checkpoint(demo_assets, trainer_env, tmp_path):
  (tmp_path / "samples").write_text("a file where the sample folder should be")  # saving the grid fails
  proc = run_trainer(trainer_env(), tmp_path, demo_assets, "--config.sample_every=10", "--config.checkpoint_every=10",
                     check=False)
  assert proc.returncode != 0
  assert "compiled the train step in" in proc.stderr
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 10  # saved before the grid was drawn


# --- configuration and command-line errors, before anything loads ----------------------------------------

def test_resuming_with_another_objective_is_refused_unless_allowed(demo_run, demo_assets, trainer_env, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(demo_run[0], workdir)
  proc = run_trainer(trainer_env(), workdir, demo_assets, "--config.objective=dpo", check=False, timeout=120)
  assert proc.returncode == 1
  error = proc.stderr.strip().splitlines()[-1]
  assert "config.objective: 'mapo' -> 'dpo'" in error and "--allow-config-change" in error
  assert json.loads((workdir / "config.json").read_text())["objective"] == "mapo"  # not overwritten
  assert sorted(p.name for p in workdir.glob("config.*.json")) == ["config.0.json"]


@pytest.mark.parametrize("args,message", [
    (["--config.optim.learning_rat=1"], "config.optim.learning_rat: unknown key; did you mean config.optim."),
    (["--config.nonexistent=1"], "config.nonexistent: unknown key"),
    (["--config.sample_prompts=()", "--config.sample_every=5"], "config.sample_prompts: is empty"),
    (["--config.judge=toy"], "config.judge: 'toy' is not one of ('toy_world',)"),
    (["--config.judge=toy_world", "--config.judge_prompts=()"], "config.judge_prompts: is empty"),
])
def test_config_errors_are_one_line_before_anything_loads(args, message, demo_assets, trainer_env, tmp_path):
  proc = run_trainer(trainer_env(), tmp_path, demo_assets, *args, check=False, timeout=60)
  assert proc.returncode in (1, 2) and message in proc.stderr.strip().splitlines()[-1]
  assert "Traceback" not in proc.stderr


def test_command_line_usage_errors_and_help(trainer_env, tmp_path):
  train = [sys.executable, "-m", "mapo_jax.train"]
  run = lambda *a: subprocess.run([*train, *a], env=trainer_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
  missing = run("--workdir", str(tmp_path))
  assert missing.returncode == 2 and "--config is required" in missing.stderr
  absent = run("--config", "configs/nope.py", "--workdir", str(tmp_path))
  assert absent.returncode == 2 and "configs/nope.py: no such file" in absent.stderr
  assert len(absent.stderr.strip().splitlines()) == 1
  help_ = run("--help")
  assert help_.returncode == 0 and "config.optim.lr = 1e-05" in help_.stdout and "--print-config" in help_.stdout
  printed = run("--config", "configs/demo.py", "--print-config")
  assert printed.returncode == 0 and "config.resolution = 32" in printed.stdout


def test_encode_and_generate_reject_bad_sizes_before_writing(demo_assets, trainer_env, tmp_path):
  for resolution, message in (("63", "must be a positive multiple of"), ("0", "must be a positive multiple of")):
    out = tmp_path / f"cache{resolution}"
    proc = subprocess.run([sys.executable, "-m", "mapo_jax.encode", "--pipeline", str(demo_assets / "pipeline"),
                           "--data", str(demo_assets / "pairs.parquet"), "--out", str(out), "--resolution", resolution],
                          env=trainer_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "--resolution" in proc.stderr
    assert not out.exists()
  proc = subprocess.run([sys.executable, "-m", "mapo_jax.generate", "--model", str(demo_assets / "pipeline"),
                         "--prompt", "a red circle", "--out", str(tmp_path / "gen"), "--steps", "0"],
                        env=trainer_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "--steps" in proc.stderr and "must be >= 1" in proc.stderr


# --- smaller ones ---------------------------------------------------------------------------------------

def test_metrics_drop_steps_a_resume_repeats_and_write_strict_json(tmp_path):
  writer = MetricsWriter(tmp_path, first_step=0, enabled=True)
  for step in (5, 10, 15):
    writer.write(step, {"loss": float("nan") if step == 15 else 1.0 / step})
  writer.close()
  writer = MetricsWriter(tmp_path, first_step=10, enabled=True)  # resumed from the checkpoint of step 10
  writer.write(15, {"loss": float("inf")})
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) for line in lines]
  assert [m["step"] for m in parsed] == [5, 10, 15] and parsed[-1]["loss"] is None


def test_two_builders_of_one_demo_part_both_succeed(tmp_path):
  final = tmp_path / "pipeline"

  def write(tmp):  # while this process writes, another one finishes the same part first
    tmp.mkdir()
    (tmp / "mine").write_text("1")
    final.mkdir()
    (final / "theirs").write_text("1")

  demo._build(final, write)
  assert [p.name for p in final.iterdir()] == ["theirs"] and [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_temporaries_of_killed_processes_are_removed(tmp_path):
  stale, live = tmp_path / f".cache.tmp-{dead_pid()}", tmp_path / f".export.tmp-{os.getpid()}"
  stale.mkdir()
  live.mkdir()
  remove_stale_temporaries(tmp_path)
  assert not stale.exists() and live.exists()
