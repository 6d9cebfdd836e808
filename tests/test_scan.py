"""Scanned stacks of identical blocks (models/layers.py ScannedBlocks, Options.scan, config.scan_blocks) against
the unrolled model they replace, and against diffusers.

One micro SDXL-layout UNet with 2-deep transformer stacks (as at SDXL's 64x64 level; four stacks: down, mid
and two up) is written by diffusers (`save_pretrained`) and loaded unrolled and scanned. Facts tested: the
scanned model is the unrolled one in forward and in the gradient w.r.t. every parameter (mapped back to the
per-block checkpoint keys) and the input, with remat "none" and "full"; it matches diffusers'
UNet2DConditionModel; its saved files and LoRA files (diffusers and kohya formats) are the unrolled model's byte
for byte; a sharded load reads blocks only; sampling runs it; a tuple carry (FLUX's two streams) scans like the
unrolled blocks.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_call, make_diffusers_unet, rel_l2
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_unet import random_inputs, torch_forward

from mapo_jax import convert, sampling, sharding
from mapo_jax.convert import LazyTensor
from mapo_jax.models import load_unet, save_unet
from mapo_jax.models.layers import ScannedBlocks, block_stack, run_blocks
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.pipelines import load_pipeline
from mapo_jax.training import lora

# MICRO_SDXL_UNET (whose text towers the micro pipeline fixture has) with 2 transformer blocks per attention.
SCAN_UNET = dict(MICRO_SDXL_UNET, transformer_layers_per_block=[1, 2])
STACKS = 4  # down_blocks.1 (one attention), mid_block, up_blocks.0 (two attentions)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in")


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("scan_unet")
  return make_diffusers_unet(SCAN_UNET, path), path


def inputs(seed=0):
  x, t, ctx, extra = random_inputs(SCAN_UNET, seed, size=8)
  return x, t, ctx, extra


@functools.partial(jax.jit, static_argnums=0)
def _outputs_and_grads(graphdef, params, rest, x, t, ctx, extra, weights):
  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x, t, ctx, **extra)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return out, grads


def outputs_and_grads(model, seed=0):
  """The model's output, and the gradient of a fixed random projection of it w.r.t. its parameters (as the
  per-block PyTorch-keyed state dict convert writes) and w.r.t. the input."""
  x, t, ctx, extra = inputs(seed)
  weights = np.random.default_rng(seed + 100).standard_normal(x.shape).astype(np.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  out, (grads, dx) = _outputs_and_grads(graphdef, params, rest, x, t, ctx, extra, weights)
  return np.asarray(out), convert.state_dict(nnx.merge(graphdef, grads, rest)), np.asarray(dx)


def stacks(model) -> list[ScannedBlocks]:
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, ScannedBlocks)]


def test_layout_and_sharding_axes(unet_dir):
  _, path = unet_dir
  model = load_unet(path, scan=True)
  assert len(stacks(model)) == STACKS and all(len(s) == 2 for s in stacks(model))
  kernel = model.mid_block.attentions[0].transformer_blocks.stack.attn1.to_q.kernel
  assert kernel.shape == (2, 32, 32) and kernel.get_metadata()["axes"] == ("layers", "embed", "heads")
  mesh = sharding.make_mesh((1, 4, 2))
  assert sharding.logical_to_spec(("layers", "embed", "heads"), (2, 32, 32), mesh) == P(None, "fsdp", "tensor")
  # A stack of one block gains nothing from a scan: it stays a list (SDXL's 1-deep level, SD 1.x).
  assert isinstance(block_stack(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 1, scan=True), nnx.List)


class _TwoStream(nnx.Module):
  """A FLUX double-block-like block: (x, context) in and out, one extra per-call input."""

  def __init__(self, rngs):
    self.x = nnx.Linear(4, 4, rngs=rngs)
    self.c = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x, context, temb):
    return jnp.tanh(self.x(x) + context) * temb, self.c(context) + x


def test_tuple_carry_and_extra_inputs_with_remat():
  """A stack whose blocks carry a tuple (FLUX's image and text streams) and take an extra input (temb)."""
  rngs_u, rngs_s = nnx.Rngs(0), nnx.Rngs(0)
  unrolled = block_stack(lambda: _TwoStream(rngs_u), 3, scan=False)
  scanned = block_stack(lambda: _TwoStream(rngs_s), 3, scan=True)
  assert isinstance(scanned, ScannedBlocks) and scanned.stack.x.kernel.shape == (3, 4, 4)
  x, c, temb = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 4)), jnp.float32) for i in range(3))

  def run(blocks, x):
    out = run_blocks(blocks, "full", (x, c), temb)
    return jnp.sum(out[0] ** 2) + jnp.sum(out[1]), out

  (_, out_u), dx_u = jax.value_and_grad(run, argnums=1, has_aux=True)(unrolled, x)
  (_, out_s), dx_s = jax.value_and_grad(run, argnums=1, has_aux=True)(scanned, x)
  for a, b in zip((*out_s, dx_s), (*out_u, dx_u)):
    assert rel_l2(a, b) <= 1e-6


