"""Will it fit? Compiles a config's real train step for a TPU slice ahead of time, on this (CPU) host.

    python -m mapo_jax.aot --config configs/sdxl_mapo.py --topology v5p-8 [--config.KEY=VALUE ...]
        [--architecture PIPELINE_FOLDER_OR_PRESET] [--max-batch] [--dump_hlo FILE]

The step is the one `mapo_jax.train` runs (mapo_jax/training/build.py: same state, shardings, objective, optimizer,
attention kernel), built from abstract models (shapes only): no weights or data are read, only the
architecture: `--architecture` is a diffusers pipeline folder (its config.json files and scheduler config) or a
preset of models/presets.py (UNETS); by default config.pipeline, else the config file's name (sdxl_* →
"sdxl", sd15_* → "sd15"). The reference of DPO/RPO has the model's architecture. `--topology` is a gcloud
accelerator type (v5p-8, v5litepod-16, v6e-8, v4-32) or a raw topology (v5e:2x2, v5p:2x2x1), mapo_jax/training/tpu.py.
Needs libtpu (`pip install "jax[tpu]"`), not a TPU: XLA's TPU compiler runs on the host.

Prints per chip: parameters, optimizer state and reference (the shards the logical-axis rules give each
chip), XLA's temporaries, the peak and the chip's HBM; XLA's FLOP count and step-time estimate; the
compile time; then one JSON line with the same numbers. Exit status: 0 fits, 1 does not fit, 2 any other
error. `--max-batch` searches the largest global_batch_size that fits (each probe is one compile).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-8, v5litepod-16, v6e-8, v4-32, v5e:2x2, ...")
_ARCHITECTURE = flags.DEFINE_string("architecture", None, "a diffusers pipeline folder or a models/presets.py UNETS name")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "search the largest global_batch_size that fits; also "
                               "spelled --max-batch")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "write the compiled step's HLO text to this file")
DASHED_FLAGS = ("max-batch", "dump-hlo")

FITS, DOES_NOT_FIT, ERROR = 0, 1, 2
# config file name prefix → preset
PREFIX_PRESETS = {"sdxl": "sdxl", "sd15": "sd15", "flux": "flux1_dev", "sd35": "sd35_medium"}


@dataclasses.dataclass
class Model:
  """The architecture to compile: a denoiser config, its family, latent normalisation and schedule."""
  name: str
  family: Any
  denoiser_config: dict
  latents: Any
  schedule: Any
  vae_downsample: int = 8  # image pixels per latent pixel (the SD / SDXL VAEs': 8)


def resolve_model(name: str | None, config, config_file: str | None) -> Model:
  from mapo_jax import diffusion, pipelines
  from mapo_jax.convert import model_folder, read_config
  source = "--architecture"
  if not name and config.pipeline:
    name, source = config.pipeline, "config.pipeline"
  if not name and config_file:
    prefix = Path(config_file).name.split("_")[0]
    name, source = PREFIX_PRESETS.get(prefix), f"the config file name ({Path(config_file).name})"
  presets = {preset: family for family in pipelines.FAMILIES for preset in family.PRESETS}
  if not name:
    raise ValueError(f"which architecture? pass --architecture PIPELINE_FOLDER or a preset ({', '.join(presets)})")
  if name in presets:
    family = presets[name]
    denoiser = dict(family.PRESETS[name])
    return Model(name, family, denoiser, family.preset_latents(denoiser),
                 diffusion.as_schedule(family.SCHEDULER_CONFIG))
  path = Path(name)
  if not path.is_dir():
    raise ValueError(f"{source}={name!r} is neither a folder nor a preset ({', '.join(presets)}); "
                     "pass --architecture")
  family = pipelines.family(path)
  scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
  vae = read_config(path / "vae")
  return Model(str(path), family, read_config(model_folder(path, family.DENOISER)),
               family.Latents.from_vae_config(vae), diffusion.as_schedule(scheduler),
               vae_downsample=2 ** (len(vae["block_out_channels"]) - 1))


def check_config(config) -> None:
  """config_lib.validate, except for what only a run needs (a pipeline folder, a data source)."""
  from mapo_jax import config as config_lib
  checked = config.copy_and_resolve_references()
  checked.pipeline = checked.pipeline or "(aot: not read)"
  checked.data.cache_dir = checked.data.cache_dir or "(aot: not read)"
  checked.data.source = checked.data.source or "(aot: not read)"
  config_lib.validate(checked)


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (every device holds equal shards:
  the rules shard only dimensions a mesh axis divides)."""
  import jax
  import numpy as np
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit.upper()[:1]])


