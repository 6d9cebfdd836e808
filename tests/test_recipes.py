"""Every recipe in configs/ as a user runs it, on tiny models: so a recipe that cannot build, shard, train or
draw its sample grid never lands again.

1. Lowered for a TPU slice (`mapo_jax.aot.build_target`, a tiny preset of the recipe's own family: the micro
   SDXL-layout UNet, "tiny_flux" or "tiny_sd35"; v5p-8, a (1, 2, 2) mesh so parameters and optimizer state shard
   over fsdp and tensor): the recipe's objective, optimizer, LoRA, remat, dtypes, batch preparation and training
   draws; lowering, not compiling, keeps it to seconds.
2. Trained for two steps on a tiny pipeline of the recipe's family and a cache of the demo's pairs, with the
   recipe's own remat, optimizer, dtypes, LoRA, flow-matching and sample settings, a sample grid after each step:
   the SDXL recipes on the demo's own pipeline and cache; the FLUX and SD3.5 recipes on tiny random pipelines
   (tests/flow_fixtures.py) and caches of 16 demo pairs encoded by `mapo_jax.encode`'s functions, built once per
   module. Only what cannot apply to the tiny data changes: the pipeline and cache paths, the VAE (the recipes
   name the fp16-fix one), the resolution (the cache's), and the batch: one pair per micro-batch, at most two
   micro-batches (the accumulation is one scan whatever its length: the lowering above keeps the recipe's count;
   64 on CPU would only cost time).

LoRA recipes of a family whose transformer `mapo_jax.training.lora` cannot adapt yet are expected to fail
(xfail, naming the error) until it can.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")


def recipe(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The family of a recipe, by its file name's prefix (as aot.PREFIX_PRESETS), and the tiny preset it lowers with.
FAMILY_OF = {"sdxl": "sd", "sd15": "sd", "demo": "sd", "flux": "flux", "sd35": "sd3"}
TINY_PRESET = {"sd": "micro", "flux": "tiny_flux", "sd3": "tiny_sd35"}
FLOW_PAIRS = 16  # demo pairs encoded for the flow families' tiny pipelines


def family_of(name):
  if name.startswith("demo"):  # the demos name their toy base in the config
    return {"sdxl": "sd", "flux": "flux"}[recipe(name).demo_base]
  return FAMILY_OF[name.split("_")[0]]


def lora_unsupported(name):
  """Why `lora.from_config` cannot adapt this LoRA recipe's tiny denoiser (None when it can, or without LoRA)."""
  config = recipe(name)
  if not config.lora.rank:
    return None
  from mapo_jax import aot
  from mapo_jax.training import lora
  model = aot.resolve_model(TINY_PRESET[family_of(name)], config, None)
  try:
    lora.from_config(model.family.abstract_denoiser(model.denoiser_config), config.lora, config.seed)
  except Exception as e:  # noqa: BLE001  (whatever lora.py says, it is the reason)
    return f"{type(e).__name__}: {e}"
  return None


def xfail_waiting_for_lora(name):
  reason = lora_unsupported(name)
  if reason is not None:
    pytest.xfail(f"{name}: waiting for LoRA support on the {family_of(name)} transformer ({reason[:300]})")


def test_the_recipe_list_is_every_config_file():
  assert {"sdxl_mapo", "sdxl_dpo", "sd15_dpo", "demo", "flux_dpo_lora", "sd35_mapo"} <= set(RECIPES)
  assert len(RECIPES) >= 15 and all(name.split("_")[0] in FAMILY_OF for name in RECIPES)


@needs_libtpu
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_lowers_for_a_tpu_slice(name):
  from mapo_jax import aot
  xfail_waiting_for_lora(name)
  config = recipe(name)
  with config.unlocked():
    config.mesh = (1, 2, 2)
    config.global_batch_size = 2 * config.accum_steps  # one pair per batch shard per micro-batch
    config.resolution = 64
  target = aot.build_target(config, "v5p-8", TINY_PRESET[family_of(name)])
  batch = aot.abstract_batch(target, config, config.global_batch_size)
  with jax.set_mesh(target.mesh):
    target.built.train_step.lower(target.built.state, batch, target.built.frozen)
  # Every optimizer-state leaf got a sharding its shape admits.
  for leaf in jax.tree.leaves(target.built.state):
    leaf.sharding.shard_shape(leaf.shape)


