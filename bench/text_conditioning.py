"""Text conditioning at scale (docs/data.md, "Text conditioning at scale"): FLUX.1's and SD3.5's T5 prompts either
cached as per-pair embeddings, or cached as token ids and encoded by the frozen towers inside the train step.

  JAX_PLATFORMS=cpu python bench/text_conditioning.py                        # CPU, about two minutes
  JAX_PLATFORMS=cpu python bench/text_conditioning.py --families flux --steps 3

Prints markdown tables, with the machine, the date and this command:
1. bytes per pair at full size (1024 px, float16 storage, the pooled RPO embedding) from the record layout `encode`
   writes (data/cache.py RecordLayout), the shapes from the families' own batch and tower definitions;
2. Pick-a-Pic v2 (--pairs pairs, --captions unique captions): the whole cache with per-pair embeddings, with one
   embeddings row per unique caption (the pairs keep their latents and a caption index, a side table holds the
   caption rows), and with token ids;
3. steps/s of the train step on CPU for tiny random FLUX and SD3.5 models with each design: "token ids" runs the
   frozen towers in the step, "per-pair embeddings" gets them in the batch. The tiny towers run at the published
   token counts (77 CLIP, 512 / 256 T5 tokens), so the sequence work is real and only the widths are toy;
4. arithmetic, not a compile, of the frozen bf16 T5-XXL in the step, sharded over fsdp on --chips chips: weights
   and the largest buffers one layer keeps live, per chip, for --global-batch captions.
"""
import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mapo_jax, not an installed copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapo_jax import diffusion, sharding
from mapo_jax.configs import flux_mapo_lora, sd35_mapo
from mapo_jax.data.cache import PROMPT_EMBED_KEYS, TEXT_IDS_PREFIX, RecordLayout
from mapo_jax.models import presets
from mapo_jax.models.clip import CLIPTextModel
from mapo_jax.models.flux import init_flux_transformer
from mapo_jax.models.layers import Options
from mapo_jax.models.sd3 import init_sd3_transformer
from mapo_jax.models.t5 import T5EncoderModel
from mapo_jax.pipelines import flux, sd3
from mapo_jax.training import build

NAMES = {"flux": "FLUX.1-dev", "sd3": "SD3.5"}
FAMILIES = {"flux": flux, "sd3": sd3}
FULL_DENOISER = {"flux": presets.FLUX1_DEV_TRANSFORMER, "sd3": presets.SD35_LARGE_TRANSFORMER}
DESIGNS = ("embeddings", "ids")
DESIGN_NAMES = {"embeddings": "per-pair embeddings", "ids": "token ids"}
PER_PAIR_KEYS = ("moments_w", "moments_l", "time_ids")  # what stays per pair when captions get their own rows
CAPTION_INDEX_BYTES = 4  # an int32 row number into the caption table


def one_device_mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


# --- 1. Bytes per pair ------------------------------------------------------------------------------------------

def full_size_layout(family: str, text: str, resolution: int, cache_dtype: str) -> RecordLayout:
  """The record `encode` writes for the published model (--rpo_embedding pooled): the family's batch shapes
  (abstract_batch) and, for token ids, its towers' token counts (abstract_step_text)."""
  module = FAMILIES[family]
  shapes = module.abstract_batch(FULL_DENOISER[family], resolution, 1, one_device_mesh())
  batch = {k: np.zeros(v.shape, np.float32) for k, v in shapes.items()}
  if text == "ids":
    _, _, tokens = module.abstract_step_text(None)
    for k in PROMPT_EMBED_KEYS:
      del batch[k]
    batch.update({TEXT_IDS_PREFIX + name: np.zeros((1, n), np.int32) for name, n in tokens.items()})
  return RecordLayout.for_batch(batch, cache_dtype)


def key_bytes(layout: RecordLayout) -> dict[str, int]:
  return {k: math.prod(s) * np.dtype(layout.dtypes[k]).itemsize for k, s in layout.shapes.items()}


def bytes_table(a) -> dict:
  layouts = {(f, t): full_size_layout(f, t, a.resolution, a.cache_dtype) for f in a.families for t in DESIGNS}
  print(f"\n### Bytes per pair ({a.resolution} px, {a.cache_dtype} storage, pooled RPO embedding)\n")
  print("| family | design | bytes per pair | text part | record keys |")
  print("|---|---|---|---|---|")
  for (family, text), layout in layouts.items():
    sizes = key_bytes(layout)
    total = sum(sizes.values())
    # The serialised record is the layout's arithmetic, byte for byte.
    assert len(layout.serialize({k: np.zeros((1, *s), layout.dtypes[k]) for k, s in layout.shapes.items()})[0]) \
        == total
    text_part = sum(v for k, v in sizes.items() if k in PROMPT_EMBED_KEYS or k.startswith(TEXT_IDS_PREFIX))
    keys = ", ".join(f"{k} {'x'.join(map(str, s))} {layout.dtypes[k]}" for k, s in layout.shapes.items())
    print(f"| {NAMES[family]} | {DESIGN_NAMES[text]} | {total:,} | {text_part:,} | {keys} |")
  return layouts


