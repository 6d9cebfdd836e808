"""Ahead-of-time compiles for TPU slices on this CPU host (mapo_jax/aot.py) and the slice table (mapo_jax/training/tpu.py).

Two compiles in all (about a minute each): MaPO on a v5e 2x2 slice through the CLI, DPO on a v5p 2x2x1 slice
through `aot.run`. Both use the micro SDXL-layout UNet at 256 px: its one attention level sits after one
downsample, at 256/8/2 = 16 x 16 = 256 tokens, two 128-token blocks of the splash kernel.
"""
import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx

from mapo_jax import aot, sharding
from mapo_jax.training import tpu
from mapo_jax.models.presets import MICRO_SDXL_UNET, SD15_UNET, SDXL_BASE_UNET
from mapo_jax.pipelines import sd

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install 'jax[tpu]'; the test extra installs it)")
GIB = 1024**3


# --- The slice table (no compile) ---------------------------------------------------------------------

@pytest.mark.parametrize("name, topology, chips, host_bounds, hosts, hbm_gib", [
    ("v5p-8", "v5p:2x2x1", 4, (2, 2, 1), 1, 95),
    ("v5p-16", "v5p:2x2x2", 8, (2, 2, 1), 2, 95),
    ("v5p-64", "v5p:2x4x4", 32, (2, 2, 1), 8, 95),
    ("v5p-128", "v5p:4x4x4", 64, (2, 2, 1), 16, 95),
    ("v4-8", "v4:2x2x1", 4, (2, 2, 1), 1, 32),
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1), 4, 32),
    ("v5litepod-1", "v5e:1x1", 1, (1, 1, 1), 1, 16),
    ("v5litepod-4", "v5e:2x2", 4, (2, 2, 1), 1, 16),
    ("v5litepod-8", "v5e:2x4", 8, (2, 4, 1), 1, 16),
    ("v5litepod-16", "v5e:4x4", 16, (2, 2, 1), 4, 16),
    ("v5e-16", "v5e:4x4", 16, (2, 2, 1), 4, 16),
    ("v5litepod-256", "v5e:16x16", 256, (2, 2, 1), 64, 16),
    ("v6e-8", "v6e:2x4", 8, (2, 4, 1), 1, 32),
    ("v6e-32", "v6e:4x8", 32, (2, 2, 1), 8, 32),
    ("v6e-128", "v6e:8x16", 128, (2, 2, 1), 32, 32),
    ("v5e:2x2", "v5e:2x2", 4, (2, 2, 1), 1, 16),
    ("v5p:2x2x1", "v5p:2x2x1", 4, (2, 2, 1), 1, 95),
    ("V5E:4x4", "v5e:4x4", 16, (2, 2, 1), 4, 16),
])
def test_slice_names(name, topology, chips, host_bounds, hosts, hbm_gib):
  slc = tpu.parse(name)
  assert (slc.topology, slc.chips, slc.host_bounds, slc.hosts) == (topology, chips, host_bounds, hosts)
  assert slc.hbm_bytes == hbm_gib * GIB


@pytest.mark.parametrize("name, match", [
    ("v7x-8", "v4 .*v5e .*v5p .*v6e"),  # unknown generations name the known ones
    ("tpu-8", "not one of"),
    ("v5p-7", "TensorCores, 2 per chip"),
    ("v5p-6", "power of two"),
    ("v5p-4", "start at 4 chips"),
    ("v5e:2x2x2", "2 dimensions"),
    ("v5p", "GENERATION-N"),
])
def test_bad_slice_names(name, match):
  with pytest.raises(ValueError, match=match):
    tpu.parse(name)


# --- Pieces of the CLI (no compile) --------------------------------------------------------------------

