"""Encode every preference pair once into an ArrayRecord cache for training.

    python -m mapo_jax.encode --pipeline DIR --data SPEC --out DIR --resolution 1024 [--vae DIR] [--strict]
    python -m mapo_jax.encode --merge PART_DIR PART_DIR ... --out DIR [--copy_shards]
    python -m mapo_jax.encode --verify --out DIR [--quick]

--data is a Pick-a-Pic-style parquet file or folder, Arrow files or a `datasets.save_to_disk`
folder (add ?split=NAME for a saved DatasetDict), a JSONL of {"prompt", "chosen", "rejected"},
an HPDv2-style ranked .json (?best_worst or --best_worst keeps one pair per prompt), a folder of
w/NAME.png, l/NAME.png and NAME.txt, or tfds:NAME[:SPLIT] (see docs/data.md and
mapo_jax/data/sources.py). Each pair stores the VAE posterior moments
of winner and loser ([mean, logvar] on the channel axis, unscaled: the train step samples and
scales), the prompt embeddings, the pooled embedding, SDXL time ids and the RPO embedding.
--text ids stores each text tower's token ids instead of the prompt and pooled embeddings (a few KiB a pair
against FLUX.1's 4 MiB of T5 states), and the train step encodes them with the frozen towers; --text auto (the
default) takes ids for the families that encode in the step (FLUX, SD3: their TEXT_IN_STEP) and embeddings for
the others and for unpaired samples (docs/data.md, "Text conditioning at scale").
--vae encodes the images with another VAE folder than the pipeline's vae/ (e.g. the fp16-safe
madebyollin/sdxl-vae-fp16-fix of the official SDXL recipes); the manifest records it and the trainer
refuses the cache unless its config.vae names the same folder.
Run the same command on every host of a multi-host job (with --distributed): each encodes its
share of the shards on its local devices; the last to finish writes manifest.json. Re-running
skips finished shards whose files still match their records (--resume_check full, the default: size,
record count, every record read and its CRC-32; size: size and record count only) and re-encodes the
others, e.g. a shard truncated by a bad copy. Bad rows are skipped and counted (logged with file and
row) unless --strict. Out of disk space (checked before each shard against the largest one written so
far, and caught where the writer writes), it stops with one line naming the path and the free space:
the shards it finished are valid, and a re-run after freeing space encodes only the missing ones.

--verify checks a cache: every shard's size and record count against the manifest, and every record
read, decoded and its CRC-32 compared (--quick: sizes and record counts only, a stat and a footer read
per shard). It lists bad shards and exits 1 if there is any (or if shards are not encoded yet), else 0.

--merge joins caches encoded separately (same pipeline and settings) under one manifest in --out,
which refers to the parts' shard files (or, with --copy_shards, hard-links or copies them).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from flax import nnx

from mapo_jax import cli
from mapo_jax.data.cache import (PAIRS, PROMPT_EMBED_KEYS, TEXT_IDS_PREFIX, EncodeFn, EncodeSettings, OutOfDiskError,
                                 merge_caches, record_kind, verify_cache, write_cache)
from mapo_jax.data.sources import open_source
from mapo_jax.training.objectives import RPO_EMBEDDINGS
from mapo_jax.pipelines import family, load_pipeline, text_options



TEXT_MODES = ("auto", "ids", "embeddings")


def text_mode(pipeline_family, text: str, source=None) -> str:
  """"ids" or "embeddings" for `--text`: auto is ids where the family encodes prompts in the train step
  (TEXT_IN_STEP) and the source holds pairs (unpaired samples keep their embeddings), else embeddings. ids for a
  family that cannot encode in the step is a ValueError."""
  if text not in TEXT_MODES:
    raise ValueError(f"text={text!r}; expected one of {TEXT_MODES}")
  in_step = getattr(pipeline_family, "TEXT_IN_STEP", False)
  pairs = source is None or record_kind(source) is PAIRS
  if text == "auto":
    return "ids" if in_step and pairs else "embeddings"
  if text == "ids" and not (in_step and pairs):
    what = ("unpaired samples (KTO) are cached with their embeddings" if in_step else
            f"{pipeline_family.__name__.rsplit('.', 1)[-1]} pipelines do not encode prompts in the train step")
    raise ValueError(f"--text ids: {what}; use --text embeddings")
  return text


def make_encoder(pipe, *, rpo_embedding: str = "pooled", text: str = "embeddings") -> EncodeFn:
  """VAE moments of both images and prompt embeddings, with the images split over local devices. With text="ids"
  the prompts' token ids per text tower (TEXT_IDS_PREFIX + tower name, `pipe.tokenize`) take the embeddings'
  place, and only rpo_emb is computed by the towers (`pipe.step_text`'s encode, of which XLA keeps only what
  rpo_emb reads: CLIP alone for the pooled embedding)."""
  if rpo_embedding not in RPO_EMBEDDINGS:
    raise ValueError(f"rpo_embedding={rpo_embedding!r}; expected one of {RPO_EMBEDDINGS}")
  if text not in ("ids", "embeddings"):
    raise ValueError(f"text={text!r}; expected 'ids' or 'embeddings'")
  rpo_of = lambda t: t["pooled_prompt_embeds"] if rpo_embedding == "pooled" else t["prompt_embeds"].mean(axis=1)
  if text == "ids":
    if not hasattr(pipe, "step_text"):
      raise ValueError(f"{type(pipe).__module__}: this family does not encode prompts in the train step; use text "
                       "'embeddings'")
    towers, encode_ids = pipe.step_text()
    tower_graphdef, tower_state = nnx.split(towers)
    rpo_from_ids = jax.jit(lambda state, ids: rpo_of(encode_ids(nnx.merge(tower_graphdef, state), ids)))
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  graphdef, state = nnx.split(pipe.vae)
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.P()))

  @jax.jit
  def moments(state, x):
    mean, logvar = nnx.merge(graphdef, state).encode(x)
    return jnp.concatenate([mean, logvar], axis=-1).astype(jnp.float32)

  def encode(pixels_w, pixels_l, captions):
    # pixels_l None: unpaired samples, the winner branch only (no moments_l).
    b = len(captions)
    pad = [(0, -b % len(devices))] + [(0, 0)] * 3  # equal shards of winners and of losers
    x = np.concatenate([np.pad(p, pad) for p in (pixels_w, pixels_l) if p is not None])
    m = moments(state, jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data"))))
    if text == "ids":
      ids = pipe.tokenize(list(captions))
      conditioning, rpo = {TEXT_IDS_PREFIX + k: v for k, v in ids.items()}, rpo_from_ids(tower_state, ids)
    else:
      embeds = pipe.encode_prompts(list(captions))
      conditioning, rpo = {k: embeds[k] for k in PROMPT_EMBED_KEYS}, rpo_of(embeds)
    out = {"moments_w": m[:b], **conditioning, "rpo_emb": rpo.astype(jnp.float32)}
    if pixels_l is not None:
      out["moments_l"] = m[len(x) // 2:len(x) // 2 + b]
    return out

  return encode


def parse_flags(argv: list[str]) -> argparse.Namespace:
  # argparse rather than absl's global flags, so importing make_encoder elsewhere defines nothing.
  p = cli.parser(__doc__)
  p.add_argument("--pipeline", help="diffusers-layout pipeline folder (SDXL or SD 1.x/2.x)")
  p.add_argument("--data", help="parquet, Arrow or save_to_disk folder, .jsonl, ranked .json, w/ + l/ folder, "
                 "or tfds:NAME[:SPLIT]; options as PATH?key=value (docs/data.md)")
  p.add_argument("--out", required=True, help="cache folder (shards + manifest.json)")
  p.add_argument("--vae", default="", help="a VAE folder to encode with instead of the pipeline's vae/ "
                 "(recorded in the manifest; train with the same --config.vae)")
  p.add_argument("--resolution", type=int, help="square training resolution in pixels")
  p.add_argument("--best_worst", action="store_true",
                 help="ranked .json only: one pair per prompt, best vs worst image, instead of every pair")
  p.add_argument("--merge", nargs="+", metavar="PART", help="finished caches to join under one manifest in --out "
                 "(needs no --pipeline/--data/--resolution)")
  p.add_argument("--copy_shards", action="store_true",
                 help="with --merge: hard-link (or copy) the parts' shards into --out instead of referring to them")
  p.add_argument("--verify", action="store_true", help="check the cache in --out (needs no --pipeline/--data/"
                 "--resolution): list bad shards, exit 1 if any")
  p.add_argument("--quick", action="store_true", help="with --verify: sizes and record counts only (fast), "
                 "instead of reading every record")
  p.add_argument("--resume_check", default="full", choices=["full", "size"],
                 help="how a re-run checks finished shards before skipping them (a shard that fails is encoded "
                 "again): full reads every record, size checks sizes and record counts")
  p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
  p.add_argument("--batch_size", type=int, default=8, help="pairs per encoder call (padded to the local device count)")
  p.add_argument("--shard_size", type=int, default=1000, help="source rows per shard (unit of resume and host split)")
  p.add_argument("--cache_dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                 help="storage dtype of moments and prompt embeddings")
  p.add_argument("--seed", type=int, default=0, help="seeds each pair's flip (and random crop)")
  p.add_argument("--random_crop", action="store_true", help="random instead of centre crop")
  p.add_argument("--text", default="auto", choices=TEXT_MODES,
                 help="ids: each text tower's token ids, encoded by the train step; embeddings: the prompt embeddings; "
                 "auto: ids for FLUX and SD3 pairs, else embeddings (docs/data.md, 'Text conditioning at scale')")
  p.add_argument("--max_sequence_length", type=int, default=0,
                 help="T5 tokens per prompt for FLUX.1 / SD3 pipelines (the training scripts' --max_sequence_length; "
                 "0: the pipeline's default, 512 FLUX and 256 SD3); train with the same config.max_sequence_length")
  p.add_argument("--rpo_embedding", default="pooled", choices=RPO_EMBEDDINGS,
                 help="pooled: the pooled prompt embedding; mean_tokens: prompt_embeds averaged over tokens")
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  args = cli.parse(p, argv)
  if args.quick and not args.verify:
    p.error("--quick goes with --verify")
  if args.verify:
    extra = [f"--{k}" for k in ("pipeline", "data", "merge") if getattr(args, k) is not None]
    if extra:
      p.error(f"--verify checks the cache in --out; it takes no {', '.join(extra)}")
  elif args.merge is None:
    missing = [f"--{k}" for k in ("pipeline", "data", "resolution") if getattr(args, k) is None]
    if missing:
      p.error(f"the following arguments are required: {', '.join(missing)}")
    # Checked before anything is read or written: a bad size would only fail later, in the trainer.
    try:
      multiple = family(args.pipeline).resolution_multiple(args.pipeline)
    except (FileNotFoundError, ValueError) as e:
      p.error(f"--pipeline {args.pipeline}: {e}")
    if args.resolution <= 0 or args.resolution % multiple:
      p.error(f"--resolution {args.resolution} must be a positive multiple of {multiple} (the VAE's and the "
              f"UNet's downsampling of {args.pipeline})")
    try:
      text_mode(family(args.pipeline), args.text)
    except ValueError as e:
      p.error(str(e))
    try:
      text_options(args.pipeline, args.max_sequence_length)
    except ValueError as e:
      p.error(f"--max_sequence_length {args.max_sequence_length}: {e}")
  elif args.data is not None:
    p.error("--merge joins finished caches; it takes no --data")
  return args


def encode_cache(source, out: str, encode_fn: EncodeFn, settings: EncodeSettings, **kwargs) -> dict | None:
  """`cache.write_cache` as the command runs it (kwargs are write_cache's), logging the outcome; out of disk space
  it exits with the error's one line (status 1) instead of a traceback."""
  try:
    manifest = write_cache(source, out, encode_fn, settings, **kwargs)
  except OutOfDiskError as e:
    sys.exit(f"error: {e}")  # the progress bar has closed: this is the last line
  if manifest is None:
    logging.info("this host's shards are done; the last host to finish writes the manifest")
  else:
    logging.info("wrote %s/manifest.json: %d pairs, %d ties dropped, %d skipped", out,
                 manifest["pairs"], manifest["ties_dropped"], manifest["skipped"])
  return manifest


def verify(cache_dir: str, *, full: bool = True) -> int:
  """Prints what `cache.verify_cache` finds in `cache_dir`, one line per bad or missing shard; returns the exit
  status: 0 if every shard is good and the cache is finished, else 1."""
  how = ("size, record count, every record read and decoded, CRC-32 of the records" if full
         else "size and record count only (--quick: records not read)")
  print(f"verifying {cache_dir}: {how}", flush=True)
  report = verify_cache(cache_dir, full=full)
  for problem in report.bad:
    print(f"BAD {problem.file}: {problem.problem}")
  for path in report.missing:
    print(f"MISSING {path}: not encoded yet")
  for note in report.notes:
    print(f"note: {note}")
  total = len(report.good) + len(report.bad) + len(report.missing)
  summary = [f"{len(report.good)} of {total} shards good"]
  if report.bad:
    summary.append(f"{len(report.bad)} of {total} shards bad")
  if report.missing:
    summary.append(f"{len(report.missing)} not encoded yet (no manifest.json)")
  print("; ".join(summary))
  if report.bad or report.missing:
    print("re-run the encode command that wrote this cache (same flags and --out): it encodes only the missing "
          "shards and those that fail verification")
  return 0 if report.ok else 1


def main(args: argparse.Namespace) -> int:
  if args.verify:
    return verify(args.out, full=not args.quick)
  if args.merge is not None:
    manifest = merge_caches(args.merge, args.out, copy=args.copy_shards)
    logging.info("wrote %s/manifest.json: %d pairs from %d caches", args.out, manifest["pairs"], len(args.merge))
    return 0
  if args.distributed:
    jax.distributed.initialize()
  source = open_source(args.data, **({"best_worst": True} if args.best_worst else {}))
  text = text_mode(family(args.pipeline), args.text, source)
  vae = os.path.abspath(args.vae) if args.vae else ""
  pipe = load_pipeline(args.pipeline, components=family(args.pipeline).FROZEN, vae=vae or None,
                       **text_options(args.pipeline, args.max_sequence_length))
  settings = EncodeSettings(resolution=args.resolution, seed=args.seed, random_crop=args.random_crop,
                            cache_dtype=args.cache_dtype, shard_size=args.shard_size, text=text,
                            max_sequence_length=args.max_sequence_length)
  encode_cache(source, args.out, make_encoder(pipe, rpo_embedding=args.rpo_embedding, text=text), settings,
               pipeline=args.pipeline, vae=vae, batch_size=args.batch_size, strict=args.strict,
               process_index=jax.process_index(), process_count=jax.process_count(), resume_check=args.resume_check)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
