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

import dataclasses
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
from types import ModuleType, SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from mapo_jax import config as config_lib
from mapo_jax import convert, pipelines, sampling, sharding
from mapo_jax.data import (cached_eval_batch, cached_loader, onthefly_eval_batch, onthefly_loader, open_source,
                           read_manifest)
from mapo_jax.data.cache import TEXT_IDS_PREFIX, DamagedShardError, RecordLayout, is_text_ids
from mapo_jax.encode import make_encoder
from mapo_jax.export import export_denoiser, export_lora, run_card
from mapo_jax.run import workdir as workdir_lib
from mapo_jax.run.checkpoint import (CHECKPOINTS, CheckpointSaveError, Checkpointer, NoGoodCheckpointError, abstract_like,
                                     limit_heap_arenas, release_freed_memory)
from mapo_jax.run.guards import (DivergedError, check_cache_text_tokens, check_cache_vae, check_exportable, check_skipped,
                                 global_norm)
from mapo_jax.run.metrics import MetricsWriter
from mapo_jax.run.workdir import WorkdirLock
from mapo_jax.toy import demo, judging
from mapo_jax.training import objectives, optim
from mapo_jax.training.build import (Built, build, compile_step, denoiser_param_dtype, model_options,
                                     needs_reference_model)


@dataclasses.dataclass(frozen=True)
class Processes:
  """How this process joins a multi-host run: an explicit coordinator (GPU/CPU clusters), `distributed`
  (jax.distributed's auto-detection: TPU pod slices, SLURM), or neither (one process). The command line's
  flags, defaulting to the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables."""
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0
  distributed: bool = False

  @classmethod
  def from_env(cls) -> Processes:
    return cls(os.environ.get("JAX_COORDINATOR_ADDRESS"), int(os.environ.get("JAX_NUM_PROCESSES", 1)),
               int(os.environ.get("JAX_PROCESS_ID", 0)))


def define_flags() -> SimpleNamespace:
  """The command line's flags. Defined by the running program only, not on import: mapo_jax.aot defines a
  `--config` too, and a process (a notebook, a test) may import both modules."""
  env = Processes.from_env()
  return SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True),
      workdir=flags.DEFINE_string("workdir", None, "output folder; an existing one is resumed (required)"),
      allow_config_change=flags.DEFINE_bool(
          "allow_config_change", False, "resume even though the objective, model, resolution or data changed; "
          "also spelled --allow-config-change"),
      print_config=flags.DEFINE_bool("print_config", False, "print every config key with its value and exit; "
                                     "also spelled --print-config"),
      stop_after=flags.DEFINE_integer(
          "stop_after_step", None, "stop after this step as a preemption would (checkpoint, exit 0); "
          "also spelled --stop-after-step"),
      coordinator=flags.DEFINE_string("coordinator_address", env.coordinator_address,
                                      "host:port of process 0 (multi-host GPU/CPU)"),
      num_processes=flags.DEFINE_integer("num_processes", env.num_processes, "processes in a multi-host job"),
      process_id=flags.DEFINE_integer("process_id", env.process_id, "this process's index in a multi-host job"),
      distributed=flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with the cluster "
                                    "auto-detected (TPU pod slices, SLURM); launch/tpu_pod.sh sets it"))


DASHED_FLAGS = ("stop-after-step", "allow-config-change", "print-config")  # absl only knows underscores


def host_rss_mib() -> float:
  """This process's resident memory now (not its peak), MiB: logged, so a slow leak shows in metrics.jsonl.
  Freed heap is handed back to the OS first, so what is left is live memory: glibc's arenas otherwise keep a
  varying amount of freed memory that hides a slow leak under noise (bench/RESULTS.md, "Soak")."""
  release_freed_memory()
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError):  # no /proc (macOS): the peak instead
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


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


# ------------------------------------------------------------------------------------------------------
# Phase 1. Config and workdir: every value checked before anything loads or compiles; one trainer per
# workdir, its lock held as long as the run; a resume may not change what the run trains.
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """What lives as long as the run: the workdir's lock (process 0) and the checkpointer."""
  config: ml_collections.ConfigDict
  workdir: Path
  lead: bool  # process 0: holds the lock, writes logs, grids and the export
  lock: WorkdirLock | None
  checkpointer: Checkpointer
  resume_step: int | None  # the newest checkpoint's step, if any

  def close(self) -> None:
    """Closes the checkpointer (idempotent), then releases the workdir."""
    self.checkpointer.close()
    if self.lock is not None:
      self.lock.release()


