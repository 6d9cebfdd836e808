"""The FLUX.1 family (mapo_jax/pipelines/flux.py) against diffusers' FluxPipeline, on tiny random folders that
diffusers itself writes (`FluxPipeline(...).save_pretrained`): a guidance-distilled (dev-like) and a schnell-like
one. Sampling (guidance embedding, schnell at 256 T5 tokens, true CFG with negative prompts), decoding, prompt
encoding and packing equal diffusers'; `python -m mapo_jax.generate`, export and encode run on the folders;
8-device sampling equals 1-device sampling; aot resolves the presets to this family.

Every sampling run uses the same shapes (8 prompts, 32 x 48 px -> 4 x 6 x 16 latents, 3 steps), so each mode
compiles once and the 8 prompts shard over conftest's 8 host devices.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh
from PIL import Image
from safetensors.numpy import load_file

from conftest import rel_l2
from flow_fixtures import make_tiny_flux_pipeline
from mapo_jax import aot, encode, export, generate, sampling, sharding
from mapo_jax.data import cache
from mapo_jax.pipelines import family, flux, load_pipeline
from test_data_helpers import image_bytes, read_cache

PROMPTS = ["a cat", "the red dog!", "a photo of the blue sky", "a dog on the red cat", "cat", "dog, dog", "the cat.",
           "red"]
NEGATIVES = ["blurry", "a dog", "ugly cat", "red", "the", "dog", "cat", "a photo"]
HEIGHT, WIDTH, STEPS = 32, 48, 3  # not square; a multiple of 16 both ways
# float32 through two text towers and three transformer steps. Measured 7e-6 (dev), 2e-6 (schnell), 5e-6 (true
# CFG): the project's forward-pass bar holds for the whole loop.
LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """name -> (folder, the diffusers FluxPipeline saved there)."""
  out = {}
  for name, guidance in (("dev", True), ("schnell", False)):
    path = tmp_path_factory.mktemp(f"flux_{name}")
    out[name] = path, make_tiny_flux_pipeline(path, guidance_embeds=guidance, seed=3 if guidance else 7)
  return out


@pytest.fixture(scope="module")
def pipes(folders):
  """name -> our loaded pipeline; schnell encodes at 256 T5 tokens, as BFL's reference does."""
  return {"dev": load_pipeline(folders["dev"][0]),
          "schnell": load_pipeline(folders["schnell"][0], max_sequence_length=256)}