# --- 2. Pick-a-Pic v2 arithmetic --------------------------------------------------------------------------------

def pickapic_table(a, layouts) -> None:
  tb = lambda n: f"{n / 1e12:.2f} TB"
  print(f"\n### Pick-a-Pic v2: {a.pairs:,} pairs, {a.captions:,} unique captions (arithmetic)\n")
  print("| family | per-pair embeddings | one row per unique caption | token ids | text in the ids cache |")
  print("|---|---|---|---|---|")
  for family in a.families:
    emb, ids = key_bytes(layouts[(family, "embeddings")]), key_bytes(layouts[(family, "ids")])
    per_pair = sum(emb[k] for k in PER_PAIR_KEYS) + CAPTION_INDEX_BYTES
    per_caption = sum(v for k, v in emb.items() if k not in PER_PAIR_KEYS)  # prompt, pooled and RPO embeddings
    text_ids = sum(v for k, v in ids.items() if k.startswith(TEXT_IDS_PREFIX))
    print(f"| {NAMES[family]} | {tb(a.pairs * sum(emb.values()))} | "
          f"{tb(a.pairs * per_pair + a.captions * per_caption)} (captions: {tb(a.captions * per_caption)}) | "
          f"{tb(a.pairs * sum(ids.values()))} | {a.pairs * text_ids / 1e9:.2f} GB |")


# --- 3. Steps/s on CPU, tiny models -----------------------------------------------------------------------------

# Toy towers of about the tests' sizes (tests/flow_fixtures.py), built here: the bench needs no test code, tokenizer
# or pipeline folder, since random ids in the vocabulary cost the towers what real ones do.
TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               layer_norm_epsilon=1e-6)
TINY_CLIP = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)
TINY_SD3_CLIP_L = dict(TINY_CLIP, architectures=["CLIPTextModelWithProjection"], hidden_size=8, intermediate_size=16,
                       num_hidden_layers=2, projection_dim=8)
TINY_SD3_CLIP_G = dict(TINY_CLIP, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
                       num_hidden_layers=2, projection_dim=12, eos_token_id=63)


def tiny_family(family: str):
  """(denoiser, towers, encode, tokens per tower, recipe) of a tiny model whose towers give the denoiser's widths."""
  rngs = nnx.Rngs(0)
  if family == "flux":
    towers = (CLIPTextModel(TINY_CLIP, rngs=rngs), T5EncoderModel(TINY_T5, rngs=rngs))
    tokens = {"text_encoder": flux.CLIP_TOKENS, "text_encoder_2": flux.MAX_SEQUENCE_LENGTH}
    return dict(presets.TINY_FLUX_PIPELINE_TRANSFORMER), towers, flux.encode_ids, tokens, flux_mapo_lora
  towers = (CLIPTextModel(TINY_SD3_CLIP_L, rngs=rngs), CLIPTextModel(TINY_SD3_CLIP_G, rngs=rngs),
            T5EncoderModel(TINY_T5, rngs=rngs))
  tokens = {name: sd3.TEXT_TOKENS for name in sd3.CLIP_TOWERS} | {sd3.T5_TOWER: sd3.MAX_SEQUENCE_LENGTH}
  denoiser = dict(presets.TINY_SD35_TRANSFORMER, in_channels=16, out_channels=16, joint_attention_dim=32,
                  pooled_projection_dim=8 + 12)
  encode = functools.partial(sd3.encode_ids, width=32, t5_tokens=sd3.MAX_SEQUENCE_LENGTH)
  return denoiser, towers, encode, tokens, sd35_mapo


