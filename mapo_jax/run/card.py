"""Model cards: the README.md (YAML metadata, then markdown) written beside exported weights, so an export
folder says how it was made and can be uploaded to the Hugging Face Hub as it is.

Facts this relies on:
- The format: `huggingface_hub.ModelCard` / `ModelCardData` (a `---` YAML block, then the body). The metadata
  fields are the ones diffusers' training scripts set (`diffusers.utils.hub_utils.load_or_create_model_card`
  with `from_training=True`: `license`, `library_name="diffusers"`, `base_model`; `populate_model_card` adds
  tags; e.g. diffusers `examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py` `save_model_card`
  with tags "stable-diffusion-xl", "text-to-image", "diffusers", "lora"), plus `pipeline_tag: text-to-image`.
  `license_name` / `license_link` are the Hub's companions of `license: other`.
- Hub ids: `owner/name`, neither "--" nor ".." inside (`huggingface_hub.utils.validate_repo_id`); the Hub cache
  keeps a model's files in `models--owner--name/snapshots/<revision>/` (`huggingface_hub.file_download`
  `repo_folder_name`). diffusers' own `save_pretrained` drops `_name_or_path` from model_index.json
  (`pipeline_utils.py`), so only folders written otherwise carry it.
- The family tag: the base's model_index.json `_class_name` without "Pipeline", in lower kebab case
  (StableDiffusionXLPipeline -> stable-diffusion-xl, StableDiffusionPipeline -> stable-diffusion: the tags
  diffusers' scripts use).
- LoRA files (docs/lora.md, mapo_jax/training/lora.py): the diffusers file stores lora_B already multiplied by
  alpha / rank and no alpha metadata, so diffusers' default (alpha = rank) at adapter weight 1 is the trained
  model; the kohya file stores `.alpha` per module (scale alpha / rank), so strength 1 is the trained model.
  Its `lora_unet_<diffusers module name, "." -> "_">` keys are among those ComfyUI maps onto its UNet
  (comfy/lora.py `model_lora_keys_unet`, through `comfy.utils.unet_to_diffusers`); its LoraLoaderModelOnly node
  applies a file to the model alone.

What a card states comes from the run's files, nothing else: the base folder (model_index.json, its own card),
WORKDIR's recorded config (`workdir.previous_config`), the cache manifest (`data.cache.read_manifest`),
metrics.jsonl, judge/judge.jsonl, samples/ and the exported files themselves. A fact that cannot be read is
left out. `write_card` writes an export folder's card; `put_section` adds or replaces one marked section (the
evaluation table of `mapo_jax.evaluate --update-card`) in any folder's card, creating a minimal one if needed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import yaml
from absl import logging
from huggingface_hub import ModelCard, ModelCardData

from mapo_jax import pipelines
from mapo_jax.data.cache import read_manifest
from mapo_jax.run.workdir import previous_config
from mapo_jax.training import lora, objectives

CARD = "README.md"
LIBRARY = "diffusers"
PIPELINE_TAG = "text-to-image"
TOOL_TAG = "mapo-jax"
LICENSE_KEYS = ("license", "license_name", "license_link")
# owner/name with the Hub's characters; "--" and ".." are refused by the Hub, and matter for the cache layout.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_HUB_CACHE_FOLDER = re.compile(r"models--([A-Za-z0-9][A-Za-z0-9_.-]*)")


# --- the base pipeline ---------------------------------------------------------------------------------

def _valid_hub_id(text: Any) -> bool:
  return isinstance(text, str) and bool(_HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def read_card(folder: str | os.PathLike) -> ModelCard | None:
  """`folder`'s own card (README.md), or None where it has none or it does not parse. Only an existing file
  is read: `ModelCard.load` of anything else would ask the Hub."""
  path = Path(folder) / CARD
  if not path.is_file():
    return None
  try:
    return ModelCard.load(path, ignore_metadata_errors=True)
  except (ValueError, yaml.YAMLError) as e:
    logging.warning("%s: its model card does not parse (%s); read as a card without metadata", path, e)
    return None


def _model_index(folder: str | os.PathLike) -> dict[str, Any]:
  path = Path(folder) / "model_index.json"
  try:
    return json.loads(path.read_text()) if path.is_file() else {}
  except ValueError:
    return {}


def hub_id(base: str | os.PathLike) -> str | None:
  """The Hub id the folder `base` names for itself, if any: its model_index.json `_name_or_path`, its own
  card's `model_name` (huggingface_hub's field for the model's name), both only when shaped as a Hub id and
  not an existing local path; or the Hub cache's `models--owner--name/snapshots/<revision>` around it."""
  for name in (_model_index(base).get("_name_or_path"), (card := read_card(base)) and card.data.get("model_name")):
    if _valid_hub_id(name) and not Path(name).exists():
      return name
  parts = Path(os.path.abspath(base)).parts
  if len(parts) >= 3 and parts[-2] == "snapshots" and (m := _HUB_CACHE_FOLDER.fullmatch(parts[-3])):
    name = "/".join(m.group(1).split("--"))
    if _valid_hub_id(name):
      return name
  return None


