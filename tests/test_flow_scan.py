"""Scanned block stacks of the flow transformers (models/flux.py, models/sd3.py with Options.scan, config.scan_blocks)
against the unrolled models they replace and against diffusers.

Two tiny transformers written by diffusers (`save_pretrained`): FLUX with 2 double- and 2 single-stream blocks (two
stacks), and an SD3.5-medium-like one with 5 blocks whose runs of identical blocks are 0-1 (attn2), 2-3 (plain) and
4 (context_pre_only), as SD3.5 medium's 0-12, 13-22 and 23. Facts tested: the stacks and runs (also of the published
configs, abstractly: diffusers' per-block keys, the "layers" axis); the scanned model equals the unrolled one in
its output and its gradients w.r.t. every parameter (by diffusers key) and the input, with remat "none" and "full",
and diffusers' output; files written from it are the unrolled model's byte for byte and diffusers loads them; a
sharded load reads only each device's blocks; the families' load_denoiser / abstract_denoiser take `scan`.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from flax import nnx
from flow_fixtures import (flux_transformer_inputs, make_diffusers_flux_transformer, make_diffusers_sd3_transformer,
                           sd3_transformer_inputs, sd3_transformer_torch)
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from mapo_jax import convert, sharding
from mapo_jax.convert import LazyTensor
from mapo_jax.convert.params import stacked_layers
from mapo_jax.models import flux, sd3
from mapo_jax.models.layers import ScannedBlocks
from mapo_jax.models.presets import (FLUX1_DEV_TRANSFORMER, SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER,
                                     TINY_FLUX_TRANSFORMER, TINY_SD3_TRANSFORMER, TINY_SD35_TRANSFORMER)
from mapo_jax.pipelines import flux as flux_family
from mapo_jax.pipelines import sd3 as sd3_family

FLUX_SCAN = dict(TINY_FLUX_TRANSFORMER, num_layers=2, num_single_layers=2)
SD3_SCAN = dict(TINY_SD35_TRANSFORMER, num_layers=5)  # dual_attention_layers [0, 1]
SCAN_TOL = 1e-6  # the same arithmetic in another program: float32 reordering at most (measured 0 here)
F32_TOL = 1e-4  # against diffusers: the project's float32 bar


class Family:
  def __init__(self, config, make, load, save, inputs, torch_forward):
    self.config, self.make, self.load, self.save = config, make, load, save
    self.inputs, self.torch_forward = inputs, torch_forward


def _flux_torch(model, inputs):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in inputs.items()}).sample.numpy()


FAMILIES = {
    "flux": Family(FLUX_SCAN, make_diffusers_flux_transformer, flux.load_flux_transformer, flux.save_flux_transformer,
                   lambda: flux_transformer_inputs(FLUX_SCAN, 0), _flux_torch),
    "sd3": Family(SD3_SCAN, make_diffusers_sd3_transformer, sd3.load_sd3_transformer, sd3.save_sd3_transformer,
                  lambda: sd3_transformer_inputs(SD3_SCAN, 0), sd3_transformer_torch),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """name -> (folder written by diffusers, the torch model)."""
  out = {}
  for name, fam in FAMILIES.items():
    path = tmp_path_factory.mktemp(f"scan_{name}")
    out[name] = path, fam.make(fam.config, path, seed=1, scale=0.1)
  return out


def diffusers_keyed(model, tree=None) -> dict[str, np.ndarray]:
  """A state dict of `model`'s parameters (or of `tree`, parameters-shaped) under diffusers' keys: a scanned
  stack's parameters as their blocks' keys (convert), SD3's scanned runs renamed (`checkpoint_name`)."""
  if tree is not None:
    model = nnx.merge(nnx.graphdef(model), tree, nnx.state(model, nnx.Not(nnx.Param)))
  rename = getattr(model, "checkpoint_name", lambda k: k)
  return {rename(k): v for k, v in convert.state_dict(model).items()}


def abstract_keys(model) -> dict[str, tuple]:
  """{diffusers key: PyTorch shape} of an abstract model (shapes only)."""
  rename = getattr(model, "checkpoint_name", lambda k: k)
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      n = stacked_layers(path, var)
      shape = tuple(var.shape[0 if n is None else 1:])
      shape = shape[::-1] if path[-1] == "kernel" else shape
      for layer in ([None] if n is None else range(n)):
        out[rename(convert.torch_key(path, layer))] = shape
  return out