def test_missing_hbm_reads_the_compilers_messages():
  # libtpu 0.0.42 (jax 0.10.2), seen on this host:
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(27.97G) exceeds available HBM (15.75G).")
  assert aot.missing_hbm(message) == pytest.approx(12.22 * GIB, rel=1e-6)
  assert aot.missing_hbm("Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == 4.75 * GIB
  assert aot.missing_hbm("RESOURCE_EXHAUSTED: something else") is None


def fake_report(size, fits):
  required = {f.name: 0 for f in dataclasses.fields(aot.Report) if f.default is dataclasses.MISSING}
  return aot.Report(**dict(required, global_batch_size=size), fits=fits,
                    error=None if fits else "RESOURCE_EXHAUSTED: ...")


def test_max_batch_search_doubles_then_bisects():
  probed = []

  def probe(size):  # fits up to 56 pairs
    probed.append(size)
    return fake_report(size, size <= 56)

  best, failed = aot.search_max_batch(probe, unit=8)
  assert best.global_batch_size == 56 and failed.global_batch_size == 64
  assert probed == [8, 16, 32, 64, 48, 56]  # doubling to the first failure, then bisection between 32 and 64
  best, failed = aot.search_max_batch(lambda size: fake_report(size, False), unit=8)
  assert best is None and failed.global_batch_size == 8


def test_max_batch_search_starts_at_the_configs_batch_and_aims_at_the_hbm():
  # A step's peak is close to linear in its batch: here 10 GiB plus 3 GiB per 8 pairs on 95 GiB, so 28 x 8
  # fits (94 GiB) and 29 x 8 does not (97 GiB).
  probed = []

  def probe(size):
    probed.append(size)
    peak, hbm = (10 + 3 * size // 8) * GIB, 95 * GIB
    r = fake_report(size, peak <= hbm)
    r.hbm_bytes, r.peak_bytes = hbm, peak
    r.missing_bytes = None if r.fits else peak - hbm
    return r

  best, failed = aot.search_max_batch(probe, unit=8, start=16)
  assert (best.global_batch_size, failed.global_batch_size) == (224, 232)
  # 16 and 32 bracket it (58 and 106 GiB); the line through them meets 95 GiB at 28.3: 28 fits, 29 does not
  assert probed == [128, 256, 224, 232]
  probed.clear()
  best, failed = aot.search_max_batch(probe, unit=8, start=64)  # from above: halving to the first fit
  assert (best.global_batch_size, failed.global_batch_size) == (224, 232)
  assert probed[:3] == [512, 256, 128] and probed[3:] == [224, 232]
  # only the compiler's shortfall is known for a failed probe (no peak): the same line
  probed.clear()

  def short(size):
    r = probe(size)
    if not r.fits:
      r.peak_bytes = None
    return r

  best, failed = aot.search_max_batch(short, unit=8, start=16)
  assert best.global_batch_size == 224 and probed == [128, 256, 224, 232]


def test_abstract_batch_matches_the_sdxl_and_sd15_caches():
  mesh = sharding.make_mesh((1, -1, 1), jax.devices()[:4])
  batch = sd.abstract_batch(SDXL_BASE_UNET, 1024, 8, mesh)
  assert {k: v.shape for k, v in batch.items()} == dict(
      moments_w=(8, 128, 128, 8), moments_l=(8, 128, 128, 8), prompt_embeds=(8, 77, 2048),
      pooled_prompt_embeds=(8, 1280), time_ids=(8, 6), rpo_emb=(8, 1280))
  assert all(v.dtype == np.float32 and v.sharding == sharding.batch_sharding(mesh) for v in batch.values())
  batch = sd.abstract_batch(SD15_UNET, 512, 8, mesh, rpo_embedding="mean")
  assert batch["prompt_embeds"].shape == (8, 77, 768) and batch["pooled_prompt_embeds"].shape == (8, 768)
  assert sd.preset_latents(SDXL_BASE_UNET).scale == 0.13025 and sd.preset_latents(SD15_UNET).scale == 0.18215


def test_a_pipeline_folder_gives_its_own_vae_factor(tmp_path):
  """Latents are resolution / 2^(VAE blocks - 1): 8 for the random demo pipeline's four-block VAE, 4 with
  three blocks (the toy world's)."""
  from mapo_jax.toy import demo
  from mapo_jax.config import base_config
  mesh = sharding.make_mesh((1, -1, 1), jax.devices()[:4])
  pipeline = tmp_path / "pipeline"
  demo.write_pipeline(pipeline)
  original = json.loads((pipeline / "vae" / "config.json").read_text())
  for blocks, factor in ((4, 8), (3, 4)):
    vae = dict(original)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
      vae[key] = vae[key][:blocks]
    (pipeline / "vae" / "config.json").write_text(json.dumps(vae))
    model = aot.resolve_model(str(pipeline), base_config(), None)
    assert model.vae_downsample == factor
    batch = model.family.abstract_batch(model.denoiser_config, 64, 4, mesh, vae_downsample=model.vae_downsample)
    assert batch["moments_w"].shape == (4, 64 // factor, 64 // factor, 8)


def test_model_defaults_to_the_config_file_name_and_asks_otherwise():
  from mapo_jax.config import base_config
  config = base_config()
  assert aot.resolve_model(None, config, "configs/sdxl_mapo.py").denoiser_config == SDXL_BASE_UNET
  assert aot.resolve_model(None, config, "configs/sd15_dpo.py").latents.scale == 0.18215
  with pytest.raises(ValueError, match="pass --architecture"):
    aot.resolve_model(None, config, "configs/demo.py")
  with pytest.raises(ValueError, match="neither a folder nor a preset"):
    aot.resolve_model("/no/such/pipeline", config, None)


# --- Compiles ------------------------------------------------------------------------------------------

def expected_shard_bytes(unet_config, mesh_shape, dtype_bytes):
  """Per-chip bytes of a UNet's parameters by the logical-axis rules, worked out here from shapes and axes:
  a dimension is divided by its mesh axis's size when that size divides it and no earlier dimension of
  the parameter took the axis."""
  model = sd.abstract_denoiser(unet_config)
  total = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size, used = 1, set()
    for dim, name in zip(var.get_value().shape, var.get_metadata()["axes"]):
      axis = sharding.LOGICAL_RULES.get(name) if name else None
      if axis and axis not in used and dim % mesh_shape[axis] == 0:
        dim //= mesh_shape[axis]
        used.add(axis)
      size *= dim
    total += size * dtype_bytes
  return total


@needs_libtpu
def test_cli_dpo_fits_v5e_2x2_with_the_splash_kernel_and_a_bf16_reference(tmp_path):
  """One TPU compile from the command line (the suite's costliest kind, so one serves every check): DPO, whose
  step holds the most (policy, bf16 reference, Adam), on the demo config at 256 px with the splash kernels."""
  hlo = tmp_path / "step.hlo"
  cmd = [sys.executable, "-m", "mapo_jax.aot", "--config", os.path.join(REPO, "configs/demo.py"),
         "--config.objective=dpo", "--config.ref_param_dtype=bfloat16", "--config.resolution=256",
         "--config.global_batch_size=8", "--architecture", "micro", "--topology", "v5e:2x2", "--dump-hlo", str(hlo)]
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  # The host-memory line, checked against this compile's measured peak: the estimate must not fall short of
  # it (it would then miss compiles that will be killed), nor exceed it by more than a base's worth.
  peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  estimate = float(re.search(r"host memory: the compile needs about (\d+) GiB", proc.stdout)[1])
  if peak_gib > before / 2**20:  # this child set the children's maximum: it is this compile's own peak
    assert peak_gib - 0.5 <= estimate <= peak_gib + aot.HOST_BASE_GIB
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["fits"] and report["error"] is None and "FITS" in proc.stdout
  assert report["attention"] == "pallas"  # the target's kernel, though this host is a CPU
  assert (report["topology"], report["chips"], report["mesh"]) == ("v5e:2x2", 4, dict(data=1, fsdp=4, tensor=1))
  assert report["hbm_bytes"] == 16 * GIB
  params = expected_shard_bytes(MICRO_SDXL_UNET, report["mesh"], 4)  # demo: float32 parameters
  assert report["params_bytes"] == params
  assert 2 * params <= report["opt_state_bytes"] < 2 * params + 1024  # Adam's two moments, plus counters
  assert report["reference_bytes"] == expected_shard_bytes(MICRO_SDXL_UNET, report["mesh"], 2)  # bf16
  assert report["peak_bytes"] == (report["argument_bytes"] + report["temp_bytes"] + report["output_bytes"]
                                  - report["alias_bytes"])
  # 8 pairs, 2 micro-batches (the demo's accumulation), 4 chips: one pair per chip per micro-batch.
  assert report["flops"] > 0 and report["estimated_step_seconds"] > 0 and report["micro_pairs_per_chip"] == 1
  # Model FLOPs: 8 pairs x 2 latents x (forward + backward = 3 forwards) plus DPO's reference forward,
  # against the lowered forward's count. XLA's estimate leaves out the kernels and counts the accumulation
  # loop's body once, so no MFU is made of it, and the report says why.
  assert report["model_flops"] > 0 and report["mfu"] is None
  assert report["estimate_leaves_out"] == list(aot.ESTIMATE_GAPS) and "so no MFU" in proc.stdout
  # The Mosaic kernels: splash forward for the reference and the policy, dq and dkv for the policy's backward.
  assert "tpu_custom_call" in hlo.read_text()


def test_estimate_gaps_finds_loops_in_a_compiled_program():
  """A loop's body is counted once by XLA's cost model: found in the compiled text; a loop-free program has none
  (the Pallas kernel's pattern is checked on a real TPU compile above)."""
  x = jnp.ones((8, 8))
  looped = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, y: jnp.sin(y @ y), x)).lower(x).compile()
  flat = jax.jit(lambda x: jnp.sin(x @ x)).lower(x).compile()
  assert aot.estimate_gaps(looped.as_text()) == ["loops counted once (scan_blocks, accum_steps > 1)"]
  assert aot.estimate_gaps(flat.as_text()) == []


def test_host_memory_warning_names_swap_when_the_host_is_short(monkeypatch):
  """The estimate against a host that cannot hold it: one extra line saying so and how to add swap."""
  target = aot.Target(built=None, mesh=None, slc=None, model=None, attention="xla")
  monkeypatch.setattr(aot, "host_memory_estimate", lambda target, config: 40.0)
  monkeypatch.setattr(aot, "host_memory_available", lambda: (20.0, 0.0))
  lines = []
  aot.check_host_memory(target, None, lines.append)
  assert "about 40 GiB" in lines[0] and "20 GiB available" in lines[0]
  assert len(lines) == 2 and "mkswap /swapfile && swapon /swapfile" in lines[1]
  monkeypatch.setattr(aot, "host_memory_available", lambda: (20.0, 40.0))
  lines.clear()
  aot.check_host_memory(target, None, lines.append)
  assert len(lines) == 1


@needs_libtpu
@pytest.mark.parametrize("preset", ["tiny_flux", "tiny_sd35"])
def test_the_sampling_path_of_a_flow_family_compiles_for_a_slice(preset):
  """`aot --sample`: one denoiser call of a flow-matching family, bf16 weights sharded by the rules, per chip."""
  spec = importlib.util.spec_from_file_location("r", os.path.join(REPO, "configs/sd35_mapo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.global_batch_size, config.accum_steps, config.resolution, config.param_dtype = 8, 1, 64, "bfloat16"
  report = aot.sample_report(config, "v5litepod-8", preset, log=lambda line: None)
  assert report.fits and report.error is None, report.error
  assert report.objective == "sample" and report.opt_state_bytes == 0 and report.mesh["fsdp"] == 8
  abstract = aot.resolve_model(preset, config, None).family.abstract_denoiser(aot.resolve_model(
      preset, config, None).denoiser_config, param_dtype=np.dtype("bfloat16"))
  whole = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract))) * 2
  assert whole / 8 <= report.params_bytes <= whole  # sharded over 8 chips where the rules divide