def base_model(base: str | os.PathLike) -> str:
  """`base_model` of a card: the base's Hub id (`hub_id`), else its absolute local path."""
  return hub_id(base) or os.path.abspath(base)


def base_license(base: str | os.PathLike) -> dict[str, str]:
  """license (and license_name / license_link) of the base folder's own card; {} where it states none."""
  card = read_card(base)
  return {k: card.data.get(k) for k in LICENSE_KEYS if card is not None and card.data.get(k)}


def family_tag(class_name: str) -> str:
  """model_index.json `_class_name` -> the Hub tag of its family (StableDiffusionXLPipeline -> stable-diffusion-xl)."""
  name = class_name.removesuffix("Pipeline")
  return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])", "-", name).lower()


def metadata(base: str | os.PathLike | None, folder: str | os.PathLike, *, objective: str | None = None,
             adapter: bool = False) -> ModelCardData:
  """The card's metadata: base_model and license from `base` (none without a base), the family from the
  model_index.json of `base` (else of `folder`), the objective's tag, "lora" for an adapter file."""
  index = _model_index(base) if base is not None else {}
  index = index or _model_index(folder)
  tags = [PIPELINE_TAG, LIBRARY]
  if objective is not None:
    tags += [TOOL_TAG, objective]
  if adapter:
    tags.append("lora")
  if index.get("_class_name"):
    tags.append(family_tag(index["_class_name"]))
  extra = base_license(base) if base is not None else {}
  return ModelCardData(base_model=base_model(base) if base is not None else None, library_name=LIBRARY,
                       pipeline_tag=PIPELINE_TAG, tags=list(dict.fromkeys(tags)), **extra)


def render(data: ModelCardData, body: str) -> str:
  return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


# --- the run -------------------------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict[str, Any]]:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _at_or_before(records: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
  return [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]


def _number(v: Any) -> str:
  if v is None:
    return "non-finite"  # metrics.jsonl writes NaN / inf as null
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return f"`{v}`"
  return str(v) if isinstance(v, int) else format(v, ".6g")