def open_run(config: ml_collections.ConfigDict, workdir: Path, allow_config_change: bool,
             processes: Processes) -> Run:
  config_lib.validate(config)
  use_compile_cache(config.compile_cache)
  initialize_distributed(config.peer_timeout_s, processes)
  config_lib.validate_for_devices(config, jax.device_count(), jax.process_count())
  lead = jax.process_index() == 0
  lock = WorkdirLock(workdir) if lead else None
  if lock is not None:
    lock.acquire()
  try:
    checkpointer = Checkpointer(workdir / CHECKPOINTS, keep=config.keep_checkpoints,
                                save_timeout_s=config.save_timeout_s)
    resume_step = checkpointer.latest_step()
    if lead:
      if resume_step is not None:
        workdir_lib.check_resume_config(workdir, json.loads(config.to_json()), allow_change=allow_config_change)
      workdir_lib.record_config(workdir, config.to_json(indent=2), resume_step or 0)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  logging.info("config:\n%s", config)
  return Run(config, workdir, lead, lock, checkpointer, resume_step)


def use_compile_cache(folder: str) -> None:
  """XLA's persistent compilation cache in `folder` (config.compile_cache; "" = off): a restarted run loads
  its compiled step instead of compiling it again. Keyed by the program, the devices and the jax/XLA
  versions, so a stale entry is never used. On a multi-host slice each host keeps its own."""
  if folder:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))


def initialize_distributed(peer_timeout_s: int, processes: Processes) -> None:
  """jax.distributed for multi-host runs: explicit coordinator (GPU/CPU clusters) or a TPU pod slice. A process
  without a heartbeat for `peer_timeout_s` (config.peer_timeout_s) is declared lost by the coordination
  service: every other process then stops (`lost_processes`) instead of waiting in a collective forever."""
  timeouts = dict(heartbeat_timeout_seconds=peer_timeout_s)
  if processes.coordinator_address:
    if jax.config.jax_platforms == "cpu":  # CPU collectives across processes need gloo
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(processes.coordinator_address, processes.num_processes, processes.process_id,
                               **timeouts)
  elif processes.distributed or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # several TPU hosts
    jax.distributed.initialize(**timeouts)


class PeerLostError(RuntimeError):
  """Another process of a multi-host run is gone (crashed, preempted, killed)."""


def lost_processes(timeout_s: float) -> list[int] | None:
  """The processes the coordination service no longer hears from, asked once a collective has failed; None
  when it does not answer within `timeout_s`. Every live process asks (each sees the failed collective), and
  the answer comes when the service has declared the lost ones dead (their heartbeat timeout)."""
  from jax._src import distributed  # the client jax.distributed.initialize() set up
  everyone, answer = list(range(jax.process_count())), []
  asking = threading.Thread(target=lambda: answer.append(distributed.global_state.client.get_live_nodes(everyone)),
                            daemon=True)
  asking.start()
  asking.join(timeout_s)
  if not answer:
    return None
  return sorted(set(everyone) - {int(p) for p in answer[0]})


def barrier(name: str) -> None:
  """Waits for every process at the coordination service. The first step's collectives must not start
  while another process is still compiling: CPU (gloo) collectives give up after 30 s."""
  if jax.process_count() > 1:
    from jax._src import distributed  # the client jax.distributed.initialize() set up
    distributed.global_state.client.wait_at_barrier(f"mapo_jax/{name}", 3_600_000)


# ------------------------------------------------------------------------------------------------------
# Phase 2. Mesh and (demo only) assets.
# ------------------------------------------------------------------------------------------------------
def make_mesh(run: Run) -> jax.sharding.Mesh:
  config = run.config
  mesh = sharding.make_mesh(config.mesh)
  try:
    sharding.check_partitioning(mesh)
  except sharding.MeshPartitioningError as e:
    raise config_lib.ConfigError("mesh", str(e)) from None
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())
  if config.demo_assets:
    if run.lead:
      demo.ensure_assets(config.demo_assets, config.demo_base)
    multihost_utils.sync_global_devices("demo assets")
  return mesh