def time_step(a, family: str, text: str) -> dict:
  """Compiles the recipe's train step on one CPU device and times it on one fixed batch."""
  module = FAMILIES[family]
  denoiser_cfg, towers, encode, tokens, recipe = tiny_family(family)
  config = recipe.get_config()
  config.resolution, config.global_batch_size, config.accum_steps = a.res, a.batch, 1
  config.dtype, config.remat, config.data.empty_prompt_prob = "float32", "none", a.empty_prompt_prob
  mesh = one_device_mesh()
  options = Options(**build.model_options(config, mesh))
  init = init_flux_transformer if family == "flux" else init_sd3_transformer
  model = init(denoiser_cfg, options=options)
  rng = np.random.default_rng(0)
  ids = {TEXT_IDS_PREFIX + k: rng.integers(0, 64, (a.batch, n)).astype(np.int32) for k, n in tokens.items()}
  empty_ids = {k: np.zeros(v.shape[1:], np.int32) for k, v in ids.items()}
  graphdef, tower_state = nnx.split(towers)
  unprefixed = lambda i: {k[len(TEXT_IDS_PREFIX):]: v for k, v in i.items()}
  encode_jit = jax.jit(lambda s, i: encode(nnx.merge(graphdef, s), unprefixed(i)))
  shapes = module.abstract_batch(denoiser_cfg, a.res, a.batch, mesh)
  batch = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in shapes.items() if k not in PROMPT_EMBED_KEYS}
  if text == "ids":
    batch.update(ids)
    empty, step_text = empty_ids, (towers, encode)
  else:  # what a cache of embeddings holds, and "" encoded once, as train.py's empty_prompt_rows
    batch.update({k: np.asarray(v) for k, v in encode_jit(tower_state, ids).items()})
    empty = encode_jit(tower_state, {k: v[None] for k, v in empty_ids.items()})
    empty = {k: np.asarray(v[0]) for k, v in empty.items()}
    step_text = None
  schedule = diffusion.as_schedule(module.SCHEDULER_CONFIG)
  built = build.build(config, module, model, None, schedule, module.preset_latents(denoiser_cfg), mesh,
                      empty if a.empty_prompt_prob > 0 else None, text=step_text)
  batch = sharding.global_batch(batch, mesh)
  t0 = time.perf_counter()
  compiled = build.compile_step(built.train_step, mesh, built.state, batch, built.frozen)
  compile_s = time.perf_counter() - t0
  run = {"state": built.state}

  def one_step():
    run["state"], run["metrics"] = compiled(run["state"], batch, built.frozen)
    float(run["metrics"]["loss"])  # one host sync per step, as the trainer logs

  step_s = statistics.median(timed(one_step, a.warmup, a.steps))
  # The towers alone on the same ids: the part of the ids step that the embeddings design does not do.
  towers_s = statistics.median(timed(lambda: jax.block_until_ready(encode_jit(tower_state, ids)), a.warmup, a.steps))
  return dict(step_s=step_s, steps_per_s=1 / step_s, compile_s=compile_s, towers_s=towers_s)


def timed(fn, warmup, n):
  out = []
  for i in range(warmup + n):
    t0 = time.perf_counter()
    fn()
    if i >= warmup:
      out.append(time.perf_counter() - t0)
  return out


def steps_table(a) -> None:
  print(f"\n### Train step on CPU, tiny random models ({a.res} px, {a.batch} pairs, MaPO, float32, "
        f"empty-prompt dropout {a.empty_prompt_prob}; median of {a.steps} steps after {a.warmup})\n")
  print("| family | design | step_s | steps/s | towers alone, s | compile_s |")
  print("|---|---|---|---|---|---|")
  for family in a.families:
    for text in DESIGNS:
      r = time_step(a, family, text)
      towers = f"{r['towers_s']:.4f}" if text == "ids" else "–"
      print(f"| tiny {NAMES[family]} ({'LoRA' if family == 'flux' else 'full'}) | {DESIGN_NAMES[text]} | "
            f"{r['step_s']:.4f} | {r['steps_per_s']:.2f} | {towers} | {r['compile_s']:.1f} |", flush=True)


# --- 4. A frozen T5-XXL in the step: HBM per chip, arithmetic -----------------------------------------------------

class _MeshShape:
  """What logical_to_spec reads of a mesh: its axis sizes (no devices needed for the arithmetic)."""

  def __init__(self, chips: int):
    self.shape = {"data": 1, "fsdp": chips, "tensor": 1}


def per_chip_bytes(model, chips: int) -> tuple[int, int, int]:
  """(parameters, total bytes, bytes one chip holds) of an abstract model placed by the logical-axis rules, as
  build.py places the towers (every variable)."""
  mesh = _MeshShape(chips)
  axes = sharding.logical_axes(model, ...)
  params = total = per_chip = 0
  for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, ...))):
    ax = functools.reduce(lambda tree, k: tree[getattr(k, "key", getattr(k, "idx", None))], path, axes)
    n, size = math.prod(x.shape), np.dtype(x.dtype).itemsize
    spec = sharding.logical_to_spec(ax, x.shape, mesh) if ax else ()
    split = math.prod(mesh.shape[s] for s in spec if s is not None)
    params, total, per_chip = params + n, total + n * size, per_chip + n * size // split
  return params, total, per_chip


