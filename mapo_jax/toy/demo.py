"""The embedded demos' assets, created locally and deterministically, without PyTorch or diffusers:

  pipeline/      a pretrained toy-world pipeline, copied: the SDXL-architecture base (mapo_jax/toy/base: a tiny
                 UNet, a /4 VAE, frozen random CLIP towers; 32 px) or its FLUX.1 twin (mapo_jax/toy/flux_base: a
                 tiny FluxTransformer2DModel on the same VAE, a CLIP and a T5 tower; mapo_jax/toy/pretrain.py
                 builds both);
  pairs.parquet  toy-world preference pairs (mapo_jax/toy/world.py) in Pick-a-Pic's columns: the preferred
                 image shows the captioned shape and colour filled, the other the same shape outlined or a
                 wrong shape or colour; both bases draw < 10 % filled shapes;
  cache/         the pairs encoded by the pipeline's VAE and text towers (`mapo_jax.encode`'s format; the FLUX
                 twin's T5 at FLUX_T5_TOKENS tokens);
  unpaired/      unpaired labelled samples for Diffusion-KTO (unpaired.jsonl + PNGs): the preferred images
                 of such pairs are desirable (+1), the others undesirable (-1);
  cache_unpaired/  those samples encoded (configs/demo_kto.py trains on it).

`configs/demo.py` (SDXL) and `configs/demo_flux.py` (FLUX; config.demo_base = "flux") point the trainer at such a
folder; `python -m mapo_jax.train --config configs/demo.py` calls `ensure_assets` first, which builds whatever is
missing. A folder holds one base: asked for the other, it is refused. Each part is written under a temporary name
and renamed when complete, so an interrupted run never leaves a half-written part behind.

`write_pipeline` writes a random pipeline of the SDXL architecture (a /8 VAE, 64 px): toy_pretrain.py
starts from its text towers, and tests use it where the weights do not matter.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from PIL import Image

from mapo_jax.toy import world as toy_world
from mapo_jax.data.cache import EncodeSettings, read_manifest, write_cache
from mapo_jax.data.sources import ParquetSource, open_source
from mapo_jax.encode import make_encoder
from mapo_jax.models import AutoencoderKL, CLIPTextModel, save_text_encoder, save_unet, save_vae
from mapo_jax.pipelines import family, flux, load_pipeline, text_options
from mapo_jax.run.workdir import remove_stale_temporaries
from mapo_jax.models.presets import MICRO_SDXL_UNET
from mapo_jax.models.unet import UNet2DConditionModel

BASE = Path(__file__).resolve().parent / "base"  # the pretrained toy base that ships (mapo_jax/toy/pretrain.py builds it)
# Its FLUX.1 twin (`python -m mapo_jax.toy.pretrain --family flux`), a FluxPipeline on the same world.
FLUX_BASE = Path(__file__).resolve().parent / "flux_base"
# The twin's T5 length: FluxPipeline's max_sequence_length (512 by default there; BFL's CLI uses 256 for schnell). The
# toy's captions take 4 T5 tokens with the closing </s>; at 512 the transformer would spend ~97 % of its work on
# padding, a training step ~70x slower on 2 CPU cores. Everything that encodes the twin's prompts uses it.
FLUX_T5_TOKENS = 8
BASES = {"sdxl": BASE, "flux": FLUX_BASE}
RESOLUTION = 64  # the random pipeline's
NUM_PAIRS = 512
# The UNet's cross_attention_dim (24) = tower 1 width (8) + tower 2 width (16); the pooled embedding (16)
# + 6 time ids x 4 = projection_class_embeddings_input_dim (40).
UNET = {**MICRO_SDXL_UNET, "sample_size": RESOLUTION // 8}
VAE = dict(  # four blocks: latents are /8 as with the real VAEs
    in_channels=3, out_channels=3, block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
    sample_size=RESOLUTION, scaling_factor=0.13025, force_upcast=False)
SCHEDULER = dict(  # SDXL base's EulerDiscreteScheduler
    _class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    interpolation_type="linear", use_karras_sigmas=False)

# A CLIP BPE vocabulary over single letters plus a few merged words, the two specials last (CLIP's order).
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MERGES = ["r e", "re d</w>", "b l", "bl u", "blu e</w>", "g r", "gr e", "gre e", "gree n</w>"]
_VOCAB = ["!", "!</w>", ",</w>", ".</w>", *_LETTERS, *(c + "</w>" for c in _LETTERS),
          *("".join(m.split()) for m in _MERGES), "<|startoftext|>", "<|endoftext|>"]
BOS, EOS = len(_VOCAB) - 2, len(_VOCAB) - 1
_CLIP = dict(model_type="clip_text_model", vocab_size=len(_VOCAB), num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS)
TEXT_ENCODER = {**_CLIP, "architectures": ["CLIPTextModel"], "hidden_size": 8, "intermediate_size": 16,
                "projection_dim": 8, "hidden_act": "quick_gelu", "pad_token_id": EOS}
TEXT_ENCODER_2 = {**_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 16,
                  "intermediate_size": 32, "projection_dim": 16, "hidden_act": "gelu", "pad_token_id": 0}

TOY_SIZE = 32  # px: the pretrained toy pipeline's (mapo_jax/toy_pretrain.SIZE)


def clip_tokenizer_files(folder: Path, pad_token: str) -> None:
  """A CLIPTokenizer folder over the hand-made vocabulary above."""
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(_VOCAB)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
  specials = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                  pad_token=pad_token)
  (folder / "special_tokens_map.json").write_text(json.dumps(specials))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
       "clean_up_tokenization_spaces": False}))


def random_model(build, seed: int):
  """`build()` with numpy-drawn weights: kernels and embeddings N(0, 1/fan_in), norm scales 1, biases 0.

  Built abstractly and filled on the host: the models' own initialisers would compile (or dispatch op by
  op) for tens of seconds on CPU, which the demo cannot afford.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = str(path[-1])
    if name.endswith("scale"):
      return np.ones(x.shape, x.dtype)
    if name.endswith("bias"):
      return np.zeros(x.shape, x.dtype)
    fan_in = np.prod(x.shape[:-1]) if len(x.shape) > 1 else 1
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def toy_t5_tokens(folder: str | os.PathLike) -> int:
  """The T5 length a toy pipeline folder's prompts are encoded at: FLUX_T5_TOKENS for the FLUX twin, 0 (none) for
  the SDXL base."""
  return FLUX_T5_TOKENS if family(folder) is flux else 0


