"""Every optimizer the config offers (optim.OPTIMIZERS) builds its state on a mesh that shards parameters two
ways ((1, 4, 2): over fsdp and tensor; meshes with all three axes > 1 are refused by
sharding.check_partitioning), trains, checkpoints and resumes bit-identically; each optimizer-state leaf is
sharded by its own shape.

Adafactor factors tensors whose two largest axes are both >= optim.MIN_DIM_TO_FACTOR (128, the official recipe's)
and keeps shape-(1,) placeholders for the rest: both kinds of leaf that used to get their parameter's 2-D spec.
The micro UNet's widest level is 32, so the tests lower the threshold to 32: its attention and feed-forward
matrices are factored, the rest get placeholders, and the sharded programs compile in half the time of a UNet
with a 128-wide level.
"""
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from test_train_step import LATENTS, SCHEDULE, make_batch

from mapo_jax import sharding
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.unet import UNet2DConditionModel
from mapo_jax.pipelines import sd
from mapo_jax.run.checkpoint import Checkpointer, abstract_like
from mapo_jax.toy.demo import random_model
from mapo_jax.training import objectives, optim
from mapo_jax.training.train_step import (Frozen, StepConfig, create_sharded_state, jit_train_step, make_train_step,
                                          optimizer_leaf_sharding)



@pytest.fixture(autouse=True)
def factor_at_micro_widths(monkeypatch):
  monkeypatch.setattr(optim, "MIN_DIM_TO_FACTOR", 32)


@functools.cache
def initial_params():
  graphdef, params = nnx.split(random_model(lambda: UNet2DConditionModel(MICRO_SDXL_UNET, rngs=nnx.Rngs(0)), seed=0))
  return graphdef, jax.tree.map(np.asarray, params)


def setup(name, mesh_shape, objective="mapo"):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  cfg = optim.default_config()
  cfg.name, cfg.lr = name, 1e-4
  tx = optim.make_optimizer(cfg)
  graphdef, state, state_sh, frozen, frozen_sh = create_sharded_state(nnx.merge(*initial_params()), tx, mesh, seed=0)
  step_cfg = StepConfig(objective=objective, hparams=objectives.get_objective(objective).hparams(num_timesteps=1000),
                        latents=LATENTS)
  step = jit_train_step(make_train_step(sd.denoise, graphdef, None, tx, SCHEDULE, step_cfg, mesh), state_sh, mesh,
                        Frozen(policy=frozen_sh))
  batch = jax.device_put(make_batch(pairs=8), sharding.batch_sharding(mesh))
  return mesh, state, state_sh, step, Frozen(policy=frozen), batch


def test_leaf_shardings_follow_each_leafs_shape():
  mesh = sharding.make_mesh((1, 4, 2))
  param = jax.ShapeDtypeStruct((256, 128), np.float32)
  param_sh = NamedSharding(mesh, P("fsdp", "tensor"))
  spec = lambda shape: optimizer_leaf_sharding(jax.ShapeDtypeStruct(shape, np.float32), param, param_sh).spec
  assert spec((256, 128)) == P("fsdp", "tensor")  # Adam's moments
  assert spec((128,)) == P("tensor")  # a factored moment over the first axis
  assert spec((256,)) == P("fsdp")  # ... over the second
  assert spec((1,)) == P() and spec(()) == P()  # placeholders and counts
  conv = jax.ShapeDtypeStruct((3, 3, 128, 256), np.float32)
  conv_sh = NamedSharding(mesh, P(None, None, "fsdp", "tensor"))
  got = optimizer_leaf_sharding(jax.ShapeDtypeStruct((3, 3, 256), np.float32), conv, conv_sh).spec
  assert got == P(None, None, "tensor")


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_trains_sharded_and_resumes_bit_identically(name, tmp_path):
  mesh, state, state_sh, step, frozen, batch = setup(name, (1, 4, 2))
  factored = [x for x in jax.tree.leaves(state.opt_state) if 0 < x.ndim < 4 and x.size > 1]
  if name == "adafactor":  # the case that failed: factored row/column moments of sharded matrices
    assert any(len(x.sharding.spec) and x.ndim == 1 and x.size >= optim.MIN_DIM_TO_FACTOR for x in factored)
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
    assert leaf.sharding == sh
  state, _ = step(state, batch, frozen)
  checkpointer = Checkpointer(tmp_path, keep=1)
  checkpointer.save(1, state)
  checkpointer.wait()
  straight, metrics = step(state, batch, frozen)
  resumed, resumed_metrics = step(checkpointer.restore(1, abstract_like(state, state_sh)), batch, frozen)
  checkpointer.close()
  assert np.isfinite(float(metrics["loss"])) and int(straight.skipped) == 0
  assert float(resumed_metrics["loss"]) == float(metrics["loss"])
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adafactor_sharded_step_equals_one_device():
  """One Adafactor step on (1, 4, 2) against one device, on SFT's loss (the mean winner error: no objective
  amplifies the per-sample errors' rounding, as MaPO's T = 1000 would). The update is the gradient divided by
  the root of its (factored) second moment, then clipped to RMS 1 per tensor, a smooth function of the
  gradient except where an unfactored element's gradient is at rounding level (its update is sign(g) lr).
  So the updates agree to the gradient's float32 rounding under another reduction order: relative 1e-5 on
  the whole tree, as tests/test_train_step.py bounds Adam's first update; the moves are read back as
  (p + update) - p, which adds up to one ulp of each parameter (updates are ~lr = 1e-4, parameters ~1)."""
  results = []
  for mesh_shape in ((1, 1, 1), (1, 4, 2)):
    _, state, _, step, frozen, batch = setup("adafactor", mesh_shape, objective="sft")
    state, metrics = step(state, batch, frozen)
    results.append((jax.tree.map(np.asarray, state.params), float(metrics["loss"]), float(metrics["grad_norm"])))
  (one, loss1, norm1), (many, loss8, norm8) = results
  assert loss8 == pytest.approx(loss1, rel=1e-5) and norm8 == pytest.approx(norm1, rel=1e-4)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  initial = flat(nnx.to_pure_dict(initial_params()[1]))
  moved_one, moved_many = flat(one) - initial, flat(many) - initial
  ulps = np.linalg.norm(np.spacing(np.abs(flat(one))))
  assert np.linalg.norm(moved_many - moved_one) <= 1e-5 * np.linalg.norm(moved_one) + ulps