# ------------------------------------------------------------------------------------------------------
# Phase 3. Models, by the pipeline's family: the trained denoiser, the frozen reference (DPO/RPO), and the
# components that sample grids and on-the-fly encoding need. Weights go from safetensors straight into
# each device's shard: no device holds a whole model.
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Models:
  family: ModuleType
  model: nnx.Module
  reference: nnx.Module | None
  pipe: Any  # the family's Pipeline: frozen encoders, VAE, tokenizers, scheduler


def load_models(config: ml_collections.ConfigDict, mesh) -> Models:
  family = pipelines.family(config.pipeline)
  if config.vae and not Path(config.vae).exists():
    raise config_lib.ConfigError("vae", f"{config.vae!r} does not exist: a VAE folder (config.json and weights), "
                                 "or '' for the pipeline's own vae/")
  try:
    text_options = pipelines.text_options(config.pipeline, config.max_sequence_length)
  except ValueError as e:
    raise config_lib.ConfigError("max_sequence_length", f"{config.max_sequence_length}: {e}") from None
  multiple = family.resolution_multiple(config.pipeline)
  if config.resolution % multiple:
    raise config_lib.ConfigError("resolution", f"{config.resolution} is not a multiple of {multiple} "
                                 f"(the VAE's and the UNet's downsampling of {config.pipeline})")
  # The schedule's kind decides which keys apply (DDPM's min_snr_gamma, flow matching's config.flow): checked
  # from the scheduler config before any weight is read.
  config_lib.validate_for_schedule(config, family.load_pipeline(config.pipeline, ("scheduler",)).schedule)
  options = model_options(config, mesh)
  model = family.load_denoiser(config.pipeline, param_dtype=denoiser_param_dtype(config), mesh=mesh, **options)
  reference = None
  if needs_reference_model(config):
    reference = family.load_denoiser(config.reference or config.pipeline, mesh=mesh,
                                     param_dtype=jnp.dtype(config.ref_param_dtype), **options)
  needs_frozen = (config.sample_every > 0 or bool(config.judge) or config.data.mode == "onthefly"
                  or config.data.empty_prompt_prob > 0)
  pipe = family.load_pipeline(config.pipeline, (family.FROZEN if needs_frozen else ()) + ("scheduler",),
                              vae=config.vae or None, **text_options)
  return Models(family, model, reference, pipe)


# ------------------------------------------------------------------------------------------------------
# Phase 4. Input: global batches of `global_batch_size` pairs sharded over (data, fsdp); each process reads
# its own slice. The iterator's position is checkpointed with the state.
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Input:
  data_iterator: Any  # grain iterator of global batches (checkpointed)
  eval_batch: dict[str, jax.Array] | None  # held-out pairs (config.data.eval_pairs), or None
  empty_prompt: dict[str, np.ndarray] | None  # "" encoded once (or its token ids), for empty-prompt dropout in the step
  text: tuple | None = None  # (towers, encode) that encode a token ids cache in the step (build's `text`), or None


def step_text(config: ml_collections.ConfigDict, mesh, ids_shapes: dict[str, tuple[int, ...]]):
  """For a token ids cache (docs/data.md, "Text conditioning at scale"): the family's frozen text towers in
  config.dtype (T5 born sharded on `mesh`) as (towers, encode), and the empty prompt's ids. The cache's ids must be
  what this pipeline's tokenizers give (same towers, same lengths)."""
  family = pipelines.family(config.pipeline)
  if not hasattr(family, "load_step_text"):
    raise config_lib.ConfigError("data.cache_dir", f"{config.data.cache_dir} holds token ids, but "
                                 f"{config.pipeline} is a pipeline whose train step does not encode prompts")
  dtype = jnp.dtype(config.dtype)  # frozen: no float32 master copy (diffusers' FLUX / SD3 scripts: weight_dtype)
  text_pipe = family.load_step_text(config.pipeline, dtype=dtype, param_dtype=dtype, mesh=mesh,
                                    **pipelines.text_options(config.pipeline, config.max_sequence_length))
  empty = {TEXT_IDS_PREFIX + k: v[0] for k, v in text_pipe.tokenize([""]).items()}
  if (given := {k: tuple(v.shape) for k, v in empty.items()}) != ids_shapes:
    raise config_lib.ConfigError("data.cache_dir", f"{config.data.cache_dir} holds token ids {ids_shapes}, but the "
                                 f"tokenizers of {config.pipeline} give {given}: encoded with another pipeline, or at "
                                 "another max_sequence_length (`encode --max_sequence_length`, "
                                 "config.max_sequence_length)?")
  return text_pipe.step_text(), empty


