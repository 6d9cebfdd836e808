"""Attention kernels against the einsum reference: the Pallas TPU (splash) kernel in interpret mode on CPU,
the shard_map wrapper on an 8-device CPU mesh, per-platform defaults, and (with libtpu installed) an
ahead-of-time TPU compile on this CPU host."""
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mapo_jax.models import attention
from mapo_jax.sharding import MESH_AXES, make_mesh

# Tolerance from the arithmetic: the kernel and the einsum reference compute the same float32 sums in a
# different order (blocked online softmax vs one pass). A float32 sum of n terms is off by at most
# ~n·u (u = 2^-24, Higham's gamma_n) times the magnitude of its terms; the longest chain of reductions is
# head_dim (logits) + kv tokens (softmax normaliser, P·V, dq) + q tokens (dk, dv), so with inputs of unit
# scale every output and gradient is within (D + S + T)·u of the reference, relative to its largest entry
# (~3.4e-5 for 64 + 256 + 256; observed errors are ~100x smaller).
U = 2.0 ** -24


def assert_close(got, ref, reduction_length):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
  assert err <= reduction_length * U * scale, (err, scale)


@pytest.fixture
def interpret(monkeypatch):
  """The Pallas TPU kernel in interpret mode, with 128-token blocks so 256 tokens span two of them."""
  monkeypatch.setattr(attention, "INTERPRET", True)
  monkeypatch.setattr(attention, "SPLASH_MAX_BLOCK", 128)


def qkv(batch, q_len, kv_len, heads, dim=64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, dim))
  k, v = (jax.random.normal(key, (batch, kv_len, heads, dim)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)  # a random output weighting, so every gradient is used
  return q, k, v, cotangent


def value_and_grads(impl, q, k, v, cotangent, wrap=lambda f: f):
  """Output and d(sum(out * cotangent))/d(q, k, v), jitted."""
  attend = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl)
  loss = lambda q, k, v: jnp.sum(wrap(attend)(q, k, v) * cotangent)
  return jax.jit(wrap(attend))(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_default_implementation_follows_the_target_platform():
  assert [attention.default_implementation(p) for p in ("tpu", "gpu", "cpu")] == ["pallas", "cudnn", "einsum"]
  assert attention.default_implementation() == attention.default_implementation(jax.default_backend())
  mesh = make_mesh((2, 2, 2))
  assert attention.mesh_platform(mesh) == attention.mesh_platform(mesh.abstract_mesh) == "cpu"


@pytest.mark.parametrize("q_len,kv_len", [(256, 256), (256, 128), (256, 77)],
                         ids=["self", "cross-kernel", "cross-77-text"])
def test_pallas_matches_einsum(interpret, q_len, kv_len):
  # 77 text tokens do not fill splash's 128-token blocks: "pallas" answers them with XLA attention.
  assert attention._splash_fits(q_len, kv_len) == (kv_len % 128 == 0)
  q, k, v, cotangent = qkv(2, q_len, kv_len, heads=2)
  out, grads = value_and_grads("pallas", q, k, v, cotangent)
  ref_out, ref_grads = value_and_grads("einsum", q, k, v, cotangent)
  n = q.shape[-1] + q_len + kv_len
  assert_close(out, ref_out, n)
  for g, ref in zip(grads, ref_grads):
    assert_close(g, ref, n)


def test_shard_spec_replicates_over_axes_that_do_not_divide():
  mesh = make_mesh((2, 2, 2)).abstract_mesh
  assert attention.shard_spec(mesh, batch=4, heads=2) == P(("data", "fsdp"), None, "tensor", None)
  assert attention.shard_spec(mesh, batch=2, heads=3) == P("data", None, None, None)  # fsdp, tensor: replicated
  assert attention.shard_spec(mesh, batch=3, heads=4) == P(None, None, "tensor", None)
  one_tensor = make_mesh((4, 2, 1)).abstract_mesh  # size-1 axes are left out
  assert attention.shard_spec(one_tensor, batch=8, heads=2) == P(("data", "fsdp"), None, None, None)


@pytest.mark.parametrize("batch,heads,in_spec", [(4, 2, P(MESH_AXES[:2])), (2, 3, P("data"))],
                         ids=["sharded", "replicated-fallback"])
def test_sharded_kernels_on_an_8_device_mesh(interpret, batch, heads, in_spec):
  mesh = make_mesh((2, 2, 2))
  q, k, v, cotangent = qkv(batch, 256, 256, heads, seed=1)
  ref_out, ref_grads = value_and_grads("einsum", q, k, v, cotangent)
  n = q.shape[-1] + 2 * 256
  q, k, v, cotangent = (jax.device_put(x, NamedSharding(mesh, in_spec)) for x in (q, k, v, cotangent))
  # The einsum path under the same wrapper as the TPU/cuDNN kernels: checks the specs without a kernel.
  per_shard = lambda f: functools.partial(attention.sharded, f)
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="pallas")).lower(
        q, k, v).as_text()
    assert "sdy.manual_computation" in hlo  # the kernel runs per shard, not partitioned by GSPMD
    for impl, wrap in (("pallas", lambda f: f), ("einsum", per_shard)):
      out, grads = value_and_grads(impl, q, k, v, cotangent, wrap)
      assert_close(out, ref_out, n)
      for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, n)


def test_sharded_on_an_explicit_axis_mesh():
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES)  # Explicit axes: shard_map wants inputs laid out as its in_specs
  q, k, v, _ = qkv(2, 128, 128, heads=3, seed=2)
  ref = attention._einsum_attention(q, k, v, 0.125, False)
  per_shard = functools.partial(attention._einsum_attention, scale=0.125, upcast=False)
  with jax.set_mesh(mesh):
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P())) for x in (q, k, v))
    out = jax.jit(functools.partial(attention.sharded, per_shard))(q, k, v)
  assert out.sharding.spec == P("data", None, None, None)
  assert_close(out, ref, 64 + 128)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')")
def test_splash_compiles_for_a_tpu_mesh_without_a_tpu():
  """Lowers and compiles forward and backward for a v5e 2x2 slice on this CPU host (no TPU needed): the
  splash kernel under shard_map compiles; the bare kernel under GSPMD is refused."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                         chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
  mesh = make_mesh((2, 2, 1), devices)
  platform = attention.mesh_platform(mesh)
  assert platform == "tpu"
  batch = NamedSharding(mesh, P(MESH_AXES[:2]))
  shape = jax.ShapeDtypeStruct((4, 1024, 10, 64), jnp.bfloat16, sharding=batch)

  def compile_grad(attend):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)
    with jax.set_mesh(mesh):
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(batch,) * 3).lower(
          shape, shape, shape).compile()

  impl = attention.default_implementation(platform)
  compiled = compile_grad(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl))
  assert compiled.as_text().count("tpu_custom_call") == 3  # splash forward, dq and dkv kernels
  with pytest.raises(NotImplementedError, match="Mosaic kernels cannot be automatically partitioned"):
    compile_grad(lambda q, k, v: attention._splash_attention(q, k, v, 0.125))
