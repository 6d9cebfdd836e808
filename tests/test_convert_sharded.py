"""Weights born sharded: safetensors → each device's block of the target sharding, on the 8-device CPU mesh.

The micro SDXL UNet is written with random weights straight from its abstract shapes (no init, no torch),
split over several safetensors files so the lazy reader crosses files.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapo_jax import convert, sharding
from mapo_jax.convert import CheckpointMismatchError, LazyTensor
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.unet import UNet2DConditionModel, load_unet

MESHES = [(2, 4, 1), (1, 4, 2)]


def torch_tensors(model, seed=0):
  """A random PyTorch-layout state dict for `model` (abstract is fine)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      shape = convert.params.to_torch_layout(str(path[-1]), np.empty(var.shape, np.bool_)).shape
      out[convert.torch_key(path)] = rng.standard_normal(shape).astype(np.float32)
  return out


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("micro_unet")
  model = nnx.eval_shape(lambda: UNet2DConditionModel(MICRO_SDXL_UNET, rngs=nnx.Rngs(0)))
  (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **model.config}))
  convert.write_weights(folder, torch_tensors(model), convert.DIFFUSERS_STEM, max_shard_bytes=64 * 2**10)
  assert (folder / f"{convert.DIFFUSERS_STEM}.safetensors.index.json").is_file()
  return folder


def pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def record_reads(monkeypatch):
  """Patches LazyTensor so every block read from the files is logged as (key, block size, full size)."""
  reads, get = [], LazyTensor.__getitem__

  def logged(self, index):
    block = get(self, index)
    reads.append((self.key, block.size, int(np.prod(self.shape))))
    return block

  monkeypatch.setattr(LazyTensor, "__getitem__", logged)
  return reads


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_load_follows_the_rules_bit_exact_without_full_copies(micro_dir, monkeypatch, shape):
  mesh = sharding.make_mesh(shape)
  single = pure(load_unet(micro_dir))
  reads = record_reads(monkeypatch)
  model = load_unet(micro_dir, mesh=mesh)
  loaded, want = pure(model), sharding.model_shardings(model, mesh)
  assert jax.tree.structure(loaded) == jax.tree.structure(single)
  n_sharded = 0
  for (path, got), ref, rule in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(single),
                                    jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    assert got.sharding == rule, name
    assert got.dtype == ref.dtype and np.array_equal(np.asarray(got), np.asarray(ref)), name
    if not rule.is_fully_replicated:
      n_sharded += 1
      for shard in got.addressable_shards:  # no device holds the whole parameter
        assert shard.data.size < got.size and shard.data.shape == rule.shard_shape(got.shape), name
  assert n_sharded > 50  # most kernels are split over fsdp and/or tensor
  # The host read each parameter block by block: a sharded parameter is never read whole, and a
  # partially replicated one reads each distinct block once, not once per holding device.
  sizes = {}
  for key, size, full in reads:
    sizes.setdefault(key, []).append((size, full))
  assert len(sizes) == len(jax.tree.leaves(single))
  split = {k for k, v in sizes.items() if any(size < full for size, full in v)}
  assert len(split) == n_sharded
  for key in split:
    blocks = sizes[key]
    assert all(size < full for size, full in blocks) and sum(s for s, _ in blocks) <= blocks[0][1], key


def test_param_dtype_cast_on_the_host_matches_the_device_cast(micro_dir):
  mesh = sharding.make_mesh((2, 4, 1))
  f32 = pure(load_unet(micro_dir))
  bf16 = pure(load_unet(micro_dir, param_dtype=jnp.bfloat16, mesh=mesh))
  for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
    assert b.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(b).view(np.uint16), np.asarray(a.astype(jnp.bfloat16)).view(np.uint16))


def test_load_model_takes_a_shardings_tree(micro_dir):
  mesh = sharding.make_mesh((1, 4, 2))
  abstract = nnx.eval_shape(lambda: UNet2DConditionModel(MICRO_SDXL_UNET, rngs=nnx.Rngs(0)))
  build = lambda: UNet2DConditionModel(MICRO_SDXL_UNET, rngs=nnx.Rngs(0))
  tree = sharding.model_shardings(abstract, mesh)
  model = convert.load_model(micro_dir, build, stem=convert.DIFFUSERS_STEM, shardings=tree)
  for got, rule in zip(jax.tree.leaves(pure(model)), jax.tree.leaves(tree)):
    assert got.sharding == rule


