"""Prompt sets from local files, in the formats the benchmarks publish them in (docs/evaluation.md).

    read_prompt_set(path) -> PromptSet(prompts, categories)

- `*.tsv`: PartiPrompts (google-research/parti `PartiPrompts.tsv`): tab-separated, header
  `Prompt Category Challenge Note`; category: `Category`.
- `*.json`: one HPS v2 benchmark style (`anime.json`, `concept-art.json`, `paintings.json`, `photo.json`): a JSON
  list of prompt strings; category: the file's stem. A folder of them: all, in sorted file-name order.
- `*.parquet`: a Pick-a-Pic split (e.g. `test_unique`): its `caption` column, unique captions in first-seen order.
- `*.txt`: one prompt per line, blank lines skipped.

Anything else is refused with the file's name: a guess at a format would silently score the wrong prompts.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

FORMATS = ".tsv (PartiPrompts), .json or a folder of them (HPS v2 benchmark), .parquet (Pick-a-Pic), .txt"


@dataclasses.dataclass(frozen=True)
class PromptSet:
  prompts: list[str]
  categories: list[str] | None = None  # one per prompt, or None when the set has none


def _partiprompts(path: Path) -> PromptSet:
  # QUOTE_NONE: the file is plain tab-separated text, and prompts may begin with a double quote.
  with path.open(newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  missing = [c for c in ("Prompt", "Category") if rows and c not in rows[0]]
  if not rows or missing:
    raise ValueError(f"{path}: a PartiPrompts .tsv needs a header with columns Prompt and Category "
                     f"(missing {missing or ['Prompt', 'Category']})")
  rows = [r for r in rows if (r["Prompt"] or "").strip()]
  return PromptSet([r["Prompt"].strip() for r in rows], [(r["Category"] or "").strip() for r in rows])


def _hps_style(path: Path) -> list[str]:
  prompts = json.loads(path.read_text(encoding="utf-8"))
  if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"{path}: an HPS v2 benchmark file is a JSON list of prompt strings")
  return [p.strip() for p in prompts if p.strip()]


def _hps(paths: list[Path]) -> PromptSet:
  prompts, categories = [], []
  for path in paths:
    style = _hps_style(path)
    prompts += style
    categories += [path.stem] * len(style)
  return PromptSet(prompts, categories)


def _pickapic(path: Path) -> PromptSet:
  import pyarrow.parquet as pq
  names = pq.read_schema(path).names
  if "caption" not in names:
    raise ValueError(f"{path}: a Pick-a-Pic parquet needs a 'caption' column; found {names}")
  captions = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
  return PromptSet(list(dict.fromkeys(c.strip() for c in captions if isinstance(c, str) and c.strip())))


def _text(path: Path) -> PromptSet:
  return PromptSet([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])


def read_prompt_set(path: str | os.PathLike) -> PromptSet:
  """The prompts (and categories) in `path`; see the module docstring for the formats."""
  path = Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.json"))
    if not files:
      raise ValueError(f"{path}: a prompt folder must hold HPS v2 benchmark .json files; found none")
    result = _hps(files)
  elif not path.is_file():
    raise FileNotFoundError(f"{path}: no such prompt file or folder")
  elif path.suffix == ".tsv":
    result = _partiprompts(path)
  elif path.suffix == ".json":
    result = _hps([path])
  elif path.suffix == ".parquet":
    result = _pickapic(path)
  elif path.suffix == ".txt":
    result = _text(path)
  else:
    raise ValueError(f"{path}: unknown prompt file format {path.suffix!r}; expected {FORMATS}")
  if not result.prompts:
    raise ValueError(f"{path} holds no prompts")
  return result