@needs_libtpu
def test_xla_attention_keeps_each_chips_batch_shard():
  """Attention that falls back to XLA (attention "xla", or shapes the splash kernel cannot tile) runs on each chip's
  batch shard, as the kernels do. Left to GSPMD, FLUX's logits were laid out for the whole batch on every chip of an
  fsdp mesh (the full-size FLUX.1-dev forward at 1024 px did not fit v5litepod-8: 33 GiB of temporaries; here,
  159 MB against none). The bound: one chip's own example, its f32 logits and their softmax."""
  spec = importlib.util.spec_from_file_location("r", os.path.join(REPO, "configs/flux_dpo_lora.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.global_batch_size, config.accum_steps, config.resolution, config.attention = 8, 1, 512, "xla"
  config.param_dtype = "bfloat16"
  report = aot.sample_report(config, "v5litepod-8", "tiny_flux", log=lambda line: None)
  assert report.fits and report.error is None, report.error
  heads = aot.resolve_model("tiny_flux", config, None).denoiser_config["num_attention_heads"]
  tokens = (512 // 16) ** 2 + 512  # image tokens (2x2 patches of /8 latents) + FLUX.1-dev's 512 T5 tokens
  assert report.temp_bytes <= 2 * heads * tokens ** 2 * 4, report.temp_bytes


@pytest.mark.parametrize("preset,t5_tower", [("tiny_flux", "text_encoder_2"), ("tiny_sd35", "text_encoder_3")])
def test_the_compiled_batch_holds_config_max_sequence_length_t5_tokens(preset, t5_tower):
  """aot compiles the step the trainer runs: prompt embeddings (a tiny preset's towers are not its width, so the
  embeddings design) and the published towers' T5 ids at config.max_sequence_length, not at the family's default;
  an SD pipeline refuses a T5 length naming the key."""
  from mapo_jax import config as config_lib
  config = config_lib.base_config()
  config.resolution, config.global_batch_size, config.accum_steps, config.max_sequence_length = 64, 4, 1, 24
  target = aot.build_target(config, "v5p-8", preset)
  family = target.model.family
  got = aot.abstract_batch(target, config, 4)["prompt_embeds"].shape
  default = family.abstract_batch(target.model.denoiser_config, 64, 4, target.mesh)["prompt_embeds"].shape
  assert default[1] - got[1] == family.MAX_SEQUENCE_LENGTH - 24 and got[0] == 4
  _, _, tokens = family.abstract_step_text(None, **aot.text_length(config, family))
  assert tokens[t5_tower] == 24
  with pytest.raises(config_lib.ConfigError, match="^config.max_sequence_length: 24: sd pipelines, whose prompts have no T5"):
    aot.text_length(config, sd)
