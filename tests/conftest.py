"""Shared fixtures: tiny random diffusers/transformers models saved with `save_pretrained`."""
import functools
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests run tiny models, so compiling dominates their time: XLA:CPU's cheaper code generation (same
# HLO, same float semantics: no fast-math either way) compiles them about a fifth faster.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# 8 host devices, so sharded code is tested on real meshes (set before JAX initialises).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE}"
                             " --xla_force_host_platform_device_count=8")
# One persistent compilation cache for the tests and the trainer processes they start: a program compiled
# once (in this run, or an earlier run on this machine) is not compiled again. Keyed by the program and
# the jax/XLA versions, so a stale entry is never used.
XLA_CACHE = os.environ.get("MAPO_JAX_TEST_XLA_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "mapo_jax", "xla_tests"))

import jax
import numpy as np
import pytest

jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
CACHE_FLAG = f"--config.compile_cache={XLA_CACHE}"  # trainer subprocesses use the same cache (config.compile_cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
import torch
from flax import nnx

# The tiny reference models run ~50x faster on one thread than with torch's two competing with XLA.
torch.set_num_threads(1)


def _torchvision_beside_cpu_torch():
  """PyPI's torchvision wheels are linked against CUDA torch. Beside the CPU torch their C ops fail to load,
  and `import torchvision` (which transformers, diffusers and open_clip do) then dies registering fake kernels
  for the undefined ops torchvision::nms and qnms. The tests use only torchvision's Python transforms
  (open_clip's preprocessing), so those two schemas are defined first, when the C ops are missing."""
  import glob
  import importlib.util
  spec = importlib.util.find_spec("torchvision")
  if spec is None:
    return None
  try:
    torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))[0])
    return None
  except (OSError, IndexError):
    pass
  try:
    torch.ops.torchvision.nms  # already defined (a machine-level fix, or an earlier import)
    return None
  except (AttributeError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib  # the schemas live as long as this object


_TORCHVISION_OPS = _torchvision_beside_cpu_torch()

from mapo_jax.models.presets import TINY_SD2_UNET, TINY_SD15_UNET, TINY_SDXL_UNET  # noqa: F401


def perturb_(module, seed=0, scale=0.05):
  """Adds noise to every torch parameter so zero-initialised layers (e.g. proj_out) matter."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return module


def make_diffusers_unet(config, path, seed=0):
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  model = perturb_(UNet2DConditionModel(**config), seed).eval()
  model.save_pretrained(path)
  return model


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def tiny_sdxl_unet_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_sdxl_unet")
  make_diffusers_unet(TINY_SDXL_UNET, path)
  return path


# --- Tiny SDXL / SD pipelines (VAE, CLIP towers, tokenizers) ---------------------------------------

TINY_VAE = dict(  # four blocks, so latents are /8 as with the real VAEs
    block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
    sample_size=64, scaling_factor=0.13025)
# Tower 1 (CLIP ViT-L-like: quick_gelu, eos_token_id 2 → argmax pooling) and tower 2 (OpenCLIP bigG-like:
# gelu, projection, real EOS id → first-EOS pooling). Hidden sizes 16 + 32 = TINY_SDXL_UNET's cross_attention_dim.
TINY_CLIP_L = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                   max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1,
                   eos_token_id=2)
TINY_CLIP_G = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=32)


def make_clip_tokenizer(folder, **kwargs):
  """A CLIP BPE tokenizer over a hand-made vocabulary (letters, a few words, the two specials last)."""
  import json
  from pathlib import Path
  from transformers import CLIPTokenizer
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  letters = "abcdefghijklmnopqrstuvwxyz"
  merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>", "o n</w>", "t h", "th e</w>"]
  tokens = ["!", "!</w>", ",</w>", ".</w>", *letters, *(c + "</w>" for c in letters),
            *("".join(m.split()) for m in merges), "<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **kwargs)


def make_clip_reward_dir(path, *, vision_act="gelu", seed=0):
  """A tiny random transformers CLIPModel folder (tokenizer, preprocessor_config.json) at `path`, as the
  `pickscore`, `clip` and `aesthetic` rewards load it; returns the torch model."""
  import torch
  from transformers import CLIPConfig, CLIPModel
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  tokenizer = make_clip_tokenizer(path)
  tokenizer.save_pretrained(path)
  ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
             pad_token_id=tokenizer.pad_token_id)
  config = CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, **ids),
      vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                         image_size=32, patch_size=8, hidden_act=vision_act),
      projection_dim=12, logit_scale_init_value=3.0)
  torch.manual_seed(seed)
  model = perturb_(CLIPModel(config), seed).eval()
  model.save_pretrained(path)
  # Resize to a 40 px shorter side, then centre crop 32: both steps move pixels.
  CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                        image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]).save_pretrained(path)
  return model


def make_clip_text_model(config, *, projection=False, seed=0):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  cls = CLIPTextModelWithProjection if projection else CLIPTextModel
  return perturb_(cls(CLIPTextConfig(**config)), seed).eval()


def make_diffusers_vae(config, seed=0):
  import torch
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  return perturb_(AutoencoderKL(**config), seed).eval()


def sdxl_scheduler():
  from diffusers import EulerDiscreteScheduler
  return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                prediction_type="epsilon")


def save_sdxl_pipeline(path, *, clip_l, clip_g, unet_config, seed=0, unet_scale=0.05):
  """Saves a random SDXL pipeline folder (diffusers layout) built from tower and UNet configs and returns
  the torch pipeline. Tokenizers as SDXL's (the second pads with "!"); TINY_VAE keeps the /8 latents."""
  import torch
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
  tokenizer = make_clip_tokenizer(f"{path}/tokenizer")
  tokenizer_2 = make_clip_tokenizer(f"{path}/tokenizer_2", pad_token="!")
  eos = tokenizer.eos_token_id
  text_encoder = make_clip_text_model({**clip_l, "vocab_size": len(tokenizer)}, seed=seed)
  text_encoder_2 = make_clip_text_model(
      {**clip_g, "vocab_size": len(tokenizer), "bos_token_id": eos - 1, "eos_token_id": eos, "pad_token_id": 0},
      projection=True, seed=seed + 1)
  torch.manual_seed(seed)
  unet = perturb_(UNet2DConditionModel(**unet_config), seed + 2, scale=unet_scale).eval()
  pipe = StableDiffusionXLPipeline(
      vae=make_diffusers_vae(TINY_VAE, seed + 3), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
      tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=sdxl_scheduler(), add_watermarker=False)
  pipe.save_pretrained(path)
  return pipe


def make_tiny_sdxl_pipeline(path, seed=0):
  """A tiny random SDXL pipeline folder (64 px default)."""
  return save_sdxl_pipeline(path, clip_l=TINY_CLIP_L, clip_g=TINY_CLIP_G,
                            unet_config={**TINY_SDXL_UNET, "sample_size": 8}, seed=seed)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_sdxl_pipeline")
  make_tiny_sdxl_pipeline(path)
  return path


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, args, kwargs):
  return nnx.merge(graphdef, state)(*args, **kwargs)


