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
import ml_collections
from flax import nnx

from mapo_jax import objectives, optim, sharding
from mapo_jax.models.attention import default_implementation, mesh_platform
from mapo_jax.train_step import Frozen, StepConfig, create_sharded_state, jit_train_step, make_train_step


def model_options(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """dtype, attention kernel and remat for the denoiser. The attention default follows the platform of
  the mesh's devices (the target: a TPU slice compiled for on a CPU host gets the TPU kernel)."""
  return dict(dtype=jnp.dtype(config.dtype), remat=config.remat,
              attention=config.attention or default_implementation(mesh_platform(mesh)))


@dataclasses.dataclass
class Built:
  graphdef: nnx.GraphDef
  state: Any  # TrainState (arrays, or ShapeDtypeStructs for an abstract model)
  state_shardings: Any
  frozen: Frozen
  train_step: Any  # jitted `step(state, batch, frozen) -> (state, metrics)`; lower and compile under `mesh`


def build(config: ml_collections.ConfigDict, family: ModuleType, model: nnx.Module, reference: nnx.Module | None,
          schedule, latents, mesh) -> Built:
  """The train state of `model` (and the reference's parameters) on `mesh`, and the jitted step of
  `config.objective`. Models may be abstract (nnx.eval_shape): everything is then ShapeDtypeStructs."""
  objective = objectives.get_objective(config.objective)
  tx = optim.make_optimizer(config.optim)
  graphdef, state, state_shardings, frozen_params, frozen_shardings = create_sharded_state(
      model, tx, mesh, config.seed)
  ref_graphdef = ref_params = ref_shardings = None
  if objective.needs_reference:
    ref_graphdef = nnx.graphdef(reference)
    ref_params, ref_shardings = sharding.place(reference, mesh)
  hparams = objective.hparams(config[config.objective] if objective.defaults else None,
                              num_timesteps=schedule.num_train_timesteps)
  step_config = StepConfig(objective=config.objective, hparams=hparams, latents=latents,
                           accum_steps=config.accum_steps)
  train_step = jit_train_step(make_train_step(family.denoise, graphdef, ref_graphdef, tx, schedule, step_config, mesh),
                              state_shardings, mesh, Frozen(policy=frozen_shardings, reference=ref_shardings))
  return Built(graphdef, state, state_shardings, Frozen(policy=frozen_params, reference=ref_params), train_step)


def compile_step(train_step, mesh, state, batch, frozen):
  """`train_step` lowered and compiled for these arguments (arrays, or ShapeDtypeStructs with shardings).
  Traced under `jax.set_mesh(mesh)`, so kernels that run per shard (attention on TPU and GPU) see the mesh."""
  with jax.set_mesh(mesh):
    return train_step.lower(state, batch, frozen).compile()