def open_input(config: ml_collections.ConfigDict, mesh, pipe) -> Input:
  loader_kwargs = dict(batch_size=config.global_batch_size // jax.process_count(), seed=config.seed,
                       sharding=sharding.batch_sharding(mesh), num_threads=config.data.num_threads,
                       holdout=config.data.eval_pairs)
  eval_batch = text = None
  if config.data.mode == "cached":
    manifest = read_manifest(config.data.cache_dir)
    encoded_at = manifest["settings"]["resolution"]
    if encoded_at != config.resolution:
      raise config_lib.ConfigError("resolution", f"{config.resolution}, but {config.data.cache_dir} was "
                                   f"encoded at {encoded_at}")
    check_cache_vae(manifest, config.data.cache_dir, config.vae)
    check_cache_text_tokens(manifest, config.data.cache_dir, config.max_sequence_length)
    dataset = cached_loader(config.data.cache_dir, **loader_kwargs)
    if config.data.eval_pairs:
      eval_batch = cached_eval_batch(config.data.cache_dir, config.data.eval_pairs)
    layout = RecordLayout.from_json(manifest["record"])
    cache_dtypes = layout.dtypes
    check_batch_keys(config.objective, tuple(cache_dtypes), config.data.cache_dir)
    if ids_shapes := {k: shape for k, shape in layout.shapes.items() if is_text_ids(k)}:
      text, empty_ids = step_text(config, mesh, ids_shapes)
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
  # Empty-prompt dropout: "" encoded once here (a token ids cache: its ids), swapped in per pair inside the step
  # (train_step.augment_batch).
  empty_prompt = None
  if config.data.empty_prompt_prob > 0:
    empty_prompt = empty_ids if text is not None else pipelines.empty_prompt_rows(pipe, cache_dtypes)
  return Input(iter(dataset), eval_batch, empty_prompt, text)


# ------------------------------------------------------------------------------------------------------
# Phase 5 is `build` (training/build.py): the float32 master params and optimizer state, sharded; the
# frozen parameters; the jitted step. Phase 6. Restore: the newest checkpoint that restores (onto this
# run's mesh), else the pipeline's weights.
# ------------------------------------------------------------------------------------------------------
def restore(run: Run, built: Built, data_iterator) -> Any:
  state = built.state
  if run.resume_step is not None:
    restored = run.checkpointer.restore_latest(abstract_like(state, built.state_shardings), data_iterator)
    if restored is not None:
      state = restored
      logging.info("resumed from %s/%s/%d", run.workdir, CHECKPOINTS, int(state.step))
  return state