def t5_table(a) -> None:
  gb = lambda n: f"{n / 1e9:.2f} GB"
  bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  towers = {f: FAMILIES[f].abstract_step_text(None, **bf16)[0] for f in a.families}
  t5 = towers[a.families[0]][-1]  # the same T5-XXL encoder in both families
  cfg = flux.T5_XXL_CONFIG
  params, total, per_chip = per_chip_bytes(t5, a.chips)
  d, d_ff, heads, layers = cfg["d_model"], cfg["d_ff"], cfg["num_heads"], cfg["num_layers"]
  block = (params - cfg["vocab_size"] * d) / layers  # one block's parameters (norms and bias table included)
  b = a.global_batch // a.chips  # encode_text runs once on the whole global batch, before micro-batching
  print(f"\n### Frozen text towers in the step, {a.chips} chips (fsdp), {a.global_batch} captions per step: "
        "arithmetic, not an aot compile\n")
  print(f"T5-XXL encoder: {params / 1e9:.2f} G parameters, bf16 {gb(total)}; held per chip by the logical-axis "
        f"rules (embed -> fsdp): {gb(per_chip)}. Activations: the largest buffers one T5 block keeps live for "
        f"{b} captions per chip, forward only (no gradient through the frozen towers).\n")
  print("| family | T5 tokens | all towers' weights per chip | one gathered T5 block (bf16) | attention logits (f32) | "
        "gated FFN (bf16) | residual (f32) | output embeddings (f32) | T5 TFLOP per caption | "
        "denoiser TFLOP per pair | T5 share |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for family in a.families:
    n = flux.MAX_SEQUENCE_LENGTH if family == "flux" else sd3.MAX_SEQUENCE_LENGTH
    logits = b * heads * n * n * 4
    ffn = 2 * b * n * d_ff * 2
    resid = out = b * n * d * 4
    flop = 2 * (params - cfg["vocab_size"] * d) * n + layers * 4 * n * n * d
    # The denoiser: 2 FLOP per parameter per token, image tokens (16 px patches) and text rows; winner and loser;
    # forward and backward as 3 forwards (bench/train_step.py's convention). Attention's own FLOPs left out.
    denoiser = FAMILIES[family].abstract_denoiser(FULL_DENOISER[family], **bf16)
    tokens = (a.resolution // 16) ** 2 + (n if family == "flux" else sd3.TEXT_TOKENS + n)
    pair = 3 * 2 * 2 * per_chip_bytes(denoiser, 1)[0] * tokens
    print(f"| {NAMES[family]} | {n} | {gb(per_chip_bytes(towers[family], a.chips)[2])} | {gb(block * 2)} | "
          f"{gb(logits)} | {gb(ffn)} | {gb(resid)} | {gb(out)} | {flop / 1e12:.2f} | {pair / 1e12:.0f} | "
          f"{flop / (flop + pair):.1%} |")


def machine() -> str:
  try:
    mem = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
  except (OSError, IndexError, ValueError):
    mem = 0
  return f"{platform.machine()}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["flux", "sd3"])
  p.add_argument("--resolution", type=int, default=1024, help="full-size records: image pixels per side")
  p.add_argument("--cache-dtype", default="float16", help="full-size records: encode's --cache_dtype")
  p.add_argument("--pairs", type=int, default=959_000, help="Pick-a-Pic v2 training pairs")
  p.add_argument("--captions", type=int, default=59_000, help="Pick-a-Pic v2 unique captions")
  p.add_argument("--res", type=int, default=64, help="tiny CPU steps: image pixels per side (a multiple of 16)")
  p.add_argument("--batch", type=int, default=4, help="tiny CPU steps: pairs per step")
  p.add_argument("--empty-prompt-prob", type=float, default=0.1)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no-steps", action="store_true", help="arithmetic only (skip the CPU steps)")
  p.add_argument("--chips", type=int, default=8, help="T5 arithmetic: chips on the fsdp axis")
  p.add_argument("--global-batch", type=int, default=128, help="T5 arithmetic: captions per step (the recipes' 128)")
  a = p.parse_args()
  print(f"`python {' '.join(sys.argv)}`\n")
  print(f"machine: {machine()}; jax {jax.__version__}, {jax.devices()[0].device_kind} x {len(jax.devices())}; "
        f"{datetime.date.today().isoformat()}")
  layouts = bytes_table(a)
  pickapic_table(a, layouts)
  if not a.no_steps:
    steps_table(a)
  t5_table(a)


if __name__ == "__main__":
  main()
