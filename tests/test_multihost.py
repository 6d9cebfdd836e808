"""Multi-host on CPU: two processes x 2 devices (jax.distributed, gloo collectives) train, checkpoint,
resume and draw sample grids as one process with 4 devices does."""
import json
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO, rel_l2, run_trainer
from PIL import Image
from safetensors.numpy import load_file

ARGS = ["--config.judge=", "--config.steps=4", "--config.log_every=1", "--config.sample_every=0", "--config.checkpoint_every=2"]


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(env, workdir, assets, *args):
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mapo_jax.train", "--config", f"{REPO}/configs/demo.py", "--workdir", str(workdir),
       f"--config.demo_assets={assets}", f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}", *ARGS, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]


def losses(workdir):
  return {m["step"]: m["loss"] for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_two_processes_match_one_process_and_resume(demo_assets, trainer_env, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  run_trainer(trainer_env(devices=4, fast_compile=True), single, demo_assets, *ARGS, "--config.sample_every=4")
  run_two_processes(trainer_env(devices=2, fast_compile=True), multi, demo_assets, "--stop-after-step=2")
  assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2"]
  # Both processes restore step 2; at step 4 both sample on the global mesh and process 0 writes the grid.
  run_two_processes(trainer_env(devices=2, fast_compile=True), multi, demo_assets, "--config.sample_every=4")
  want, got = losses(single), losses(multi)
  assert sorted(got) == [1, 2, 3, 4]
  for step in want:
    assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), step
  a = load_file(single / "export/unet/diffusion_pytorch_model.safetensors")
  b = load_file(multi / "export/unet/diffusion_pytorch_model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    assert rel_l2(b[k], a[k]) <= 1e-5, k
  # The same grid: the sampler's work is split the same way; only the parameters differ, by float32
  # rounding of the gradient reductions (above), which can move a pixel across a uint8 rounding edge.
  grid_a, grid_b = (np.asarray(Image.open(w / "samples/step_000004.png"), np.int16) for w in (single, multi))
  assert grid_a.shape == grid_b.shape and np.abs(grid_a - grid_b).max() <= 1
  assert np.mean(grid_a != grid_b) < 1e-3
