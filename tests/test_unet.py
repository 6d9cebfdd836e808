"""The Flax NNX UNet against diffusers' PyTorch UNet2DConditionModel, and its weight conversion."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_SD2_UNET, TINY_SD15_UNET, TINY_SDXL_UNET, jit_call, make_diffusers_unet, rel_l2
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from mapo_jax.convert import CheckpointMismatchError
from mapo_jax.models import load_unet, save_unet
from mapo_jax.models.presets import SD15_UNET, SDXL_BASE_UNET
from mapo_jax.models.layers import Options
from mapo_jax.models.unet import UNet2DConditionModel

CONFIGS = {"sdxl": TINY_SDXL_UNET, "sd15": TINY_SD15_UNET, "sd2": TINY_SD2_UNET}


def random_inputs(cfg, seed, batch=2, size=16, tokens=7):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, cfg["in_channels"])).astype(np.float32)
  t = rng.integers(0, 1000, batch)
  ctx = rng.standard_normal((batch, tokens, cfg["cross_attention_dim"])).astype(np.float32)
  extra = {}
  if cfg.get("addition_embed_type") == "text_time":
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    extra["text_embeds"] = rng.standard_normal((batch, pooled)).astype(np.float32)
    extra["time_ids"] = np.stack([rng.choice([512, 768, 1024, 1216], 6) for _ in range(batch)]).astype(np.float32)
    extra["time_ids"][:, 2:4] = rng.integers(0, 64, (batch, 2))  # crop coordinates
  return x, t, ctx, extra


def torch_forward(model, x, t, ctx, extra):
  added = {k: torch.tensor(v) for k, v in extra.items()} or None
  with torch.no_grad():
    out = model(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx),
                added_cond_kwargs=added).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(f"unet_{request.param}")
  return request.param, make_diffusers_unet(CONFIGS[request.param], path), path


def test_parity_with_diffusers(pair):
  name, torch_model, path = pair
  cfg = CONFIGS[name]
  unet = load_unet(path)
  draws = [(0, 7), (1, 7), (2, 7)] + ([(3, 77)] if name == "sdxl" else [])  # any token count
  for seed, tokens in draws:
    x, t, ctx, extra = random_inputs(cfg, seed, tokens=tokens)
    ours = jit_call(unet, x, t, ctx, **extra)
    assert ours.shape == x.shape
    assert rel_l2(ours, torch_forward(torch_model, x, t, ctx, extra)) <= 1e-5


def test_float_timesteps_and_odd_sizes(tiny_sdxl_unet_dir):
  torch_model = TorchUNet.from_pretrained(tiny_sdxl_unet_dir)
  x, _, ctx, extra = random_inputs(TINY_SDXL_UNET, 3, size=12)  # 12 → 6 → 3: upsampling to odd sizes
  t = np.array([0.5, 999.0], np.float32)
  ours = jit_call(load_unet(tiny_sdxl_unet_dir), x, t, ctx, **extra)
  assert rel_l2(ours, torch_forward(torch_model, x, t, ctx, extra)) <= 1e-5


def test_bfloat16_compute_close_to_float32(tiny_sdxl_unet_dir):
  x, t, ctx, extra = random_inputs(TINY_SDXL_UNET, 4)
  ref = jit_call(load_unet(tiny_sdxl_unet_dir), x, t, ctx, **extra)
  out = jit_call(load_unet(tiny_sdxl_unet_dir, dtype=jnp.bfloat16), x, t, ctx, **extra)
  assert out.dtype == jnp.bfloat16
  assert rel_l2(out.astype(jnp.float32), ref) <= 2e-2


def test_attention_implementations_and_remat_agree(tmp_path):
  cfg = dict(TINY_SD15_UNET, layers_per_block=1)  # the fewest ops: gradients compile fastest
  make_diffusers_unet(cfg, tmp_path)
  x, t, ctx, extra = random_inputs(cfg, 5)

  def loss_and_grad(**options):
    graphdef, params = nnx.split(load_unet(tmp_path, **options))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, ctx, **extra) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grad = loss_and_grad(attention="einsum")
  variants = [dict(attention="xla"), dict(remat="full")]
  for options in variants:
    loss, grad = loss_and_grad(**options)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), options
    flat, ref_flat = jax.tree.leaves(grad), jax.tree.leaves(ref_grad)
    assert max(rel_l2(a, b) for a, b in zip(flat, ref_flat) if np.any(b)) <= 1e-4, options


def test_export_round_trip(pair, tmp_path):
  name, torch_model, path = pair
  unet = load_unet(path)
  save_unet(unet, tmp_path / "out")
  reloaded = TorchUNet.from_pretrained(tmp_path / "out")  # raises on missing/unexpected keys
  ref = torch_model.state_dict()
  got = reloaded.state_dict()
  assert set(got) == set(ref)
  for key in ref:
    assert torch.equal(got[key], ref[key]), key
  # load → save → load is bit-exact
  again = load_unet(tmp_path / "out")
  for a, b in zip(jax.tree.leaves(nnx.state(unet)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert again.config == unet.config


def test_pipeline_folder_sharded_and_fp16_variants(tiny_sdxl_unet_dir, tmp_path):
  torch_model = TorchUNet.from_pretrained(tiny_sdxl_unet_dir)
  torch_model.save_pretrained(tmp_path / "pipe" / "unet", max_shard_size="300KB")
  assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
  torch_model.half().save_pretrained(tmp_path / "fp16", variant="fp16")
  x, t, ctx, extra = random_inputs(TINY_SDXL_UNET, 6)
  ref = jit_call(load_unet(tiny_sdxl_unet_dir), x, t, ctx, **extra)
  sharded = load_unet(tmp_path / "pipe")  # a pipeline folder: finds unet/
  np.testing.assert_array_equal(jit_call(sharded, x, t, ctx, **extra), ref)
  half = load_unet(tmp_path / "fp16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
  assert rel_l2(jit_call(half, x, t, ctx, **extra), ref) <= 5e-3  # the weights themselves were rounded to fp16
  # export in fp16 again loads in diffusers
  save_unet(half, tmp_path / "fp16_out", dtype="fp16")
  exported = TorchUNet.from_pretrained(tmp_path / "fp16_out", torch_dtype=torch.float16)
  for key, value in exported.state_dict().items():
    assert torch.equal(value, torch_model.state_dict()[key]), key


def test_bad_checkpoints_list_every_problem(tiny_sdxl_unet_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = tmp_path / "bad"
  folder.mkdir()
  (folder / "config.json").write_text((tiny_sdxl_unet_dir / "config.json").read_text())
  weights = load_file(tiny_sdxl_unet_dir / "diffusion_pytorch_model.safetensors")
  del weights["conv_in.bias"]
  weights["mid_block.extra.weight"] = np.zeros(3, np.float32)
  weights["conv_out.weight"] = weights["conv_out.weight"][:, :-1]
  save_file(weights, folder / "diffusion_pytorch_model.safetensors")
  with pytest.raises(CheckpointMismatchError) as err:
    load_unet(folder)
  msg = str(err.value)
  assert "conv_in.bias" in msg and "mid_block.extra.weight" in msg and "conv_out.weight" in msg
  assert "1 missing keys" in msg and "1 unexpected keys" in msg and "1 mis-shaped keys" in msg


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("addition_embed_type", "text"),
                                       ("resnet_time_scale_shift", "scale_shift"), ("no_such_option", 1),
                                       ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3)])
def test_unsupported_options_name_the_key(tiny_sdxl_unet_dir, tmp_path, key, value):
  config = json.loads((tiny_sdxl_unet_dir / "config.json").read_text())
  config[key] = value
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=key):
    load_unet(tmp_path)


@pytest.mark.parametrize("config,count", [(SDXL_BASE_UNET, 2_567_463_684), (SD15_UNET, 859_520_964)])
def test_full_size_parameter_counts(config, count):
  model = nnx.eval_shape(lambda: UNet2DConditionModel(config, options=Options(), rngs=nnx.Rngs(0)))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == count
