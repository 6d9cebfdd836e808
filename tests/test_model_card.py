"""Model cards (mapo_jax/run/card.py): what the trainer's export, `python -m mapo_jax.export` in each mode and
`mapo_jax.evaluate --update-card` write beside the weights, read back with `huggingface_hub.ModelCard.load` and
checked against the run's own files (config.json, metrics.jsonl, judge/judge.jsonl, the exported files)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_evaluate import reward_dir  # noqa: F401  (a fixture: the reward model evaluate needs)

from mapo_jax import evaluate, export
from mapo_jax.run import card as card_lib
from mapo_jax.training import lora

SDXL_TAG = "stable-diffusion-xl"  # diffusers' training scripts' tag for StableDiffusionXLPipeline models
HUB_BASE = "someone/sdxl-base-for-tests"  # a Hub id written into a base folder's model_index.json


def load(folder) -> ModelCard:
  return ModelCard.load(folder / card_lib.CARD)


def rows(text: str, heading: str) -> dict[str, list[str]]:
  """The markdown table after `heading` (the first table after it): {first cell: the other cells}."""
  lines = text[text.index(heading):].splitlines()[1:]
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  out = {}
  for line in lines[start + 2:]:  # header and separator
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    out[cells[0]] = cells[1:]
  return out


def assert_numbers(table: dict[str, list[str]], expected: dict[str, float], column: int = 0):
  assert set(table) == set(expected)
  for k, v in expected.items():
    assert float(table[k][column]) == pytest.approx(v, rel=1e-5, abs=1e-12), k  # written to 6 significant digits


def jsonl(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snippet(text: str) -> str:
  return text[text.index("```python"):].split("```")[1]


def licensed_copy(source, folder, *, license=None, name_or_path=None):
  """A copy of the pipeline folder `source` with a model card (license) and/or model_index `_name_or_path`."""
  shutil.copytree(source, folder)
  if license:
    (folder / "README.md").write_text(f"---\nlicense: {license}\ntags:\n- text-to-image\n---\n\n# The base's own card\n")
  if name_or_path:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_name_or_path": name_or_path}))
  return folder


@pytest.fixture(scope="module")
def lora_run(demo_assets, trainer_env, tmp_path_factory):
  """A 4-step DPO LoRA run of the demo (test_lora.py's run, whose compiled programs the test cache holds) with 8
  held-out pairs, so its card has held-out metrics."""
  from conftest import run_trainer
  workdir = tmp_path_factory.mktemp("lora_run")
  run_trainer(trainer_env(fast_compile=True), workdir, demo_assets, "--config.objective=dpo", "--config.lora.rank=4",
              "--config.lora.alpha=2.0", "--config.steps=4", "--config.sample_every=0", "--config.log_every=2",
              "--config.checkpoint_every=4", "--config.optim.lr=1e-2", "--config.data.eval_pairs=8")
  return workdir


# --- the trainer's export --------------------------------------------------------------------------------------

def test_trainer_card_states_the_run(demo_run):
  workdir, _ = demo_run
  config = json.loads((workdir / "config.json").read_text())
  folder = workdir / "export"
  card = load(folder)
  assert card.data.base_model == config["pipeline"]  # the demo's base names no Hub id: its path
  assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
  assert {"text-to-image", "diffusers", "mapo-jax", config["objective"], SDXL_TAG} <= set(card.data.tags)
  assert "lora" not in card.data.tags
  assert card.data.license is None  # the demo's base has no card: no license is invented
  text = card.text
  last = jsonl(workdir / "metrics.jsonl")[-1]
  assert last["step"] == config["steps"]
  assert_numbers(rows(text, f"## Metrics at step {last['step']}"),
                 {k: v for k, v in last.items() if k != "step" and not k.startswith("eval_")})
  records = jsonl(workdir / "judge" / "judge.jsonl")
  judge = rows(text, "## Judge")
  assert_numbers(judge, {k: v for k, v in records[0].items() if k != "step"}, column=0)
  assert_numbers(judge, {k: v for k, v in records[-1].items() if k != "step"}, column=1)
  assert f"| step {records[0]['step']} | step {records[-1]['step']} |" in text
  training = rows(text, "## Training")
  assert training["objective"][0] == f"`{config['objective']}` (beta {config['mapo']['beta']:g}, snr {config['mapo']['snr']:g})"
  assert training["steps"][0].startswith(f"{config['steps']} of {config['steps']}")
  assert training["global batch"][0].startswith(f"{config['global_batch_size']} pairs")
  assert f"lr {config['optim']['lr']:g}" in training["optimizer"][0]
  manifest = json.loads((Path(config["data"]["cache_dir"]) / "manifest.json").read_text())
  data = rows(text, "## Data")
  assert data["cache"][0] == f"`{config['data']['cache_dir']}`" and data["source"][0] == f"`{manifest['source']}`"
  assert data["records"][0].startswith(f"{manifest['pairs']} pairs, {manifest['source_rows']} source rows")
  # The newest samples of the exported step: the judge's before/after sheet, copied and linked relatively.
  link = re.search(r"!\[[^\]]*\]\(([^)]+)\)", text).group(1)
  assert (folder / link).read_bytes() == (workdir / "judge" / "before_after.png").read_bytes()
  assert f'from_pretrained("{folder}"' in snippet(text)
  assert json.loads(text.split("```json")[1].split("```")[0]) == config


def test_cli_export_cards_pass_the_license_and_hub_id_through(demo_run, demo_assets, tmp_path):
  workdir, _ = demo_run
  licensed = licensed_copy(demo_assets / "pipeline", tmp_path / "base", license="openrail++", name_or_path=HUB_BASE)
  export.main(export.parse_flags(["export", "--checkpoint", str(workdir), "--step", "40", "--base", str(licensed),
                                  "--out", str(tmp_path / "pipe"), "--dtype", "fp16"]))
  export.main(export.parse_flags(["export", "--checkpoint", str(workdir), "--base", str(demo_assets / "pipeline"),
                                  "--out", str(tmp_path / "unet"), "--unet-only"]))
  card = load(tmp_path / "pipe")
  assert card.data.license == "openrail++" and card.data.base_model == HUB_BASE
  assert "The base's own card" not in card.text  # the base's README, copied with the pipeline, is replaced
  # Step 40 of a 60-step run: the metrics and judged numbers of step 40, not the run's last ones.
  line = next(r for r in jsonl(workdir / "metrics.jsonl") if r["step"] == 40)
  assert_numbers(rows(card.text, "## Metrics at step 40"), {k: v for k, v in line.items() if k != "step"})
  judged = [r for r in jsonl(workdir / "judge" / "judge.jsonl") if r["step"] <= 40]
  assert_numbers(rows(card.text, "## Judge"), {k: v for k, v in judged[-1].items() if k != "step"}, column=1)
  assert "![" not in card.text  # the before/after sheet shows step 60: no picture of step 40
  assert "weights `fp16`" in card.text and f'from_pretrained("{tmp_path / "pipe"}"' in snippet(card.text)
  bare = load(tmp_path / "unet")
  assert bare.data.license is None and bare.data.base_model == str(demo_assets / "pipeline")
  assert {"mapo", SDXL_TAG} <= set(bare.data.tags)
  code = snippet(bare.text)
  assert f'UNet2DConditionModel.from_pretrained("{tmp_path / "unet"}"' in code
  assert f'StableDiffusionXLPipeline.from_pretrained("{demo_assets / "pipeline"}", unet=unet' in code


def test_lora_cards_name_the_file_that_exists(lora_run, demo_assets, tmp_path):
  config = json.loads((lora_run / "config.json").read_text())
  base = demo_assets / "pipeline"
  export.main(export.parse_flags(["export", "--checkpoint", str(lora_run), "--base", str(base),
                                  "--out", str(tmp_path / "kohya"), "--format", "kohya"]))
  export.main(export.parse_flags(["export", "--checkpoint", str(lora_run), "--base", str(base),
                                  "--out", str(tmp_path / "fuse"), "--fuse"]))
  for folder, name in ((lora_run / "export", lora.DIFFUSERS_FILE), (tmp_path / "kohya", lora.KOHYA_FILE)):
    card = load(folder)
    assert {"lora", "dpo", "mapo-jax", SDXL_TAG} <= set(card.data.tags)
    assert card.data.base_model == config["pipeline"]
    code = snippet(card.text)
    loaded = re.search(r'load_lora_weights\("([^"]+)", weight_name="([^"]+)"\)', code)
    assert loaded.groups() == (str(folder), name) and (folder / name).is_file()
    assert f'from_pretrained("{base}"' in code
    assert "rank 4, alpha 2: scale alpha / rank = 0.5" in card.text
  last = jsonl(lora_run / "metrics.jsonl")[-1]
  text = load(lora_run / "export").text
  assert_numbers(rows(text, "Held-out pairs (8"), {k[5:]: v for k, v in last.items() if k.startswith("eval_")})
  assert rows(text, "## Training")["fine-tune"][0].startswith("LoRA: rank 4, alpha 2")
  fused = load(tmp_path / "fuse")
  assert "lora" not in fused.data.tags and "merged into the UNet" in fused.text
  assert f'from_pretrained("{tmp_path / "fuse"}"' in snippet(fused.text)


# --- evaluate --update-card ------------------------------------------------------------------------------------

def test_update_card_replaces_its_section(demo_run, demo_assets, lora_run, reward_dir, tmp_path):  # noqa: F811
  workdir, _ = demo_run
  model_b = shutil.copytree(workdir / "export", tmp_path / "model_b")
  before = load(model_b)
  (tmp_path / "prompts.txt").write_text("a red circle\n")
  base = demo_assets / "pipeline"

  def run(seed, b=model_b, *extra):
    evaluate.main(evaluate.parse_flags([
        "evaluate", "--model-a", str(base), "--model-b", str(b), *extra, "--rewards", f"clip={reward_dir[0]}",
        "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / f"eval{seed}"), "--steps", "2",
        "--seed", str(seed), "--update-card"]))
    return json.loads((tmp_path / f"eval{seed}" / "results.json").read_text())

  run(0)
  second = run(1)
  text = (model_b / card_lib.CARD).read_text()
  assert text.count("<!-- mapo_jax:evaluation-") == 1 and text.count("<!-- /mapo_jax:evaluation-") == 1
  section = text[text.index("<!-- mapo_jax:evaluation-"):]
  assert "seed 1," in section and "seed 0," not in section  # the second run's table replaced the first's
  r = second["summary"]["clip"]
  assert f"| {r['mean_a']:.4f} ± {r['se_a']:.4f} | {r['mean_b']:.4f} ± {r['se_b']:.4f} |" in section
  assert section.startswith("<!-- mapo_jax:evaluation-") and "\n## A: `" in section  # evaluate's heading, one level down
  after = load(model_b)
  assert after.data.to_dict() == before.data.to_dict()  # the metadata and the rest are kept
  assert after.text.startswith(before.text.rstrip("\n"))
  # B = a base with a LoRA file in a folder without a card: a minimal card there, the metadata rules of export's.
  licensed = licensed_copy(base, tmp_path / "licensed", license="openrail++", name_or_path=HUB_BASE)
  adapters = tmp_path / "adapters"
  adapters.mkdir()
  shutil.copy(lora_run / "export" / lora.DIFFUSERS_FILE, adapters)
  run(2, licensed, "--lora-b", str(adapters / lora.DIFFUSERS_FILE))
  minimal = load(adapters)
  assert minimal.data.base_model == HUB_BASE and minimal.data.license == "openrail++"
  assert minimal.data.library_name == "diffusers" and {"lora", SDXL_TAG} <= set(minimal.data.tags)
  assert minimal.text.count("<!-- mapo_jax:evaluation-") == 1
  assert "The base's own card" in (licensed / card_lib.CARD).read_text()  # model B's base card is untouched


# --- the base's Hub id ---------------------------------------------------------------------------------------

def test_hub_id_comes_only_from_the_folder_itself(tmp_path):
  index = json.dumps({"_class_name": "StableDiffusionXLPipeline"})
  snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / "0123abc"
  plain, named, local = tmp_path / "plain", tmp_path / "named", tmp_path / "local"
  for folder in (snapshot, plain, named, local):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(index)
  (named / "README.md").write_text("---\nmodel_name: org/model\nlicense: mit\n---\n")
  (local / "model_index.json").write_text(json.dumps({"_class_name": "X", "_name_or_path": str(plain)}))
  assert card_lib.hub_id(snapshot) == "stabilityai/stable-diffusion-xl-base-1.0"
  assert card_lib.hub_id(named) == "org/model" and card_lib.base_license(named) == {"license": "mit"}
  assert card_lib.hub_id(plain) is None and card_lib.base_model(plain) == str(plain)
  assert card_lib.hub_id(local) is None  # a local path is not a Hub id
  assert card_lib.family_tag("StableDiffusionPipeline") == "stable-diffusion"
  assert card_lib.family_tag("StableDiffusion3Pipeline") == "stable-diffusion-3"
