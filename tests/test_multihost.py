"""Multi-host on CPU: two processes x 2 devices (jax.distributed, gloo collectives) train and draw sample
grids as one process with 4 devices does; and the faults of a pod end in one consistent, resumable workdir:
- a preemption notice (SIGTERM) reaching the two processes at different times makes both save the same step,
  and the resumed run equals an uninterrupted one bit for bit;
- a process killed (kill -9) makes the other exit non-zero within config.peer_timeout_s, naming it, with no
  half-written checkpoint taken for a good one; restarting both resumes from the last complete checkpoint and
  equals an uninterrupted run bit for bit.
The interrupted runs are started for 100000 steps and resumed for STEPS: the schedule (linear warm-up) and
every other setting are the same, so the program is the uninterrupted run's."""
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CACHE_FLAG, REPO, rel_l2, run_trainer
from PIL import Image
from safetensors.numpy import load_file

STEPS = 10
ARGS = ["--config.judge=", "--config.log_every=1", "--config.sample_every=0", "--config.checkpoint_every=2",
        "--config.peer_timeout_s=10"]
WEIGHTS = "export/unet/diffusion_pytorch_model.safetensors"


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_two(env, workdir, assets, *args):
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "mapo_jax.train", "--config", f"{REPO}/configs/demo.py", "--workdir", str(workdir),
       f"--config.demo_assets={assets}", CACHE_FLAG, f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}", *ARGS, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]


def run_two(env, workdir, assets, *args):
  procs = start_two(env, workdir, assets, *args)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]


def metrics(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(procs, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while not (metrics(workdir) and metrics(workdir)[-1]["step"] >= step):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].communicate()[1][-3000:]
    time.sleep(0.1)


def assert_same_weights(a, b, exact=True):
  want, got = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
  assert want.keys() == got.keys()
  for k in want:
    if exact:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    else:
      assert rel_l2(got[k], want[k]) <= 1e-5, k


@pytest.fixture(scope="module")
def env(trainer_env):
  return trainer_env(devices=2, fast_compile=True)


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_two(env, workdir, demo_assets, f"--config.steps={STEPS}", f"--config.sample_every={STEPS}")
  return workdir


def test_two_processes_match_one_process(demo_assets, trainer_env, uninterrupted, tmp_path):
  single = tmp_path / "single"
  run_trainer(trainer_env(devices=4, fast_compile=True), single, demo_assets, *ARGS, f"--config.steps={STEPS}",
              f"--config.sample_every={STEPS}")
  want = {m["step"]: m["loss"] for m in metrics(single)}
  got = {m["step"]: m["loss"] for m in metrics(uninterrupted)}
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in want:
    assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), step
  assert_same_weights(single, uninterrupted, exact=False)
  # The same grid: at the last step both sample on the global mesh and process 0 writes it. The parameters
  # differ by float32 rounding of the gradient reductions, which can move a pixel across a uint8 edge.
  grid_a, grid_b = (np.asarray(Image.open(w / f"samples/step_{STEPS:06d}.png"), np.int16) for w in (single, uninterrupted))
  assert grid_a.shape == grid_b.shape and np.abs(grid_a - grid_b).max() <= 1
  assert np.mean(grid_a != grid_b) < 1e-3


def test_a_preemption_notice_then_a_dead_process_and_both_resume_exactly(demo_assets, env, uninterrupted, tmp_path):
  """One workdir through both faults of a pod, then finished: (1) SIGTERM reaches the two processes 0.5 s apart
  (as a maintenance event's notice does): both save the same step and exit 0; (2) restarted, worker 1 is killed
  (kill -9): worker 0 exits non-zero within config.peer_timeout_s, naming it, and no half-written checkpoint is
  taken for a good one; (3) restarted again, the run finishes and equals the uninterrupted one bit for bit."""
  procs = start_two(env, tmp_path, demo_assets, "--config.steps=100000", "--config.checkpoint_every=100000")
  wait_for_step(procs, tmp_path, 2)
  procs[0].send_signal(signal.SIGTERM)
  time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < STEPS - 2  # one step, the same for both processes
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]

  procs = start_two(env, tmp_path, demo_assets, "--config.steps=100000")  # resumes, checkpoints every 2 steps
  wait_for_step(procs, tmp_path, saved[0] + 1)
  procs[1].kill()  # a crashed or preempted host
  killed_at = time.time()
  _, err = procs[0].communicate(timeout=10 + 120)
  assert procs[0].returncode != 0 and time.time() - killed_at < 10 + 60
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert lines and "process 1 of 2 stopped answering" in lines[-1] and "config.peer_timeout_s=10" in lines[-1]
  complete = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert complete[-1] >= saved[0] and complete[-1] < STEPS

  run_two(env, tmp_path, demo_assets, f"--config.steps={STEPS}")  # from the newest complete checkpoint
  steps = [m["step"] for m in metrics(tmp_path)]
  assert steps == list(range(1, STEPS + 1))  # every step once: the resumes dropped the steps they retook
  assert_same_weights(uninterrupted, tmp_path)
