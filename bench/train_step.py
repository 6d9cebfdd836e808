"""Times one jitted training step (random weights and data) and, optionally, the PyTorch reference.

  python bench/train_step.py --config tiny --res 64 --batch 2 --steps 3                 # CPU, seconds
  python bench/train_step.py --config sdxl --res 1024 --batch 8 --dtype bfloat16 \\
      --torch-reference PATH/torch_reference.py                                        # one GPU

Prints one JSON line per implementation (and a ratio line): impl, config, objective, res, pairs_per_step,
step_s (median), pairs_per_s, model_tflops_per_s (fwd+bwd = 3x forward FLOPs per latent, counted by
XLA, + 1x for the reference forward), peak_mem_gib, compile_s.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import diffusion, sharding
from mapo_jax.training import objectives
from mapo_jax.training import optim
from mapo_jax.models import init_unet, presets
from mapo_jax.models.layers import Options
from mapo_jax.pipelines import sd
from mapo_jax.training.train_step import (Frozen, StepConfig, create_sharded_state, jit_train_step, make_train_step,
                                          step_compiler_options)

CONFIGS = {"sdxl": presets.SDXL_BASE_UNET, "sd15": presets.SD15_UNET, "tiny": presets.BENCH_TINY_UNET}
SCHEDULE = diffusion.NoiseSchedule.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                    beta_schedule="scaled_linear"))


def random_batch(unet_cfg, pairs, res, seed=0):
  rng = np.random.default_rng(seed)
  h = res // 8
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  batch = dict(moments_w=f(pairs, h, h, 8), moments_l=f(pairs, h, h, 8), rpo_emb=f(pairs, 64),
               prompt_embeds=f(pairs, 77, unet_cfg["cross_attention_dim"]))
  if unet_cfg.get("addition_embed_type") == "text_time":
    pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
    batch["pooled_prompt_embeds"] = f(pairs, pooled)
    batch["time_ids"] = np.tile(np.array([[res, res, 0, 0, res, res]], np.float32), (pairs, 1))
  return batch


def forward_flops(graphdef, params, batch):
  """XLA's FLOP count of one UNet forward on one latent."""
  one = {k: v[:1] for k, v in batch.items()}
  def fwd(p):
    return sd.denoise(nnx.merge(graphdef, p), one["moments_w"][..., :4], jnp.zeros((1,), jnp.int32), one)
  cost = jax.jit(fwd).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def run_jax(a):
  unet_cfg = CONFIGS[a.config]
  dtype = jnp.dtype(a.dtype)
  options = Options(dtype=dtype, attention=a.attention, remat=a.remat)
  mesh = sharding.make_mesh((-1, 1, 1))
  opt_cfg = optim.default_config()
  tx = optim.make_optimizer(opt_cfg)
  graphdef, state, state_sh, frozen, frozen_sh = create_sharded_state(
      init_unet(unet_cfg, options=options, seed=0), tx, mesh, 0)
  objective = objectives.get_objective(a.objective)
  ref_graphdef = ref = ref_sh = None
  if objective.needs_reference:
    ref_unet = init_unet(unet_cfg, options=Options(dtype=dtype, param_dtype=jnp.bfloat16,
                                                   attention=a.attention), seed=1)
    ref_graphdef = nnx.graphdef(ref_unet)
    ref, ref_sh = sharding.place(ref_unet, mesh)
  frozen, frozen_sh = Frozen(policy=frozen, reference=ref), Frozen(policy=frozen_sh, reference=ref_sh)
  cfg = StepConfig(objective=a.objective, hparams=objective.hparams(num_timesteps=SCHEDULE.num_train_timesteps),
                   latents=sd.Latents(scale=0.13025), accum_steps=a.accum,
                   reference_param_dtype="bfloat16" if objective.needs_reference else None)
  step = jit_train_step(make_train_step(sd.denoise, graphdef, ref_graphdef, tx, SCHEDULE, cfg, mesh),
                        state_sh, mesh, frozen_sh, step_compiler_options(cfg, mesh))
  batch = sharding.global_batch(random_batch(unet_cfg, a.batch, a.res), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  fwd = forward_flops(graphdef, state.params, batch)
  for _ in range(a.warmup):
    state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    float(metrics["loss"])  # one host sync per step, as the reference does
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  latents = (2 if a.objective != "sft" else 1) * a.batch
  flop = fwd * latents * (3 + (1 if objective.needs_reference else 0))
  return dict(impl="jax", jax=jax.__version__, device=jax.devices()[0].device_kind, config=a.config,
              objective=a.objective, res=a.res, pairs_per_step=a.batch, accum=a.accum, dtype=a.dtype,
              attention=a.attention or "default", remat=a.remat, step_s=round(med, 4),
              step_s_min=round(min(times), 4), pairs_per_s=round(a.batch / med, 3),
              model_tflops_per_s=round(flop / med / 1e12, 2),
              peak_mem_gib=round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
              compile_s=round(compile_s, 1), loss=float(metrics["loss"]))


def run_torch(a):
  cmd = [sys.executable, a.torch_reference, "--config", a.config, "--res", str(a.res), "--batch", str(a.batch),
         "--steps", str(a.steps), "--warmup", str(a.warmup), "--objective", a.objective]
  if a.remat == "none":
    cmd.append("--no-remat")
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
  p.add_argument("--res", type=int, default=64)
  p.add_argument("--batch", type=int, default=2, help="preference pairs per step")
  p.add_argument("--accum", type=int, default=1)
  p.add_argument("--objective", choices=sorted(objectives.OBJECTIVES), default="mapo")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention", default=None, help="einsum | xla | cudnn | pallas (default: per backend)")
  p.add_argument("--remat", default="none", help="none | full | save_dots | save_dots_no_batch | offload_dots")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--torch-reference", default=None, help="path to torch_reference.py: run it too, same flags")
  a = p.parse_args()
  ours = run_jax(a)
  print(json.dumps(ours), flush=True)
  if a.torch_reference:
    if a.config == "sd15" or a.objective in ("rpo", "sft"):
      sys.exit("the PyTorch reference covers --config sdxl/tiny and --objective mapo/dpo only")
    ref = run_torch(a)
    print(json.dumps(ref))
    print(json.dumps({"ratio_pairs_per_s_jax_over_torch": round(ours["pairs_per_s"] / ref["pairs_per_s"], 3)}))


if __name__ == "__main__":
  main()