TRAINED = [r for r in RECIPES if not r.startswith("demo")]  # the demos run as written in test_train.py, test_unpaired.py
RUN_ALL = """
import json, sys, traceback
from pathlib import Path
from absl import flags
from mapo_jax import train
from test_recipes import family_of, recipe, tiny_overrides
flags.FLAGS.mark_as_parsed()
assets, out = json.loads(sys.argv[1]), Path(sys.argv[2])
for name in sys.argv[3:]:
  config = recipe(name)
  with config.unlocked():
    tiny_overrides(config, assets[family_of(name)])
  try:
    train.train(config, out / name)
  except Exception:  # one recipe's failure is its own test's (the others still run)
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "ERROR").write_text(traceback.format_exc())
  print("trained", name, flush=True)
"""


def tiny_overrides(config, assets):
  """What cannot apply to the tiny pipeline and cache in `assets` (module docstring); the rest is the recipe's."""
  config.pipeline, config.vae, config.resolution = f"{assets}/pipeline", "", 32
  config.data.cache_dir = f"{assets}/{'cache_unpaired' if config.objective == 'kto' else 'cache'}"
  config.accum_steps = config.global_batch_size = min(config.accum_steps, 2)
  config.steps, config.sample_every, config.log_every, config.checkpoint_every = 2, 1, 1, 2
  config.compile_cache = ""  # the tests' cache, set by the environment (conftest.trainer_env)


def flow_assets(demo_assets, folder, family):
  """A tiny random pipeline of `family` ("flux": FLUX.1-dev-like, "sd3": SD3.5-medium-like) at folder/pipeline and
  the first FLOW_PAIRS demo pairs encoded with it at folder/cache, as `python -m mapo_jax.encode` writes them."""
  import pyarrow.parquet as pq
  from flow_fixtures import make_tiny_flux_pipeline, save_sd3_pipeline, sd3_pipeline_transformer
  from mapo_jax.models.presets import TINY_SD35_TRANSFORMER
  from mapo_jax.data.cache import EncodeSettings, write_cache
  from mapo_jax.data.sources import ParquetSource
  from mapo_jax.encode import make_encoder
  from mapo_jax.pipelines import family as family_module, load_pipeline
  pipeline = folder / "pipeline"
  if family == "flux":
    make_tiny_flux_pipeline(pipeline)
  else:
    save_sd3_pipeline(pipeline, sd3_pipeline_transformer(TINY_SD35_TRANSFORMER))
  pq.write_table(pq.read_table(demo_assets / "pairs.parquet").slice(0, FLOW_PAIRS), folder / "pairs.parquet")
  pipe = load_pipeline(pipeline, components=family_module(pipeline).FROZEN)
  write_cache(ParquetSource(folder / "pairs.parquet"), folder / "cache", make_encoder(pipe),
              EncodeSettings(resolution=32), pipeline=str(pipeline), batch_size=FLOW_PAIRS, process_index=0,
              process_count=1)
  return folder


@pytest.fixture(scope="module")
def trained(demo_assets, trainer_env, tmp_path_factory):
  """Every recipe trained in one process (one start-up, shared compiled programs): workdir per recipe."""
  import json
  import subprocess
  import sys
  out = tmp_path_factory.mktemp("recipes")
  assets = {"sd": str(demo_assets)}
  for family in sorted({family_of(name) for name in TRAINED} - {"sd"}):
    assets[family] = str(flow_assets(demo_assets, tmp_path_factory.mktemp(f"{family}_assets"), family))
  names = [name for name in TRAINED if lora_unsupported(name) is None]
  env = trainer_env(fast_compile=True, PYTHONPATH=f"{REPO}{os.pathsep}{os.path.join(REPO, 'tests')}")
  proc = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(assets), str(out), *names], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return out


@pytest.mark.parametrize("name", TRAINED)
def test_every_recipe_trains_two_steps_and_draws_its_sample_grids(name, trained):
  xfail_waiting_for_lora(name)
  config, workdir = recipe(name), trained / name
  assert not (workdir / "ERROR").exists(), (workdir / "ERROR").read_text()[-5000:]
  for step in (1, 2):
    grid = np.asarray(Image.open(workdir / "samples" / f"step_{step:06d}.png"))
    side = int(np.ceil(np.sqrt(len(config.sample_prompts))))
    assert grid.shape == (32 * -(-len(config.sample_prompts) // side), 32 * side, 3) and grid.std() > 0
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
  assert all(m["skipped_steps"] == 0 for m in metrics)
  assert (workdir / "export").is_dir()
