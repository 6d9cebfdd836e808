"""Preference fine-tuning of a diffusion model (MaPO, Diffusion-DPO, Diffusion-RPO, SFT).

    python -m mapo_jax.train --config configs/sdxl_mapo.py --workdir /runs/mapo \
        [--config.optim.lr=2e-5 ...] [--stop-after-step K]
    python -m mapo_jax.train --config configs/demo.py --workdir /tmp/demo   # tiny, CPU, minutes

The workdir receives checkpoints/ (Orbax; a run with an existing workdir resumes from its latest
checkpoint), metrics.jsonl (one JSON object per logged step), tensorboard/, samples/step_NNNNNN.png,
config.json and, when the run completes, export/ (a diffusers pipeline folder with the trained UNet; for a
LoRA run, config.lora.rank > 0, export/pytorch_lora_weights.safetensors with the adapters alone).
SIGTERM or SIGINT writes a checkpoint after the current step and exits with status 0, as does
--stop-after-step K after step K (the schedule still ends at config.steps, so a later run resumes).
Multi-host: on GPU clusters pass --coordinator_address, --num_processes and --process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); multi-host TPU slices are detected.
"""
from __future__ import annotations

import functools
import json
import logging as pylogging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from mapo_jax import config as config_lib
from mapo_jax import convert, pipelines, sampling, sharding
from mapo_jax.toy import demo
from mapo_jax.toy import judging
from mapo_jax.training import objectives
from mapo_jax.training import optim
from mapo_jax.run import workdir as workdir_lib
from mapo_jax.training.build import build, compile_step, denoiser_param_dtype, model_options, needs_reference_model
from mapo_jax.run.checkpoint import CHECKPOINTS, CheckpointSaveError, Checkpointer, NoGoodCheckpointError, abstract_like
from mapo_jax.data import (cached_eval_batch, cached_loader, onthefly_eval_batch, onthefly_loader,
                           open_source, read_manifest)
from mapo_jax.data.cache import RecordLayout
from mapo_jax.encode import make_encoder
from mapo_jax.export import export_denoiser, export_lora
from mapo_jax.run.guards import (DivergedError, check_cache_vae, check_exportable, check_skipped,
                             global_norm)
from mapo_jax.run.metrics import MetricsWriter
from mapo_jax.run.workdir import WorkdirLock

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder; an existing one is resumed (required)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume even though the objective, model, resolution or data changed; "
    "also spelled --allow-config-change")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print every config key with its value and exit; "
                                  "also spelled --print-config")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after_step", None, "stop after this step as a preemption would (checkpoint, exit 0); "
    "also spelled --stop-after-step")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0 (multi-host GPU/CPU)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                                      "processes in a multi-host job")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", 0)),
                                   "this process's index in a multi-host job")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with the cluster "
                                 "auto-detected (TPU pod slices, SLURM); launch/tpu_pod.sh sets it")
DASHED_FLAGS = ("stop-after-step", "allow-config-change", "print-config")  # absl only knows underscores


def initialize_distributed() -> None:
  """jax.distributed for multi-host runs: explicit coordinator (GPU/CPU clusters) or a TPU pod slice."""
  if _COORDINATOR.value:
    if jax.config.jax_platforms == "cpu":  # CPU collectives across processes need gloo
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # several TPU hosts
    jax.distributed.initialize()


def barrier(name: str) -> None:
  """Waits for every process at the coordination service. The first step's collectives must not start
  while another process is still compiling: CPU (gloo) collectives give up after 30 s."""
  if jax.process_count() > 1:
    from jax._src import distributed  # the client jax.distributed.initialize() set up
    distributed.global_state.client.wait_at_barrier(f"mapo_jax/{name}", 3_600_000)