def noise(seed=0):
  return np.random.default_rng(seed).standard_normal((len(PROMPTS), HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32)


def diffusers_sample(ref, init, output_type="latent", **kwargs):
  """FluxPipeline.__call__ from our NHWC unit-variance noise (packed, as its prepare_latents expects); latents come
  back unpacked NHWC, images as a uint8 array."""
  from diffusers import FluxPipeline
  b, h, w, c = init.shape
  packed = FluxPipeline._pack_latents(torch.from_numpy(init.transpose(0, 3, 1, 2).copy()), b, c, h, w)
  with torch.no_grad():
    out = ref(prompt=PROMPTS, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, latents=packed,
              output_type=output_type, **kwargs).images
  if output_type == "pil":
    return np.stack([np.asarray(im) for im in out])
  return FluxPipeline._unpack_latents(out, HEIGHT, WIDTH, ref.vae_scale_factor).numpy().transpose(0, 2, 3, 1)


CASES = {  # name: (folder, our generate_images arguments, FluxPipeline.__call__ arguments)
    "dev-guidance": ("dev", dict(guidance=4.0), dict(guidance_scale=4.0)),
    "schnell": ("schnell", dict(guidance=0.0), dict(guidance_scale=0.0, max_sequence_length=256)),
    "dev-true-cfg": ("dev", dict(guidance=2.5, negative_prompts=NEGATIVES, true_cfg=3.0),
                     dict(guidance_scale=2.5, negative_prompt=NEGATIVES, true_cfg_scale=3.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_matches_diffusers(folders, pipes, case):
  name, ours, theirs = CASES[case]
  init = noise()
  images, latents = sampling.generate_images(pipes[name], PROMPTS, steps=STEPS, height=HEIGHT, width=WIDTH,
                                             init_latents=init, **ours)
  expected = diffusers_sample(folders[name][1], init, **theirs)
  assert latents.shape == init.shape and latents.dtype == np.float32
  assert rel_l2(latents, expected) <= LATENT_TOL
  assert rel_l2(latents, init) > 0.1  # the transformer did move the latents
  if case == "dev-guidance":  # decoding (shift and scale, the VAE, postprocessing): diffusers' PIL images
    expected_images = diffusers_sample(folders[name][1], init, "pil", **theirs)
    assert images.shape == (len(PROMPTS), HEIGHT, WIDTH, 3) and images.dtype == np.uint8
    diff = np.abs(images.astype(int) - expected_images)
    assert diff.max() <= 1 and diff.mean() < 0.01  # only float rounding at .5 boundaries may differ


def test_packing_ids_and_prompts_match_diffusers(folders, pipes):
  """2x2 packing both ways and the image ids as FluxPipeline's static methods; prompt encoding as its
  encode_prompt (T5 last hidden state at max_sequence_length, CLIP pooled output)."""
  from diffusers import FluxPipeline
  x = noise(1)[:2]
  theirs = FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 2, 16, 4, 6)
  np.testing.assert_array_equal(np.asarray(flux.pack(jnp.asarray(x))), theirs.numpy())
  np.testing.assert_array_equal(np.asarray(flux.unpack(flux.pack(jnp.asarray(x)), 4, 6)), x)
  ids = FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32).numpy()
  np.testing.assert_array_equal(flux.latent_image_ids(2, 3), ids)
  for name, length in (("dev", 512), ("schnell", 256)):
    ref, pipe = folders[name][1], pipes[name]
    with torch.no_grad():
      embeds, pooled, text_ids = ref.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=length)
    ours = pipe.encode_prompts(PROMPTS)
    assert ours["prompt_embeds"].shape == (len(PROMPTS), length, 32) and not text_ids.any()
    assert rel_l2(ours["prompt_embeds"], embeds.numpy()) <= 1e-5
    assert rel_l2(ours["pooled_prompt_embeds"], pooled.numpy()) <= 1e-5


def test_generate_cli_round_trip(folders, tmp_path):
  """python -m mapo_jax.generate (its main, in this process) with --init-latents / --output-latents: 16-channel
  NHWC latents in and out, the same as sampling.generate_images, images at the latents' size; prompts at
  --max-sequence-length T5 tokens, as the pipeline loaded with that max_sequence_length encodes them."""
  path = folders["dev"][0]
  init = noise(2)
  np.save(tmp_path / "noise.npy", init)
  (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  args = generate.parse_flags(["generate", "--model", str(path), "--prompts", str(tmp_path / "prompts.txt"),
                               "--out", str(tmp_path / "out"), "--steps", str(STEPS), "--guidance", "4",
                               "--init-latents", str(tmp_path / "noise.npy"),
                               "--output-latents", str(tmp_path / "latents.npy"), "--max-sequence-length", "16"])
  generate.main(args)
  latents = np.load(tmp_path / "latents.npy")
  _, want = sampling.generate_images(load_pipeline(path, max_sequence_length=16), PROMPTS, steps=STEPS, guidance=4.0,
                                     init_latents=init)
  assert latents.shape == (len(PROMPTS), HEIGHT // 8, WIDTH // 8, 16)
  np.testing.assert_allclose(latents, want, rtol=1e-6, atol=1e-6)
  assert Image.open(tmp_path / "out" / "0007.png").size == (WIDTH, HEIGHT)
  metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
  assert metadata["images"][3]["prompt"] == PROMPTS[3] and metadata["max_sequence_length"] == 16


def test_export_round_trip(folders, tmp_path):
  """load -> export_denoiser writes the transformer's tensors byte for byte; diffusers loads the exported pipeline
  with no missing or unexpected keys and samples exactly as from the original folder."""
  from diffusers import FluxPipeline, FluxTransformer2DModel
  base, ref = folders["dev"]
  out = export.export_denoiser(flux.load_denoiser(base), base, tmp_path / "export")
  theirs, ours = (load_file(p / "transformer" / "diffusion_pytorch_model.safetensors") for p in (base, out))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype and ours[key].tobytes() == value.tobytes(), key
  _, info = FluxTransformer2DModel.from_pretrained(out / "transformer", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  exported = FluxPipeline.from_pretrained(out)
  exported.set_progress_bar_config(disable=True)
  init = noise(3)
  np.testing.assert_array_equal(diffusers_sample(exported, init, guidance_scale=4.0),
                                diffusers_sample(ref, init, guidance_scale=4.0))
  assert family(out) is flux


def test_encode_cli_writes_flux_cache(folders, pipes, tmp_path):
  """python -m mapo_jax.encode (its main) on a JSONL of pairs: 32-channel moments (mean and logvar of 16 latent
  channels), the T5 and CLIP embeddings of `encode_prompts`, rpo_emb the pooled one."""
  path = folders["dev"][0]
  rng = np.random.default_rng(0)
  lines = []
  for i, caption in enumerate(PROMPTS[:3]):
    for side in ("w", "l"):
      (tmp_path / f"{side}{i}.png").write_bytes(image_bytes(rng.integers(0, 256, (40, 36, 3))))
    lines.append(json.dumps({"prompt": caption, "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(SystemExit):  # 40 px: a multiple of 8, not of 16
    encode.parse_flags(["encode", "--pipeline", str(path), "--data", str(tmp_path / "pairs.jsonl"), "--out",
                        str(tmp_path / "bad"), "--resolution", "40"])
  encode.main(encode.parse_flags(["encode", "--pipeline", str(path), "--data", str(tmp_path / "pairs.jsonl"),
                                  "--out", str(tmp_path / "cache"), "--resolution", "32", "--cache_dtype", "float32",
      "--text", "embeddings"]))  # per-pair embeddings; token ids (the default): test_text_conditioning.py
  manifest, records = read_cache(tmp_path / "cache")
  assert manifest["pairs"] == 3
  assert {k: v["shape"] for k, v in manifest["record"].items()} == {
      "moments_w": [4, 4, 32], "moments_l": [4, 4, 32], "prompt_embeds": [512, 32], "pooled_prompt_embeds": [16],
      "time_ids": [6], "rpo_emb": [16]}
  got = {k: np.stack([r[k] for r in records]) for k in cache.BATCH_KEYS}
  order = np.argsort([PROMPTS.index(c) for c in _captions(records, got, pipes["dev"])])
  want = pipes["dev"].encode_prompts(PROMPTS[:3])
  for key in ("prompt_embeds", "pooled_prompt_embeds"):
    assert rel_l2(got[key][order], want[key]) <= 1e-5, key
  np.testing.assert_array_equal(got["rpo_emb"], got["pooled_prompt_embeds"])
  assert np.abs(got["moments_w"] - got["moments_l"]).max() > 0


def _captions(records, got, pipe):
  """The caption of each cached row, found by its pooled embedding (the cache stores no text)."""
  pooled = np.asarray(pipe.encode_prompts(PROMPTS)["pooled_prompt_embeds"])
  return [PROMPTS[int(np.argmin(np.abs(pooled - row).sum(-1)))] for row in got["pooled_prompt_embeds"]]


def test_sharded_sampling_equals_one_device(folders, pipes):
  """8 prompts on 8 devices (one per device) give the 1-device latents; load_denoiser(mesh=) places the weights
  straight into shards with the same values."""
  pipe = pipes["dev"]
  cond, uncond, cfg = pipe.conditioning(PROMPTS, height=HEIGHT, width=WIDTH, guidance=4.0)
  assert uncond is None and cfg == 1.0
  run = lambda mesh: sampling.generate_latents(pipe.denoise, pipe.transformer, pipe.scheduler_config, cond, None,
                                               noise(), steps=STEPS, guidance=cfg, mesh=mesh,
                                               options=pipe.sample_options(STEPS))
  sharded = run(None)
  assert len(sharded.sharding.device_set) == 8 and sharded.addressable_shards[0].data.shape[0] == 1
  one = run(Mesh(np.array(jax.devices()[:1]), ("batch",)))
  # Two XLA programs (batch 1 per device vs 8 on one) may sum in other orders: float32 rounding only.
  assert rel_l2(sharded, one) <= 1e-5
  mesh = sharding.make_mesh((1, -1, 1))
  placed = flux.load_denoiser(folders["dev"][0], mesh=mesh)
  kernel = placed.transformer_blocks[0].ff.net[0].proj.kernel
  assert len(kernel.get_value().sharding.device_set) == 8
  np.testing.assert_array_equal(jax.device_get(nnx.state(placed, nnx.Param)),
                                jax.device_get(nnx.state(pipe.transformer, nnx.Param)))


def test_conditioning_and_what_diffusers_would_ignore(pipes):
  """Guidance goes in through cond["guidance"] (default 3.5) for dev, true CFG adds the negatives at weight
  true_cfg; every combination FluxPipeline ignores or cannot do fails naming the flag. `denoise` ignores the
  caches' time ids."""
  dev, schnell = pipes["dev"], pipes["schnell"]
  size = dict(height=HEIGHT, width=WIDTH)
  cond, uncond, cfg = dev.conditioning(PROMPTS, **size)
  np.testing.assert_array_equal(cond["guidance"], np.full(8, 3.5, np.float32))
  cond, uncond, cfg = dev.conditioning(PROMPTS, NEGATIVES, guidance=2.0, true_cfg=3.0, **size)
  assert cfg == 3.0 and float(uncond["guidance"][0]) == 2.0 and uncond["prompt_embeds"].shape == (8, 512, 32)
  cond_s, uncond_s, cfg_s = schnell.conditioning(PROMPTS, guidance=0.0, **size)
  assert "guidance" not in cond_s and uncond_s is None and cfg_s == 1.0
  with pytest.raises(ValueError, match="--negative-prompt"):
    dev.conditioning(PROMPTS, NEGATIVES, guidance=3.5, **size)
  with pytest.raises(ValueError, match="--true-cfg"):
    dev.conditioning(PROMPTS, guidance=3.5, true_cfg=2.0, **size)
  with pytest.raises(ValueError, match="--guidance"):
    schnell.conditioning(PROMPTS, guidance=5.0, **size)
  with pytest.raises(ValueError, match="--height/--width"):
    dev.conditioning(PROMPTS, guidance=3.5, height=40, width=WIDTH)
  with pytest.raises(ValueError, match="ddim"):
    sampling.generate_images(dev, PROMPTS, steps=STEPS, guidance=3.5, init_latents=noise(), sampler="ddim")
  x, t = jnp.asarray(noise()[:2]), jnp.array([900.0, 250.0])
  two = {k: v[:2] for k, v in cond.items()}

  @nnx.jit  # both calls in one program: one compile
  def with_and_without_time_ids(model):
    return (flux.denoise(model, x, t, two), flux.denoise(model, x, t, {**two, "time_ids": jnp.ones((2, 6))}))

  out, with_ids = with_and_without_time_ids(dev.transformer)
  np.testing.assert_array_equal(out, with_ids)
  assert out.shape == x.shape


def test_config_checks_and_aot_presets(folders):
  """What FluxPipeline cannot run fails naming the key; aot resolves the FLUX presets and folders to this family,
  with FLUX.1's latent normalisation and batch shapes (no compile)."""
  from mapo_jax.config import base_config
  from mapo_jax.models.presets import FLUX1_DEV_TRANSFORMER, TINY_FLUX_PIPELINE_TRANSFORMER
  with pytest.raises(ValueError, match="patch_size"):
    flux.check_denoiser_config(dict(TINY_FLUX_PIPELINE_TRANSFORMER, patch_size=2))
  with pytest.raises(ValueError, match="out_channels"):
    flux.check_denoiser_config(dict(TINY_FLUX_PIPELINE_TRANSFORMER, out_channels=16))
  with pytest.raises(ValueError, match="max_sequence_length"):
    load_pipeline(folders["dev"][0], components=(), max_sequence_length=513)
  assert flux.resolution_multiple(folders["dev"][0]) == 16
  mesh = sharding.make_mesh((1, -1, 1))
  for name, config, tokens, width, pooled in (("tiny_flux", TINY_FLUX_PIPELINE_TRANSFORMER, 512, 32, 16),
                                              ("flux1_dev", FLUX1_DEV_TRANSFORMER, 512, 4096, 768)):
    model = aot.resolve_model(name, base_config(), None)
    assert model.family is flux and model.denoiser_config == config and model.schedule.use_dynamic_shifting
    assert (model.latents.scale, model.latents.shift) == (0.3611, 0.1159)
    batch = flux.abstract_batch(model.denoiser_config, 256, 8, mesh, "mean_tokens")
    assert batch["moments_w"].shape == (8, 32, 32, 32) and batch["prompt_embeds"].shape == (8, tokens, width)
    assert batch["pooled_prompt_embeds"].shape == (8, pooled) and batch["rpo_emb"].shape == (8, width)
    assert batch["time_ids"].shape == (8, 6)
  model = aot.resolve_model(str(folders["schnell"][0]), base_config(), None)
  assert model.family is flux and not model.schedule.use_dynamic_shifting and model.vae_downsample == 8
