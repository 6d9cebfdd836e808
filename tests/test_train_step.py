"""The jitted, sharded train step: objectives wired correctly, sharding and accumulation exact."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from flax import nnx
from jax.sharding import PartitionSpec as P

from mapo_jax import diffusion, sharding
from mapo_jax.training import objectives
from mapo_jax.training import optim
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.unet import init_unet
from mapo_jax.pipelines import sd
from mapo_jax.training.train_step import (Frozen, StepConfig, create_sharded_state, draw_noise, jit_train_step, make_loss_fn,
                                 make_train_step, per_sample_errors)

SCHEDULE = diffusion.NoiseSchedule.from_config(dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
LATENTS = sd.Latents(scale=0.13025)
# Float32 per-sample errors (means of h·w·c = 256 squared differences) computed with a different summation
# order (another mesh, another fusion) agree to a few ulps: the bound asserted below is 2^-20 ≈ 16 ulps
# relative. Every loss-level tolerance is this bound times the objective's sensitivity to its inputs.
ERR_RTOL = 2.0 ** -20


def make_batch(pairs=8, seed=0, size=8):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  moments = lambda: np.concatenate([f(pairs, size, size, 4) * 5, f(pairs, size, size, 4) - 4], -1)
  time_ids = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (pairs, 1))
  return dict(moments_w=moments(), moments_l=moments(), prompt_embeds=f(pairs, 5, 24),
              pooled_prompt_embeds=f(pairs, 16), time_ids=time_ids, rpo_emb=f(pairs, 16))


@functools.cache
def initial_unet():
  graphdef, params = nnx.split(init_unet(MICRO_SDXL_UNET, seed=0))
  return graphdef, jax.tree.map(np.asarray, params)


def setup(objective, mesh_shape=(1, 1, 1), accum=1, lr=1e-4, devices=None, eps=1e-8):
  mesh = sharding.make_mesh(mesh_shape, devices or jax.devices()[:int(np.prod(mesh_shape))])
  unet = nnx.merge(*initial_unet())  # fresh arrays: the step donates them
  opt_cfg = optim.default_config()
  opt_cfg.lr, opt_cfg.eps = lr, eps
  tx = optim.make_optimizer(opt_cfg)
  graphdef, state, state_sh, frozen, frozen_sh = create_sharded_state(unet, tx, mesh, seed=0)
  obj = objectives.get_objective(objective)
  cfg = StepConfig(objective=objective, hparams=obj.hparams(num_timesteps=1000), latents=LATENTS, accum_steps=accum)
  ref = ref_sh = None
  if obj.needs_reference:  # the reference is the initial policy, as in a real DPO run
    ref_sh = state_sh.params
    ref = jax.tree.map(jnp.copy, state.params)
  step = jit_train_step(make_train_step(sd.denoise, graphdef, graphdef, tx, SCHEDULE, cfg, mesh), state_sh, mesh,
                        Frozen(policy=frozen_sh, reference=ref_sh))
  return mesh, graphdef, state, step, Frozen(policy=frozen, reference=ref), cfg


def first_step_errors(mesh_shape):
  """Per-sample winner/loser errors of the initial model on the first step's draws, sharded on `mesh_shape`."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  graphdef, params = initial_unet()
  batch = global_batch(make_batch(), mesh)
  key = jax.random.fold_in(jax.random.key(0), 0)  # the step's key: fold_in(key(seed), step)

  @jax.jit
  def errors(params, batch):
    draws = draw_noise(key, batch, SCHEDULE.num_train_timesteps)
    model = nnx.merge(graphdef, params)
    return jnp.concatenate(per_sample_errors(sd.denoise, model, batch, draws, SCHEDULE, LATENTS, True))

  return np.asarray(errors(jax.device_put(params, sharding.replicated(mesh)), batch))


def loss_bound(objective, errors):
  """How far the loss can move when every per-sample error (policy and reference) moves by at most
  ERR_RTOL·max|e|: the L1 norm of the objective's gradient with respect to its error inputs at this point
  (β/2·... for DPO and RPO, so β = 5000 makes it large) times that displacement."""
  obj = objectives.get_objective(objective)
  e_w, e_l = np.split(errors, 2)
  inputs = dict(err_w=e_w, err_l=e_l, ref_err_w=e_w, ref_err_l=e_l, emb=make_batch()["rpo_emb"])
  args = [jnp.asarray(inputs[k]) for k in obj.inputs]
  float_args = [k for k in obj.inputs if k != "emb"]
  grads = jax.grad(lambda *a: obj.fn(*a, **obj.hparams(num_timesteps=1000))[0],
                   argnums=tuple(range(len(float_args))))(*args)
  sensitivity = sum(float(jnp.sum(jnp.abs(g))) for g in grads)
  return sensitivity * ERR_RTOL * float(np.max(np.abs(errors)))


def global_batch(batch, mesh):
  return jax.device_put(batch, sharding.batch_sharding(mesh))


