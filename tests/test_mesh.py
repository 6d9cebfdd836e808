"""`sharding.check_partitioning` refuses a mesh exactly when XLA computes the transformer layer pattern wrongly
on it (`sharding.partitioning_error`; bench/sharding_check.py also measures whole-UNet gradients on every
8-device mesh)."""
import pytest

from mapo_jax import sharding


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (2, 4, 1), (4, 1, 2)])
def test_a_mesh_is_refused_exactly_when_xla_gets_the_pattern_wrong(shape):
  mesh = sharding.make_mesh(shape)
  wrong = sharding.partitioning_error(mesh) > 1e-5
  if 1 in shape:
    assert not wrong  # two-axis meshes: never refused, and right
    sharding.check_partitioning(mesh)
  elif wrong:
    with pytest.raises(sharding.MeshPartitioningError, match=r"mesh \{'data': 2, 'fsdp': 2, 'tensor': 2\}.*\(1, 4, 2\)"):
      sharding.check_partitioning(mesh)
  else:  # a fixed XLA: the check lets the mesh through
    sharding.check_partitioning(mesh)
