"""Will it fit? Compiles a config's real train step for a TPU slice ahead of time, on this (CPU) host.

    python -m mapo_jax.aot --config configs/sdxl_mapo.py --topology v5p-8 [--config.KEY=VALUE ...]
        [--architecture PIPELINE_FOLDER_OR_PRESET] [--max-batch] [--dump_hlo FILE] [--text auto|ids|embeddings]

The step is the one `mapo_jax.train` runs (mapo_jax/training/build.py: same state, shardings, objective, optimizer,
attention kernel), built from abstract models (shapes only): no weights or data are read, only the
architecture: `--architecture` is a diffusers pipeline folder (its config.json files and scheduler config) or a
preset of a family (the UNets of models/presets.py, `flux1_dev`, `sd35_medium`, `tiny_flux`, ...: each family's
PRESETS); by default config.pipeline, else the config file's name (sdxl_* → "sdxl", sd15_* → "sd15", flux_* →
"flux1_dev", sd35_* → "sd35_medium"). The reference of DPO/RPO has the model's architecture. `--topology` is a gcloud
accelerator type (v5p-8, v5litepod-16, v6e-8, v4-32) or a raw topology (v5e:2x2, v5p:2x2x1), mapo_jax/training/tpu.py.
Needs libtpu (`pip install "jax[tpu]"`), not a TPU: XLA's TPU compiler runs on the host.

For the families that encode prompts in the train step (FLUX, SD3: a token ids cache, docs/data.md "Text
conditioning at scale") the batch holds token ids and the step the frozen text towers, as the trainer runs it
(`--text auto`; `--text embeddings` compiles the step on cached prompt embeddings instead).

Prints per chip: parameters, optimizer state, reference and text encoders (the shards the logical-axis rules give
each chip), XLA's temporaries, the peak and the chip's HBM; XLA's FLOP count and step-time estimate; the
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
from types import SimpleNamespace
from typing import Any

from absl import app, flags
from ml_collections import config_flags


def define_flags() -> SimpleNamespace:
  """The command line's flags, defined by the running program only (train.define_flags says why)."""
  return SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True),
      topology=flags.DEFINE_string("topology", None, "TPU slice: v5p-8, v5litepod-16, v6e-8, v4-32, v5e:2x2, ..."),
      architecture=flags.DEFINE_string("architecture", None,
                                       "a diffusers pipeline folder or a models/presets.py UNETS name"),
      max_batch=flags.DEFINE_bool("max_batch", False, "search the largest global_batch_size that fits, "
                                  "from the config's (doubling or halving, then interpolating); also spelled "
                                  "--max-batch"),
      dump_hlo=flags.DEFINE_string("dump_hlo", None, "write the compiled step's HLO text to this file"),
      text=flags.DEFINE_enum("text", "auto", ["auto", "ids", "embeddings"],
                             "how the batch conditions: ids, token ids that the step encodes with the frozen text "
                             "towers (a token ids cache, `encode --text ids`); embeddings, cached prompt embeddings; "
                             "auto, ids where the family encodes in the step and its text towers fit the denoiser"),
      sample=flags.DEFINE_bool("sample", False, "compile the sampling path instead of the train step: one denoiser "
                               "call on config.global_batch_size latents (double it for classifier-free guidance), "
                               "weights in config.param_dtype"))


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
  folder: str | None = None  # the pipeline folder, or None for a preset


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
               vae_downsample=2 ** (len(vae["block_out_channels"]) - 1), folder=str(path))


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
  text_encoder_bytes: int = 0  # the frozen text towers a token ids batch is encoded with (`step_text`)
  fits: bool = False
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  peak_bytes: int | None = None
  missing_bytes: int | None = None
  flops: float | None = None
  estimated_step_seconds: float | None = None
  model_flops: float | None = None  # the step's useful FLOPs, all chips (`model_flops_per_step`): no remat, no kernels' bookkeeping
  mfu: float | None = None  # model_flops / (chips x peak bf16 FLOP/s x estimated_step_seconds), when complete
  estimate_leaves_out: list = dataclasses.field(default_factory=list)  # `estimate_gaps`: why mfu is None
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
      reference_bytes=shard_bytes(built.frozen.reference), batch_bytes=shard_bytes(batch),
      text_encoder_bytes=shard_bytes(built.frozen.text))
  if not compile_into(report, slc, lambda: compile_step(built.train_step, mesh, built.state, batch, built.frozen)):
    return report
  report.model_flops = model_flops_per_step(target, config, global_batch_size)
  report.estimate_leaves_out = estimate_gaps(report.compiled.as_text())
  peak = slc.generation.bf16_tflops * 1e12 * slc.chips
  if report.estimated_step_seconds and peak and not report.estimate_leaves_out:
    report.mfu = report.model_flops / (peak * report.estimated_step_seconds)
  return report


