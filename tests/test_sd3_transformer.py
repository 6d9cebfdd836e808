"""The Flax NNX SD3 / SD3.5 MMDiT against diffusers' PyTorch SD3Transformer2DModel, and its weight conversion.

Float32 forward passes and input gradients must agree to rel L2 <= 1e-4 (the project bar; they reach ~1e-6):
the same arithmetic in a different order leaves only float32 rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, rel_l2
from flax import nnx
from flow_fixtures import make_diffusers_sd3_transformer, sd3_transformer_inputs, sd3_transformer_torch

from mapo_jax import convert, sharding
from mapo_jax.models import sd3
from mapo_jax.models.presets import (SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, TINY_SD3_TRANSFORMER,
                                     TINY_SD35_TRANSFORMER)

CONFIGS = {"sd3": TINY_SD3_TRANSFORMER, "sd35": TINY_SD35_TRANSFORMER}
NON_SQUARE = dict(height=8, width=12)  # a 4 x 6 patch grid, cropped from the 12 x 12 table at (4, 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name → (config, diffusers model, its folder, our model loaded from that folder)."""
  out = {}
  for name, cfg in CONFIGS.items():
    path = tmp_path_factory.mktemp(f"sd3_{name}")
    torch_model = make_diffusers_sd3_transformer(cfg, path)
    out[name] = cfg, torch_model, path, sd3.load_sd3_transformer(path)
  return out


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, models):
  return models[request.param]


def test_forward_matches_diffusers(pair):
  cfg, torch_model, _, model = pair
  for seed, shape in ((0, dict(height=8, width=8)), (1, NON_SQUARE)):
    inputs = sd3_transformer_inputs(cfg, seed, **shape)
    ours = jit_call(model, **inputs)
    assert ours.shape == (2, shape["height"], shape["width"], cfg["out_channels"]) and ours.dtype == jnp.float32
    assert rel_l2(ours, sd3_transformer_torch(torch_model, inputs)) <= 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _grads(graphdef, state, inputs, weights):
  """Gradients of sum(output · weights) w.r.t. the latents, the text states and the pooled text."""
  names = ("hidden_states", "encoder_hidden_states", "pooled_projections")

  def scalar(*args):
    out = nnx.merge(graphdef, state)(*args, inputs["timestep"])
    return jnp.sum(out.astype(jnp.float32) * weights)

  return dict(zip(names, jax.grad(scalar, argnums=(0, 1, 2))(*(inputs[n] for n in names))))


@pytest.fixture(scope="module")
def input_grads(models):
  """name → (inputs, weights, our input gradients) on a non-square latent, each computed once."""
  cache = {}

  def get(name):
    if name not in cache:
      cfg, _, _, model = models[name]
      inputs = sd3_transformer_inputs(cfg, 2, **NON_SQUARE)
      weights = np.random.default_rng(3).standard_normal((2, 8, 12, cfg["out_channels"])).astype(np.float32)
      cache[name] = inputs, weights, _grads(*nnx.split(model), inputs, weights)
    return cache[name]

  return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_input_gradients_match_torch_autograd(models, input_grads, name):
  _, torch_model, _, _ = models[name]
  inputs, weights, ours = input_grads(name)
  args = {k: torch.tensor(v, requires_grad=k != "timestep") for k, v in inputs.items()}
  out = torch_model(**{**args, "hidden_states": args["hidden_states"].permute(0, 3, 1, 2)}).sample
  (out * torch.tensor(weights).permute(0, 3, 1, 2)).sum().backward()
  for key, grad in ours.items():
    assert rel_l2(grad, args[key].grad.numpy()) <= 1e-4, key


def test_remat_and_xla_attention_agree(models, input_grads):
  """Rematerialised blocks and XLA's attention give the einsum path's gradients (same math, another schedule)."""
  model = models["sd35"][3]
  inputs, weights, ref = input_grads("sd35")
  graphdef = nnx.graphdef(sd3.abstract_sd3_transformer(model.config, attention="xla", remat="full"))
  for key, grad in _grads(graphdef, nnx.state(model), inputs, weights).items():
    assert rel_l2(grad, ref[key]) <= 1e-5, key


