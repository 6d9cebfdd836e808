"""One jitted training step for every objective: shared noise and timestep per pair, one UNet call on
the 2B stacked latents (winners first), per-sample float32 errors, the objective, AdamW.

Conventions (../NOTES, official MaPO / Diffusion-DPO trainers): winner i and loser i share noise and
integer timestep t ~ U{0..T-1}; latents are VAE posterior samples × scaling_factor; reductions are plain
means over the global batch. Random draws are made for the whole global batch before it is split into
micro-batches, so accumulating k micro-batches equals one step on the k-times larger batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mapo_jax import diffusion, objectives, sharding

Params = Any
Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Params  # trainable UNet parameters (pure dict, float32 master copy)
  opt_state: optax.OptState
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
  skipped: jax.Array  # updates skipped for a non-finite loss or gradient


@dataclasses.dataclass(frozen=True)
class StepConfig:
  objective: str
  hparams: dict  # the objective's keyword options (beta, snr, tau, ...)
  scaling_factor: float  # VAE latent scale (SDXL 0.13025, SD 1.5 0.18215)
  accum_steps: int = 1


def init_state(params: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))


def draw_noise(key: jax.Array, batch: Batch, num_timesteps: int) -> dict[str, jax.Array]:
  """Posterior samples for w and l, one noise and one timestep per pair (shared by w and l)."""
  k_w, k_l, k_noise, k_t = jax.random.split(key, 4)
  shape = batch["moments_w"].shape[:-1] + (batch["moments_w"].shape[-1] // 2,)
  return dict(eps_w=jax.random.normal(k_w, shape), eps_l=jax.random.normal(k_l, shape),
              noise=jax.random.normal(k_noise, shape),
              t=diffusion.sample_timesteps(k_t, shape[0], num_timesteps))


def posterior_sample(moments: jax.Array, eps: jax.Array, scale: float) -> jax.Array:
  """z = (mean + exp(logvar / 2) eps) × scaling_factor; moments = [mean, logvar] on the channel axis."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return (mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * eps) * scale


def per_sample_errors(graphdef, params, batch: Batch, draws, schedule, cfg: StepConfig, pair: bool):
  """mean over (H, W, C) of (prediction − target)² in float32, for [winners; losers] (or winners only)."""
  z = posterior_sample(batch["moments_w"], draws["eps_w"], cfg.scaling_factor)
  if pair:
    z = jnp.concatenate([z, posterior_sample(batch["moments_l"], draws["eps_l"], cfg.scaling_factor)])
  reps = 2 if pair else 1
  stack = lambda x: None if x is None else jnp.concatenate([x] * reps)
  noise, t = stack(draws["noise"]), stack(draws["t"])
  unet = nnx.merge(graphdef, params)
  pred = unet(diffusion.add_noise(schedule, z, noise, t), t, stack(batch["prompt_embeds"]),
              text_embeds=stack(batch.get("pooled_prompt_embeds")), time_ids=stack(batch.get("time_ids")))
  target = diffusion.training_target(schedule, z, noise, t)
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
  return jnp.split(err, 2) if pair else (err, None)


def make_loss_fn(graphdef, ref_graphdef, schedule, cfg: StepConfig, uses_text_time: bool):
  """`loss_fn(params, ref_params, batch, draws) -> (loss, metrics)` for one (micro-)batch."""
  objective = objectives.get_objective(cfg.objective)
  pair = "err_l" in objective.inputs
  drop = () if uses_text_time else ("pooled_prompt_embeds", "time_ids")  # SD 1.x/2.x UNets take neither

  def loss_fn(params, ref_params, batch, draws):
    batch = {k: v for k, v in batch.items() if k not in drop}
    err_w, err_l = per_sample_errors(graphdef, params, batch, draws, schedule, cfg, pair)
    ref_w = ref_l = None
    if objective.needs_reference:
      ref_w, ref_l = jax.lax.stop_gradient(
          per_sample_errors(ref_graphdef, ref_params, batch, draws, schedule, cfg, pair))
    return objectives.objective_loss(cfg.objective, err_w, err_l, ref_err_w=ref_w, ref_err_l=ref_l,
                                     emb=batch.get("rpo_emb"), **cfg.hparams)

  return loss_fn


def make_train_step(graphdef, ref_graphdef, tx, schedule, cfg: StepConfig, uses_text_time: bool, mesh=None):
  """Returns `step(state, batch, ref_params) -> (state, metrics)`; jit it with the state donated.

  With `mesh`, each micro-batch is pinned to the (data, fsdp) batch sharding: XLA cannot infer it
  through the micro-batch reshape and would otherwise replicate and re-partition activations.
  """
  loss_fn = make_loss_fn(graphdef, ref_graphdef, schedule, cfg, uses_text_time)
  pin = ((lambda t: jax.lax.with_sharding_constraint(t, sharding.batch_sharding(mesh))) if mesh is not None
         else (lambda t: t))

  def step(state: TrainState, batch: Batch, ref_params=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    draws = draw_noise(key, batch, schedule.num_train_timesteps)
    # Micro-batch j takes pairs j, j+k, j+2k, ...: each device's shard of the batch splits in place.
    micro = lambda x: x.reshape(-1, cfg.accum_steps, *x.shape[1:]).swapaxes(0, 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
      (_, metrics), grads = grad_fn(state.params, ref_params, *pin(xs))
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: grad_fn(state.params, ref_params, *jax.tree.map(lambda x: micro(x)[0], (batch, draws)))))
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero[1], zero[0][1]),
                                       jax.tree.map(micro, (batch, draws)))
    grads, metrics = jax.tree.map(lambda x: x / cfg.accum_steps, (grads, metrics))

    # A NaN/inf anywhere in the gradient makes its global norm non-finite. lax.cond (not a per-leaf
    # select) keeps XLA from fusing the whole backward pass into the update: 4x faster to compile.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, skipped_steps=skipped)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped), metrics

  return step


def create_sharded_state(unet: nnx.Module, tx, mesh, seed: int):
  """Splits the UNet into (graphdef, pure params) and places params + optimizer state on `mesh` by the
  logical-axis rules; the optimizer state is created already sharded (jit with out_shardings).

  Returns (graphdef, state, state_shardings).
  """
  graphdef, params = nnx.split(unet, nnx.Param)
  params = nnx.to_pure_dict(params)
  param_sh = sharding.param_shardings(params, sharding.logical_axes(unet), mesh)
  params = jax.device_put(params, param_sh)
  abstract = jax.eval_shape(lambda p: init_state(p, tx, seed), params)
  state_sh = _state_shardings(abstract, param_sh, mesh)
  state = jax.jit(lambda p: init_state(p, tx, seed), out_shardings=state_sh)(params)
  return graphdef, state, state_sh


def _state_shardings(abstract: TrainState, param_sh, mesh):
  """Optimizer moments shaped like the params are sharded like them; everything else is replicated."""
  rep = sharding.replicated(mesh)
  param_struct = jax.tree.structure(abstract.params)

  def like_params(subtree):
    if jax.tree.structure(subtree) == param_struct:
      return param_sh
    return None

  opt_sh = jax.tree.map(lambda x: like_params(x) or jax.tree.map(lambda _: rep, x), abstract.opt_state,
                        is_leaf=lambda x: jax.tree.structure(x) == param_struct)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, skipped=rep)


def jit_train_step(step_fn, state_shardings, mesh, ref_shardings=None):
  """jit with the state donated, batch sharded over (data, fsdp) and metrics replicated."""
  return jax.jit(step_fn, donate_argnums=(0,),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), ref_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)))