# The compiled program's parts that XLA's cost model does not count in full, so that its FLOPs and step time
# fall short of the step's: a Pallas kernel is an opaque custom call to it, and a loop's body is counted once
# whatever its trip count (FLUX.1-dev's scanned blocks on v5p-8 came out at 670 % MFU). An MFU from such an
# estimate would be too high, so `aot` gives none and says which parts, and names the same step's complete program.
COMPLETE_ESTIMATE_FLAGS = "--config.attention=xla --config.scan_blocks=false --config.accum_steps=1"
ESTIMATE_GAPS = {
    "Pallas kernels (attention=pallas)": re.compile(r"custom_call_target=\"tpu_custom_call\""),
    "loops counted once (scan_blocks, accum_steps > 1)": re.compile(r"\swhile\("),
}


def estimate_gaps(hlo_text: str) -> list[str]:
  """What XLA's cost estimate of this compiled HLO leaves out (ESTIMATE_GAPS); empty when it counts it all."""
  return [name for name, pattern in ESTIMATE_GAPS.items() if pattern.search(hlo_text)]


def compile_into(report: Report, slc, compile_fn) -> bool:
  """Runs `compile_fn` and fills `report` from the executable: compile time, XLA's memory figures and the peak
  against the slice's HBM, XLA's cost model. False (with report.error, and report.missing_bytes when XLA says
  how much HBM is short) if it did not compile."""
  start = time.perf_counter()
  try:
    compiled = compile_fn()
  except Exception as e:  # noqa: BLE001  (XLA raises JaxRuntimeError; anything else is a bug to report)
    report.compile_seconds, report.error = time.perf_counter() - start, f"{type(e).__name__}: {e}"
    if "RESOURCE_EXHAUSTED" in str(e):
      report.missing_bytes = missing_hbm(str(e))
    return False
  report.compile_seconds, report.compiled = time.perf_counter() - start, compiled
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
  return True