def missing_hbm(message: str) -> int | None:
  """Bytes beyond HBM that a RESOURCE_EXHAUSTED compile error names, if it names them."""
  size = r"([\d.]+)\s*([KMGT]?)i?B?"
  if m := re.search(r"[Ee]xceeded \w+ capacity by " + size, message):
    return _bytes(m[1], m[2])
  if m := re.search(r"[Uu]sed " + size + r" of " + size, message):
    return _bytes(m[1], m[2]) - _bytes(m[3], m[4])
  if m := re.search(r"\(" + size + r"\) exceeds? (?:the )?available \w+ \(" + size + r"\)", message):
    return _bytes(m[1], m[2]) - _bytes(m[3], m[4])
  return None


@dataclasses.dataclass
class Report:
  topology: str
  chips: int
  hosts: int
  mesh: dict
  model: str
  objective: str
  attention: str
  resolution: int
  global_batch_size: int
  accum_steps: int
  micro_pairs_per_chip: float  # pairs each batch shard (data x fsdp) holds per micro-batch
  hbm_bytes: int
  params_bytes: int
  opt_state_bytes: int
  reference_bytes: int
  batch_bytes: int
  fits: bool = False
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  peak_bytes: int | None = None
  missing_bytes: int | None = None
  flops: float | None = None
  estimated_step_seconds: float | None = None
  compile_seconds: float | None = None
  error: str | None = None
  compiled: Any = dataclasses.field(default=None, repr=False)

  def json(self) -> str:
    return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"})


def compile_report(target: Target, config, global_batch_size: int) -> Report:
  """Compiles the step for a global batch of `global_batch_size` pairs and measures it per chip."""
  from mapo_jax.training.build import compile_step
  built, mesh, slc, model = target.built, target.mesh, target.slc, target.model
  batch = abstract_batch(target, config, global_batch_size)
  data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
  report = Report(
      topology=slc.topology, chips=slc.chips, hosts=slc.hosts, mesh=dict(mesh.shape), model=model.name,
      objective=config.objective, attention=target.attention, resolution=config.resolution,
      global_batch_size=global_batch_size, accum_steps=config.accum_steps,
      micro_pairs_per_chip=global_batch_size / config.accum_steps / (data * fsdp), hbm_bytes=slc.hbm_bytes,
      params_bytes=shard_bytes(built.state.params) + shard_bytes(built.frozen.policy),
      opt_state_bytes=shard_bytes((built.state.opt_state, built.state.step, built.state.rng, built.state.skipped)),
      reference_bytes=shard_bytes(built.frozen.reference), batch_bytes=shard_bytes(batch))
  start = time.perf_counter()
  try:
    compiled = compile_step(built.train_step, mesh, built.state, batch, built.frozen)
  except Exception as e:  # noqa: BLE001  (XLA raises JaxRuntimeError; anything else is a bug to report)
    report.compile_seconds = time.perf_counter() - start
    report.error = f"{type(e).__name__}: {e}"
    if "RESOURCE_EXHAUSTED" in str(e):
      report.missing_bytes = missing_hbm(str(e))
    return report
  report.compile_seconds = time.perf_counter() - start
  report.compiled = compiled
  mem = compiled.memory_analysis()
  report.argument_bytes, report.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
  report.alias_bytes, report.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  # Arguments (state, batch, frozen) live for the whole step; outputs are new buffers except those aliased
  # to donated arguments (the new state reuses the old one's), so aliased bytes count once; temporaries
  # are XLA's buffer assignment for every intermediate, already packed by liveness (its own peak).
  report.peak_bytes = report.argument_bytes + report.temp_bytes + report.output_bytes - report.alias_bytes
  report.fits = report.peak_bytes <= slc.hbm_bytes
  if not report.fits:
    report.missing_bytes = report.peak_bytes - slc.hbm_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost:
    report.flops = cost.get("flops")
    seconds = cost.get("optimal_seconds")
    # XLA's estimate. It came out negative (-19 s) for the micro demo step at 16 pairs on v5e:2x2: none then.
    report.estimated_step_seconds = seconds if seconds is not None and seconds > 0 else None
  return report


