"""The SD3 / SD3.5 family (mapo_jax/pipelines/sd3.py) against diffusers' StableDiffusion3Pipeline, on tiny random
pipeline folders written by diffusers' own save_pretrained: prompt encoding, sampling (final latents and PIL
images), `python -m mapo_jax.generate`, export, `python -m mapo_jax.encode`, sharding and aot's preset lookup.

Every sampling call has the same shapes (8 prompts, 32 x 48 px → 4 x 6 latents of 16 channels, 3 steps), so each
transformer and guidance mode compiles once; 8 prompts shard over conftest's 8 host devices. Tolerances: float32
end to end, so our numbers differ from torch's by rounding only (encodings ~1e-6, final latents ~1e-5 rel L2 after
3 guided steps; the project bar for a sampling run is 1e-3).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import XLA_CACHE, rel_l2
from flow_fixtures import save_sd3_pipeline, sd3_pipeline_transformer

from mapo_jax import aot, encode, pipelines, sampling
from mapo_jax.models.presets import TINY_SD3_TRANSFORMER, TINY_SD35_TRANSFORMER
from mapo_jax.pipelines import family, load_pipeline, sd3

PROMPTS = ["a cat", "the red dog!", "", "a dog on the red cat", "cat", "dog, dog", "the cat.", "red"]
NEGATIVES = ["blurry", "", "a dog", "ugly cat", "red", "the", "dog", "cat"]
HEIGHT, WIDTH, STEPS = 32, 48, 3  # not square, smaller than the folders' 64 px default
DYNAMIC = dict(sd3.SCHEDULER_CONFIG, use_dynamic_shifting=True)  # mu from the latents' patch count
SUBPROCESS_ENV = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": XLA_CACHE,
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """name → (folder, diffusers pipeline): SD3-like (three towers), SD3.5-medium-like (dual attention, qk norm),
  and an SD3 folder without text_encoder_3 whose scheduler shifts dynamically."""
  root = tmp_path_factory.mktemp("sd3_pipelines")
  specs = {"sd3": (TINY_SD3_TRANSFORMER, True, None), "sd35": (TINY_SD35_TRANSFORMER, True, None),
           "no_t5": (TINY_SD3_TRANSFORMER, False, DYNAMIC)}
  out = {}
  for i, (name, (config, t5, scheduler)) in enumerate(specs.items()):
    save_sd3_pipeline(root / name, sd3_pipeline_transformer(config), t5=t5, scheduler_config=scheduler, seed=10 * i)
    out[name] = root / name, reference(root / name)
  return out


def reference(folder):
  """The diffusers pipeline as a user loads it: from_pretrained on the folder (a folder saved without T5 loads
  with text_encoder_3=None, tokenizer_3=None passed, as diffusers' SD3 docs drop T5)."""
  from diffusers import StableDiffusion3Pipeline
  index = json.loads((folder / "model_index.json").read_text())
  absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if index[name][0] is None}
  pipe = StableDiffusion3Pipeline.from_pretrained(folder, **absent)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def pipes(folders):
  return {name: load_pipeline(folder) for name, (folder, _) in folders.items()}


