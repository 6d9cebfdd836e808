"""Text conditioning at scale for the FLUX and SD3 families (docs/data.md, "Text conditioning at scale"): the cache
stores each pair's token ids (`python -m mapo_jax.encode --text ids`, those families' default) and the train step
runs the frozen text towers on them (training/train_step.py `encode_text`).

On tiny random FLUX.1-dev-like and SD3.5-like pipeline folders written by diffusers (tests/flow_fixtures.py) and 16
pairs of 4 captions, encoded by the encode CLI's `main`:
1. The cache holds each pair's ids as the pipeline tokenizes its caption, and the step's conditioning equals
   `pipe.encode_prompts` of the captions (<= 1e-5 rel, float32: the same towers in another XLA program).
2. Empty-prompt dropout swaps the empty prompt's ids in for exactly the pairs the step's key draws, which are the pairs
   whose embeddings the per-pair embeddings design swaps for the empty prompt's rows.
3. The trainer (`mapo_jax.train.train`, as `python -m mapo_jax.train` calls it, on 2 devices: the towers sharded)
   trains FLUX from the token ids cache with empty-prompt dropout; its first step equals the step from the per-pair
   embeddings cache (`encode --text embeddings`) with the same draws (loss, gradient norm, the objective's metrics,
   to the float32 bar); a run stopped after step 2 (`--stop-after-step`) and resumed ends bit-identical to the
   uninterrupted run; it trains SD3 from its token ids cache too.
4. A record's bytes are what docs/data.md says: the layout's arithmetic, the tiny caches' records, and the table's
   FLUX.1-dev and SD3.5 numbers at 1024 px.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, rel_l2
from flax import nnx
from flow_fixtures import make_tiny_flux_pipeline, save_sd3_pipeline, sd3_pipeline_transformer
from test_data_helpers import image_bytes

from mapo_jax import encode
from mapo_jax.data import cache
from mapo_jax.data.loader import cached_loader
from mapo_jax.models.presets import TINY_SD35_TRANSFORMER
from mapo_jax.pipelines import empty_prompt_rows, load_pipeline
from mapo_jax.training import train_step

CAPTIONS = ["a cat", "the red dog", "a photo of the blue sky", "a dog on the red cat"]
PAIRS, RESOLUTION = 16, 32  # 16 pairs, each caption 4 times; 32 px: a multiple of 16 (both families)
TOL = 1e-5  # float32: the same towers (or the same step) in two XLA programs
SHORT = 16  # T5 tokens of the `encode --max_sequence_length` cache (the FLUX fixture's default: 512)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Tiny FLUX and SD3 pipeline folders, a JSONL of PAIRS pairs, and their caches encoded by the encode CLI (float32
  storage, so that the embeddings cache holds the towers' numbers): token ids for both families (the default), and
  per-pair embeddings for FLUX."""
  root = tmp_path_factory.mktemp("text_conditioning")
  make_tiny_flux_pipeline(root / "flux", seed=3)
  save_sd3_pipeline(root / "sd3", sd3_pipeline_transformer(TINY_SD35_TRANSFORMER), seed=1)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(PAIRS):
    for side in ("w", "l"):
      (root / f"{side}{i}.png").write_bytes(image_bytes(rng.integers(0, 256, (40, 36, 3))))
    lines.append(json.dumps({"prompt": CAPTIONS[i % len(CAPTIONS)], "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
  (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  for name, family, text, tokens in (("flux_ids", "flux", "auto", 0), ("flux_embeddings", "flux", "embeddings", 0),
                                     ("sd3_ids", "sd3", "auto", 0), (f"flux_ids_{SHORT}", "flux", "auto", SHORT)):
    encode.main(encode.parse_flags(["encode", "--pipeline", str(root / family), "--data", str(root / "pairs.jsonl"),
                                    "--out", str(root / name), "--resolution", str(RESOLUTION), "--cache_dtype",
                                    "float32", "--text", text, "--batch_size", "8",
                                    "--max_sequence_length", str(tokens)]))
  return root


@pytest.fixture(scope="module")
def pipes(world):
  return {name: load_pipeline(world / name) for name in ("flux", "sd3")}


def whole_cache(path) -> dict[str, np.ndarray]:
  """Every pair of a cache in one batch, in the loader's order (seed 0), as the trainer's loader casts it."""
  return next(iter(cached_loader(path, batch_size=PAIRS, seed=0, num_epochs=1, process_index=0, process_count=1)))


def captions_of(batch, pipe) -> list[str]:
  """Each row's caption, found by its token ids (every row must be exactly one caption's)."""
  ids = {cache.TEXT_IDS_PREFIX + k: v for k, v in pipe.tokenize(CAPTIONS).items()}
  found = []
  for i in range(len(batch["rpo_emb"])):
    hits = [c for j, c in enumerate(CAPTIONS) if all(np.array_equal(batch[k][i], v[j]) for k, v in ids.items())]
    assert len(hits) == 1, f"row {i}: {hits}"
    found += hits
  return found


def step_text_encoder(pipe):
  """The pipeline's towers as build.py hands them to the step: (TextEncoder, parameters)."""
  towers, encode_ids = pipe.step_text()
  return train_step.TextEncoder(nnx.graphdef(towers), encode_ids), nnx.to_pure_dict(nnx.state(towers, ...))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_the_cache_holds_token_ids_and_the_step_encodes_them_as_encode_prompts(world, pipes, name):
  pipe = pipes[name]
  manifest = cache.read_manifest(world / f"{name}_ids")
  assert manifest["settings"]["text"] == "ids" and manifest["pairs"] == PAIRS
  want_ids = {cache.TEXT_IDS_PREFIX + k: v for k, v in pipe.tokenize([""]).items()}
  record = manifest["record"]
  assert {k: v for k, v in record.items() if cache.is_text_ids(k)} == {
      k: {"shape": [v.shape[1]], "dtype": "int32"} for k, v in want_ids.items()}
  assert not set(cache.PROMPT_EMBED_KEYS) & set(record)
  batch = whole_cache(world / f"{name}_ids")
  captions = captions_of(batch, pipe)
  assert sorted(captions) == sorted(CAPTIONS * (PAIRS // len(CAPTIONS)))
  assert all(batch[k].dtype == np.int32 for k in want_ids)
  want = jax.device_get(pipe.encode_prompts(captions))
  text, params = step_text_encoder(pipe)
  got = jax.jit(lambda p, b: train_step.encode_text(text, p, b))(params, {k: v for k, v in batch.items()})
  assert not any(cache.is_text_ids(k) for k in got) and got["moments_w"] is not None
  for key in cache.PROMPT_EMBED_KEYS:
    assert got[key].dtype == jnp.float32 and got[key].shape == want[key].shape
    assert rel_l2(got[key], want[key]) <= TOL, key
  assert rel_l2(batch["rpo_emb"], want["pooled_prompt_embeds"]) <= TOL  # encode --rpo_embedding pooled


def test_empty_prompt_dropout_swaps_the_drawn_pairs_ids_for_the_empty_prompts(world, pipes):
  """The ids design and the per-pair embeddings design drop the same pairs (one draw from the step's key), and a
  dropped pair's conditioning is the empty prompt's encoding."""
  pipe = pipes["flux"]
  ids_batch, embeds_batch = whole_cache(world / "flux_ids"), whole_cache(world / "flux_embeddings")
  np.testing.assert_array_equal(ids_batch["moments_w"], embeds_batch["moments_w"])  # the same pairs, same order
  empty_ids = {cache.TEXT_IDS_PREFIX + k: v[0] for k, v in pipe.tokenize([""]).items()}
  cfg = train_step.StepConfig(objective="mapo", hparams={}, latents=pipe.latents, empty_prompt_prob=0.5)
  key = jax.random.fold_in(jax.random.key(7), 3)  # a step's key
  dropped_ids, stats = train_step.augment_batch(key, ids_batch, empty_ids, cfg)
  dropped_embeds, _ = train_step.augment_batch(key, embeds_batch, empty_prompt_rows(pipe), cfg)
  # The pairs drawn: bernoulli(p) per pair from the augmentation's stream of the step's key.
  k_empty, _ = jax.random.split(jax.random.fold_in(key, train_step.AUGMENT_STREAM))
  drawn = np.asarray(jax.random.bernoulli(k_empty, 0.5, (PAIRS,)))
  assert 0 < drawn.sum() < PAIRS and float(stats["empty_prompt_fraction"]) == drawn.mean()
  for k, row in empty_ids.items():
    is_empty = (np.asarray(dropped_ids[k]) == row).all(axis=1)
    np.testing.assert_array_equal(is_empty, drawn)
    np.testing.assert_array_equal(np.asarray(dropped_ids[k])[~drawn], ids_batch[k][~drawn])
  text, params = step_text_encoder(pipe)
  encoded = jax.jit(lambda p, b: train_step.encode_text(text, p, b))(params, dropped_ids)
  empty = jax.device_get(pipe.encode_prompts([""]))
  for key_name in cache.PROMPT_EMBED_KEYS:
    got = np.asarray(encoded[key_name])
    assert rel_l2(got[drawn], np.broadcast_to(empty[key_name], got[drawn].shape)) <= TOL
    assert rel_l2(got, dropped_embeds[key_name]) <= TOL  # what the embeddings design trains on


def test_encode_max_sequence_length_is_the_cache_s_t5_length_and_the_trainer_holds_to_it(world):
  """`encode --max_sequence_length` (the training scripts' flag) gives T5 ids of that length, as the pipeline loaded
  with it tokenizes; the manifest records it; a trainer set to another length is refused naming the key, and so is
  a length for a family without T5."""
  from mapo_jax import config as config_lib
  from mapo_jax.data.cache import read_manifest
  from mapo_jax.pipelines import text_options
  from mapo_jax.run.guards import check_cache_text_tokens
  short = load_pipeline(world / "flux", ("tokenizer", "tokenizer_2"), **text_options(world / "flux", SHORT))
  batch = whole_cache(world / f"flux_ids_{SHORT}")
  ids = {cache.TEXT_IDS_PREFIX + k: v for k, v in short.tokenize(CAPTIONS).items()}
  assert batch[cache.TEXT_IDS_PREFIX + "text_encoder_2"].shape == (PAIRS, SHORT)
  for i, caption in enumerate(captions_of(batch, short)):  # every row is its caption's ids at 16 T5 tokens
    for k, v in ids.items():
      np.testing.assert_array_equal(batch[k][i], v[CAPTIONS.index(caption)])
  manifest = read_manifest(world / f"flux_ids_{SHORT}")
  assert manifest["settings"]["max_sequence_length"] == SHORT
  assert "max_sequence_length" not in read_manifest(world / "flux_ids")["settings"]  # old caches keep their identity
  check_cache_text_tokens(manifest, "c", SHORT)
  check_cache_text_tokens(read_manifest(world / "flux_ids"), "c", 0)
  for cached, configured in ((manifest, 0), (manifest, 512), (read_manifest(world / "flux_ids"), SHORT)):
    with pytest.raises(config_lib.ConfigError, match="^config.max_sequence_length: "):
      check_cache_text_tokens(cached, "c", configured)
  assert text_options(world / "flux", 0) == {} and text_options(world / "sd3", 77) == {"max_sequence_length": 77}


def test_a_t5_length_for_a_pipeline_without_t5_is_refused_naming_the_key(demo_assets, capsys):
  from mapo_jax import config as config_lib
  from mapo_jax import aot, train  # both import in one process (neither defines its flags on import)
  del aot
  config = config_lib.base_config()
  config.pipeline, config.max_sequence_length = str(demo_assets / "pipeline"), 256
  with pytest.raises(config_lib.ConfigError, match="^config.max_sequence_length: 256: .* StableDiffusionXLPipeline "
                                                    "folder, whose prompts have no T5 tokens"):
    train.load_models(config, mesh=None)
  with pytest.raises(SystemExit):
    encode.parse_flags(["encode", "--pipeline", config.pipeline, "--data", "pairs.jsonl", "--out", "cache",
                        "--resolution", "32", "--max_sequence_length", "256"])
  assert "--max_sequence_length 256: " in capsys.readouterr().err


# --- The trainer, end to end (one subprocess: the trainer's own flags, one start-up for every run) ---------------

RUNS = """
import json, sys
from pathlib import Path
from absl import flags
from mapo_jax import train
from mapo_jax.configs import flux_mapo_lora, sd35_mapo
flags.FLAGS.mark_as_parsed()
world, out = Path(sys.argv[1]), Path(sys.argv[2])

def config(recipe, family, steps, text="ids"):
  config = recipe.get_config()
  config.pipeline, config.data.cache_dir = str(world / family), str(world / f"{family}_{text}")
  config.resolution, config.global_batch_size, config.accum_steps, config.steps = 32, 4, 1, steps
  config.sample_every, config.judge, config.log_every, config.checkpoint_every = 0, "", 1, 2
  config.data.empty_prompt_prob, config.dtype, config.remat, config.compile_cache = 0.5, "float32", "none", ""
  return config

train.train(config(flux_mapo_lora, "flux", 4), out / "straight")
train.train(config(flux_mapo_lora, "flux", 4), out / "resumed", stop_after=2)
train.train(config(flux_mapo_lora, "flux", 4), out / "resumed")
train.train(config(flux_mapo_lora, "flux", 4, "embeddings"), out / "embeddings")
train.train(config(sd35_mapo, "sd3", 2), out / "sd3")
short = config(flux_mapo_lora, "flux", 1, "ids_16")  # T5 at 16 tokens: the cache's and the towers' in the step
short.max_sequence_length = 16
train.train(short, out / "short")
"""


@pytest.fixture(scope="module")
def runs(world, trainer_env, tmp_path_factory):
  out = tmp_path_factory.mktemp("runs")
  env = trainer_env(devices=2, fast_compile=True)  # 2 devices: the towers sharded over fsdp as on a slice
  proc = subprocess.run([sys.executable, "-c", RUNS, str(world), str(out)], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return out


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_the_trainer_trains_from_token_ids_and_resumes_bit_identical(runs):
  from safetensors.numpy import load_file
  straight, resumed = runs / "straight", runs / "resumed"
  want, got = metrics(straight), metrics(resumed)
  assert [m["step"] for m in want] == [1, 2, 3, 4] and [m["step"] for m in got] == [1, 2, 3, 4]
  assert all(np.isfinite(m["loss"]) for m in want) and sum(m["empty_prompt_fraction"] for m in want) > 0
  for a, b in zip(want, got):
    for key in ("loss", "grad_norm", "empty_prompt_fraction"):
      assert a[key] == b[key], (a["step"], key)
  lora = "export/pytorch_lora_weights.safetensors"
  want_w, got_w = load_file(straight / lora), load_file(resumed / lora)
  assert want_w.keys() == got_w.keys() and want_w
  for k in want_w:
    np.testing.assert_array_equal(got_w[k], want_w[k], err_msg=k)


def test_a_flux_step_from_token_ids_equals_the_step_from_per_pair_embeddings(runs):
  """The same pairs in the same order, the same draws (MaPO, empty prompts at 0.5, FLUX.1-dev's guidance): step 1's
  metrics agree to the float32 bar; the conditioning differs only by the towers' float32 rounding in two programs."""
  ids, embeds = metrics(runs / "straight")[0], metrics(runs / "embeddings")[0]
  assert ids["step"] == embeds["step"] == 1 and 0 < ids["empty_prompt_fraction"] < 1
  assert ids["empty_prompt_fraction"] == embeds["empty_prompt_fraction"]
  for key in ("loss", "grad_norm"):
    assert abs(ids[key] - embeds[key]) <= TOL * abs(embeds[key]), (key, ids[key], embeds[key])
  timing = {"lr", "pairs_per_s", "host_rss_mib", "step"}
  assert set(ids) == set(embeds)
  for key in set(ids) - timing:
    assert np.isclose(ids[key], embeds[key], rtol=TOL, atol=1e-7), (key, ids[key], embeds[key])


def test_the_trainer_trains_flux_from_a_cache_at_another_t5_length(runs):
  logged = metrics(runs / "short")
  assert SHORT == 16 and [m["step"] for m in logged] == [1] and np.isfinite(logged[0]["loss"])


def test_the_trainer_trains_sd3_from_token_ids(runs):
  logged = metrics(runs / "sd3")
  assert [m["step"] for m in logged] == [1, 2] and all(np.isfinite(m["loss"]) for m in logged)
  assert (runs / "sd3" / "export" / "transformer").is_dir()


# --- Bytes per pair --------------------------------------------------------------------------------------------

def record_bytes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> int:
  return sum(int(np.prod(s)) * np.dtype(dtypes[k]).itemsize for k, s in shapes.items())


def full_size_layout(family: str, text: str) -> cache.RecordLayout:
  """The record layout `encode` writes at 1024 px with fp16 storage and the pooled RPO embedding: FLUX.1-dev (T5 512
  tokens x 4096, CLIP-L pooled 768) or SD3.5 (77 CLIP + 256 T5 tokens x 4096, pooled 768 + 1280); 16 latent channels
  (mean and logvar), 128 x 128."""
  tokens = {"flux": {"text_encoder": 77, "text_encoder_2": 512},
            "sd3": {"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256}}[family]
  pooled = {"flux": 768, "sd3": 2048}[family]
  one = lambda *shape, dtype=np.float32: np.zeros((1, *shape), dtype)
  batch = {"moments_w": one(128, 128, 32), "moments_l": one(128, 128, 32), "time_ids": one(6), "rpo_emb": one(pooled)}
  if text == "ids":
    batch.update({cache.TEXT_IDS_PREFIX + k: one(n, dtype=np.int32) for k, n in tokens.items()})
  else:
    # FLUX: T5's 512 rows (CLIP gives only the pooled); SD3: 77 rows of CLIP-L and CLIP-G side by side on the
    # width axis (one 77, not two), then T5's 256 rows: 333 in all, as sd3.abstract_batch shapes them.
    batch.update(prompt_embeds=one(sum(tokens.values()) - 77, 4096), pooled_prompt_embeds=one(pooled))
  return cache.RecordLayout.for_batch(batch, "float16")


def docs_table() -> dict[tuple[str, str], int]:
  """docs/data.md's "bytes per pair" rows: (family, design) -> bytes."""
  text = (Path(REPO) / "docs/data.md").read_text()
  rows = re.findall(r"^\| (FLUX\.1-dev|SD3\.5) \| (per-pair embeddings|token ids) \| ([\d,]+) \|", text, re.M)
  assert len(rows) == 4, rows
  return {({"FLUX.1-dev": "flux", "SD3.5": "sd3"}[f], {"token ids": "ids"}.get(d, "embeddings")): int(n.replace(",", ""))
          for f, d, n in rows}


def test_bytes_per_pair_are_what_the_docs_say(world):
  table = docs_table()
  for (family, text), documented in table.items():
    layout = full_size_layout(family, text)
    assert record_bytes(layout.shapes, layout.dtypes) == documented, (family, text)
    assert len(layout.serialize({k: np.zeros((1, *s), layout.dtypes[k]) for k, s in layout.shapes.items()})[0]) \
        == documented
  # The tiny caches: a record is its layout's bytes, and the ids take the embeddings' place in it.
  for name in ("flux_ids", "flux_embeddings", "sd3_ids"):
    manifest = cache.read_manifest(world / name)
    layout = cache.RecordLayout.from_json(manifest["record"])
    records = cache.open_records(world / name)
    assert all(len(records._source[i]) == record_bytes(layout.shapes, layout.dtypes) for i in range(len(records)))
  ids = cache.RecordLayout.from_json(cache.read_manifest(world / "flux_ids")["record"])
  embeds = cache.RecordLayout.from_json(cache.read_manifest(world / "flux_embeddings")["record"])
  text_ids = sum(4 * s[0] for k, s in ids.shapes.items() if cache.is_text_ids(k))
  assert text_ids == 4 * (77 + 512)
  assert record_bytes(embeds.shapes, embeds.dtypes) - record_bytes(ids.shapes, ids.dtypes) == \
      4 * (512 * 32 + 16) - text_ids  # float32 storage here: T5 states 512 x 32, CLIP pooled 16
