"""`python -m mapo_jax.encode` and the pipeline encoder with tiny random SDXL / SD 1.x pipelines."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapo_jax import encode
from mapo_jax.data import cache, loader, pairs, sources
from mapo_jax.models import AutoencoderKL, CLIPTextModel, save_text_encoder, save_vae
from mapo_jax.pipelines import load_pipeline
from mapo_jax.pipelines.sd import encode_prompts
from test_data_helpers import image_bytes, pick_a_pic_rows, read_cache, write_parquet

RESOLUTION = 32  # 4 x 4 latents
COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def byte_level_tokenizer():
  """A CLIP tokenizer with only the 512 byte-level symbols (no merges) and the two specials."""
  from transformers import CLIPTokenizer
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs + [256 + n for n in range(256 - len(bs))]
  bs += [b for b in range(256) if b not in bs]
  chars = [chr(c) for _, c in sorted(zip(bs, cs))]
  vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
  tokenizer = CLIPTokenizer(vocab=vocab | {"<|startoftext|>": 512, "<|endoftext|>": 513}, merges=[])
  tokenizer.model_max_length = 77
  return tokenizer


def random_model(cls, config, seed=0):
  """The model with N(0, 0.3) parameters drawn in numpy (jax's initialisers compile once per shape: slow)."""
  model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), nnx.state(model)))
  return model