def save_grid(images: np.ndarray, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(sampling.make_grid(images, cols=math.ceil(math.sqrt(len(images))))).save(path)


def check_batch_keys(objective: str, keys: tuple[str, ...], cache_dir: str) -> None:
  """A cache of unpaired samples trains only an objective on unpaired samples (KTO); SmPO needs pairs
  with reward scores. ConfigError naming config.objective otherwise."""
  obj = objectives.get_objective(objective)
  if "moments" in keys and not obj.unpaired:
    raise config_lib.ConfigError("objective", f"{objective!r} trains on pairs, but {cache_dir} holds unpaired "
                                 "samples (only 'kto' trains on them)")
  if obj.needs_scores and "score_w" not in keys:
    raise config_lib.ConfigError("objective", f"{objective!r} needs the pairs' reward scores (score_w, score_l), "
                                 f"which {cache_dir} does not hold: encode pairs JSONL with those fields")


def place_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """A batch every process holds whole (the held-out pairs) as global arrays sharded by `sharding`."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def main(argv) -> None:
  del argv
  if _PRINT_CONFIG.value:
    print("\n".join(f"config.{k} = {v!r}" for k, v in config_lib.flatten(_CONFIG.value).items()))
    return
  if not _WORKDIR.value:
    raise config_lib.UsageError("--workdir is required: the run's output folder (an existing one is resumed)")
  config, workdir = _CONFIG.value, Path(_WORKDIR.value).absolute()
  # ----------------------------------------------------------------------------------------------
  # Config and workdir: every value is checked before any model is loaded or anything compiles; one
  # trainer per workdir; a resume may not change what the run trains.
  # ----------------------------------------------------------------------------------------------
  config_lib.validate(config)
  initialize_distributed()
  config_lib.validate_for_devices(config, jax.device_count(), jax.process_count())
  lead = jax.process_index() == 0
  if lead:
    WorkdirLock(workdir).acquire()  # released by the kernel when this process ends, however it ends
  checkpointer = Checkpointer(workdir / CHECKPOINTS, keep=config.keep_checkpoints)
  resume_step = checkpointer.latest_step()
  if lead:
    if resume_step is not None:
      workdir_lib.check_resume_config(workdir, json.loads(config.to_json()), allow_change=_ALLOW_CONFIG_CHANGE.value)
    workdir_lib.record_config(workdir, config.to_json(indent=2), resume_step or 0)
  logging.info("config:\n%s", config)

  # ----------------------------------------------------------------------------------------------
  # Mesh and (demo only) assets.
  # ----------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())
  if config.demo_assets:
    if lead:
      demo.ensure_assets(config.demo_assets)
    multihost_utils.sync_global_devices("demo assets")

  # ----------------------------------------------------------------------------------------------
  # Models, by the pipeline's family: the trained denoiser, the frozen reference (DPO/RPO), and the
  # components that sample grids and on-the-fly encoding need. Weights go from safetensors straight
  # into each device's shard: no device holds a whole model.
  # ----------------------------------------------------------------------------------------------
  family = pipelines.family(config.pipeline)
  if config.vae and not Path(config.vae).exists():
    raise config_lib.ConfigError("vae", f"{config.vae!r} does not exist: a VAE folder (config.json and weights), "
                                 "or '' for the pipeline's own vae/")
  multiple = family.resolution_multiple(config.pipeline)
  if config.resolution % multiple:
    raise config_lib.ConfigError("resolution", f"{config.resolution} is not a multiple of {multiple} "
                                 f"(the VAE's and the UNet's downsampling of {config.pipeline})")
  options = model_options(config, mesh)
  model = family.load_denoiser(config.pipeline, param_dtype=denoiser_param_dtype(config), mesh=mesh, **options)
  reference = None
  if needs_reference_model(config):
    reference = family.load_denoiser(config.reference or config.pipeline, mesh=mesh,
                                     param_dtype=jnp.dtype(config.ref_param_dtype), **options)
  needs_frozen = (config.sample_every > 0 or bool(config.judge) or config.data.mode == "onthefly"
                  or config.data.empty_prompt_prob > 0)
  pipe = family.load_pipeline(config.pipeline, (family.FROZEN if needs_frozen else ()) + ("scheduler",),
                              vae=config.vae or None)

  # ----------------------------------------------------------------------------------------------
  # Input: global batches of `global_batch_size` pairs sharded over (data, fsdp); each process reads
  # its own slice. The iterator's position is checkpointed with the state.
  # ----------------------------------------------------------------------------------------------
  loader_kwargs = dict(batch_size=config.global_batch_size // jax.process_count(), seed=config.seed,
                       sharding=sharding.batch_sharding(mesh), num_threads=config.data.num_threads,
                       holdout=config.data.eval_pairs)
  eval_batch = None
  if config.data.mode == "cached":
    manifest = read_manifest(config.data.cache_dir)
    encoded_at = manifest["settings"]["resolution"]
    if encoded_at != config.resolution:
      raise config_lib.ConfigError("resolution", f"{config.resolution}, but {config.data.cache_dir} was "
                                   f"encoded at {encoded_at}")
    check_cache_vae(manifest, config.data.cache_dir, config.vae)
    dataset = cached_loader(config.data.cache_dir, **loader_kwargs)
    if config.data.eval_pairs:
      eval_batch = cached_eval_batch(config.data.cache_dir, config.data.eval_pairs)
    cache_dtypes = RecordLayout.from_json(manifest["record"]).dtypes
    check_batch_keys(config.objective, tuple(cache_dtypes), config.data.cache_dir)
  else:
    source, encoder = open_source(config.data.source), make_encoder(pipe, rpo_embedding=config.data.rpo_embedding)
    pair_kwargs = dict(resolution=config.resolution, random_crop=config.data.random_crop)
    dataset = onthefly_loader(source, encoder, **pair_kwargs, **loader_kwargs)
    if config.data.eval_pairs:
      eval_batch = onthefly_eval_batch(source, encoder, config.data.eval_pairs, seed=config.seed,
                                       num_threads=config.data.num_threads, **pair_kwargs)
    cache_dtypes = None
  if eval_batch is not None:
    eval_batch = place_global(eval_batch, sharding.batch_sharding(mesh))
  data_iterator = iter(dataset)
  # Empty-prompt dropout: "" encoded once here, swapped in per pair inside the step (train_step.augment_batch).
  empty_prompt = pipelines.empty_prompt_rows(pipe, cache_dtypes) if config.data.empty_prompt_prob > 0 else None

  # ----------------------------------------------------------------------------------------------
  # Train state (float32 master params + optimizer state, sharded), frozen parameters and the step.
  # ----------------------------------------------------------------------------------------------
  built = build(config, family, model, reference, pipe.schedule, pipe.latents, mesh, empty_prompt)
  del model, reference  # their arrays now live in `built` (the trainable ones donated to the state)
  graphdef, state, frozen = built.graphdef, built.state, built.frozen
  initial_norm = float(global_norm(state.params))  # the starting model's, for the export check
  learning_rate = optim.learning_rate(config.optim)

  # ----------------------------------------------------------------------------------------------
  # Restore: the newest checkpoint that restores (onto this run's mesh), else start from the pipeline.
  # ----------------------------------------------------------------------------------------------
  if resume_step is not None:
    restored = checkpointer.restore_latest(abstract_like(state, built.state_shardings), data_iterator)
    if restored is not None:
      state = restored
      logging.info("resumed from %s/%s/%d", workdir, CHECKPOINTS, int(state.step))
  first_step = int(state.step)

  def sample(prompts: list[str]) -> np.ndarray:
    """The current model's images for `prompts` on fixed seeds. Every process samples on the global mesh
    (the trained parameters are sharded over all of them)."""
    images, _ = sampling.generate_images(
        pipe, prompts, steps=config.sample_steps, guidance=config.sample_guidance, seed=config.seed,
        height=config.resolution, width=config.resolution, unet=(graphdef, state.params, frozen.policy), mesh=mesh)
    return images

  def sample_grid(step: int) -> None:
    """Process 0 writes the grid of sample_prompts."""
    images = sample(list(config.sample_prompts))
    if lead:
      save_grid(images, workdir / "samples" / f"step_{step:06d}.png")

  def judge_samples(step: int) -> None:
    """Samples judge_prompts and judges them (process 0)."""
    prompts = [p for p in config.judge_prompts for _ in range(config.judge_samples_per_prompt)]
    images = sample(prompts)
    if lead:
      scores = judging.JUDGES[config.judge](images, prompts)
      judge_log.write(step, scores, images, cols=config.judge_samples_per_prompt)
      metrics_writer.write_scalars(step, {f"judge/{k}": v for k, v in scores.items()})
      progress.write(f"judge at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                     file=sys.stderr)

  # ----------------------------------------------------------------------------------------------
  # Loop. Only logging steps wait for the devices; SIGTERM/SIGINT and --stop-after-step end the run
  # after a step with a checkpoint, as a preemption would. A step's checkpoint is started before its
  # sample grid, and any error first finishes the save in flight.
  # ----------------------------------------------------------------------------------------------
  stop_requested = []

  def on_signal(signum, _frame):
    logging.warning("signal %d: checkpointing after this step, then exiting", signum)
    stop_requested.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  metrics_writer = MetricsWriter(workdir, first_step=first_step, enabled=lead)
  judge_log = judging.JudgeLog(workdir, first_step=first_step, enabled=lead and bool(config.judge))
  progress = tqdm(total=config.steps, initial=first_step, unit="step", disable=not lead, dynamic_ncols=True)
  last_log, last_time = first_step, time.perf_counter()
  skip_history = [(first_step, int(state.skipped))]
  step = first_step
  compiled_step = compiled_eval = None
  try:
    if config.judge and step == 0:
      judge_samples(0)  # the base, before any update
    while step < config.steps:
      batch = next(data_iterator)
      if compiled_step is None:
        start = time.perf_counter()
        progress.write("compiling the train step (once per run; minutes for a large model)...", file=sys.stderr)
        compiled_step = compile_step(built.train_step, mesh, state, batch, frozen)
        progress.write(f"compiled the train step in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        barrier("train step compiled")
      state, metrics = compiled_step(state, batch, frozen)
      step += 1
      progress.update()
      checkpointer.check()  # a failed asynchronous save stops the run here, one step later at most
      stop = bool(stop_requested) or step == _STOP_AFTER.value
      if step % config.log_every == 0 or step == config.steps or stop:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        now = time.perf_counter()
        metrics.update(lr=float(learning_rate(step - 1)),
                       pairs_per_s=(step - last_log) * config.global_batch_size / (now - last_time))
        if eval_batch is not None:  # held-out pairs, fixed noise: after the throughput, which it would skew
          if compiled_eval is None:
            compiled_eval = compile_step(built.eval_step, mesh, state.params, eval_batch, frozen)
          evaluated = jax.device_get(compiled_eval(state.params, eval_batch, frozen))
          metrics.update({f"eval_{k}": float(evaluated[k]) for k in ("loss", "accuracy", "margin") if k in evaluated})
        last_log, last_time = step, time.perf_counter()
        progress.set_postfix(loss=f"{metrics['loss']:.4g}", pairs_s=f"{metrics['pairs_per_s']:.3g}")
        if not np.isfinite(metrics["loss"]):
          logging.warning("step %d: non-finite loss, update skipped (%d so far)", step, metrics["skipped_steps"])
        metrics_writer.write(step, metrics)
        check_skipped(skip_history, step, int(metrics["skipped_steps"]), config.max_skipped_fraction)
      if step % config.checkpoint_every == 0 or step == config.steps or stop:
        checkpointer.save(step, state, data_iterator)
      if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
        sample_grid(step)
      if config.judge and ((config.judge_every and step % config.judge_every == 0) or step == config.steps):
        judge_samples(step)
      if stop:
        break
    checkpointer.wait()
  except BaseException:
    checkpointer.finish_or_abandon()
    raise
  finally:
    progress.close()
    metrics_writer.close()
  checkpointer.close()
  # Every process leaves together: one that exits while another still finalises the checkpoint
  # would leave the other waiting in jax.distributed's shutdown.
  multihost_utils.sync_global_devices("checkpoint closed")

  # ----------------------------------------------------------------------------------------------
  # Export: the finished model as a diffusers pipeline folder, if its parameters are sound.
  # ----------------------------------------------------------------------------------------------
  if step < config.steps:
    logging.info("stopped after step %d of %d; run again with --workdir %s to resume", step, config.steps, workdir)
    print(f"stopped after step {step}; checkpoint in {workdir / CHECKPOINTS}")
    return
  judged = judge_log.finish()
  if judged:
    first, last = judged
    print(f"judge ({config.judge}), step {first['step']} -> {last['step']}: " + ", ".join(
        f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k != "step"))
  check_exportable(state.params, initial_norm, config.max_param_norm_ratio)
  params = convert.host_params(state.params)  # one parameter at a time; every process takes part
  if lead:
    if not (workdir / "export").exists() or first_step < config.steps:
      if config.lora.rank:  # the adapters alone, as diffusers' save_lora_weights writes them
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen.policy)
        export_lora(nnx.merge(graphdef, params, shapes), workdir / "export")
      else:
        export_denoiser(nnx.merge(graphdef, params, convert.host_params(frozen.policy)), config.pipeline,
                        workdir / "export", dtype=config.export_dtype)
    print(f"done: {config.steps} steps in {workdir}\n  checkpoints  {workdir / CHECKPOINTS}\n"
          f"  export       {workdir / 'export'}\n"
          + (f"  samples      {workdir / 'samples'}\n" if config.sample_every else "")
          + f"  metrics      {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tensorboard'})"
          + (f"\n  judge        {workdir / 'judge'} (curve.png, before_after.png)" if config.judge else ""))
  multihost_utils.sync_global_devices("export")


# Errors a user can act on: reported in one line, exit status 1 (no traceback).
USER_ERRORS = (config_lib.ConfigError, config_lib.UsageError, workdir_lib.WorkdirBusyError, workdir_lib.ConfigChangedError,
               CheckpointSaveError, NoGoodCheckpointError, DivergedError, FileNotFoundError)


def quiet_orbax(record: pylogging.LogRecord) -> bool:
  """Orbax logs each save's every phase at INFO, and a failed save's traceback from each of its threads:
  keep its warnings and errors as one line each (the trainer reports the failure itself)."""
  if "orbax" not in record.pathname:
    return True
  if record.levelno < pylogging.WARNING:
    return False
  record.msg, record.args = str(record.getMessage()).splitlines()[0] if record.getMessage() else "", ()
  record.exc_info = record.exc_text = None
  return True


_background_errors: set[str] = set()


def log_background_error(exc_type, exc_value) -> None:
  """One line per kind of error raised in a background thread (checkpoint writers, data workers) instead
  of a traceback from every thread: a failed save alone raised hundreds of them."""
  line = f"{exc_type.__name__}: {str(exc_value).splitlines()[0] if str(exc_value) else ''}"
  if line not in _background_errors:
    _background_errors.add(line)
    logging.warning("in a background thread: %s", line[:500])


def run(argv) -> None:
  logging.get_absl_handler().addFilter(quiet_orbax)
  sys.unraisablehook = lambda u: log_background_error(u.exc_type, u.exc_value)
  threading.excepthook = lambda a: log_background_error(a.exc_type, a.exc_value)
  try:
    main(argv)
  except USER_ERRORS as e:
    print(f"\nerror: {e}", file=sys.stderr)  # on a line of its own, whatever a thread printed last
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a failed asynchronous save can leave orbax's writer thread behind, and the exit must not
    # wait for it (or for the loader's threads).
    os._exit(1)


if __name__ == "__main__":
  app.run(run, flags_parser=functools.partial(config_lib.parse_command_line, dashed=DASHED_FLAGS, doc=__doc__))