def jit_call(model, *args, **kwargs):
  """model(*args, **kwargs) under one jit shared by every model with the same structure, so tests that
  load the same architecture several times compile it once."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, args, kwargs)


# --- Micro SDXL pipeline for sampling tests: the same layout at the fewest ops (fast sampler compiles) -------

def make_micro_sdxl_pipeline(path, seed=0):
  """A micro random SDXL pipeline folder (MICRO_SDXL_UNET, towers sized to fit it, TINY_VAE)."""
  from mapo_jax.models.presets import MICRO_SDXL_UNET
  pooled = MICRO_SDXL_UNET["projection_class_embeddings_input_dim"] - 6 * MICRO_SDXL_UNET["addition_time_embed_dim"]
  width_l = MICRO_SDXL_UNET["cross_attention_dim"] - pooled  # tower 2's hidden size = its projection = pooled
  small = dict(num_hidden_layers=2, num_attention_heads=2)
  return save_sdxl_pipeline(
      path, clip_l={**TINY_CLIP_L, **small, "hidden_size": width_l, "intermediate_size": 2 * width_l},
      clip_g={**TINY_CLIP_G, **small, "hidden_size": pooled, "intermediate_size": 2 * pooled,
              "projection_dim": pooled},
      unet_config=MICRO_SDXL_UNET, seed=seed, unet_scale=0.2)


@pytest.fixture(scope="session")
def micro_sdxl_pipeline_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("micro_sdxl_pipeline")
  make_micro_sdxl_pipeline(path)
  return path


# The slowest files first (per-file sums of `pytest --durations=0` from a cold compilation cache, as CI runs,
# 2026-12-03): `--dist loadfile` hands whole files to the two workers in this order, so the long ones run side by
# side early instead of leaving one worker alone at the end. xdist would otherwise reorder files by their number of
# tests (`--loadscope-reorder`, its default), which put these few-test files last.
SLOWEST_FILES = ("test_multihost.py", "test_recipes.py", "test_toy_preference.py", "test_train_step.py",
                 "test_reliability.py", "test_lora.py", "test_train.py", "test_optimizers.py",
                 "test_objectives_step.py", "test_text_conditioning.py", "test_aot.py", "test_flow_step.py",
                 "test_unpaired.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep SLOWEST_FILES' order
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))


# --- The trainer as a subprocess (tests/test_train*.py, test_multihost.py, test_demo.py) -----------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built_once(tmp_path_factory, name, build):
  """A session fixture's folder, built once for the whole run even under xdist: the workers share the base temporary
  folder's parent, and the first to take the lock builds while the others wait, then reuse it. Users must only read
  it (or copy it first)."""
  import fcntl
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
  path = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f"{name}.built").exists():  # absent too after a builder failed: then this one tries
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      build(path)
      (root / f"{name}.built").touch()
  return path


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
  """The demo's tiny pipeline, pairs and cache (mapo_jax/toy/demo.py), created once per run."""
  from mapo_jax.toy import demo
  return built_once(tmp_path_factory, "demo_assets", demo.ensure_assets)


