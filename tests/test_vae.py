"""The Flax VAE against diffusers' AutoencoderKL on tiny random checkpoints, plus loading rules."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from conftest import make_diffusers_vae, rel_l2
from mapo_jax.convert import CheckpointMismatchError
from mapo_jax.models import AutoencoderKL, load_vae, posterior_sample, save_vae

# Three levels (two downsamples), two resnets per block, channel changes (conv_shortcut), mid-block attention.
TINY = dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, latent_channels=4, norm_num_groups=4,
            sample_size=32)
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                in_channels=3, out_channels=3, act_fn="silu", sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_vae")
  model = make_diffusers_vae(TINY)
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def tiny_jitted(tiny_vae):
  """jitted (state, x) → encode / decode of the tiny architecture; compiled once per input shape."""
  graphdef = nnx.graphdef(load_vae(tiny_vae[1]))
  return (jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x)),
          jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z)))


def test_encode_decode_match_diffusers(tiny_vae, tiny_jitted):
  ref, path = tiny_vae
  encode, decode = tiny_jitted
  vae = load_vae(path)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)  # non-square
  z = np.random.default_rng(1).standard_normal((2, 4, 6, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = ref.encode(nchw(x)).latent_dist
    image = ref.decode(nchw(z)).sample
  mean, logvar = encode(nnx.state(vae), x)
  assert mean.shape == logvar.shape == (2, 4, 6, 4)
  assert rel_l2(mean, nhwc(posterior.mean)) <= 1e-5
  assert rel_l2(logvar, nhwc(posterior.logvar)) <= 1e-5
  decoded = decode(nnx.state(vae), z)
  assert decoded.shape == (2, 16, 24, 3)
  assert rel_l2(decoded, nhwc(image)) <= 1e-5
  assert vae.config["scaling_factor"] == 0.18215  # diffusers' default, filled in


def test_variant_without_attention_and_quant_convs_loads(tmp_path):
  config = {**TINY, "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}
  make_diffusers_vae(config).save_pretrained(tmp_path)
  vae = load_vae(tmp_path)  # every key and shape checked
  assert vae.quant_conv is None and vae.encoder.mid_block.attentions is None


def test_logvar_is_clamped_like_diffusers(tiny_vae, tiny_jitted, tmp_path):
  ref, _ = tiny_vae
  state = {k: v.clone() for k, v in ref.state_dict().items()}
  state["quant_conv.bias"][4:] += 100.0  # logvar channels far above the upper bound of 20
  ref_hot = make_diffusers_vae(TINY)
  ref_hot.load_state_dict(state)
  ref_hot.save_pretrained(tmp_path)
  x = np.random.default_rng(2).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    expected = nhwc(ref_hot.encode(nchw(x)).latent_dist.logvar)
  _, logvar = tiny_jitted[0](nnx.state(load_vae(tmp_path)), x)
  np.testing.assert_array_equal(expected, 20.0)
  np.testing.assert_array_equal(np.asarray(logvar), 20.0)


def test_posterior_sample_moments():
  mean = np.full((4, 64, 64, 4), 0.5, np.float32)
  logvar = np.full((4, 64, 64, 4), np.log(0.25), np.float32)  # std 0.5
  sample = jax.jit(posterior_sample)
  z = sample(jax.random.key(0), mean, logvar)
  assert z.dtype == jnp.float32
  assert abs(float(np.mean(z)) - 0.5) < 0.01 and abs(float(np.std(z)) - 0.5) < 0.01
  np.testing.assert_array_equal(z, sample(jax.random.key(0), mean, logvar))


def test_legacy_attention_names_load(tiny_vae, tmp_path):
  ref, path = tiny_vae
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in load_file(path / "diffusion_pytorch_model.safetensors").items():
    for new, old in names.items():
      key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
    legacy[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  shutil.copy(path / "config.json", tmp_path / "config.json")
  save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
  a, b = nnx.state(load_vae(path), nnx.Param), nnx.state(load_vae(tmp_path), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_mismatch_lists_every_bad_key(tiny_vae, tmp_path):
  _, path = tiny_vae
  weights = load_file(path / "diffusion_pytorch_model.safetensors")
  del weights["decoder.conv_out.bias"]
  weights["encoder.extra.weight"] = torch.zeros(3)
  weights["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
  shutil.copy(path / "config.json", tmp_path / "config.json")
  save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
  with pytest.raises(CheckpointMismatchError) as err:
    load_vae(tmp_path)
  message = str(err.value)
  for key in ("decoder.conv_out.bias", "encoder.extra.weight", "quant_conv.weight: checkpoint (8, 8, 3, 3)"):
    assert key in message


def test_save_vae_loads_in_diffusers(tiny_vae, tmp_path):
  from diffusers import AutoencoderKL as TorchAutoencoderKL
  ref, path = tiny_vae
  save_vae(load_vae(path), tmp_path)
  reloaded = TorchAutoencoderKL.from_pretrained(tmp_path)
  for key, value in ref.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_force_upcast_keeps_float16_vaes_in_float32(tiny_vae, tmp_path):
  _, path = tiny_vae
  assert load_vae(path, jnp.float16).encoder.conv_in.dtype == jnp.float32  # force_upcast defaults to true
  shutil.copy(path / "diffusion_pytorch_model.safetensors", tmp_path)
  config = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "force_upcast": False}))  # sdxl-vae-fp16-fix
  assert load_vae(tmp_path, jnp.float16).encoder.conv_in.dtype == jnp.float16


@pytest.mark.parametrize("change, key", [
    ({"act_fn": "relu"}, "act_fn"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "up_block_types"),
    ({"use_tiling": True}, "use_tiling"),
])
def test_unsupported_config_names_the_key(change, key):
  with pytest.raises(ValueError, match=key):
    AutoencoderKL({**TINY, **change}, rngs=nnx.Rngs(0))


def test_sdxl_vae_parameter_count():
  vae = nnx.eval_shape(lambda: AutoencoderKL(SDXL_VAE, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(vae, nnx.Param))) == 83_653_863