def gib(n: int | None) -> str:
  if n is None:
    return "?"
  unit = "GiB" if abs(n) >= 1024**3 else "MiB"
  return f"{n / _UNITS[unit[0]]:9.3f} {unit}"


def print_report(r: Report) -> None:
  print(f"{r.model} · {r.objective} · {r.resolution} px on {r.topology} ({r.chips} chips, {r.hosts} hosts), "
        f"mesh {r.mesh}, attention {r.attention!r}")
  print(f"batch: {r.global_batch_size} pairs per step = {r.accum_steps} micro-batches x "
        f"{r.micro_pairs_per_chip:g} pairs per chip")
  print("per chip:")
  print(f"  parameters       {gib(r.params_bytes)}")
  print(f"  optimizer state  {gib(r.opt_state_bytes)}")
  print(f"  reference        {gib(r.reference_bytes)}")
  print(f"  batch            {gib(r.batch_bytes)}")
  if r.error is None:
    print(f"  arguments        {gib(r.argument_bytes)}")
    print(f"  outputs          {gib(r.output_bytes)}  (aliased to donated arguments: {gib(r.alias_bytes).strip()})")
    print(f"  temporaries      {gib(r.temp_bytes)}")
    print(f"  peak             {gib(r.peak_bytes)}  = arguments + temporaries + outputs - aliased")
  print(f"  HBM              {gib(r.hbm_bytes)}")
  if r.fits:
    print(f"FITS: {gib(r.hbm_bytes - r.peak_bytes).strip()} to spare")
  elif r.missing_bytes is not None:
    print(f"DOES NOT FIT: {gib(r.missing_bytes).strip()} missing")
  elif r.error and "RESOURCE_EXHAUSTED" in r.error:
    print("DOES NOT FIT (the compiler named no size)")
  if r.error:
    print(f"compile error: {r.error}")
  if r.flops is not None:
    print(f"XLA cost model (an estimate, per chip): {r.flops:.4g} FLOP per step, "
          f"{r.estimated_step_seconds if r.estimated_step_seconds is not None else float('nan'):.4g} s per step")
  print(f"compile: {r.compile_seconds:.1f} s")


def status(r: Report) -> int:
  if r.fits:
    return FITS
  if r.error is None or "RESOURCE_EXHAUSTED" in r.error:
    return DOES_NOT_FIT
  return ERROR


def search_max_batch(probe, unit: int, limit: int = 1 << 14):
  """Largest multiple k*unit that `probe(global_batch_size) -> Report` fits: doubling k, then bisection.
  Returns (best report or None, the first report that did not fit or errored)."""
  best, k, failed = None, 1, None
  while k * unit <= limit:
    r = probe(k * unit)
    if not r.fits:
      failed = r
      break
    best, k = r, 2 * k
  if best is None or failed is None or status(failed) == ERROR:
    return best, failed
  lo, hi = best.global_batch_size // unit, failed.global_batch_size // unit
  while hi - lo > 1:
    mid = (lo + hi) // 2
    r = probe(mid * unit)
    if r.fits:
      lo, best = mid, r
    else:
      hi = mid
      if status(r) == ERROR:
        return best, r
  return best, failed


@dataclasses.dataclass
class Target:
  """A config's step built from abstract models on a slice's devices, ready to lower and compile."""
  built: Any
  mesh: Any
  slc: Any
  model: Model
  attention: str


