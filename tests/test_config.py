"""Configs: every recipe validates with the official defaults; a bad value fails naming its key."""
import ast
import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

from mapo_jax import config as config_lib

RECIPES = tuple(config_lib.recipe_names())  # every packaged recipe


def load(name):
  spec = importlib.util.spec_from_file_location(name, f"{REPO}/configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if name != "demo":
    config.pipeline, config.data.cache_dir = "/models/base", "/data/cache"
  return config


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_validate(name):
  config = load(name)
  config_lib.validate(config)
  config_lib.validate_for_devices(config, 1 if name == "demo" else 8, 1)
  assert config.optim.total_steps == config.steps


def test_official_defaults():
  mapo, dpo, rpo = load("sdxl_mapo"), load("sdxl_dpo"), load("sdxl_rpo")
  assert (mapo.optim.lr, mapo.optim.schedule, mapo.mapo.beta, mapo.steps, mapo.optim.clip_norm) == (
      1e-5, "constant", 0.1, 2000, 1.0)
  assert (mapo.global_batch_size, mapo.accum_steps, mapo.resolution, mapo.optim.name) == (128, 2, 1024, "adamw")
  assert (dpo.objective, dpo.dpo.beta, dpo.global_batch_size) == ("dpo", 5000.0, 2048)
  assert dpo.optim.lr == pytest.approx(2.048e-5) and dpo.optim.warmup_steps == 200
  assert (rpo.objective, rpo.rpo.tau) == ("rpo", 0.5)
  assert load("sd15_mapo").resolution == 512


def documented_values(name):
  """The `| key | value | source |` rows of a recipe's docstring table, values as Python literals."""
  spec = importlib.util.spec_from_file_location(name, f"{REPO}/configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rows = [line.split("|")[1:3] for line in module.__doc__.splitlines() if line.startswith("| ")]
  return {k.strip(): ast.literal_eval(v.strip()) for k, v in rows if k.strip() not in ("key",)}


# Each official recipe's docstring table holds the source's values: the resolved config must equal them, and
# the table must cover the keys that make the recipe (so a new deviation cannot hide by omission).
SOURCED = {
    "sdxl_dpo": {"optim.name", "optim.warmup_steps", "optim.clip_norm", "data.empty_prompt_prob", "data.time_ids",
                 "vae", "optim.lr", "global_batch_size", "dpo.beta", "steps"},
    "sd15_dpo": {"optim.name", "optim.warmup_steps", "optim.clip_norm", "data.empty_prompt_prob", "vae",
                 "optim.lr", "global_batch_size", "dpo.beta", "resolution"},
    "sdxl_mapo": {"optim.name", "optim.lr", "optim.schedule", "optim.clip_norm", "data.empty_prompt_prob",
                  "data.time_ids", "data.label_noise_prob", "vae", "mapo.beta", "global_batch_size", "accum_steps"},
    "sdxl_mapo_lora": {"lora.rank", "lora.alpha", "lora.targets", "optim.lr", "mapo.beta", "global_batch_size", "vae"},
    "sdxl_dpo_lora": {"lora.rank", "lora.alpha", "lora.targets", "optim.lr", "optim.schedule", "optim.warmup_steps",
                      "dpo.beta", "global_batch_size", "accum_steps", "steps", "data.empty_prompt_prob", "vae"},
    "sd15_dpo_lora": {"lora.rank", "lora.alpha", "lora.targets", "optim.lr", "optim.schedule", "dpo.beta",
                      "global_batch_size", "steps", "resolution", "vae"},
}


@pytest.mark.parametrize("name", sorted(SOURCED))
def test_recipes_match_their_documented_sources(name):
  documented = documented_values(name)
  assert SOURCED[name] <= documented.keys(), SOURCED[name] - documented.keys()
  resolved = config_lib.flatten(load(name))
  for key, value in documented.items():
    assert key in resolved, f"{name}: documented key {key} is not a config key"
    got = resolved[key]
    assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{name}: config.{key} = {got!r}, documented {value!r}"


@pytest.mark.parametrize("key, value", [
    ("objective", "ppo"), ("data.mode", "stream"), ("optim.lr", -1.0), ("optim.schedule", "step"),
    ("dtype", "float8"), ("remat", "sometimes"), ("resolution", 1020), ("accum_steps", 0), ("mesh", (1, -1, -1)),
    ("export_dtype", "int8"), ("rpo.tau", 0.0), ("keep_checkpoints", 0), ("global_batch_size", 127),
    ("log_every", "10"), ("data.empty_prompt_prob", 1.5), ("data.label_noise_prob", -0.1), ("data.time_ids", "crop"),
])
def test_bad_value_names_the_key(key, value):
  config = load("sdxl_mapo")
  parent, _, leaf = key.rpartition(".")
  target = config[parent] if parent else config
  with target.ignore_type():
    target[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=f"^config.{key}:"):
    config_lib.validate(config)


def test_unknown_key_and_device_divisibility():
  config = load("sdxl_mapo")
  config.unlock()
  config.optim.learning_rate = 1e-5
  with pytest.raises(config_lib.ConfigError, match="^config.optim.learning_rate: unknown key"):
    config_lib.validate(config)
  config = load("sdxl_mapo")
  with pytest.raises(config_lib.ConfigError, match="^config.global_batch_size:.*data x fsdp x accum_steps"):
    config_lib.validate_for_devices(config, 48, 1)  # 128 pairs over 48 devices x 2 micro-batches
  with pytest.raises(config_lib.ConfigError, match="^config.mesh:"):
    config.mesh = (3, 1, 1)
    config_lib.validate_for_devices(config, 8, 1)


def test_command_line_errors_name_the_key_before_loading_anything(tmp_path):
  def run(*overrides):
    return subprocess.run([sys.executable, "-m", "mapo_jax.train", "--config", f"{REPO}/configs/sdxl_mapo.py",
                           "--workdir", str(tmp_path), "--config.pipeline=/nonexistent", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"JAX_PLATFORMS": "cpu",
                          "PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "HOME": str(tmp_path)})
  bad = run("--config.data.cache_dir=/c", "--config.optim.lr=-2e-5")
  assert bad.returncode != 0 and "config.optim.lr: -2e-05 must be > 0" in bad.stderr
  unknown = run("--config.optim.lrr=2e-5")
  assert unknown.returncode != 0 and "lrr" in unknown.stderr
  missing = run()
  assert missing.returncode != 0 and "config.data.cache_dir" in missing.stderr
  assert not (tmp_path / "checkpoints").exists()
