"""Export: `python -m mapo_jax.export` writes a pipeline diffusers loads, whose UNet computes as ours."""
import subprocess
import sys

import numpy as np
from conftest import REPO, rel_l2

from mapo_jax.export import load_checkpoint_denoiser


def test_export_cli_loads_in_diffusers_with_the_same_unet(demo_run, demo_assets, trainer_env, tmp_path):
  import torch
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
  workdir, _ = demo_run
  base = demo_assets / "pipeline"
  for out, extra in ((tmp_path / "pipe", []), (tmp_path / "unet", ["--unet-only"])):
    subprocess.run([sys.executable, "-m", "mapo_jax.export", "--checkpoint", str(workdir), "--step", "40",
                    "--base", str(base), "--out", str(out), "--dtype", "fp32", *extra],
                   cwd=REPO, env=trainer_env(), check=True, capture_output=True, text=True, timeout=300)
  pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")
  bare = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
  ours, step = load_checkpoint_denoiser(workdir, base, 40)  # not the last step
  assert step == 40
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 700], np.int32)
  ctx = rng.standard_normal((2, 77, 24)).astype(np.float32)
  pooled = rng.standard_normal((2, 16)).astype(np.float32)
  time_ids = np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (2, 1))
  want = np.asarray(ours(x, t, ctx, text_embeds=pooled, time_ids=time_ids))
  with torch.no_grad():
    for unet in (pipe.unet, bare):
      got = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                 added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
                 ).sample.permute(0, 2, 3, 1).numpy()
      assert rel_l2(got, want) < 1e-4
  # The trained weights differ from the base's: the export is really the checkpoint.
  base_unet = UNet2DConditionModel.from_pretrained(base / "unet")
  assert not torch.equal(base_unet.conv_in.weight, pipe.unet.conv_in.weight)