def load_toy(folder: str | os.PathLike, components=None):
  """`load_pipeline` for a toy pipeline folder of either family, its prompts at `toy_t5_tokens`."""
  return load_pipeline(folder, components, **text_options(folder, toy_t5_tokens(folder)))


def write_pipeline(out: Path, seed: int = 0, *, unet: UNet2DConditionModel | None = None,
                   vae: AutoencoderKL | None = None, dtype: str | None = None,
                   force_zeros_for_empty_prompt: bool = True) -> None:
  """Random weights, saved with our own writers; `unet` and `vae`, when given, are saved instead of random
  ones (the pretrained toy world, mapo_jax/toy/pretrain.py). `dtype`: the saved weights' dtype ("fp16")."""
  if unet is None:
    unet = random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), seed)
  if vae is None:
    vae = random_model(lambda: AutoencoderKL(VAE, rngs=nnx.Rngs(0)), seed + 1)
  save_unet(unet, out / "unet", dtype=dtype)
  save_vae(vae, out / "vae", dtype=dtype)
  save_text_encoder(random_model(lambda: CLIPTextModel(TEXT_ENCODER, rngs=nnx.Rngs(0)), seed + 2),
                    out / "text_encoder", dtype=dtype)
  save_text_encoder(random_model(lambda: CLIPTextModel(TEXT_ENCODER_2, rngs=nnx.Rngs(0)), seed + 3),
                    out / "text_encoder_2", dtype=dtype)
  clip_tokenizer_files(out / "tokenizer", pad_token="<|endoftext|>")
  clip_tokenizer_files(out / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
  (out / "scheduler").mkdir()
  (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
  (out / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
      "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt, "feature_extractor": [None, None],
      "image_encoder": [None, None],
      "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
      "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def write_pairs(out: Path, num_pairs: int = NUM_PAIRS, seed: int = 0) -> None:
  """Toy-world pairs preferring filled shapes, in Pick-a-Pic's columns; every third pair lists the preferred
  image second, so the label handling is exercised."""
  rng = np.random.default_rng(seed)
  rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
  for i in range(num_pairs):
    win, lose = toy_world.preference_pair(rng, "filled")
    images = [_png(toy_world.draw(s, rng, TOY_SIZE)) for s in (win, lose)]
    swap = i % 3 == 2
    rows["caption"].append(toy_world.caption(win))
    rows["jpg_0"].append(images[swap])
    rows["jpg_1"].append(images[not swap])
    rows["label_0"].append(0.0 if swap else 1.0)
    rows["label_1"].append(1.0 if swap else 0.0)
  pq.write_table(pa.table(rows), out)


def write_unpaired(out: Path, num_samples: int = 2 * NUM_PAIRS, seed: int = 1) -> None:
  """`num_samples` labelled images as unpaired.jsonl {"prompt", "image", "label"}: the preferred or the
  other image of a toy-world pair (as write_pairs draws them), in runs of 2 desirable, 1 undesirable."""
  rng = np.random.default_rng(seed)
  out.mkdir(parents=True)
  with (out / "unpaired.jsonl").open("w") as f:
    for i in range(num_samples):
      win, lose = toy_world.preference_pair(rng, "filled")
      desirable = i % 3 != 2
      (out / f"{i:04d}.png").write_bytes(_png(toy_world.draw(win if desirable else lose, rng, TOY_SIZE)))
      f.write(json.dumps({"prompt": toy_world.caption(win), "image": f"{i:04d}.png", "label": 1 if desirable else -1})
              + "\n")


def copy_toy_pipeline(out: Path, base: Path = BASE) -> None:
  shutil.copytree(base, out, ignore=shutil.ignore_patterns("samples.png", "metrics.json", "README.md"))


def held_base(folder: Path) -> str | None:
  """Which toy base (a BASES key) the assets folder's pipeline/ holds; None before it exists."""
  if not (folder / "pipeline" / "model_index.json").is_file():
    return None
  return "flux" if family(folder / "pipeline") is flux else "sdxl"


def _build(final: Path, write) -> None:
  """Runs write(tmp) and renames tmp to `final`; skips if `final` exists. Two processes building the same
  part at once (two first-time demos) both finish; the second to rename keeps the first one's."""
  if final.exists():
    return
  tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  write(tmp)
  try:
    os.replace(tmp, final)
  except OSError:  # a folder cannot replace a non-empty one: another process finished first
    if not final.exists():
      raise
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def ensure_assets(folder: str | os.PathLike, base: str = "sdxl") -> dict[str, Path]:
  """Creates whatever of pipeline/, pairs.parquet, cache/, unpaired/ and cache_unpaired/ is missing;
  returns their paths. `base`: "sdxl" or "flux", the toy base (BASES) the folder holds; a folder whose
  pipeline/ holds the other one is refused."""
  folder = Path(folder).expanduser()
  if base not in BASES:
    raise ValueError(f"base={base!r}; expected one of {sorted(BASES)}")
  if (held := held_base(folder)) not in (None, base):
    raise ValueError(f"{folder}/pipeline holds the {held} toy base, not {base}: choose another assets folder")
  folder.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(folder)
  paths = {"pipeline": folder / "pipeline", "pairs": folder / "pairs.parquet", "cache": folder / "cache",
           "unpaired": folder / "unpaired", "cache_unpaired": folder / "cache_unpaired"}
  _build(paths["pipeline"], lambda out: copy_toy_pipeline(out, BASES[base]))
  _build(paths["pairs"], write_pairs)
  _build(paths["unpaired"], write_unpaired)

  def encoder(source):
    def encode(tmp: Path) -> None:
      pipe = load_toy(paths["pipeline"], components=family(paths["pipeline"]).FROZEN)
      settings = EncodeSettings(resolution=TOY_SIZE, max_sequence_length=toy_t5_tokens(paths["pipeline"]))
      write_cache(source, tmp, make_encoder(pipe), settings,
                  pipeline=str(paths["pipeline"]), batch_size=128, process_index=0, process_count=1)
    return encode

  _build(paths["cache"], encoder(ParquetSource(paths["pairs"])))
  _build(paths["cache_unpaired"], encoder(open_source(str(paths["unpaired"] / "unpaired.jsonl"))))
  for cache in ("cache", "cache_unpaired"):
    read_manifest(paths[cache])
  return paths