def make_pipeline(path, sdxl=True):
  """Saves a random tiny pipeline folder (VAE with 8x downsampling, one or two CLIP towers) and loads it."""
  save_vae(random_model(AutoencoderKL, {"down_block_types": ["DownEncoderBlock2D"] * 4, "block_out_channels": [8] * 4,
                                        "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 4}), path / "vae")
  text = {"model_type": "clip_text_model", "vocab_size": 514, "intermediate_size": 16, "num_hidden_layers": 2,
          "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 512, "eos_token_id": 513}
  towers = {"text_encoder": text | {"architectures": ["CLIPTextModel"], "hidden_size": 8}}
  if sdxl:
    towers["text_encoder_2"] = text | {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 12,
                                       "projection_dim": 6}
  index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
           "vae": ["diffusers", "AutoencoderKL"]}
  for i, (name, config) in enumerate(towers.items()):
    save_text_encoder(random_model(CLIPTextModel, config, seed=i + 1), path / name)
    byte_level_tokenizer().save_pretrained(path / f"tokenizer{'_2' if i else ''}")
    index[name] = ["transformers", config["architectures"][0]]
    index[f"tokenizer{'_2' if i else ''}"] = ["transformers", "CLIPTokenizer"]
  (path / "model_index.json").write_text(json.dumps(index))
  return load_pipeline(path, components=COMPONENTS)


def reference(pipe, prepared):
  """What the cache must hold: the pipeline's own VAE and prompt encoder, on one device, 2 pairs a call."""
  encode_images = nnx.jit(lambda vae, x: jnp.concatenate(vae.encode(x), axis=-1))
  out = []
  for chunk in (prepared[i:i + 2] for i in range(0, len(prepared), 2)):
    moments = np.asarray(encode_images(pipe.vae, np.stack([p[k] for k in ("pixels_w", "pixels_l") for p in chunk])))
    text = encode_prompts(pipe, [p["caption"] for p in chunk])
    out.append({"moments_w": moments[:len(chunk)], "moments_l": moments[len(chunk):],
                "prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"],
                "rpo_emb": text["pooled_prompt_embeds"], "time_ids": np.stack([p["time_ids"] for p in chunk])})
  return {k: np.concatenate([np.asarray(o[k]) for o in out]) for k in cache.BATCH_KEYS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny SDXL folder; a parquet of a corrupt row, a tie and 6 pairs of noise images; references."""
  root = tmp_path_factory.mktemp("encode")
  pipe = make_pipeline(root / "sdxl")
  rng = np.random.default_rng(0)
  rows = pick_a_pic_rows(8)
  for r in rows:  # noise, so a spatial or pairing mistake changes the moments
    r.update(jpg_0=image_bytes(rng.integers(0, 256, (32, 48, 3))), jpg_1=image_bytes(rng.integers(0, 256, (40, 40, 3))))
  rows[0]["jpg_0"] = b"corrupt"
  rows[4].update(label_0=0.5, label_1=0.5)
  write_parquet(root / "pairs.parquet", rows)
  source = sources.open_source(str(root / "pairs.parquet"))
  prepared = [pairs.prepare_pair(r, resolution=RESOLUTION, seed=0) for r in source.read(0, 8) if r.index not in (0, 4)]
  ref = reference(pipe, prepared)
  assert np.abs(np.diff(ref["moments_w"], axis=0)).min() > 0  # the random VAE tells the pairs apart
  return root, source, pipe, ref


def run_cli(args, env=None):
  """The CLI in a subprocess (env can give it several CPU devices)."""
  result = subprocess.run([sys.executable, "-m", "mapo_jax.encode", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  assert result.returncode == 0, result.stderr[-3000:]


def assert_matches(got, ref, tol):
  for k in cache.BATCH_KEYS:
    np.testing.assert_allclose(got[k], ref[k], rtol=tol, atol=tol, err_msg=k)


def test_cli_on_two_devices_and_read_back(setup):
  """The CLI with 2 CPU devices: 3 pairs per call, padded to 4, split 2 + 2; then read through grain."""
  root, _, _, ref = setup
  args = ["--pipeline", str(root / "sdxl"), "--data", str(root / "pairs.parquet"), "--resolution", str(RESOLUTION),
          "--batch_size", "4"]
  with pytest.raises(pairs.BadPair, match=r"pairs.parquet row 0: cannot decode jpg_0"):
    encode.main(encode.parse_flags(["encode", *args, "--out", str(root / "strict"), "--strict"]))
  run_cli([*args, "--out", str(root / "cache")], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  manifest, rs = read_cache(root / "cache")
  got = {k: np.stack([r[k] for r in rs]).astype(np.float32) for k in cache.BATCH_KEYS}
  assert {k: manifest[k] for k in ("pairs", "ties_dropped", "skipped")} == {"pairs": 6, "ties_dropped": 1, "skipped": 1}
  assert {k: (v["shape"], v["dtype"]) for k, v in manifest["record"].items()} == {
      "moments_w": ([4, 4, 8], "float16"), "moments_l": ([4, 4, 8], "float16"),
      "prompt_embeds": ([77, 20], "float16"), "pooled_prompt_embeds": ([6], "float16"),
      "time_ids": ([6], "float32"), "rpo_emb": ([6], "float32")}
  assert_matches(got, ref, 3e-3)  # float16 storage
  batches = list(loader.cached_loader(root / "cache", batch_size=2, seed=0, num_epochs=1, process_index=0,
                                      process_count=1))
  pooled = np.concatenate([b["pooled_prompt_embeds"] for b in batches])
  np.testing.assert_array_equal(np.sort(pooled, axis=0), np.sort(got["pooled_prompt_embeds"], axis=0))


def test_onthefly_with_pipeline(setup):
  _, source, pipe, ref = setup
  batches = list(loader.onthefly_loader(source, encode.make_encoder(pipe), resolution=RESOLUTION, batch_size=2,
                                        seed=0, num_epochs=1, process_index=0, process_count=1))
  got = {k: np.concatenate([b[k] for b in batches]) for k in cache.BATCH_KEYS}
  order, ref_order = (np.argsort(x["pooled_prompt_embeds"][:, 0]) for x in (got, ref))
  assert_matches({k: v[order] for k, v in got.items()}, {k: v[ref_order] for k, v in ref.items()}, 1e-5)


def test_sd15_pipeline_and_mean_tokens(tmp_path, setup):
  """One tower (no *_2 components); the RPO embedding can be the mean over tokens."""
  _, source, _, _ = setup
  pipe = make_pipeline(tmp_path, sdxl=False)
  assert pipe.text_encoder_2 is None
  prepared = [pairs.prepare_pair(r, resolution=RESOLUTION, seed=0) for r in source.read(1, 3)]
  captions = [p["caption"] for p in prepared]
  got = encode.make_encoder(pipe, rpo_embedding="mean_tokens")(
      np.stack([p["pixels_w"] for p in prepared]), np.stack([p["pixels_l"] for p in prepared]), captions)
  text = encode_prompts(pipe, captions)
  assert got["moments_w"].shape == (2, 4, 4, 8) and got["prompt_embeds"].shape == (2, 77, 8)
  for key, want in (("prompt_embeds", text["prompt_embeds"]), ("pooled_prompt_embeds", text["pooled_prompt_embeds"]),
                    ("rpo_emb", text["prompt_embeds"].mean(axis=1))):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=key)