@pytest.fixture(scope="module")
def unrolled_results(unet_dir):
  """The unrolled model's outputs and gradients per remat policy (computed once each)."""
  cache = {}

  def get(remat):
    if remat not in cache:
      cache[remat] = outputs_and_grads(load_unet(unet_dir[1], remat=remat))
    return cache[remat]

  return get


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_equals_unrolled_and_diffusers(unet_dir, unrolled_results, remat):
  torch_model, path = unet_dir
  out_u, grads_u, dx_u = unrolled_results(remat)
  out_s, grads_s, dx_s = outputs_and_grads(load_unet(path, remat=remat, scan=True))
  assert rel_l2(out_s, out_u) <= 1e-6
  assert rel_l2(dx_s, dx_u) <= 1e-6
  assert list(grads_s) == list(grads_u)  # the same per-block keys, in the same order
  worst = max(rel_l2(grads_s[k], grads_u[k]) for k in grads_u if np.any(grads_u[k]))
  assert worst <= 1e-6, worst
  assert any(".transformer_blocks.1.attn1.to_q.weight" in k for k in grads_s)
  x, t, ctx, extra = inputs()
  assert rel_l2(out_s, torch_forward(torch_model, x, t, ctx, extra)) <= 1e-4  # the project's float32 bar


def file_digests(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_saved_files_are_the_unrolled_models_byte_for_byte(unet_dir, tmp_path):
  _, path = unet_dir
  unrolled, scanned = load_unet(path), load_unet(path, scan=True)
  save_unet(unrolled, tmp_path / "unrolled")
  save_unet(scanned, tmp_path / "scanned")
  assert file_digests(tmp_path / "scanned") == file_digests(tmp_path / "unrolled")
  # Sharded files (index + shards): the key order decides which shard a tensor lands in.
  for name, model in (("u", unrolled), ("s", scanned)):
    convert.write_weights(tmp_path / f"shards_{name}", convert.state_dict(model, np.float16), "w",
                          max_shard_bytes=32 * 2**10)
  assert len(file_digests(tmp_path / "shards_s")) > 3
  assert file_digests(tmp_path / "shards_s") == file_digests(tmp_path / "shards_u")
  # The files a scanned model wrote load into it again, unchanged.
  again = convert.state_dict(load_unet(tmp_path / "scanned", scan=True))
  reference = convert.state_dict(scanned)
  assert all(np.array_equal(again[k], reference[k]) for k in reference)


def test_sharded_load_reads_only_blocks(unet_dir, monkeypatch):
  _, path = unet_dir
  mesh = sharding.make_mesh((1, 4, 2))
  single = nnx.to_pure_dict(nnx.state(load_unet(path, scan=True), nnx.Param))
  reads, get = [], LazyTensor.__getitem__

  def logged(self, index):
    block = get(self, index)
    reads.append((self.key, block.size, int(np.prod(self.shape))))
    return block

  monkeypatch.setattr(LazyTensor, "__getitem__", logged)
  model = load_unet(path, scan=True, mesh=mesh)
  loaded, want = nnx.to_pure_dict(nnx.state(model, nnx.Param)), sharding.model_shardings(model, mesh)
  for (p, got), ref, rule in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(single),
                                 jax.tree.leaves(want)):
    assert got.sharding == rule and np.array_equal(np.asarray(got), np.asarray(ref)), jax.tree_util.keystr(p)
  q = model.mid_block.attentions[0].transformer_blocks.stack.attn1.to_q.kernel
  assert q.get_value().sharding.spec == P(None, "fsdp", "tensor")
  assert all(s.data.shape == (2, 8, 16) for s in q.get_value().addressable_shards)
  key = "mid_block.attentions.0.transformer_blocks.1.attn1.to_q.weight"
  assert [r for r in reads if r[0] == key] and all(size < full for k, size, full in reads if k == key)


