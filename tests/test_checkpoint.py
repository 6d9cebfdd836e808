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
  """A run checkpoints thousands of times: once `keep` is reached, a save must leave nothing allocated behind.
  TensorStore 0.1.86 never frees what it builds when converting JSON to Python (run/checkpoint.py,
  avoid_tensorstore_json_leaks), and orbax called it twice per save:
  - its byte counters (experimental_collect_matching_metrics): one list per metric per call, which the garbage
    collector tracks, ~48 per save of this state before that fix;
  - each array's file spec (KvStore.Spec(spec).to_json()): strings and dicts it does not track, ~4 memory blocks per
    array per save before that fix (sys.getallocatedblocks counts them).
  After a warm-up, 40 more saves must add fewer than 40 tracked objects and fewer than 40 blocks per array: a
  quarter of the leak."""
  import gc

  import optax

  from mapo_jax.training import train_step
  params = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(6)}
  state = train_step.init_state(params, optax.adam(1e-3), 0)
  arrays = len(jax.tree.leaves(state))
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2)

  def save(first, count):
    for step in range(first, first + count):
      checkpointer.save(step, state)
      checkpointer.wait()
    gc.collect()
    return len(gc.get_objects()), sys.getallocatedblocks()

  objects, blocks = save(1, 10)  # orbax's one-time caches and the first `keep` checkpoints
  objects_after, blocks_after = save(11, 40)
  checkpointer.close()
  assert objects_after - objects < 40, f"{objects_after - objects} objects kept by 40 saves"
  assert blocks_after - blocks < 40 * arrays, f"{blocks_after - blocks} blocks kept by 40 saves of {arrays} arrays"


def test_file_specs_resolve_as_tensorstore_resolves_them(tmp_path):
  """avoid_tensorstore_json_leaks resolves orbax's plain file specs in Python: the JSON must be TensorStore's own, and
  every other spec must still reach TensorStore."""
  import tensorstore

  from mapo_jax.run.checkpoint import _TensorStore
  ts = _TensorStore(tensorstore)
  for path in ("/tmp/a/", f"{tmp_path}/x y/1.orbax-checkpoint-tmp/params/", "/data/ü/ocdbt.process_0/"):
    spec = {"driver": "file", "path": path}
    assert ts.KvStore.Spec(spec).to_json() == tensorstore.KvStore.Spec(spec).to_json()
  other = {"driver": "memory", "path": "a/"}
  assert isinstance(ts.KvStore.Spec(other), tensorstore.KvStore.Spec) and ts.KvStore.open is tensorstore.KvStore.open