def test_optimizer_offload_and_bf16_first_moments(tmp_path):
  """optim.offload keeps the optimizer state in host memory between steps and changes no number; optim.mu_dtype
  bfloat16 stores AdamW's first moment in bf16 (the update itself stays float32)."""
  mesh = sharding.make_mesh((1, 4, 2))
  cfg = optim.default_config()
  step_cfg = StepConfig(objective="sft", hparams={}, latents=LATENTS)
  batch = jax.device_put(make_batch(pairs=8), sharding.batch_sharding(mesh))
  results = {}
  for offload, mu_dtype in ((False, ""), (True, ""), (False, "bfloat16")):
    cfg.offload, cfg.mu_dtype, cfg.lr = offload, mu_dtype, 1e-4
    tx = optim.make_optimizer(cfg)
    graphdef, state, state_sh, frozen, frozen_sh = create_sharded_state(
        nnx.merge(*initial_params()), tx, mesh, seed=0, offload_optimizer=offload)
    step = jit_train_step(make_train_step(sd.denoise, graphdef, None, tx, SCHEDULE, step_cfg, mesh,
                                          state_sh.opt_state if offload else None), state_sh, mesh,
                          Frozen(policy=frozen_sh))
    for _ in range(2):
      state, _ = step(state, batch, Frozen(policy=frozen))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == ({"pinned_host"} if offload else {"device"})
    if offload:  # checkpoints restore into host memory
      checkpointer = Checkpointer(tmp_path, keep=1)
      checkpointer.save(2, state)
      checkpointer.wait()
      restored = checkpointer.restore(2, abstract_like(state, state_sh))
      checkpointer.close()
      assert {x.sharding.memory_kind for x in jax.tree.leaves(restored.opt_state)} == {"pinned_host"}
    results[(offload, mu_dtype)] = state
  plain, offloaded, half = results[(False, "")], results[(True, "")], results[(False, "bfloat16")]
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(offloaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mu = half.opt_state[1][0].mu
  assert {x.dtype for x in jax.tree.leaves(mu)} == {np.dtype("bfloat16")}
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])
  # m stored in bf16 is m (1 + d), |d| <= 2^-9 (bf16's unit roundoff) per element, and each update is
  # m_hat / (sqrt(v_hat) + eps): relative 2^-9 per element, per step; two steps and the parameters' own
  # float32 rounding of p + update stay well inside 2^-7 of the moves' norm.
  moved, moved_half = flat(plain.params) - flat(initial_params_dict()), flat(half.params) - flat(initial_params_dict())
  assert np.linalg.norm(moved_half - moved) <= 2 ** -7 * np.linalg.norm(moved)


def initial_params_dict():
  return nnx.to_pure_dict(initial_params()[1])