def denoiser_forward_flops(target: Target, config) -> float:
  """FLOPs of one denoiser forward on one latent at config.resolution, from XLA's cost analysis of the lowered
  (not compiled) forward with plain XLA attention, so attention's matmuls are counted (a Pallas kernel's are
  not). Counts multiplies and adds: 2 per multiply-accumulate, as model-FLOP conventions do."""
  import jax
  from flax import nnx
  model = target.model
  abstract = model.family.abstract_denoiser(model.denoiser_config, attention="xla")
  from mapo_jax import sharding
  one = sharding.make_mesh((1, 1, 1), jax.devices("cpu")[:1])
  batch = model.family.abstract_batch(model.denoiser_config, config.resolution, 1, one,
                                      vae_downsample=model.vae_downsample)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  moments = batch.pop("moments_w")
  for key in ("moments_l", "rpo_emb"):
    batch.pop(key, None)
  x = jax.ShapeDtypeStruct(moments.shape[:-1] + (moments.shape[-1] // 2,), moments.dtype)
  t = jax.ShapeDtypeStruct((1,), jax.numpy.float32)
  graphdef, state = nnx.split(abstract)
  lowered = jax.jit(lambda s, x, t, c: model.family.denoise(nnx.merge(graphdef, s), x, t, c)).lower(state, x, t, batch)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def model_flops_per_step(target: Target, config, global_batch_size: int) -> float:
  """The step's useful FLOPs: per pair, forward and backward (3 forwards) of every trained latent (2: winner and
  loser; 1 for SFT, and for KTO on unpaired samples), plus a forward per latent of the reference (DPO and the
  other reference objectives). Remat's recomputation is not useful work and is not counted."""
  from mapo_jax.training import objectives
  objective = objectives.get_objective(config.objective)
  latents = 2 if objective.paired or objective.unpaired else 1
  per_latent = 3 + (1 if objective.needs_reference else 0)
  return global_batch_size * latents * per_latent * denoiser_forward_flops(target, config)


def gib(n: int | None) -> str:
  if n is None:
    return "?"
  unit = "GiB" if abs(n) >= 1024**3 else "MiB"
  return f"{n / _UNITS[unit[0]]:9.3f} {unit}"


def print_report(r: Report) -> None:
  print(f"{r.model} · {r.objective} · {r.resolution} px on {r.topology} ({r.chips} chips, {r.hosts} hosts), "
        f"mesh {r.mesh}, attention {r.attention!r}")
  if r.objective == "sample":
    print(f"batch: {r.global_batch_size} latents per denoiser call ({r.micro_pairs_per_chip:g} per chip)")
  else:
    print(f"batch: {r.global_batch_size} pairs per step = {r.accum_steps} micro-batches x "
          f"{r.micro_pairs_per_chip:g} pairs per chip")
  print("per chip:")
  print(f"  parameters       {gib(r.params_bytes)}")
  print(f"  optimizer state  {gib(r.opt_state_bytes)}")
  print(f"  reference        {gib(r.reference_bytes)}")
  if r.text_encoder_bytes:
    print(f"  text encoders    {gib(r.text_encoder_bytes)}  (the step encodes the batch's token ids)")
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
    seconds = r.estimated_step_seconds if r.estimated_step_seconds is not None else float("nan")
    print(f"XLA cost model (an estimate, per chip): {r.flops:.4g} FLOP per step (remat's recompute included), "
          f"{seconds:.4g} s per step")
  if r.estimate_leaves_out:
    print(f"XLA's estimate leaves out: {'; '.join(r.estimate_leaves_out)}, so no MFU; for one, compile the same "
          f"step with {COMPLETE_ESTIMATE_FLAGS}")
  if r.model_flops is not None:
    print(f"model FLOPs: {r.model_flops:.4g} per step ({r.model_flops / r.global_batch_size:.4g} per pair)"
          + (f"; MFU at XLA's estimate: {100 * r.mfu:.1f} % of {r.chips} chips' bf16 peak" if r.mfu else ""))
  print(f"compile: {r.compile_seconds:.1f} s")


# Host memory a compile needs: measured on this project's compiles (bench/RESULTS.md, "SDXL at TPU scale"):
# the micro preset's step peaked at 3.5 GiB; SDXL's (2.57 B parameters) at 13.1 GiB with scanned block stacks
# and about 32 GiB unrolled.
HOST_BASE_GIB = 4.0
HOST_GIB_PER_BILLION = {True: 4.0, False: 12.0}  # scanned stacks, unrolled


def host_memory_estimate(target: Target, config) -> float:
  """GiB of host memory the compile will need: a fixed part and a part per trained or frozen parameter."""
  import jax
  built = target.built
  params = sum(x.size for x in jax.tree.leaves((built.state.params, built.frozen.policy, built.frozen.reference,
                                                built.frozen.text)))
  return HOST_BASE_GIB + HOST_GIB_PER_BILLION[bool(config.scan_blocks)] * params / 1e9


def host_memory_available() -> tuple[float, float]:
  """(available RAM, free swap) in GiB, from /proc/meminfo; (inf, 0) where it cannot be read."""
  try:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
  except OSError:
    return float("inf"), 0.0
  kib = lambda key: float(info.get(key, "0 kB").split()[0])
  return kib("MemAvailable") / 2**20, kib("SwapFree") / 2**20


def check_host_memory(target: Target, config, log=print) -> None:
  """One line on the host's memory before a compile; a second one, with how to add swap, if it looks short."""
  need = host_memory_estimate(target, config)
  ram, swap = host_memory_available()
  log(f"host memory: the compile needs about {need:.0f} GiB; this host has {ram:.0f} GiB available and "
      f"{swap:.0f} GiB of swap")
  if need > ram + swap:
    log(f"host memory: not enough for this compile ({need:.0f} > {ram + swap:.0f} GiB): it would be killed; add swap "
        "first, e.g. (as root) fallocate -l 40G /swapfile && chmod 600 /swapfile && mkswap /swapfile && "
        "swapon /swapfile, or compile on a larger host")


def status(r: Report) -> int:
  if r.fits:
    return FITS
  if r.error is None or "RESOURCE_EXHAUSTED" in r.error:
    return DOES_NOT_FIT
  return ERROR


def required_bytes(r: Report) -> int | None:
  """Bytes per chip the probe's step needs: its peak when it compiled, else the HBM plus what XLA said is
  missing; None when the compiler named no size."""
  if r.peak_bytes is not None:
    return r.peak_bytes
  return r.hbm_bytes + r.missing_bytes if r.missing_bytes is not None else None


def search_max_batch(probe, unit: int, limit: int = 1 << 14, start: int = 1):
  """Largest multiple k*unit that `probe(global_batch_size) -> Report` fits. From k = `start`: doubling k while
  it fits (halving while it does not), then a search between the last fit and the first failure. A step's
  memory is close to linear in its batch, so each probe there is the batch where the line through the two
  bracketing probes' sizes (`required_bytes`) meets the HBM, kept strictly inside the bracket; bisection where a
  size is unknown. Returns (best report or None, the first report above it that did not fit or errored)."""
  best, failed, k = None, None, max(1, start)
  while k * unit <= limit:
    r = probe(k * unit)
    if r.fits:
      best = r
      if failed is not None:
        break
      k *= 2
    else:
      failed = r
      if best is not None or status(r) == ERROR or k == 1:
        break
      k //= 2
  if best is None or failed is None or status(failed) == ERROR:
    return best, failed
  lo, hi = best.global_batch_size // unit, failed.global_batch_size // unit
  while hi - lo > 1:
    mid = (lo + hi) // 2
    low_bytes, high_bytes = required_bytes(best), required_bytes(failed)
    if low_bytes is not None and high_bytes is not None and high_bytes > low_bytes:
      at_hbm = lo + (best.hbm_bytes - low_bytes) * (hi - lo) // (high_bytes - low_bytes)
      mid = min(max(at_hbm, lo + 1), hi - 1)
    r = probe(mid * unit)
    if r.fits:
      lo, best = mid, r
    else:
      hi, failed = mid, r
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
  text_tokens: dict | None = None  # token ids per text tower when the step encodes the prompts (`step_text`)


def step_text(model: Model, config, mesh, text: str = "auto"):
  """(towers, encode, tokens) of the frozen text towers, shapes only, when the step encodes the batch's token ids
  (a token ids cache: `encode --text ids`, the default of the families with TEXT_IN_STEP), else None. The towers
  are the folder's, or for a preset the family's published ones (FLUX.1's CLIP-L and T5-XXL, SD3.5's three), in
  config.dtype as the trainer loads them. auto: where the family encodes in the step and the towers give the
  prompt embeddings the denoiser takes (a tiny preset's widths are not the published towers'); ids: that, or a
  ValueError."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from mapo_jax.data.cache import PROMPT_EMBED_KEYS
  if text not in ("auto", "ids", "embeddings"):
    raise ValueError(f"--text {text!r}: expected auto, ids or embeddings")
  family = model.family
  if text == "embeddings" or not getattr(family, "TEXT_IN_STEP", False):
    if text == "ids":
      raise ValueError(f"--text ids: {model.name} does not encode prompts in the train step")
    return None
  dtype = jnp.dtype(config.dtype)
  towers, encode, tokens = family.abstract_step_text(model.folder, dtype=dtype, param_dtype=dtype,
                                                     **text_length(config, family))
  graphdef, state = nnx.split(towers)
  ids = {name: jax.ShapeDtypeStruct((1, n), jnp.int32) for name, n in tokens.items()}
  given = jax.eval_shape(lambda s, i: encode(nnx.merge(graphdef, s), i), state, ids)
  taken = family.abstract_batch(model.denoiser_config, config.resolution, 1, mesh, vae_downsample=model.vae_downsample,
                                **text_length(config, family))
  if any(given[k].shape != taken[k].shape for k in PROMPT_EMBED_KEYS):
    if text == "ids":
      raise ValueError(f"--text ids: the text towers give {({k: given[k].shape for k in PROMPT_EMBED_KEYS})}, but "
                       f"{model.name} takes {({k: taken[k].shape for k in PROMPT_EMBED_KEYS})}")
    return None
  return towers, encode, tokens


def slice_model_and_mesh(config, topology: str, model_name: str | None, config_file: str | None):
  """What every compile starts from: the checked config's slice, model and mesh, and the model options."""
  from mapo_jax import config as config_lib
  from mapo_jax import sharding
  from mapo_jax.training import tpu
  from mapo_jax.training.build import model_options
  check_config(config)
  slc = tpu.parse(topology)
  model = resolve_model(model_name, config, config_file)
  config_lib.validate_for_devices(config, slc.chips, slc.hosts)
  mesh = sharding.make_mesh(config.mesh, slc.devices())
  return slc, model, mesh, model_options(config, mesh)


def build_target(config, topology: str, model_name: str | None = None, *, config_file: str | None = None,
                 text: str = "auto") -> Target:
  """The config's train step (mapo_jax/training/build.py: state, shardings, objective, optimizer, LoRA,
  attention kernel) from abstract models on `topology`'s devices; nothing is read but config files. `text`: as
  `step_text` (the frozen text towers in the step, or prompt embeddings in the batch)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the topology's libtpu beside any other
  import jax
  import jax.numpy as jnp

  from mapo_jax.data.cache import TEXT_IDS_PREFIX
  from mapo_jax.training.build import build, denoiser_param_dtype, needs_reference_model

  slc, model, mesh, options = slice_model_and_mesh(config, topology, model_name, config_file)
  family = model.family
  abstract = family.abstract_denoiser(model.denoiser_config, param_dtype=denoiser_param_dtype(config), **options)
  reference = None
  if needs_reference_model(config):
    reference = family.abstract_denoiser(model.denoiser_config, param_dtype=jnp.dtype(config.ref_param_dtype),
                                         **options)
  towers = step_text(model, config, mesh, text)
  empty_prompt = None
  if config.data.empty_prompt_prob > 0 and towers is not None:  # the empty prompt's token ids
    empty_prompt = {TEXT_IDS_PREFIX + k: jax.ShapeDtypeStruct((n,), jnp.int32) for k, n in towers[2].items()}
  elif config.data.empty_prompt_prob > 0:  # the empty prompt's rows, shaped like one pair's prompt keys
    one = family.abstract_batch(model.denoiser_config, config.resolution, 1, mesh,
                                vae_downsample=model.vae_downsample, **text_length(config, family))
    empty_prompt = {k: jax.ShapeDtypeStruct(one[k].shape[1:], one[k].dtype) for k in family.PROMPT_KEYS}
  built = build(config, family, abstract, reference, model.schedule, model.latents, mesh, empty_prompt,
                text=None if towers is None else towers[:2])
  return Target(built, mesh, slc, model, options["attention"], None if towers is None else towers[2])


def text_length(config, family) -> dict[str, int]:
  """The T5 length the run encodes prompts at (config.max_sequence_length; 0: the family's default), as the
  families' abstract_batch / abstract_step_text take it; ConfigError for a family without T5."""
  from mapo_jax import pipelines
  from mapo_jax.config import ConfigError
  try:
    name = family.__name__.rsplit(".", 1)[-1]
    return pipelines.family_text_options(family, config.max_sequence_length,
                                         f"{config.max_sequence_length}: {name} pipelines")
  except ValueError as e:
    raise ConfigError("max_sequence_length", str(e)) from None


def abstract_batch(target: Target, config, global_batch_size: int) -> dict:
  """A training batch of `global_batch_size` pairs as sharded ShapeDtypeStructs, with the keys the objective
  reads (SmPO: the pairs' reward scores); where the step encodes the prompts (`target.text_tokens`), each text
  tower's int32 token ids in place of the prompt embeddings, as a token ids cache holds them."""
  import jax
  import jax.numpy as jnp
  from mapo_jax.data.cache import PROMPT_EMBED_KEYS, TEXT_IDS_PREFIX
  from mapo_jax.training import objectives
  model = target.model
  batch = model.family.abstract_batch(model.denoiser_config, config.resolution, global_batch_size, target.mesh,
                                      config.data.rpo_embedding, vae_downsample=model.vae_downsample,
                                      **text_length(config, model.family))
  if target.text_tokens:
    for key in PROMPT_EMBED_KEYS:
      del batch[key]
    batch.update({TEXT_IDS_PREFIX + name: jax.ShapeDtypeStruct((global_batch_size, n), jnp.int32,
                                                               sharding=batch["time_ids"].sharding)
                  for name, n in target.text_tokens.items()})
  if objectives.get_objective(config.objective).needs_scores:
    score = batch["time_ids"].update(shape=(global_batch_size,))
    batch.update(score_w=score, score_l=score)
  return batch


def sample_report(config, topology: str, model_name: str | None = None, *, config_file: str | None = None,
                  log=print) -> Report:
  """The sampling path on `topology`: one call of the family's denoiser on config.global_batch_size latents at
  config.resolution (the batch over (data, fsdp), weights by the logical-axis rules in config.param_dtype),
  compiled and measured per chip like the train step."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mapo_jax import sharding

  slc, model, mesh, options = slice_model_and_mesh(config, topology, model_name, config_file)
  family, n = model.family, config.global_batch_size
  abstract = family.abstract_denoiser(model.denoiser_config, param_dtype=jnp.dtype(config.param_dtype), **options)
  params, _ = sharding.place(abstract, mesh, nnx.Param)
  rest, _ = sharding.place(abstract, mesh, nnx.Not(nnx.Param))
  graphdef = nnx.graphdef(abstract)
  batch = family.abstract_batch(model.denoiser_config, config.resolution, n, mesh,
                                vae_downsample=model.vae_downsample)
  moments = batch["moments_w"]
  x = jax.ShapeDtypeStruct(moments.shape[:-1] + (moments.shape[-1] // 2,), jnp.float32, sharding=moments.sharding)
  t = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding.batch_sharding(mesh))
  cond = {k: v for k, v in batch.items() if k not in ("moments_w", "moments_l", "rpo_emb")}
  call = jax.jit(lambda p, r, x, t, c: family.denoise(nnx.merge(graphdef, p, r), x, t, c))
  need = HOST_BASE_GIB + HOST_GIB_PER_BILLION[bool(config.scan_blocks)] * sum(
      v.size for v in jax.tree.leaves(params)) / 1e9 / 3  # a forward alone: about a third of a train step's program
  ram, swap = host_memory_available()
  log(f"host memory: the compile needs about {need:.0f} GiB; this host has {ram:.0f} GiB available and "
      f"{swap:.0f} GiB of swap")
  report = Report(topology=slc.topology, chips=slc.chips, hosts=slc.hosts, mesh=dict(mesh.shape), model=model.name,
                  objective="sample", attention=options["attention"], resolution=config.resolution,
                  global_batch_size=n, accum_steps=1,
                  micro_pairs_per_chip=n / (mesh.shape["data"] * mesh.shape["fsdp"]), hbm_bytes=slc.hbm_bytes,
                  params_bytes=shard_bytes(params) + shard_bytes(rest), opt_state_bytes=0, reference_bytes=0,
                  batch_bytes=shard_bytes((x, t, cond)))

  def compile_forward():
    with jax.set_mesh(mesh):
      return call.lower(params, rest, x, t, cond).compile()

  compile_into(report, slc, compile_forward)
  return report


def run(config, topology: str, model_name: str | None = None, *, config_file: str | None = None,
        max_batch: bool = False, log=print, text: str = "auto") -> Report:
  """Builds the config's step from abstract models on `topology`'s devices and compiles it (with
  `max_batch`: the largest fitting batch; its report, or the smallest probe's when none fits). `text`: as
  `step_text`."""
  from mapo_jax import config as config_lib
  target = build_target(config, topology, model_name, config_file=config_file, text=text)
  check_host_memory(target, config, log)
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
    needs = (f"peak {gib(r.peak_bytes).strip()}" if r.peak_bytes is not None else
             f"needs at least {gib(required_bytes(r)).strip()} (the compiler's figure)")
    log(f"probe: global_batch_size={size}: {verdict}, {needs} of {gib(r.hbm_bytes).strip()}, "
        f"{r.compile_seconds:.0f} s")
    log(r.json())  # each probe's row as it finishes: a search cut short keeps what it measured
    return r

  best, failed = search_max_batch(logged, unit, start=config.global_batch_size // unit)
  if best is None:
    return failed
  log(f"largest batch that fits: global_batch_size={best.global_batch_size} "
      f"({best.micro_pairs_per_chip:g} pairs per chip per micro-batch)")
  return best


def main(cli: SimpleNamespace, argv) -> int:
  del argv
  if not cli.topology.value:
    print("--topology is required (e.g. v5p-8, v5litepod-16, v6e-8, v5e:2x2)", file=sys.stderr)
    return ERROR
  import jax
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # the host compiles; never probe for local accelerators
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  config, topology, architecture = cli.config.value, cli.topology.value, cli.architecture.value
  try:
    if cli.sample.value:
      report = sample_report(config, topology, architecture, config_file=config_file)
    else:
      report = run(config, topology, architecture, config_file=config_file, max_batch=cli.max_batch.value,
                   text=cli.text.value)
  except Exception as e:  # noqa: BLE001  (a bad config, topology or model: the message says which)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    return ERROR
  print_report(report)
  if cli.dump_hlo.value and report.compiled is not None:
    Path(cli.dump_hlo.value).write_text(report.compiled.as_text())
  print(report.json())
  return status(report)


if __name__ == "__main__":
  from mapo_jax import config as config_lib
  app.run(functools.partial(main, define_flags()),
          flags_parser=functools.partial(config_lib.parse_command_line, dashed=DASHED_FLAGS, doc=__doc__))