def lora_files(model, folder):
  return {fmt: lora.save(model, folder / fmt, fmt).read_bytes() for fmt in lora.FORMATS}


def test_lora_on_a_scanned_model_is_the_unrolled_models(unet_dir, unrolled_results, tmp_path):
  _, path = unet_dir
  unrolled, scanned = load_unet(path), load_unet(path, scan=True)
  kw = dict(rank=2, alpha=3.0, targets=LORA_TARGETS, seed=5)
  names_u, names_s = lora.add_adapters(unrolled, **kw), lora.add_adapters(scanned, **kw)
  assert len(names_u) == len(names_s) + 9 * STACKS  # each stacked layer is 3 unrolled ones
  to_q = scanned.mid_block.attentions[0].transformer_blocks.stack.attn1.to_q.lora
  assert to_q.a.shape == (2, 32, 2) and to_q.b.shape == (2, 2, 32)
  assert to_q.a.get_metadata()["axes"] == ("layers", "embed", None)
  assert to_q.b.get_metadata()["axes"] == ("layers", None, "heads")
  assert lora_files(scanned, tmp_path / "fresh_s") == lora_files(unrolled, tmp_path / "fresh_u")  # the same draws
  # Trained-looking adapters (B != 0) on the unrolled model, written, then read into scanned models.
  rng = np.random.default_rng(0)
  for adapter in lora.adapted(unrolled).values():
    adapter.b.set_value(jnp.asarray(rng.standard_normal(adapter.b.shape).astype(np.float32)))
  written = lora.save(unrolled, tmp_path / "trained")
  for model in (unrolled, scanned):  # into their adapters (a run's init_from): B = B' / s
    lora.load_into(model, written)
  assert lora_files(scanned, tmp_path / "into_s") == lora_files(unrolled, tmp_path / "into_u")
  bare_u, bare_s = load_unet(path), load_unet(path, scan=True)
  assert lora.load_into(bare_s, written) == lora.load_into(bare_u, written)  # attached (generate, evaluate)
  assert lora_files(bare_s, tmp_path / "bare_s") == lora_files(bare_u, tmp_path / "bare_u")
  x, t, ctx, extra = inputs()
  adapted_s, adapted_u = jit_call(bare_s, x, t, ctx, **extra), jit_call(bare_u, x, t, ctx, **extra)
  assert rel_l2(adapted_s, adapted_u) <= 1e-6
  assert rel_l2(adapted_s, unrolled_results("none")[0]) > 1e-3  # the adapters act
  # Dropout keys: each block of a stacked adapter gets the key its unrolled layer gets.
  key = jax.random.key_data(jax.random.key(7))
  lora.set_dropout_keys(unrolled, key)
  lora.set_dropout_keys(scanned, key)
  assert lora.adapted(unrolled)["mid_block.attentions.0.transformer_blocks.1.attn1.to_q"].dropout_key is None
  for model in (unrolled, scanned):  # dropout > 0 is set at attach time: re-attach with it
    for name, layer in lora.linear_layers(model).items():
      if layer.lora is not None:
        layer.lora.dropout = 0.1
  lora.set_dropout_keys(unrolled, key)
  lora.set_dropout_keys(scanned, key)
  stacked = np.asarray(to_q.dropout_key.get_value())
  for i in range(2):
    want = lora.adapted(unrolled)[f"mid_block.attentions.0.transformer_blocks.{i}.attn1.to_q"].dropout_key
    np.testing.assert_array_equal(stacked[i], np.asarray(want.get_value()))
  # Fused: the same weights.
  fused_u, fused_s = convert.state_dict(lora.fuse(bare_u)), convert.state_dict(lora.fuse(bare_s))
  assert list(fused_s) == list(fused_u) and all(np.array_equal(fused_s[k], fused_u[k]) for k in fused_u)


