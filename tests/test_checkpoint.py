"""Orbax checkpoints: int-keyed pure dicts round-trip, restores reshard, a crash mid-save is harmless."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REPO
from flax import nnx

from mapo_jax import sharding
from mapo_jax.training import optim
from mapo_jax.run.checkpoint import Checkpointer, abstract_like
from mapo_jax.toy.demo import random_model
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.unet import UNet2DConditionModel
from mapo_jax.training.train_step import create_sharded_state


def sharded_state(mesh_shape, seed):
  unet = random_model(lambda: UNet2DConditionModel(MICRO_SDXL_UNET, rngs=nnx.Rngs(0)), seed)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  return create_sharded_state(unet, optim.make_optimizer(optim.default_config()), mesh, seed)[1:3]


def test_restore_reshards_onto_another_mesh_and_keeps_int_keys(tmp_path):
  state, _ = sharded_state((1, 4, 1), seed=0)
  state = state.replace(step=jnp.int32(7))
  checkpointer = Checkpointer(tmp_path, keep=2)
  checkpointer.save(7, state)
  checkpointer.wait()
  target, target_shardings = sharded_state((2, 1, 2), seed=1)  # other values, other device count
  restored = checkpointer.restore(7, abstract_like(target, target_shardings))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(next(iter(restored.params["down_blocks"])), int)
  for a, b, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target_shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == sh
  assert int(restored.step) == 7
  params = checkpointer.restore_params(7, abstract_like(target.params, target_shardings.params))
  np.testing.assert_array_equal(params["conv_in"]["kernel"], state.params["conv_in"]["kernel"])
  checkpointer.close()


CRASH = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from mapo_jax.run.checkpoint import Checkpointer
    from mapo_jax.training.train_step import TrainState
    def state(value):  # ~200 MB, so the asynchronous write is still running when the process dies
      return TrainState(step=jnp.int32(value), params={"w": [jnp.full((50_000_000,), float(value))]},
                        opt_state=(), rng=jnp.zeros(2, jnp.uint32), skipped=jnp.int32(0))
    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, state(1))
    checkpointer.wait()
    checkpointer.save(2, state(2))
    import pathlib, time
    deadline = time.time() + 60  # under load the save's thread may not have started writing yet: wait for it
    while not any("tmp" in p.name for p in pathlib.Path(sys.argv[1]).iterdir()) and time.time() < deadline:
      time.sleep(0.001)
    os._exit(3)  # a crash (preemption, OOM kill) in the middle of the save of step 2
""")


def test_crash_during_save_leaves_the_previous_checkpoint_usable(tmp_path):
  proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert any("tmp" in p.name for p in tmp_path.iterdir())  # step 2 was caught half-written
  checkpointer = Checkpointer(tmp_path)
  assert checkpointer.latest_step() == 1
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.ShapeDtypeStruct((50_000_000,), jnp.float32, sharding=device)
  params = checkpointer.restore_params(1, {"w": [abstract]})
  assert float(params["w"][0][0]) == 1.0 and float(params["w"][0][-1]) == 1.0
  checkpointer.close()


def test_repeated_saves_keep_no_python_objects(tmp_path):
  """A run checkpoints thousands of times: a save must not leave objects behind once `keep` is reached. orbax reads
  TensorStore's byte counters around every array write (tensorstore_utils.get_tensorstore_raw_bytes), and TensorStore
  0.1.86's experimental_collect_matching_metrics never frees what it returns: one list per metric per call, ~48 per
  save of this state before the fix (the soak's 5.9 MiB per 1000 steps, bench/RESULTS.md "Soak"). Counted with the
  garbage collector, which tracks every list: after a warm-up, 40 more saves must add fewer than 40 objects."""
  import gc
  import optax
  from mapo_jax.training import train_step
  params = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(6)}
  state = train_step.init_state(params, optax.adam(1e-3), 0)
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2)

  def save(first, count):
    for step in range(first, first + count):
      checkpointer.save(step, state)
      checkpointer.wait()
    gc.collect()
    return len(gc.get_objects())

  before = save(1, 10)  # orbax's one-time caches and the first `keep` checkpoints
  after = save(11, 40)
  checkpointer.close()
  assert after - before < 40, f"{after - before} objects kept by 40 saves"