# ------------------------------------------------------------------------------------------------------
# Phase 7. The loop. Only logging steps wait for the devices; SIGTERM/SIGINT and --stop-after-step end the
# run after a step with a checkpoint, as a preemption would. A step's checkpoint is started before its
# sample grid, and any error first finishes the save in flight.
# ------------------------------------------------------------------------------------------------------
class Observers:
  """Where a run reports: metrics.jsonl and TensorBoard, sample grids, the judge, the progress bar."""

  def __init__(self, run: Run, pipe, mesh, built: Built, first_step: int):
    config, self.run, self.pipe, self.mesh, self.built = run.config, run, pipe, mesh, built
    self.metrics = MetricsWriter(run.workdir, first_step=first_step, enabled=run.lead, wandb=config.wandb,
                                 config=json.loads(config.to_json()))
    self.judge_log = judging.JudgeLog(run.workdir, first_step=first_step, enabled=run.lead and bool(config.judge))
    self.progress = tqdm(total=config.steps, initial=first_step, unit="step", disable=not run.lead,
                         dynamic_ncols=True)
    self.judged = None  # (first, last) judge records, once the run has finished

  def sample(self, params, prompts: list[str]) -> np.ndarray:
    """The current model's images for `prompts` on fixed seeds. Every process samples on the global mesh
    (the trained parameters are sharded over all of them)."""
    config = self.run.config
    images, _ = sampling.generate_images(
        self.pipe, prompts, steps=config.sample_steps, guidance=config.sample_guidance, seed=config.seed,
        height=config.resolution, width=config.resolution,
        unet=(self.built.graphdef, params, self.built.frozen.policy), mesh=self.mesh)
    return images

  def sample_grid(self, step: int, params) -> None:
    """Process 0 writes the grid of sample_prompts."""
    images = self.sample(params, list(self.run.config.sample_prompts))
    if self.run.lead:
      path = self.run.workdir / "samples" / f"step_{step:06d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      grid = sampling.make_grid(images, cols=math.ceil(math.sqrt(len(images))))
      Image.fromarray(grid).save(path)
      self.metrics.write_image(step, "samples", grid, caption=" | ".join(self.run.config.sample_prompts))

  def judge(self, step: int, params) -> None:
    """Samples judge_prompts and judges them (process 0)."""
    config = self.run.config
    prompts = [p for p in config.judge_prompts for _ in range(config.judge_samples_per_prompt)]
    images = self.sample(params, prompts)
    if self.run.lead:
      scores = judging.JUDGES[config.judge](images, prompts)
      self.judge_log.write(step, scores, images, cols=config.judge_samples_per_prompt)
      self.metrics.write_scalars(step, {f"judge/{k}": v for k, v in scores.items()})
      self.metrics.write_image(step, "judge/samples", sampling.make_grid(images, config.judge_samples_per_prompt))
      self.progress.write(f"judge at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                          file=sys.stderr)

  def finish(self, step: int) -> None:
    """At the end of the run: the judge's curve and before/after sheet (process 0), to the writers too."""
    self.judged = self.judge_log.finish()
    if self.judged:
      sheet = np.asarray(Image.open(self.judge_log.folder / "before_after.png").convert("RGB"))
      self.metrics.write_image(step, "judge/before_after", sheet, caption="left: the base; right: now")

  def summary(self, step: int, metrics: dict[str, float], seconds_per_step: float) -> None:
    """One log line per logged step (process 0), with the time left at the measured step rate: kept in
    multi-host logs, where only process 0 prints its progress bar."""
    if not self.run.lead:
      return
    steps = self.run.config.steps
    left = (steps - step) * seconds_per_step
    parts = [f"step {step}/{steps}", f"loss {metrics['loss']:.4g}"]
    parts += [f"{k} {metrics[k]:.3f}" for k in ("accuracy", "eval_accuracy") if k in metrics]
    parts += [f"pairs/s {metrics['pairs_per_s']:.3g}", f"ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"
              + (f" (+{int(left // 86400)} d)" if left >= 86400 else "")]
    logging.info(", ".join(parts))

  def close(self) -> None:
    self.progress.close()
    self.metrics.close()


class StopSignal:
  """SIGTERM / SIGINT ask the loop to stop after the current step (with a checkpoint); a second one ends
  the process at once. Installed for the life of the loop.

  Multi-host, a preemption notice (SIGTERM, as a TPU maintenance event sends it to every host, not at the same
  instant) goes to jax.distributed's preemption sync manager instead: every process stops at the same step,
  the first one all of them reach after any of them got the notice (`reached_preemption_sync_point`), so they
  save one consistent checkpoint. No Python handler is installed then: it would replace the manager's."""

  def __init__(self):
    self.received: list[int] = []
    self.multihost = jax.process_count() > 1
    for signum in () if self.multihost else (signal.SIGTERM, signal.SIGINT):
      signal.signal(signum, self._handle)

  def _handle(self, signum, _frame):
    logging.warning("signal %d: checkpointing after this step, then exiting", signum)
    self.received.append(signum)
    signal.signal(signum, signal.SIG_DFL)

  def stop_after(self, step: int) -> bool:
    """Whether to stop (and checkpoint) after `step`; the same answer on every process."""
    if self.multihost:
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption notice: every process checkpoints after step %d, then exits", step)
        return True
      return False
    return bool(self.received)


def train_loop(run: Run, built: Built, state, inputs: Input, observers: Observers, stop_after: int | None):
  """Steps from state.step to config.steps (or a stop); returns (state, last step)."""
  config, checkpointer, progress = run.config, run.checkpointer, observers.progress
  learning_rate = optim.learning_rate(config.optim)
  stop_signal = StopSignal()
  step = int(state.step)
  last_log, last_time = step, time.perf_counter()
  skip_history = [(step, int(state.skipped))]
  compiled_step = compiled_eval = None
  try:
    if config.judge and step == 0:
      observers.judge(0, state.params)  # the base, before any update
    while step < config.steps:
      batch = next(inputs.data_iterator)
      if compiled_step is None:
        start = time.perf_counter()
        progress.write("compiling the train step (once per run; minutes for a large model)...", file=sys.stderr)
        compiled_step = compile_step(built.train_step, observers.mesh, state, batch, built.frozen)
        progress.write(f"compiled the train step in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        barrier("train step compiled")
      state, metrics = compiled_step(state, batch, built.frozen)
      step += 1
      progress.update()
      checkpointer.check()  # a failed asynchronous save stops the run here, one step later at most
      stop = stop_signal.stop_after(step) or step == stop_after
      if step % config.log_every == 0 or step == config.steps or stop:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        now = time.perf_counter()
        metrics.update(lr=float(learning_rate(step - 1)),
                       pairs_per_s=(step - last_log) * config.global_batch_size / (now - last_time),
                       host_rss_mib=host_rss_mib())
        if inputs.eval_batch is not None:  # held-out pairs, fixed noise: after the throughput, which it would skew
          if compiled_eval is None:
            compiled_eval = compile_step(built.eval_step, observers.mesh, state.params, inputs.eval_batch, built.frozen)
          evaluated = jax.device_get(compiled_eval(state.params, inputs.eval_batch, built.frozen))
          metrics.update({f"eval_{k}": float(evaluated[k]) for k in ("loss", "accuracy", "margin") if k in evaluated})
        observers.summary(step, metrics, (now - last_time) / (step - last_log))
        last_log, last_time = step, time.perf_counter()
        progress.set_postfix(loss=f"{metrics['loss']:.4g}", pairs_s=f"{metrics['pairs_per_s']:.3g}")
        if not np.isfinite(metrics["loss"]):
          logging.warning("step %d: non-finite loss, update skipped (%d so far)", step, metrics["skipped_steps"])
        observers.metrics.write(step, metrics)
        check_skipped(skip_history, step, int(metrics["skipped_steps"]), config.max_skipped_fraction)
      if step % config.checkpoint_every == 0 or step == config.steps or stop:
        checkpointer.save(step, state, inputs.data_iterator)
      if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
        observers.sample_grid(step, state.params)
      if config.judge and ((config.judge_every and step % config.judge_every == 0) or step == config.steps):
        observers.judge(step, state.params)
      if stop:
        break
    if step >= config.steps:
      observers.finish(step)
    checkpointer.wait()
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() > 1:  # a failed collective: is a peer gone? Then no save can complete: leave
      lost = lost_processes(config.peer_timeout_s + 30)
      if lost:
        checkpointer.abandoned = True  # its save waits for the lost process: never wait on it
        raise PeerLostError(
            f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {jax.process_count()} stopped "
            f"answering during step {step + 1} (no heartbeat for config.peer_timeout_s={config.peer_timeout_s} s; "
            f"this is process {jax.process_index()}): {str(e).splitlines()[0][:200]}. Restart every process to "
            f"resume from the last complete checkpoint in {checkpointer.directory}") from None
    checkpointer.finish_or_abandon()
    raise
  except BaseException:
    checkpointer.finish_or_abandon()
    raise
  finally:
    observers.close()
  checkpointer.close()
  # Every process leaves together: one that exits while another still finalises the checkpoint
  # would leave the other waiting in jax.distributed's shutdown.
  multihost_utils.sync_global_devices("checkpoint closed")
  return state, step


# ------------------------------------------------------------------------------------------------------
# Phase 8. Export: the finished model as a diffusers pipeline folder (or LoRA file), if its parameters
# are sound.
# ------------------------------------------------------------------------------------------------------
def export(run: Run, built: Built, state, first_step: int, initial_norm: float, judged) -> None:
  config, workdir = run.config, run.workdir
  if judged:
    first, last = judged
    print(f"judge ({config.judge}), step {first['step']} -> {last['step']}: " + ", ".join(
        f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k != "step"))
  check_exportable(state.params, initial_norm, config.max_param_norm_ratio)
  params = convert.host_params(state.params)  # one parameter at a time; every process takes part
  if run.lead:
    if not (workdir / "export").exists() or first_step < config.steps:
      if config.lora.rank:  # the adapters alone, as diffusers' save_lora_weights writes them
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), built.frozen.policy)
        export_lora(nnx.merge(built.graphdef, params, shapes), workdir / "export",
                    card=run_card(workdir, config.pipeline, config.steps, workdir / "export"))
      else:
        export_denoiser(nnx.merge(built.graphdef, params, convert.host_params(built.frozen.policy)), config.pipeline,
                        workdir / "export", dtype=config.export_dtype,
                        card=run_card(workdir, config.pipeline, config.steps, workdir / "export",
                                      dtype=config.export_dtype))
    print(f"done: {config.steps} steps in {workdir}\n  checkpoints  {workdir / CHECKPOINTS}\n"
          f"  export       {workdir / 'export'}\n"
          + (f"  samples      {workdir / 'samples'}\n" if config.sample_every else "")
          + f"  metrics      {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tensorboard'})"
          + (f"\n  judge        {workdir / 'judge'} (curve.png, before_after.png)" if config.judge else ""))
  multihost_utils.sync_global_devices("export")