@pytest.fixture(scope="session")
def trainer_env():
  """Environment for trainer subprocesses: CPU, the tests' persistent compilation cache (XLA_CACHE), so
  the second and later runs of the same program skip XLA compilation. `devices` sets the host device
  count (default 1). `fast_compile` adds FAST_COMPILE, for runs of a few steps where compiling dominates;
  by default runs are optimised as usual: the demo's batches of 16 pairs and its judged samples make
  running the larger cost (10 demo steps from a cold cache: 21 s, against 29 s with FAST_COMPILE)."""

  def env(devices=1, fast_compile=False, **extra):
    flags = f"{FAST_COMPILE if fast_compile else ''} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": XLA_CACHE,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "PYTHONPATH": REPO, "XLA_FLAGS": flags.strip(),
            **extra}

  return env


def run_trainer(env, workdir, assets, *args, config="configs/demo.py", timeout=600, check=True, judge=False):
  """`python -m mapo_jax.train` on the demo config (assets at `assets`); returns the CompletedProcess.
  Without `judge` the run judges no samples (config.judge=''): most tests are about something else."""
  import subprocess
  import sys
  cmd = [sys.executable, "-m", "mapo_jax.train", "--config", os.path.join(REPO, config), "--workdir", str(workdir),
         f"--config.demo_assets={assets}", CACHE_FLAG, *([] if judge else ["--config.judge="]), *args]
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-5000:]}")
  return proc


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_assets, trainer_env):
  """The whole demo (configs/demo.py as written) in one workdir, shared by the train/export tests: (workdir, the
  trainer's CompletedProcess). Run once for the whole run; its output is kept beside the workdir for the workers
  that did not run it."""
  import subprocess

  def build(folder):
    proc = run_trainer(trainer_env(), folder / "workdir", demo_assets, judge=True)
    (folder / "stdout").write_text(proc.stdout)
    (folder / "stderr").write_text(proc.stderr)

  folder = built_once(tmp_path_factory, "demo_run", build)
  proc = subprocess.CompletedProcess("mapo_jax.train", 0, (folder / "stdout").read_text(),
                                     (folder / "stderr").read_text())
  return folder / "workdir", proc