def noise(seed=0):
  return np.random.default_rng(seed).standard_normal((len(PROMPTS), HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32)


def diffusers_run(ref, guidance, negatives, latents, output_type="latent"):
  """The reference call from the same unit-variance latents (NCHW; the pipeline does not scale them)."""
  with torch.no_grad():
    out = ref(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=guidance,
              height=HEIGHT, width=WIDTH, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
              output_type=output_type).images
  return out.numpy().transpose(0, 2, 3, 1) if output_type == "latent" else np.stack([np.asarray(i) for i in out])


def test_family_and_components(folders, pipes):
  folder, _ = folders["sd3"]
  assert family(folder) is sd3
  pipe = pipes["sd3"]
  assert pipe.denoiser is pipe.transformer and pipe.latent_channels == 16 and pipe.vae_scale_factor == 8
  assert pipe.latents == sd3.Latents(scale=1.5305, shift=0.0609)
  assert pipe.schedule.is_flow and pipe.schedule.shift == 3.0 and pipe.sample_options(STEPS) == ()
  assert pipes["no_t5"].text_encoder_3 is None and pipes["no_t5"].tokenizer_3 is None
  assert pipes["no_t5"].sample_options(STEPS) == (("patch_size", 2),)
  assert sd3.resolution_multiple(folder) == 16  # VAE 8 x patch 2
  with pytest.raises(ValueError, match="true_cfg"):
    pipe.conditioning(PROMPTS, None, height=HEIGHT, width=WIDTH, guidance=5.0, true_cfg=2.0)


@pytest.mark.parametrize("name", ["sd3", "no_t5"])
def test_prompt_encoding_matches_diffusers(folders, pipes, name):
  """encode_prompt's four outputs: CLIP-L/G penultimate states padded to T5's width then T5's states (zeros
  without T5), pooled [CLIP-L, CLIP-G] projections; negatives "" when none are given."""
  _, ref = folders[name]
  pipe = pipes[name]
  for negatives in (NEGATIVES, None):
    with torch.no_grad():
      embeds, neg_embeds, pooled, neg_pooled = ref.encode_prompt(PROMPTS, None, None, negative_prompt=negatives,
                                                                 do_classifier_free_guidance=True)
    cond, uncond, cfg = pipe.conditioning(PROMPTS, negatives, height=HEIGHT, width=WIDTH, guidance=4.0)
    assert cfg == 4.0 and cond["prompt_embeds"].shape == (8, 77 + 256, 32)
    assert cond["pooled_prompt_embeds"].shape == (8, 20)
    for got, want in ((cond["prompt_embeds"], embeds), (cond["pooled_prompt_embeds"], pooled),
                      (uncond["prompt_embeds"], neg_embeds), (uncond["pooled_prompt_embeds"], neg_pooled)):
      assert rel_l2(got, want.numpy()) <= 1e-5
  assert not np.asarray(cond["prompt_embeds"])[:, :77, 24:].any()  # the zero padding of the 24 CLIP channels
  assert np.asarray(cond["prompt_embeds"])[:, 77:].any() == (name == "sd3")
  _, uncond, _ = pipe.conditioning(PROMPTS, None, height=HEIGHT, width=WIDTH, guidance=1.0)
  assert uncond is None


CASES = {"cfg-negative": ("sd3", 5.0, NEGATIVES), "cfg-empty-negative": ("sd3", 5.0, None),
         "no-guidance": ("sd3", 1.0, None), "sd35-dual-attention": ("sd35", 4.5, NEGATIVES),
         "no-t5-dynamic-shift": ("no_t5", 5.0, None)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_matches_diffusers(folders, pipes, case):
  name, guidance, negatives = CASES[case]
  _, ref = folders[name]
  init = noise()
  images, latents = sampling.generate_images(pipes[name], PROMPTS, negative_prompts=negatives, steps=STEPS,
                                             guidance=guidance, height=HEIGHT, width=WIDTH, init_latents=init)
  expected = diffusers_run(ref, guidance, negatives, init)
  assert latents.shape == init.shape and latents.dtype == np.float32
  assert rel_l2(latents, expected) <= 1e-4
  assert rel_l2(latents, init) > 0.1  # the model did move the latents
  if case == "cfg-negative":  # decoding too: the PIL images diffusers returns
    pil = diffusers_run(ref, guidance, negatives, init, "pil")
    assert images.shape == (len(PROMPTS), HEIGHT, WIDTH, 3) and images.dtype == np.uint8
    diff = np.abs(images.astype(int) - pil)
    assert diff.max() <= 1 and diff.mean() < 0.01  # only float rounding at .5 boundaries may differ
    assert images.std() > 10


def test_sharded_sampling_equals_one_device(pipes):
  """8 prompts on 8 devices (one latent per device) give the one-device numbers."""
  pipe = pipes["sd3"]
  cond, uncond, cfg = pipe.conditioning(PROMPTS, NEGATIVES, height=HEIGHT, width=WIDTH, guidance=5.0)
  sharded = sampling.generate_latents(pipe.denoise, pipe.denoiser, pipe.scheduler_config, cond, uncond, noise(),
                                      steps=STEPS, guidance=cfg)
  assert len(sharded.sharding.device_set) == len(jax.devices()) == 8
  assert sharded.addressable_shards[0].data.shape[0] == 1
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
  single = sampling.generate_latents(pipe.denoise, pipe.denoiser, pipe.scheduler_config, cond, uncond, noise(),
                                     steps=STEPS, guidance=cfg, mesh=one)
  assert len(single.sharding.device_set) == 1
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)


def test_generate_cli(folders, pipes, tmp_path):
  """`python -m mapo_jax.generate` from given 16-channel noise: its final latents are the in-process sampler's
  (itself checked against diffusers above) and its images are written."""
  folder, _ = folders["sd3"]
  init = noise(1)
  np.save(tmp_path / "init.npy", init)
  prompts = [p or "x" for p in PROMPTS]  # the prompts file skips blank lines
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mapo_jax.generate", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
         "--out", str(out), "--steps", str(STEPS), "--guidance", "5", "--negative-prompt", "blurry",
         "--init-latents", str(tmp_path / "init.npy"), "--output-latents", str(tmp_path / "final.npy")]
  proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **SUBPROCESS_ENV}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = np.load(tmp_path / "final.npy")
  _, expected = sampling.generate_images(pipes["sd3"], prompts, negative_prompts=["blurry"] * 8, steps=STEPS,
                                         guidance=5.0, init_latents=init)
  assert final.shape == (8, HEIGHT // 8, WIDTH // 8, 16)
  assert rel_l2(final, expected) <= 1e-5
  metadata = json.loads((out / "metadata.json").read_text())
  assert (metadata["height"], metadata["width"]) == (HEIGHT, WIDTH) and len(metadata["images"]) == 8
  assert (out / "0007.png").is_file() and (out / "grid.png").is_file()


def test_export_round_trip(folders, tmp_path):
  """load → export: the transformer's tensors byte for byte; diffusers loads the exported pipeline with no
  missing or unexpected keys and computes what the original computes."""
  from diffusers import SD3Transformer2DModel
  from mapo_jax.export import export_denoiser
  from safetensors.numpy import load_file
  folder, ref = folders["sd35"]
  model = sd3.load_denoiser(folder)
  out = export_denoiser(model, folder, tmp_path / "export")
  weights = lambda f: load_file(f / "transformer" / "diffusion_pytorch_model.safetensors")
  base, exported = weights(folder), weights(out)
  assert sorted(base) == sorted(exported)
  for key, value in base.items():
    assert exported[key].dtype == value.dtype and exported[key].tobytes() == value.tobytes(), key
  assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
  _, info = SD3Transformer2DModel.from_pretrained(out / "transformer", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  loaded = reference(out)
  args = dict(hidden_states=torch.randn(2, 16, 4, 6), encoder_hidden_states=torch.randn(2, 9, 32),
              pooled_projections=torch.randn(2, 20), timestep=torch.tensor([500.0, 20.0]))
  with torch.no_grad():
    torch.testing.assert_close(loaded.transformer(**args).sample, ref.transformer(**args).sample, rtol=0, atol=0)
  # Half precision: the cast weights, position table included.
  half = export_denoiser(model, folder, tmp_path / "half", dtype="bf16", denoiser_only=True)
  assert {v.dtype.name for v in load_file(half / "diffusion_pytorch_model.safetensors").values()} == {"bfloat16"}


def test_encode_cli(folders, pipes, tmp_path):
  """`python -m mapo_jax.encode` on an SD3 folder: 32-channel moments (the VAE's 16-channel mean and logvar, as
  diffusers' encoder gives them) and prompt embeddings equal to `encode_prompts`."""
  from diffusers import AutoencoderKL
  from mapo_jax.data import pairs, sources
  from test_data_helpers import image_bytes, pick_a_pic_rows, read_cache, write_parquet
  folder, _ = folders["sd3"]
  rows = pick_a_pic_rows(3)
  rng = np.random.default_rng(0)
  for r in rows:  # noise, so a spatial or pairing mistake changes the moments
    r.update(jpg_0=image_bytes(rng.integers(0, 256, (32, 48, 3))), jpg_1=image_bytes(rng.integers(0, 256, (40, 40, 3))))
  write_parquet(tmp_path / "pairs.parquet", rows)
  # The command's own flag parsing and main, in this process (generate's test above starts a real process).
  encode.main(encode.parse_flags([
      "encode", "--pipeline", str(folder), "--data", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "cache"),
      "--resolution", "32", "--cache_dtype", "float32",
      "--text", "embeddings"]))  # per-pair embeddings; token ids (the default): test_text_conditioning.py
  manifest, records = read_cache(tmp_path / "cache")
  assert manifest["pairs"] == 3
  assert {k: v["shape"] for k, v in manifest["record"].items()} == {
      "moments_w": [4, 4, 32], "moments_l": [4, 4, 32], "prompt_embeds": [77 + 256, 32],
      "pooled_prompt_embeds": [20], "time_ids": [6], "rpo_emb": [20]}
  prepared = [pairs.prepare_pair(r, resolution=32, seed=0) for r in sources.open_source(str(tmp_path / "pairs.parquet")).read(0, 3)]
  captions = [p["caption"] for p in prepared]
  text = pipes["sd3"].encode_prompts(captions)
  got = {k: np.stack([r[k] for r in records]) for k in records[0]}
  for key in ("prompt_embeds", "pooled_prompt_embeds"):
    np.testing.assert_allclose(got[key], np.asarray(text[key]), rtol=1e-5, atol=1e-6, err_msg=key)
  vae = AutoencoderKL.from_pretrained(folder / "vae")
  with torch.no_grad():
    pixels = torch.from_numpy(np.stack([p["pixels_w"] for p in prepared]).transpose(0, 3, 1, 2).copy())
    dist = vae.encode(pixels).latent_dist
  want = torch.cat([dist.mean, dist.logvar], dim=1).numpy().transpose(0, 2, 3, 1)
  assert rel_l2(got["moments_w"], want) <= 1e-4


def test_aot_finds_the_family_and_batch_shapes(folders):
  """aot resolves the SD3 presets and folders to this family (no compile), with SD3's batch layout."""
  from mapo_jax.config import base_config
  config = base_config()
  model = aot.resolve_model("tiny_sd35", config, None)
  assert model.family is sd3 and model.denoiser_config == TINY_SD35_TRANSFORMER
  assert model.latents == sd3.Latents(scale=1.5305, shift=0.0609) and model.schedule.shift == 3.0
  folder, _ = folders["no_t5"]
  from_folder = aot.resolve_model(str(folder), config, None)
  assert from_folder.family is sd3 and from_folder.vae_downsample == 8 and from_folder.schedule.use_dynamic_shifting
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  batch = sd3.abstract_batch(sd3.PRESETS["sd35_medium"], 1024, 8, mesh)
  assert {k: v.shape for k, v in batch.items()} == {
      "moments_w": (8, 128, 128, 32), "moments_l": (8, 128, 128, 32), "prompt_embeds": (8, 333, 4096),
      "pooled_prompt_embeds": (8, 2048), "time_ids": (8, 6), "rpo_emb": (8, 2048)}
  assert sd3.abstract_batch(sd3.PRESETS["sd35_large"], 512, 8, mesh, "mean_tokens")["rpo_emb"].shape == (8, 4096)
  abstract = sd3.abstract_denoiser(folder)
  assert abstract.cfg.in_channels == 16 and len(abstract.transformer_blocks) == TINY_SD3_TRANSFORMER["num_layers"]
  names = [name for module in pipelines.FAMILIES for name in module.PRESETS]
  assert len(names) == len(set(names))  # preset names are unique across families


def test_load_denoiser_sharded_as_the_trainer_calls_it(folders):
  """The trainer's call (train.py: param_dtype, mesh and the model options, scan included): parameters are born
  sharded over the mesh, and the layout is abstract_denoiser's (what aot and export build)."""
  from flax import nnx
  from mapo_jax import sharding
  folder, _ = folders["sd35"]
  mesh = sharding.make_mesh((1, 8, 1))
  options = dict(dtype=jax.numpy.bfloat16, remat="full", scan=True, attention="xla")
  model = sd3.load_denoiser(folder, param_dtype=jax.numpy.float32, mesh=mesh, **options)
  path, q = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                 if "to_q" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p))
  # the first run of identical blocks, stacked on a leading "layers" axis (unsharded) when scanned
  assert q.shape[-2:] == (32, 32) and len(q.sharding.device_set) == 8, jax.tree_util.keystr(path)
  assert q.sharding.spec[q.ndim - 2] == "fsdp"
  abstract = sd3.abstract_denoiser(folder, **options)
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))
  assert shapes(abstract) == shapes(model)
