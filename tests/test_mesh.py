"""`sharding.check_partitioning` refuses a mesh exactly when XLA computes the transformer layer pattern wrongly
on it (bench/sharding_check.py measures the pattern and whole-UNet gradients on every 8-device mesh)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mapo_jax import sharding


def pattern_error(mesh) -> float:
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((8, 8, 64)).astype(np.float32), (rng.standard_normal((64, 64)) / 8).astype(np.float32)
  f = jax.jit(lambda x, w: x @ w + x)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  got = np.asarray(f(put(x, P(sharding.BATCH_AXES, None, "tensor")), put(w, P("tensor", "fsdp"))))
  return float(np.linalg.norm(got - np.asarray(f(x, w))) / np.linalg.norm(np.asarray(f(x, w))))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (2, 4, 1), (4, 1, 2)])
def test_a_mesh_is_refused_exactly_when_xla_gets_the_pattern_wrong(shape):
  mesh = sharding.make_mesh(shape)
  wrong = pattern_error(mesh) > 1e-5
  if 1 in shape:
    assert not wrong  # two-axis meshes: never refused, and right
    sharding.check_partitioning(mesh)
  elif wrong:
    with pytest.raises(sharding.MeshPartitioningError, match=r"mesh \{'data': 2, 'fsdp': 2, 'tensor': 2\}.*\(1, 4, 2\)"):
      sharding.check_partitioning(mesh)
  else:  # a fixed XLA: the check lets the mesh through
    sharding.check_partitioning(mesh)