def test_stacks_runs_and_the_published_layouts():
  assert sd3.block_runs(sd3.SD3Config.from_dict(SD35_MEDIUM_TRANSFORMER)) == ((0, 13), (13, 10), (23, 1))
  assert sd3.block_runs(sd3.SD3Config.from_dict(SD35_LARGE_TRANSFORMER)) == ((0, 37), (37, 1))
  assert sd3.block_runs(sd3.SD3Config.from_dict(SD3_SCAN)) == ((0, 2), (2, 2), (4, 1))
  assert sd3.block_runs(sd3.SD3Config.from_dict(dict(TINY_SD3_TRANSFORMER, dual_attention_layers=[0, 2]))) == (
      (0, 1), (1, 1), (2, 1))
  # Nothing to scan when every run is one block: the plain list, diffusers' own paths.
  single = sd3.abstract_sd3_transformer(dict(TINY_SD3_TRANSFORMER, num_layers=2, dual_attention_layers=[0]), scan=True)
  assert isinstance(single.transformer_blocks, nnx.List)
  mesh = sharding.make_mesh((1, 4, 2))
  # FLUX.1-dev: two stacks, 19 and 38 blocks deep; SD3.5 medium: runs of 13, 10 and 1; the keys and shapes are
  # the unrolled model's, i.e. diffusers'.
  dev = flux_family.abstract_denoiser(FLUX1_DEV_TRANSFORMER, scan=True, param_dtype=jnp.bfloat16)
  q = dev.transformer_blocks.stack.attn.to_q.kernel
  assert q.shape == (19, 3072, 3072) and q.get_metadata()["axes"] == ("layers", "embed", "heads")
  assert dev.single_transformer_blocks.stack.proj_out.kernel.shape == (38, 3072 + 12288, 3072)
  specs = sharding.model_shardings(dev, mesh)
  assert specs["transformer_blocks"]["stack"]["attn"]["to_q"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert abstract_keys(dev) == abstract_keys(flux_family.abstract_denoiser(FLUX1_DEV_TRANSFORMER))
  medium = sd3_family.abstract_denoiser(SD35_MEDIUM_TRANSFORMER, scan=True, param_dtype=jnp.bfloat16)
  runs = medium.transformer_blocks.runs
  assert [type(r).__name__ for r in runs] == ["ScannedBlocks", "ScannedBlocks", "List"]
  assert runs[0].stack.attn2.to_q.kernel.shape == (13, 1536, 1536) and runs[1].stack.attn2 is None
  assert runs[2][0].ff_context is None  # the context_pre_only block
  assert abstract_keys(medium) == abstract_keys(sd3_family.abstract_denoiser(SD35_MEDIUM_TRANSFORMER))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _outputs_and_grads(graphdef, params, rest, names, x, others, weights):
  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(hidden_states=x, **dict(zip(names, others)))
    return jnp.sum(out * weights), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return out, grads


def outputs_and_grads(model, inputs):
  """The model's output, and the gradient of a fixed random projection of it w.r.t. its parameters (by diffusers
  key) and w.r.t. hidden_states."""
  names = tuple(k for k in inputs if k != "hidden_states")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  out_shape = jax.eval_shape(lambda: nnx.merge(graphdef, params, rest)(**inputs)).shape
  weights = np.random.default_rng(100).standard_normal(out_shape).astype(np.float32)
  out, (grads, dx) = _outputs_and_grads(graphdef, params, rest, names, inputs["hidden_states"],
                                        tuple(inputs[k] for k in names), weights)
  return np.asarray(out), diffusers_keyed(model, grads), np.asarray(dx)


@pytest.fixture(scope="module")
def unrolled_results(folders):
  cache = {}

  def get(name):
    if name not in cache:
      fam = FAMILIES[name]
      cache[name] = outputs_and_grads(fam.load(folders[name][0]), fam.inputs())
    return cache[name]

  return get


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_scanned_equals_unrolled_and_diffusers(folders, unrolled_results, name, remat):
  fam = FAMILIES[name]
  path, torch_model = folders[name]
  scanned = fam.load(path, remat=remat, scan=True)
  assert sum(isinstance(m, ScannedBlocks) for _, m in nnx.iter_graph(scanned)) == 2
  out_u, grads_u, dx_u = unrolled_results(name)  # remat changes what is recomputed, never the arithmetic
  out_s, grads_s, dx_s = outputs_and_grads(scanned, fam.inputs())
  assert rel_l2(out_s, out_u) <= SCAN_TOL
  assert rel_l2(dx_s, dx_u) <= SCAN_TOL
  assert list(grads_s) == list(grads_u)  # the same per-block keys, in the same order
  worst = max(rel_l2(grads_s[k], grads_u[k]) for k in grads_u if np.any(grads_u[k]))
  assert worst <= SCAN_TOL, worst
  if remat == "none":
    assert rel_l2(out_s, fam.torch_forward(torch_model, fam.inputs())) <= F32_TOL


def digests(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_files_are_diffusers_layout_byte_for_byte(folders, name, tmp_path):
  from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
  fam = FAMILIES[name]
  path, _ = folders[name]
  unrolled, scanned = fam.load(path), fam.load(path, scan=True)
  fam.save(unrolled, tmp_path / "unrolled")
  fam.save(scanned, tmp_path / "scanned")
  assert digests(tmp_path / "scanned") == digests(tmp_path / "unrolled")
  original = load_file(path / "diffusion_pytorch_model.safetensors")
  written = load_file(tmp_path / "scanned" / "diffusion_pytorch_model.safetensors")
  assert sorted(written) == sorted(original)
  assert all(written[k].tobytes() == v.tobytes() for k, v in original.items())
  reference = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}[name]
  _, info = reference.from_pretrained(tmp_path / "scanned", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  again = diffusers_keyed(fam.load(tmp_path / "scanned", scan=True))
  assert all(np.array_equal(again[k], v) for k, v in diffusers_keyed(scanned).items())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sharded_load_reads_only_blocks(folders, name, monkeypatch):
  fam = FAMILIES[name]
  path, _ = folders[name]
  mesh = sharding.make_mesh((1, 4, 2))
  single = nnx.to_pure_dict(nnx.state(fam.load(path, scan=True), nnx.Param))
  reads, get = [], LazyTensor.__getitem__

  def logged(self, index):
    block = get(self, index)
    reads.append((self.key, block.size, int(np.prod(self.shape))))
    return block

  monkeypatch.setattr(LazyTensor, "__getitem__", logged)
  model = fam.load(path, scan=True, mesh=mesh)
  loaded, want = nnx.to_pure_dict(nnx.state(model, nnx.Param)), sharding.model_shardings(model, mesh)
  for (p, got), ref, rule in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(single),
                                 jax.tree.leaves(want)):
    assert got.sharding == rule and np.array_equal(np.asarray(got), np.asarray(ref)), jax.tree_util.keystr(p)
  if name == "flux":  # 2 blocks of (16, 16), "embed" over fsdp (4), "heads" over tensor (2)
    q, key, shard = model.transformer_blocks.stack.attn.to_q.kernel, "transformer_blocks.1.attn.to_q.weight", (2, 4, 8)
  else:  # run 1 (blocks 2-3) of (32, 32)
    q, key, shard = (model.transformer_blocks.runs[1].stack.attn.to_q.kernel, "transformer_blocks.3.attn.to_q.weight",
                     (2, 8, 16))
  assert q.get_value().sharding.spec == P(None, "fsdp", "tensor")
  assert all(s.data.shape == shard for s in q.get_value().addressable_shards)
  assert [r for r in reads if r[0] == key] and all(size < full for k, size, full in reads if k == key)


def test_families_take_scan(folders, tmp_path):
  """load_denoiser / abstract_denoiser of both families build the scanned layout (no refusal, no silent unrolled
  model) and agree on it, as the trainer, aot and export need; a file that does not fit is reported in diffusers'
  key names."""
  for family, name in ((flux_family, "flux"), (sd3_family, "sd3")):
    path, _ = folders[name]
    options = dict(dtype=jnp.bfloat16, remat="full", scan=True, attention="xla")
    model = family.load_denoiser(path, **options)
    shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))
    assert shapes(family.abstract_denoiser(path, **options)) == shapes(model)
    assert sum(isinstance(m, ScannedBlocks) for _, m in nnx.iter_graph(model)) == 2
    assert not any(isinstance(m, ScannedBlocks) for _, m in nnx.iter_graph(family.load_denoiser(path)))
  path, _ = folders["sd3"]
  tensors = load_file(path / "diffusion_pytorch_model.safetensors")
  del tensors["transformer_blocks.3.attn.to_q.weight"]
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
  with pytest.raises(convert.CheckpointMismatchError, match=r"1 missing keys:\n    transformer_blocks\.3\.attn\.to_q"
                     r"\.weight$"):
    sd3.load_sd3_transformer(tmp_path, scan=True)