@pytest.mark.parametrize("overrides", [dict(qk_norm="layer_norm", pos_embed_max_size=None),
                                       dict(qk_norm="fp32_layer_norm", out_channels=None)])
def test_other_config_options_match_diffusers(tmp_path, overrides):
  """qk_norm "layer_norm" (weight and bias) / "fp32_layer_norm" (none); without pos_embed_max_size the table is
  computed for the grid (not in the checkpoint); out_channels None means in_channels."""
  cfg = dict(TINY_SD35_TRANSFORMER, num_layers=2, dual_attention_layers=[0], **overrides)
  torch_model = make_diffusers_sd3_transformer(cfg, tmp_path)
  inputs = sd3_transformer_inputs(cfg, 6, **NON_SQUARE)
  assert rel_l2(jit_call(sd3.load_sd3_transformer(tmp_path), **inputs),
                sd3_transformer_torch(torch_model, inputs)) <= 1e-4


def test_export_round_trip(pair, tmp_path):
  cfg, torch_model, _, model = pair
  from diffusers import SD3Transformer2DModel
  sd3.save_sd3_transformer(model, tmp_path / "out")
  reloaded, info = SD3Transformer2DModel.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  ref, got = torch_model.state_dict(), reloaded.state_dict()
  assert set(got) == set(ref) and sd3.POS_EMBED_KEY in got
  for key in ref:
    assert torch.equal(got[key], ref[key]), key
  inputs = sd3_transformer_inputs(cfg, 7, **NON_SQUARE)
  np.testing.assert_array_equal(sd3_transformer_torch(reloaded.eval(), inputs),
                                sd3_transformer_torch(torch_model, inputs))
  again = sd3.load_sd3_transformer(tmp_path / "out")
  assert again.config == model.config
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pipeline_folder_sharded_and_fp16_variant(tmp_path):
  """A pipeline folder's transformer/ in several safetensors shards, and the fp16 variant (the position table
  read from whichever file holds it); fp16 export loads in diffusers bit-exactly."""
  from diffusers import SD3Transformer2DModel
  cfg = TINY_SD3_TRANSFORMER
  torch_model = make_diffusers_sd3_transformer(cfg)
  inputs = sd3_transformer_inputs(cfg, 8, **NON_SQUARE)
  ref = sd3_transformer_torch(torch_model, inputs)
  torch_model.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="40KB")
  assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
  torch_model.half().save_pretrained(tmp_path / "fp16", variant="fp16")  # in place: torch_model is fp16 now
  assert rel_l2(jit_call(sd3.load_sd3_transformer(tmp_path / "pipe"), **inputs), ref) <= 1e-4
  half = sd3.load_sd3_transformer(tmp_path / "fp16", variant="fp16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half)))
  # the weights themselves were rounded to fp16 (unit roundoff 2^-11 ≈ 5e-4)
  assert rel_l2(jit_call(half, **inputs), ref) <= 5e-3
  sd3.save_sd3_transformer(half, tmp_path / "fp16_out", dtype="fp16")
  exported = SD3Transformer2DModel.from_pretrained(tmp_path / "fp16_out", torch_dtype=torch.float16)
  ref_half = torch_model.state_dict()
  for key, value in exported.state_dict().items():
    assert torch.equal(value, ref_half[key]), key


def test_missing_or_misshaped_position_table_is_reported(pair, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, _, path, _ = pair
  weights = load_file(path / "diffusion_pytorch_model.safetensors")
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  table = weights.pop(sd3.POS_EMBED_KEY)
  save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
  with pytest.raises(convert.CheckpointMismatchError, match="missing keys:\n    pos_embed.pos_embed"):
    sd3.load_sd3_transformer(tmp_path)
  save_file({**weights, sd3.POS_EMBED_KEY: table[:, :-1]}, tmp_path / "diffusion_pytorch_model.safetensors")
  with pytest.raises(convert.CheckpointMismatchError, match="mis-shaped keys"):
    sd3.load_sd3_transformer(tmp_path)


def test_sharded_mesh_matches_one_device(tmp_path):
  """On a (data 1, fsdp 4, tensor 2) mesh of 8 CPU devices (three-axis meshes are refused:
  sharding.check_partitioning), loaded straight into shards and placed with
  sharding.place, one forward pass equals the single-device one up to float32 reassociation of sharded sums."""
  cfg = TINY_SD35_TRANSFORMER
  make_diffusers_sd3_transformer(cfg, tmp_path)
  mesh = sharding.make_mesh((1, 4, 2))
  inputs = sd3_transformer_inputs(cfg, 9, batch=4, **NON_SQUARE)
  ref = jit_call(sd3.load_sd3_transformer(tmp_path), **inputs)

  model = sd3.load_sd3_transformer(tmp_path, mesh=mesh)
  graphdef = nnx.split(model, nnx.Param, sd3.Buffer)[0]
  params, _ = sharding.place(model, mesh)
  buffers, _ = sharding.place(model, mesh, sd3.Buffer)
  q = params["transformer_blocks"][0]["attn"]["to_q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert buffers["pos_embed"]["pos_embed"].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  batch = jax.device_put(inputs, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, b, x: nnx.merge(graphdef, p, b)(**x))(params, buffers, batch)
  assert rel_l2(out, ref) <= 1e-5


def test_bfloat16_compute_close_to_float32(models):
  """bf16 rounds every stored activation with relative error <= u = 2^-9; a block rounds each path about 10 times,
  and independent roundings add in quadrature over the blocks: rel L2 ~ u · sqrt(10 · layers), allowed twice that
  for the layers' gains (the SD3.5 layout: dual attention and qk norm)."""
  cfg, _, _, model = models["sd35"]
  inputs = sd3_transformer_inputs(cfg, 10, **NON_SQUARE)
  ref = jit_call(model, **inputs)
  bf16 = nnx.merge(nnx.graphdef(sd3.abstract_sd3_transformer(model.config, dtype=jnp.bfloat16)), nnx.state(model))
  out = jit_call(bf16, **inputs)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
  assert rel_l2(out.astype(jnp.float32), ref) <= 2 * 2 ** -9 * np.sqrt(10 * cfg["num_layers"])


@pytest.mark.parametrize("key,value", [("qk_norm", "l2"), ("qk_norm", "rms_norm_across_heads"),
                                       ("caption_projection_dim", 24), ("pos_embed_max_size", 0),
                                       ("dual_attention_layers", "0"), ("no_such_option", 1)])
def test_unsupported_options_name_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    sd3.SD3Config.from_dict({**TINY_SD3_TRANSFORMER, key: value})


@pytest.mark.parametrize("config", [SD35_MEDIUM_TRANSFORMER, SD35_LARGE_TRANSFORMER], ids=["medium", "large"])
def test_full_size_presets_match_diffusers(config):
  """Every checkpoint key and shape of the released architectures (diffusers built on the meta device), and the
  position table's 1-D sin-cos factors at full size."""
  from diffusers import SD3Transformer2DModel
  from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid
  with torch.device("meta"):
    ref = SD3Transformer2DModel(**config)
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  model = sd3.abstract_sd3_transformer(config)
  assert _torch_shapes(model) == ref_shapes
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == sum(
      p.numel() for p in ref.parameters())
  m, base, half = config["pos_embed_max_size"], config["sample_size"] // config["patch_size"], (
      config["num_attention_heads"] * config["attention_head_dim"] // 2)
  positions = torch.arange(m, dtype=torch.float32) / (m / base)
  np.testing.assert_array_equal(sd3._sincos_1d(half, sd3._grid_positions(m, base)),
                                get_1d_sincos_pos_embed_from_grid(half, positions).float().numpy())


def _torch_shapes(model):
  """PyTorch key → shape of every parameter (convert's naming and layout) and of the position table."""
  shapes = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      shape = var.shape
      shapes[convert.torch_key(path)] = tuple(reversed(shape)) if len(shape) == 2 and path[-1] == "kernel" else (
          (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape))
  shapes[sd3.POS_EMBED_KEY] = tuple(model.pos_embed.pos_embed.shape)
  return shapes