def _value(v: Any) -> str:
  """A config value in prose: numbers as numbers, lists joined, anything else as code."""
  if isinstance(v, (list, tuple)):
    return "(" + ", ".join(_value(x) for x in v) + ")"
  if v == "":
    return '`""`'
  return _number(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else f"`{v}`"


def _settings(block: dict[str, Any]) -> str:
  return ", ".join(f"{k} {_value(v)}" for k, v in block.items())


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _sample_image(workdir: Path, step: int, judged: list[dict[str, Any]]) -> tuple[Path, str] | None:
  """The newest sample grid at or before `step` (samples/step_N.png), else the judge's before/after sheet
  (judge/before_after.png: the first and last of all `judged` records) when the last judged step is `step`;
  with a caption."""
  grids = sorted((int(m.group(1)), p) for p in (workdir / "samples").glob("step_*.png")
                 if (m := re.fullmatch(r"step_(\d+)\.png", p.name)) and int(m.group(1)) <= step)
  if grids:
    at, path = grids[-1]
    return path, f"sample grid at step {at} (the run's sample_prompts, fixed seeds)"
  sheet = workdir / "judge" / "before_after.png"
  if sheet.is_file() and judged and judged[-1]["step"] == step:
    return sheet, f"judged samples on the same seeds: left step {judged[0]['step']}, right step {step}"
  return None


def _training_rows(config: dict[str, Any], step: int, ema: bool) -> list[tuple[str, str]]:
  name = config.get("objective")
  rows = []
  if name:
    block = config.get(name) or {}
    rows.append(("objective", f"`{name}`" + (f" ({_settings(block)})" if block else "")))
  if config.get("objective_safeguard"):
    guard = config["objective_safeguard"]
    rows.append(("safeguard", f"`{guard}` ({_settings(config.get(guard) or {})})"))
  if config.get("min_snr_gamma"):
    rows.append(("min-SNR weighting", f"gamma {_number(config['min_snr_gamma'])}"))
  adapters = config.get("lora") or {}
  if adapters.get("rank"):
    rows.append(("fine-tune", f"LoRA: {_settings(adapters)}"))
  elif "lora" in config:
    rows.append(("fine-tune", "full (every UNet parameter trains)"))
  if ema:
    rows.append(("exported parameters", f"exponential moving average, decay {_number(config.get('ema_decay'))}"))
  total = config.get("steps")
  rows.append(("steps", f"{step}" + (f" of {total}" if isinstance(total, int) else "") + " (the exported checkpoint)"))
  if "global_batch_size" in config:
    unit = "samples" if _unpaired(name) else "pairs"
    accum = config.get("accum_steps")
    rows.append(("global batch", f"{config['global_batch_size']} {unit} per optimizer step"
                 + (f" ({accum} accumulation steps)" if accum else "")))
  if config.get("optim"):
    rows.append(("optimizer", _settings(config["optim"])))
  for key in ("resolution", "seed"):
    if key in config:
      rows.append((key, _number(config[key])))
  dtypes = [f"{k} `{config[k]}`" for k in ("dtype", "param_dtype") if k in config]
  if dtypes:
    rows.append(("precision", ", ".join(dtypes)))
  return rows


def _unpaired(objective: str | None) -> bool:
  return objective in objectives.OBJECTIVES and objectives.OBJECTIVES[objective].unpaired


def _data_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
  data = config.get("data") or {}
  rows = []
  if data.get("mode") == "cached" and data.get("cache_dir"):
    rows.append(("cache", f"`{data['cache_dir']}`"))
    try:
      manifest = read_manifest(data["cache_dir"])
    except (OSError, ValueError):  # gone or unreadable: the path alone is known
      manifest = None
    if manifest:
      unit = "labelled samples" if _unpaired(config.get("objective")) else "pairs"
      if "source" in manifest:
        rows.append(("source", f"`{manifest['source']}`"))
      counts = [f"{manifest[k]} {unit}" if k == "pairs" else f"{manifest[k]} {k.replace('_', ' ')}"
                for k in ("pairs", "source_rows", "ties_dropped", "skipped") if k in manifest]
      if counts:
        rows.append(("records", ", ".join(counts)))
      if manifest.get("settings"):
        rows.append(("encoding", _settings(manifest["settings"])))
      if "vae" in manifest:
        rows.append(("encoded by", f"`{manifest['vae']}`" if manifest["vae"] else "the pipeline's own VAE"))
  elif data.get("source"):
    rows.append(("source", f"`{data['source']}` (encoded on the fly)"))
  # random_crop of a cached run is the manifest's (encoding) setting, shown above.
  options = {k: data[k] for k in ("empty_prompt_prob", "label_noise_prob", "time_ids", "random_crop", "eval_pairs")
             if k in data and not (k == "random_crop" and data.get("mode") == "cached")}
  if options:
    rows.append(("data options", _settings(options)))
  return rows


# --- the export folder ---------------------------------------------------------------------------------

def _safetensors_dtypes(path: Path) -> list[str]:
  """The tensor dtypes a safetensors file's header records (8-byte little-endian length, then JSON)."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  return sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})


def _what(folder: Path) -> tuple[str, str | None]:
  """What an export folder holds, read from its files: ("pipeline" | "denoiser" | "lora", the LoRA file)."""
  for name in (lora.DIFFUSERS_FILE, lora.KOHYA_FILE):
    if (folder / name).is_file():
      return "lora", name
  return ("pipeline" if (folder / "model_index.json").is_file() else "denoiser"), None


def _usage(kind: str, lora_file: str | None, base: Path, location: str, base_id: str, config: dict[str, Any],
           weights: str | None) -> list[str]:
  index = _model_index(base)
  pipeline_class = index.get("_class_name") or "DiffusionPipeline"
  try:
    denoiser = pipelines.family(base).DENOISER
  except (OSError, ValueError):
    denoiser = None
  denoiser_class = (index.get(denoiser) or [None, None])[1] if denoiser else None
  prompts = list(config.get("judge_prompts") or []) if config.get("judge") else []
  prompts = prompts or list(config.get("sample_prompts") or [])
  prompt = json.dumps(prompts[0]) if prompts else "PROMPT"
  load = "dtype=torch.float16).to(\"cuda\")  # on a CPU: dtype=torch.float32, no .to(\"cuda\")"
  lines = ["## Use", ""]
  if kind == "lora":
    scale = ""
    adapters = config.get("lora") or {}
    if adapters.get("rank") and adapters.get("alpha") is not None:
      scale = f" (rank {adapters['rank']}, alpha {_number(adapters['alpha'])}: scale alpha / rank = "
      scale += f"{_number(adapters['alpha'] / adapters['rank'])})"
    if lora_file == lora.DIFFUSERS_FILE:
      lines += [(f"`{lora_file}` holds LoRA adapters of the UNet in the diffusers / PEFT format{scale}. Their "
                 "alpha / rank is already folded into `lora_B` and the file carries no alpha metadata, so diffusers' "
                 "default adapter weight 1.0 reproduces the trained model:"), ""]
    else:
      lines += [(f"`{lora_file}` holds LoRA adapters of the UNet in the kohya format (`lora_unet_*` keys with "
                 f"`.lora_down` / `.lora_up` and a per-module `.alpha`){scale}, so a strength of 1.0 reproduces the "
                 "trained model. The module names are diffusers' (`lora_unet_down_blocks_1_..._attn1_to_q`), not the "
                 "original SGM block names; ComfyUI maps both. ComfyUI: copy it to `ComfyUI/models/loras/` and apply "
                 "it to the base checkpoint with a LoRA loader node (LoraLoaderModelOnly: the file adapts the UNet "
                 "only) at strength_model 1.0. diffusers reads it too:"), ""]
    lines += ["```python", "import torch", f"from diffusers import {pipeline_class}", "",
              f"pipe = {pipeline_class}.from_pretrained({json.dumps(base_id)}, {load}",
              f"pipe.load_lora_weights({json.dumps(location)}, weight_name={json.dumps(lora_file)})",
              f"image = pipe({prompt}).images[0]", "```"]
  elif kind == "denoiser" and denoiser_class:
    lines += [f"This folder is the trained `{denoiser_class}` alone ({denoiser}/ of a pipeline"
              + (f", weights {weights}" if weights else "") + "); the base supplies every other component:", "",
              "```python", "import torch", f"from diffusers import {pipeline_class}, {denoiser_class}", "",
              f"{denoiser} = {denoiser_class}.from_pretrained({json.dumps(location)}, dtype=torch.float16)",
              f"pipe = {pipeline_class}.from_pretrained({json.dumps(base_id)}, {denoiser}={denoiser}, {load}",
              f"image = pipe({prompt}).images[0]", "```"]
  elif kind == "pipeline":
    lines += [f"A complete diffusers pipeline (`{pipeline_class}`): the trained {denoiser or 'denoiser'}"
              + (f" (weights {weights})" if weights else "") + " with the base's other components:", "",
              "```python", "import torch", f"from diffusers import {pipeline_class}", "",
              f"pipe = {pipeline_class}.from_pretrained({json.dumps(location)}, {load}",
              f"image = pipe({prompt}).images[0]", "```"]
  else:
    return []
  return lines + [""]


def write_card(folder: str | os.PathLike, *, workdir: str | os.PathLike, base: str | os.PathLike, step: int,
               location: str | os.PathLike | None = None, dtype: str | None = None, fused: bool = False,
               ema: bool = False) -> Path:
  """Writes FOLDER/README.md for the export of checkpoint `step` of the run in `workdir`, trained from the
  pipeline folder `base`, and copies the run's newest sample grid (at or before `step`) beside it.

  `location`: where the folder will live (export writes a temporary folder, then renames it); the usage
  snippet loads from there. `dtype`: the exported denoiser weights' dtype (fp32 / fp16 / bf16) for a pipeline
  or bare-denoiser folder (a LoRA file's dtypes are read from the file). `fused`: LoRA adapters merged into
  the UNet. `ema`: the exported parameters are the moving average. Returns the card's path."""
  folder, workdir, base = Path(folder), Path(workdir), Path(base)
  location = os.path.abspath(location if location is not None else folder)
  recorded = previous_config(workdir)
  config = recorded[1] if recorded else {}
  objective = config.get("objective")
  kind, lora_file = _what(folder)
  data = metadata(base, folder, objective=objective, adapter=kind == "lora")
  base_id = data.base_model
  weights = (f"`{dtype}`" if dtype else None) if kind != "lora" else \
      " / ".join(_safetensors_dtypes(folder / lora_file))

  all_judged = _jsonl(workdir / "judge" / "judge.jsonl")
  judged = _at_or_before(all_judged, step)
  metrics = _at_or_before(_jsonl(workdir / "metrics.jsonl"), step)
  title = f"`{objective}` fine-tune of `{base_id}`" if objective else f"Fine-tune of `{base_id}`"
  made = {"lora": f"LoRA adapters (`{lora_file}`, {weights})", "denoiser": "the trained denoiser alone",
          "pipeline": "a diffusers pipeline"}[kind]
  body = [f"# {title}", "",
          f"Trained with mapo_jax from `{base_id}`; this folder holds {made}"
          + (", the run's LoRA adapters merged into the UNet (W + alpha / rank · A B)" if fused else "")
          + f". The run: `{os.path.abspath(workdir)}`" + (f", its recorded config `{recorded[0].name}`" if recorded else "")
          + f"; the exported checkpoint: step {step}" + (" (the parameters' moving average)" if ema else "") + ".", ""]
  image = _sample_image(workdir, step, all_judged)
  if image:
    name = "samples.png" if image[0].parent.name == "samples" else "judge_before_after.png"
    shutil.copy2(image[0], folder / name)
    body += [f"![{image[1]}]({name})", "", f"*{image[1][0].upper() + image[1][1:]}.*", ""]
  body += _usage(kind, lora_file, base, location, base_id, config, weights)
  if config:
    body += ["## Training", ""] + _table(("", ""), _training_rows(config, step, ema)) + [""]
    rows = _data_rows(config)
    if rows:
      body += ["## Data", ""] + _table(("", ""), rows) + [""]
  if metrics:
    last = metrics[-1]
    train = [(k, _number(v)) for k, v in last.items() if k != "step" and not k.startswith("eval_")]
    held = [(k.removeprefix("eval_"), _number(v)) for k, v in last.items() if k.startswith("eval_")]
    body += [f"## Metrics at step {last['step']}", "",
             f"The last logged line at or before step {step} of `metrics.jsonl` (means over the step's global batch):",
             ""] + _table(("metric", "value"), train) + [""]
    if held:
      pairs = (config.get("data") or {}).get("eval_pairs")
      body += [f"Held-out pairs ({pairs}, never trained on, fixed noise):" if pairs else "Held-out pairs:", ""]
      body += _table(("metric", "value"), held) + [""]
  if judged:
    first, last = judged[0], judged[-1]
    keys = [k for k in last if k != "step"]
    body += [f"## Judge (`{config.get('judge') or 'judge'}`)", "",
             "`judge/judge.jsonl`: the judge's numbers on samples of fixed seeds, first and last judged step:", ""]
    body += _table(("", f"step {first['step']}", f"step {last['step']}"),
                   [(k, _number(first.get(k)), _number(last.get(k))) for k in keys]) + [""]
  if config:
    body += ["<details><summary>The run's recorded config</summary>", "", "```json",
             json.dumps(config, indent=2), "```", "", "</details>", ""]
  path = folder / CARD
  path.write_text(render(data, "\n".join(body)))
  return path


# --- sections other commands add -----------------------------------------------------------------------

def section_key(*parts: Any) -> str:
  """A short stable key for a section from what identifies it (e.g. model A and the prompt set)."""
  return hashlib.sha1("\n".join(map(str, parts)).encode()).hexdigest()[:12]


def shift_headings(markdown: str, levels: int = 1) -> str:
  """Every ATX heading `levels` deeper (a section's own "# Title" becomes "## Title"); code fences kept."""
  out, fenced = [], False
  for line in markdown.splitlines():
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and re.match(r"#{1,6} ", line):
      line = "#" * levels + line
    out.append(line)
  return "\n".join(out)


def put_section(folder: str | os.PathLike, name: str, text: str, *, base: str | os.PathLike | None = None,
                adapter: bool = False, title: str | None = None) -> Path:
  """Adds `text` to FOLDER/README.md between markers named `name`, replacing what an earlier call with the
  same `name` put there (so a re-run does not append twice); everything else in the card is kept as it was.
  A folder with no card gets a minimal one first: `metadata(base, folder, adapter=adapter)` (base_model and
  license only where `base` is given: what the folder's model was made from is otherwise unknown) and a
  heading."""
  path = Path(folder) / CARD
  start, end = f"<!-- mapo_jax:{name} -->", f"<!-- /mapo_jax:{name} -->"
  block = f"{start}\n\n{text.strip()}\n\n{end}"  # blank lines: the markers end no table or paragraph
  if path.is_file():
    card = path.read_text()
  else:
    card = render(metadata(base, folder, adapter=adapter), f"# {title or Path(os.path.abspath(folder)).name}")
  pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
  if pattern.search(card):
    card = pattern.sub(lambda _: block, card, count=1)
  else:
    card = card.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(card)
  return path