def build_target(config, topology: str, model_name: str | None = None, *, config_file: str | None = None) -> Target:
  """The config's train step (mapo_jax/training/build.py: state, shardings, objective, optimizer, LoRA,
  attention kernel) from abstract models on `topology`'s devices; nothing is read but config files."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the topology's libtpu beside any other
  import jax
  import jax.numpy as jnp

  from mapo_jax import config as config_lib
  from mapo_jax import sharding
  from mapo_jax.training import tpu
  from mapo_jax.training.build import build, denoiser_param_dtype, model_options, needs_reference_model

  check_config(config)
  slc = tpu.parse(topology)
  model = resolve_model(model_name, config, config_file)
  config_lib.validate_for_devices(config, slc.chips, slc.hosts)
  mesh = sharding.make_mesh(config.mesh, slc.devices())
  options = model_options(config, mesh)
  family = model.family
  abstract = family.abstract_denoiser(model.denoiser_config, param_dtype=denoiser_param_dtype(config), **options)
  reference = None
  if needs_reference_model(config):
    reference = family.abstract_denoiser(model.denoiser_config, param_dtype=jnp.dtype(config.ref_param_dtype),
                                         **options)
  empty_prompt = None
  if config.data.empty_prompt_prob > 0:  # the empty prompt's rows, shaped like one pair's prompt keys
    one = family.abstract_batch(model.denoiser_config, config.resolution, 1, mesh,
                                vae_downsample=model.vae_downsample)
    empty_prompt = {k: jax.ShapeDtypeStruct(one[k].shape[1:], one[k].dtype) for k in family.PROMPT_KEYS}
  built = build(config, family, abstract, reference, model.schedule, model.latents, mesh, empty_prompt)
  return Target(built, mesh, slc, model, options["attention"])


def abstract_batch(target: Target, config, global_batch_size: int) -> dict:
  """A training batch of `global_batch_size` pairs as sharded ShapeDtypeStructs, with the keys the objective
  reads (SmPO: the pairs' reward scores)."""
  from mapo_jax.training import objectives
  model = target.model
  batch = model.family.abstract_batch(model.denoiser_config, config.resolution, global_batch_size, target.mesh,
                                      config.data.rpo_embedding, vae_downsample=model.vae_downsample)
  if objectives.get_objective(config.objective).needs_scores:
    score = batch["time_ids"].update(shape=(global_batch_size,))
    batch.update(score_w=score, score_l=score)
  return batch


def run(config, topology: str, model_name: str | None = None, *, config_file: str | None = None,
        max_batch: bool = False, log=print) -> Report:
  """Builds the config's step from abstract models on `topology`'s devices and compiles it (with
  `max_batch`: the largest fitting batch; its report, or the smallest probe's when none fits)."""
  from mapo_jax import config as config_lib
  target = build_target(config, topology, model_name, config_file=config_file)
  slc = target.slc
  probe = lambda size: compile_report(target, config, size)
  if not max_batch:
    return probe(config.global_batch_size)

  data, fsdp, _ = config_lib.mesh_shape(config, slc.chips)
  unit = math.lcm(data * fsdp * config.accum_steps, slc.hosts)

  def logged(size):
    log(f"probe: global_batch_size={size} ({size / config.accum_steps / (data * fsdp):g} pairs per chip "
        f"per micro-batch) ...")
    r = probe(size)
    verdict = ("fits" if r.fits else "error" if status(r) == ERROR else "does not fit")
    log(f"probe: global_batch_size={size}: {verdict}, peak {gib(r.peak_bytes).strip()} of "
        f"{gib(r.hbm_bytes).strip()}, {r.compile_seconds:.0f} s")
    log(r.json())  # each probe's row as it finishes: a search cut short keeps what it measured
    return r

  best, failed = search_max_batch(logged, unit)
  if best is None:
    return failed
  log(f"largest batch that fits: global_batch_size={best.global_batch_size} "
      f"({best.micro_pairs_per_chip:g} pairs per chip per micro-batch)")
  return best


def main(argv) -> int:
  del argv
  if not _TOPOLOGY.value:
    print("--topology is required (e.g. v5p-8, v5litepod-16, v6e-8, v5e:2x2)", file=sys.stderr)
    return ERROR
  import jax
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # the host compiles; never probe for local accelerators
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    report = run(_CONFIG.value, _TOPOLOGY.value, _ARCHITECTURE.value, config_file=config_file, max_batch=_MAX_BATCH.value)
  except Exception as e:  # noqa: BLE001  (a bad config, topology or model: the message says which)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    return ERROR
  print_report(report)
  if _DUMP_HLO.value and report.compiled is not None:
    Path(_DUMP_HLO.value).write_text(report.compiled.as_text())
  print(report.json())
  return status(report)


if __name__ == "__main__":
  from mapo_jax import config as config_lib
  app.run(main, flags_parser=functools.partial(config_lib.parse_command_line, dashed=DASHED_FLAGS, doc=__doc__))