def main(cli: SimpleNamespace) -> None:
  limit_heap_arenas()  # a long run's resident memory stays flat (run/checkpoint.py says why)
  if cli.print_config.value:
    print("\n".join(f"config.{k} = {v!r}" for k, v in config_lib.flatten(cli.config.value).items()))
    return
  if not cli.workdir.value:
    raise config_lib.UsageError("--workdir is required: the run's output folder (an existing one is resumed)")
  processes = Processes(cli.coordinator.value, cli.num_processes.value, cli.process_id.value, cli.distributed.value)
  train(cli.config.value, Path(cli.workdir.value).absolute(), allow_config_change=cli.allow_config_change.value,
        stop_after=cli.stop_after.value, processes=processes)


def train(config: ml_collections.ConfigDict, workdir: Path, *, allow_config_change: bool = False,
          stop_after: int | None = None, processes: Processes | None = None) -> None:
  """One run, phase by phase: what `python -m mapo_jax.train` does after parsing its flags. `processes`:
  how to join a multi-host run (default: the environment's JAX_* variables, `Processes.from_env`)."""
  run = open_run(config, workdir, allow_config_change, processes or Processes.from_env())
  try:
    mesh = make_mesh(run)
    models = load_models(config, mesh)
    inputs = open_input(config, mesh, models.pipe)
    built = build(config, models.family, models.model, models.reference, models.pipe.schedule, models.pipe.latents,
                  mesh, inputs.empty_prompt, text=inputs.text)
    del models.model, models.reference  # their arrays now live in `built` (the trainable ones donated to the state)
    initial_norm = float(global_norm(built.state.params))  # the starting model's, for the export check
    state = restore(run, built, inputs.data_iterator)
    first_step = int(state.step)
    observers = Observers(run, models.pipe, mesh, built, first_step)
    state, step = train_loop(run, built, state, inputs, observers, stop_after)
    if step < config.steps:
      logging.info("stopped after step %d of %d; run again with --workdir %s to resume", step, config.steps, workdir)
      print(f"stopped after step {step}; checkpoint in {workdir / CHECKPOINTS}")
      return
    export(run, built, state, first_step, initial_norm, observers.judged)
  finally:
    run.close()


# Errors a user can act on: reported in one line, exit status 1 (no traceback).
USER_ERRORS = (config_lib.ConfigError, config_lib.UsageError, workdir_lib.WorkdirBusyError, workdir_lib.ConfigChangedError,
               CheckpointSaveError, NoGoodCheckpointError, DivergedError, FileNotFoundError, PeerLostError,
               DamagedShardError)


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


def run(cli: SimpleNamespace, argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(quiet_orbax)
  sys.unraisablehook = lambda u: log_background_error(u.exc_type, u.exc_value)
  threading.excepthook = lambda a: log_background_error(a.exc_type, a.exc_value)
  try:
    main(cli)
  except USER_ERRORS as e:
    print(f"\nerror: {e}", file=sys.stderr)  # on a line of its own, whatever a thread printed last
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a failed asynchronous save can leave orbax's writer thread behind, and the exit must not
    # wait for it (or for the loader's threads).
    os._exit(1)


if __name__ == "__main__":
  app.run(functools.partial(run, define_flags()),
          flags_parser=functools.partial(config_lib.parse_command_line, dashed=DASHED_FLAGS, doc=__doc__))