def test_lora_refuses_part_of_a_stack(unet_dir, tmp_path):
  _, path = unet_dir
  one = "mid_block.attentions.0.transformer_blocks.1.attn1.to_q"
  with pytest.raises(ValueError, match="adapted whole"):
    lora.add_adapters(load_unet(path, scan=True), rank=2, alpha=2.0, targets=(one,), seed=0)
  unrolled = load_unet(path)
  lora.add_adapters(unrolled, rank=2, alpha=2.0, targets=(one,), seed=0)
  with pytest.raises(lora.LoRAFileError, match="adapted whole"):
    lora.load_into(load_unet(path, scan=True), lora.save(unrolled, tmp_path))


def test_sampling_with_a_scanned_unet(unet_dir, micro_sdxl_pipeline_dir):
  _, path = unet_dir
  pipe = load_pipeline(micro_sdxl_pipeline_dir, ("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                  "tokenizer_2", "scheduler"))
  prompts, noise = ["a red cat", "dog"], np.random.default_rng(0).standard_normal((2, 2, 2, 4)).astype(np.float32)
  sample = lambda unet: sampling.generate_images(pipe, prompts, steps=2, guidance=4.0, init_latents=noise, unet=unet)
  images, latents = sample(load_unet(path, scan=True, remat="full"))
  _, unrolled = sample(load_unet(path))
  assert images.shape == (2, 16, 16, 3) and np.isfinite(latents).all()
  assert rel_l2(latents, unrolled) <= 1e-6


def test_export_reads_a_scanned_runs_checkpoint_and_an_older_runs(unet_dir, micro_sdxl_pipeline_dir, tmp_path):
  """`python -m mapo_jax.export` rebuilds the denoiser the way the run recorded it (config.scan_blocks): a
  scanned run's checkpoint holds stacked parameters, a run recorded before the key existed ran unrolled."""
  import json
  import shutil

  from mapo_jax import config as config_lib
  from mapo_jax import export
  from mapo_jax.run import workdir as workdir_lib
  from mapo_jax.run.checkpoint import Checkpointer
  from mapo_jax.training import optim
  from mapo_jax.training.train_step import create_sharded_state
  _, path = unet_dir
  base = tmp_path / "base"
  shutil.copytree(micro_sdxl_pipeline_dir, base)
  shutil.rmtree(base / "unet")
  shutil.copytree(path, base / "unet")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  for scan in (True, False):
    workdir = tmp_path / f"run_scan_{scan}"
    model = load_unet(path, scan=scan)
    graphdef, state, *_ = create_sharded_state(model, optim.make_optimizer(optim.default_config()), mesh, seed=0)
    state = state.replace(params=jax.tree.map(lambda p: p + 0.01, state.params))  # a trained model's weights
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(3, state)
    checkpointer.wait()
    checkpointer.close()
    recorded = json.loads(config_lib.base_config().to_json())
    if scan:
      recorded["scan_blocks"] = True
    else:
      del recorded["scan_blocks"]  # a run recorded before the key existed: it ran unrolled
    workdir_lib.record_config(workdir, json.dumps(recorded), 0)
    exported, step = export.load_checkpoint_denoiser(workdir, base)
    assert step == 3
    trained = nnx.merge(graphdef, state.params, nnx.state(model, nnx.Not(nnx.Param)))
    assert convert.state_dict(exported).keys() == convert.state_dict(trained).keys()
    for key, value in convert.state_dict(trained).items():
      np.testing.assert_array_equal(convert.state_dict(exported)[key], value, err_msg=key)