# The two headline objectives through the whole step for 20 steps; that every objective's gradient lowers the
# winner's error is tests/test_objectives_variants.py's (per objective, in a fraction of the time).
@pytest.mark.parametrize("objective", ["mapo", "dpo"])
def test_training_lowers_the_objective_on_a_fixed_batch(objective):
  mesh, graphdef, state, step, frozen, cfg = setup(objective, lr=1e-3 if objective == "mapo" else 1e-5)
  batch = global_batch(make_batch(), mesh)
  loss_fn = jax.jit(make_loss_fn(sd.denoise, graphdef, graphdef, SCHEDULE, cfg))

  def eval_loss(params):  # the same 4 noise draws before and after training
    return np.mean([float(loss_fn(params, frozen, batch, draw_noise(jax.random.key(k), batch, 1000))[0])
                    for k in range(4)])

  before = eval_loss(state.params)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics["loss"]))
  if objective == "dpo":  # policy == reference at step 0: every inside term is 0 up to float32 rounding
    assert losses[0] == pytest.approx(math.log(2), abs=loss_bound("dpo", first_step_errors((1, 1, 1))))
  assert all(np.isfinite(losses))
  assert eval_loss(state.params) < before * (0.95 if objective == "mapo" else 1.0) - 1e-4
  assert int(state.step) == 20 and int(state.skipped) == 0


def test_non_finite_loss_skips_the_update():
  mesh, _, state, step, frozen, _ = setup("mapo")
  before = jax.tree.map(np.asarray, state.params)
  batch = make_batch()
  batch["moments_w"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, global_batch(batch, mesh), frozen)
  assert int(metrics["skipped_steps"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, metrics = step(state, global_batch(make_batch(), mesh), frozen)  # a good batch trains again
  assert int(metrics["skipped_steps"]) == 1 and np.isfinite(float(metrics["loss"]))


def one_step(objective, mesh_shape, accum=1):
  # Adam's first update is g / (|g| + eps): with eps = 1e-8 it turns float32 rounding of near-zero
  # gradients into O(1) differences, so the equality tests use an eps that keeps it smooth in g.
  mesh, _, state, step, frozen, _ = setup(objective, mesh_shape, accum, eps=1e-3)
  state, metrics = step(state, global_batch(make_batch(), mesh), frozen)
  return state, metrics, mesh


def assert_same_step(state, metrics, ref_state, ref_metrics, initial, tag, bound):
  """Same loss, gradient norm and parameters. `bound` is how far float32 rounding of the per-sample errors
  can move the loss (`loss_bound`); the gradient's per-sample weights move by at most as much relative to
  their size (for DPO/RPO at z = 0, σ'(z)/σ(z) = 1/2 ≤ 1), so the gradient and the first update get that
  on top of 1e-5 (whole tree) or 1e-4 (per leaf: leaves that start at zero hold only the first update,
  where the reduction order across devices shows)."""
  assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) <= bound + 1e-6 * abs(float(ref_metrics["loss"])), tag
  assert rel_l2(metrics["grad_norm"], ref_metrics["grad_norm"]) <= 1e-5 + bound, tag
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  assert rel_l2(flat(state.params), flat(ref_state.params)) <= 1e-5 + bound, tag
  for a, b, p0 in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), jax.tree.leaves(initial)):
    assert not np.array_equal(np.asarray(b), p0)  # the step did move every parameter
    assert rel_l2(a, b) <= 1e-4 + bound, tag


@pytest.mark.parametrize("objective,mesh_shapes", [("mapo", [(8, 1, 1), (2, 4, 1)]), ("rpo", [(1, 4, 2)])])
def test_sharded_step_equals_single_device(objective, mesh_shapes):
  initial = nnx.to_pure_dict(nnx.state(nnx.merge(*initial_unet()), nnx.Param))
  ref_state, ref_metrics, _ = one_step(objective, (1, 1, 1))
  errors = first_step_errors((1, 1, 1))
  bound = loss_bound(objective, errors)
  for mesh_shape in mesh_shapes:
    if mesh_shape == mesh_shapes[-1]:  # the premise of `bound` (one mesh suffices: each check is a compile)
      np.testing.assert_allclose(first_step_errors(mesh_shape), errors, rtol=0,
                                 atol=ERR_RTOL * np.max(np.abs(errors)))
    state, metrics, mesh = one_step(objective, mesh_shape)
    assert_same_step(state, metrics, ref_state, ref_metrics, initial, mesh_shape, bound)
    # The big parameters really are sharded as the rules say.
    attn = state.params["down_blocks"][1]["attentions"][0]["transformer_blocks"][0]["attn1"]
    assert attn["to_q"]["kernel"].sharding.spec == P("fsdp", "tensor")  # (embed, heads)
    conv = state.params["down_blocks"][1]["resnets"][0]["conv1"]["kernel"]
    assert conv.sharding.spec == P(None, None, "fsdp", "tensor")  # (h, w, in, out)
    mu = state.opt_state[1][0].mu["down_blocks"][1]["resnets"][0]["conv1"]["kernel"]
    assert mu.sharding == conv.sharding  # Adam moments are sharded like their parameters
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
      assert conv.addressable_shards[0].data.size < conv.size


def test_accumulation_equals_the_large_batch():
  initial = nnx.to_pure_dict(nnx.state(nnx.merge(*initial_unet()), nnx.Param))
  big_state, big_metrics, _ = one_step("mapo", (2, 1, 1), accum=1)
  acc_state, acc_metrics, _ = one_step("mapo", (2, 1, 1), accum=2)
  assert_same_step(acc_state, acc_metrics, big_state, big_metrics, initial, "accum",
                   loss_bound("mapo", first_step_errors((2, 1, 1))))
