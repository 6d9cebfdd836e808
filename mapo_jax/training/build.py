"""What a training config compiles: the denoiser's options, the sharded train state, the frozen parameters
and the jitted step. The one code path of `mapo_jax.train` (real weights) and `mapo_jax.aot` (abstract
models, compiled ahead of time for another platform).
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from flax import nnx

from mapo_jax import config as config_lib
from mapo_jax import diffusion, sharding
from mapo_jax.training import lora
from mapo_jax.training import objectives
from mapo_jax.training import optim
from mapo_jax.models.attention import default_implementation, mesh_platform
from mapo_jax.training.train_step import (Frozen, StepConfig, TextEncoder, create_sharded_state, jit_eval_step,
                                          jit_train_step, make_eval_step, make_train_step, step_compiler_options)


def model_options(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """dtype, attention kernel, remat and scanned block stacks for the denoiser. The attention default follows
  the platform of the mesh's devices (the target: a TPU slice compiled for on a CPU host gets the TPU kernel)."""
  return dict(dtype=jnp.dtype(config.dtype), remat=config.remat, scan=bool(config.scan_blocks),
              attention=config.attention or default_implementation(mesh_platform(mesh)))


def denoiser_param_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The trained denoiser's parameter dtype: float32 master weights, or for LoRA the frozen base's dtype."""
  return jnp.dtype(config.lora.base_dtype if config.lora.rank else config.param_dtype)


def needs_reference_model(config: ml_collections.ConfigDict) -> bool:
  """Whether a second, frozen denoiser is loaded: DPO/RPO, unless LoRA (the base without adapters is the reference)."""
  return objectives.get_objective(config.objective).needs_reference and not config.lora.rank


@dataclasses.dataclass
class Built:
  graphdef: nnx.GraphDef
  state: Any  # TrainState (arrays, or ShapeDtypeStructs for an abstract model)
  state_shardings: Any
  frozen: Frozen
  train_step: Any  # jitted `step(state, batch, frozen) -> (state, metrics)`; lower and compile under `mesh`
  eval_step: Any  # jitted `evaluate(state.params, batch, frozen) -> metrics` on held-out pairs (fixed key)


def flow_training(config: ml_collections.ConfigDict) -> diffusion.FlowTraining:
  """config.flow's sigma density and loss weighting (diffusers' `--weighting_scheme`, `--logit_mean`,
  `--logit_std`, `--mode_scale`)."""
  return diffusion.FlowTraining(weighting_scheme=config.flow.weighting_scheme, logit_mean=float(config.flow.logit_mean),
                                logit_std=float(config.flow.logit_std), mode_scale=float(config.flow.mode_scale))


def step_config(config: ml_collections.ConfigDict, family: ModuleType, latents, schedule) -> StepConfig:
  """The step's static options from the config: objective and hyper-parameters, accumulation, the batch
  preparation (empty prompts, label noise, fixed time ids [R, R, 0, 0, R, R] from the family) and, by the
  schedule's type, its training draws and weights (DDPM: min-SNR; flow matching: config.flow, whose `guidance`
  every pair's conditioning carries). Keys that do not apply to the schedule fail naming the key
  (`config.validate_for_schedule`)."""
  config_lib.validate_for_schedule(config, schedule)
  objective = objectives.get_objective(config.objective)
  hparams = objective.hparams(config[config.objective] if objective.defaults else None,
                              num_timesteps=schedule.num_train_timesteps)
  fixed = None
  if config.data.time_ids == "fixed":
    if not hasattr(family, "time_ids"):
      raise config_lib.ConfigError("data.time_ids", f"'fixed' sets SDXL's micro-conditioning, which "
                                   f"{family.__name__.rsplit('.', 1)[-1]} models do not take; use 'original'")
    fixed = tuple(float(v) for v in family.time_ids(config.resolution, config.resolution, 1)[0])
  return StepConfig(objective=config.objective, hparams=hparams, latents=latents, accum_steps=config.accum_steps,
                    empty_prompt_prob=float(config.data.empty_prompt_prob),
                    label_noise_prob=float(config.data.label_noise_prob), fixed_time_ids=fixed,
                    adapters_off_reference=bool(config.lora.rank),
                    adapter_dropout=bool(config.lora.rank) and config.lora.dropout > 0,
                    min_snr_gamma=float(config.min_snr_gamma), safeguard=config.objective_safeguard,
                    flow=flow_training(config) if schedule.is_flow else diffusion.FlowTraining(),
                    guidance=float(config.flow.guidance) if schedule.is_flow else None,
                    safeguard_hparams=tuple(dict(config[config.objective_safeguard]).items())
                    if config.objective_safeguard else (),
                    ema_decay=float(config.ema_decay) if config.ema_decay >= 0 else None,
                    reference_param_dtype=config.ref_param_dtype if needs_reference_model(config) else None)


def build(config: ml_collections.ConfigDict, family: ModuleType, model: nnx.Module, reference: nnx.Module | None,
          schedule, latents, mesh, empty_prompt: dict | None = None, text: tuple | None = None) -> Built:
  """The train state of `model` (and the reference's parameters) on `mesh`, and the jitted step of
  `config.objective`. Models may be abstract (nnx.eval_shape): everything is then ShapeDtypeStructs.
  `empty_prompt`: the empty prompt's conditioning rows, or its token ids for a token ids cache (needed when
  config.data.empty_prompt_prob > 0), arrays or ShapeDtypeStructs; placed replicated.
  `text`: (towers, encode), a family's `Pipeline.step_text()`, for batches of token ids: the towers' parameters are
  placed on `mesh` by the logical-axis rules (Frozen.text) and the steps encode the ids with them.
  With config.lora.rank > 0 the adapters are attached to `model` here (config.lora) and only they train;
  `reference` is then None (see `needs_reference_model`)."""
  tx = optim.make_optimizer(config.optim)
  trainable = nnx.Param
  if config.lora.rank:
    lora.from_config(model, config.lora, config.seed, dtype=jnp.dtype(config.param_dtype))
    trainable = lora.LoRAParam
  graphdef, state, state_shardings, frozen_params, frozen_shardings = create_sharded_state(
      model, tx, mesh, config.seed, trainable=trainable, ema=config.ema_decay >= 0,
      offload_optimizer=config.optim.offload)
  ref_graphdef = ref_params = ref_shardings = None
  if needs_reference_model(config):
    # Every variable, not only Params: a model's non-trainable arrays (SD3's positional table, a `Buffer`) are part
    # of the reference's state too, and `nnx.merge(ref_graphdef, ...)` needs all of them.
    ref_graphdef = nnx.graphdef(reference)
    ref_params, ref_shardings = sharding.place(reference, mesh, ...)
  cfg = step_config(config, family, latents, schedule)
  empty_shardings = None
  if cfg.empty_prompt_prob > 0:
    if empty_prompt is None:
      raise ValueError("config.data.empty_prompt_prob > 0 needs the empty prompt's conditioning")
    empty_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), empty_prompt)
    if sharding.is_abstract(empty_prompt):
      empty_prompt = sharding.with_shardings(empty_prompt, empty_shardings)
    else:  # every process holds the same rows: each fills its own devices (multi-host safe)
      empty_prompt = jax.tree.map(lambda x, s: jax.make_array_from_callback(
          np.shape(x), s, lambda index, x=np.asarray(x): x[index]), empty_prompt, empty_shardings)
  else:
    empty_prompt = None
  text_encoder = text_params = text_shardings = None
  if text is not None:  # every variable of the towers (as the reference's): `nnx.merge` in the step needs them all
    towers, encode = text
    text_encoder = TextEncoder(nnx.graphdef(towers), encode)
    text_params, text_shardings = sharding.place(towers, mesh, ...)
  frozen_shardings = Frozen(policy=frozen_shardings, reference=ref_shardings, empty_prompt=empty_shardings,
                            text=text_shardings)
  opt_shardings = state_shardings.opt_state if config.optim.offload else None
  train_step = jit_train_step(make_train_step(family.denoise, graphdef, ref_graphdef, tx, schedule, cfg, mesh,
                                              opt_shardings, text=text_encoder),
                              state_shardings, mesh, frozen_shardings, step_compiler_options(cfg, mesh))
  eval_step = jit_eval_step(make_eval_step(family.denoise, graphdef, ref_graphdef, schedule, cfg, mesh,
                                           text=text_encoder),
                            state_shardings.params, mesh, frozen_shardings,
                            micro_pairs=config.global_batch_size // config.accum_steps,
                            compiler_options=step_compiler_options(cfg, mesh))
  return Built(graphdef, state, state_shardings, Frozen(policy=frozen_params, reference=ref_params,
                                                        empty_prompt=empty_prompt, text=text_params),
               train_step, eval_step)


def compile_step(train_step, mesh, state, batch, frozen):  # also the eval step, with state.params for state
  """`train_step` lowered and compiled for these arguments (arrays, or ShapeDtypeStructs with shardings).
  Traced under `jax.set_mesh(mesh)`, so kernels that run per shard (attention on TPU and GPU) see the mesh."""
  with jax.set_mesh(mesh):
    return train_step.lower(state, batch, frozen).compile()