def test_bad_checkpoint_fails_before_anything_is_read_or_placed(micro_dir, tmp_path, monkeypatch):
  from safetensors.numpy import save_file
  weights = convert.read_weights(micro_dir, convert.DIFFUSERS_STEM)
  del weights["conv_in.bias"]
  weights["mid_block.extra.weight"] = np.zeros(3, np.float32)
  weights["conv_out.weight"] = weights["conv_out.weight"][:, :-1]
  (tmp_path / "config.json").write_text((micro_dir / "config.json").read_text())
  save_file(weights, tmp_path / f"{convert.DIFFUSERS_STEM}.safetensors")
  touched = []
  monkeypatch.setattr(jax, "make_array_from_callback", lambda *a, **k: touched.append("placed"))
  monkeypatch.setattr(LazyTensor, "__getitem__", lambda *a: touched.append("read"))
  monkeypatch.setattr(LazyTensor, "__array__", lambda *a, **k: touched.append("read"))
  with pytest.raises(CheckpointMismatchError) as err:
    load_unet(tmp_path, mesh=sharding.make_mesh((2, 4, 1)))
  msg = str(err.value)
  assert "conv_in.bias" in msg and "mid_block.extra.weight" in msg and "conv_out.weight" in msg
  assert "1 missing keys" in msg and "1 unexpected keys" in msg and "1 mis-shaped keys" in msg
  assert touched == []


def test_host_params_fetch_sharded_params_to_numpy(micro_dir):
  single = pure(load_unet(micro_dir))
  model = load_unet(micro_dir, mesh=sharding.make_mesh((1, 4, 2)))
  host = convert.host_params(pure(model))
  half = convert.host_params(pure(model), dtype=np.float16)
  for a, b, c in zip(jax.tree.leaves(single), jax.tree.leaves(host), jax.tree.leaves(half)):
    assert isinstance(b, np.ndarray) and np.array_equal(b, np.asarray(a))
    assert c.dtype == np.float16 and np.array_equal(c, np.asarray(a).astype(np.float16))
  # The host tree exports as train.py does it: merged into the UNet's graph, then its PyTorch state dict.
  graphdef, _ = nnx.split(model, nnx.Param)
  state = convert.state_dict(nnx.merge(graphdef, host))
  on_disk = convert.read_weights(micro_dir, convert.DIFFUSERS_STEM)
  assert state.keys() == on_disk.keys()
  assert all(np.array_equal(state[k], on_disk[k]) for k in state)



# Run by each of two processes (2 CPU devices each, gloo) on a (1, 2, 2) mesh whose fsdp axis spans them.
TWO_PROCESS_LOAD = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[1]))
from flax import nnx
from mapo_jax import convert, sharding
from mapo_jax.convert import LazyTensor
from mapo_jax.models.unet import load_unet
folder, reads, get = sys.argv[3], {}, LazyTensor.__getitem__
def logged(self, index):
  block = get(self, index)
  reads[self.key] = reads.get(self.key, 0) + block.size
  return block
LazyTensor.__getitem__ = logged
model = load_unet(folder, mesh=sharding.make_mesh((1, 2, 2)))
full = convert.read_weights(folder, convert.DIFFUSERS_STEM)
total_read = total = 0
for path, var in nnx.iter_graph(model):
  if not isinstance(var, nnx.Param):
    continue
  x, key = var.get_value(), convert.torch_key(path)
  ref = convert.params.from_torch_layout(str(path[-1]), full[key])
  assert {s.device for s in x.addressable_shards} == set(jax.local_devices()), key
  for s in x.addressable_shards:
    assert np.array_equal(np.asarray(s.data), ref[s.index]), key
  held = {tuple((i.start, i.stop) for i in idx): ref[idx].size
          for idx in x.sharding.addressable_devices_indices_map(x.shape).values()}
  assert reads[key] == sum(held.values()), key  # this process read exactly the blocks its devices hold
  total_read, total = total_read + reads[key], total + ref.size
host = convert.host_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
single = nnx.to_pure_dict(nnx.state(load_unet(folder), nnx.Param))
assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(single)))
print(f"read {total_read} of {total}")
"""


def test_two_processes_read_only_their_own_blocks(micro_dir):
  import socket
  import subprocess
  import sys
  from conftest import REPO
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_LOAD, str(i), str(port), str(micro_dir)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
    read, total = map(int, out.strip().splitlines()[-1].split()[1::2])  # "read R of T"
    assert read < 0.6 * total  # each process holds (and read) about half the model
