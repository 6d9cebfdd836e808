"""The Python snippets of the docs, run as written on the shipped toy base (mapo_jax/toy/base), so that a snippet
that stops working (a changed library default, a renamed file) fails the suite.

Which blocks run: a fenced ```python block whose opening fence is the line right after an HTML comment that
starts with `<!-- test` (e.g. `<!-- test: tests/test_docs_snippets.py runs this block -->`). A block indented
inside a list item is dedented first. Every doc in DOCS must hold at least one such block, so losing a marker
fails too.

What is substituted: each top-level assignment `NAME = "..."` of a name in PATHS gets the test's path instead of
the documented one: BASE the shipped toy base; FLUX_BASE its FLUX.1 twin; WORKDIR a finished LoRA run's work directory, whose
export/pytorch_lora_weights.safetensors is written from the toy base's UNet with the trainer's own writer
(`mapo_jax.export.export_lora`, as train.py's end of run). Nothing else changes. The block runs in a temporary
working directory (the files it writes land there), in this process (conftest.py's torchvision fix applies).
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("mapo_jax/toy/base/README.md", "mapo_jax/toy/flux_base/README.md", "docs/lora.md")
PATHS = ("BASE", "FLUX_BASE", "WORKDIR")
_MARKER = re.compile(r"^\s*<!-- test\b")
_FENCE = re.compile(r"^(\s*)```python\s*$")


def snippets(doc: str) -> list[str]:
  """The marked python blocks of `doc`, dedented."""
  lines = (REPO / doc).read_text().splitlines()
  out = []
  for i, line in enumerate(lines[1:], 1):
    fence = _FENCE.match(line)
    if not fence or not _MARKER.match(lines[i - 1]):
      continue
    end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
    out.append(textwrap.dedent("\n".join(lines[i + 1:end])))
  return out


def with_paths(code: str, paths: dict[str, Path]) -> tuple[str, set[str]]:
  """`code` with each top-level `NAME = "..."` (NAME in `paths`) pointing at paths[NAME]; and the names found."""
  found = set()

  def put(m):
    found.add(m.group(1))
    return f"{m.group(1)} = {str(paths[m.group(1)])!r}"

  pattern = re.compile(rf"^({'|'.join(paths)})\s*=\s*(['\"]).*?\2", re.M)
  return pattern.sub(put, code), found


CASES = [pytest.param(doc, i, id=f"{doc}#{i}") for doc in DOCS for i in range(len(snippets(doc)))]


def test_every_doc_has_a_marked_snippet():
  assert {doc for doc in DOCS if snippets(doc)} == set(DOCS)


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory):
  """A LoRA run's work directory on the toy base: export/pytorch_lora_weights.safetensors, adapters as the
  config's defaults target them (rank 4), with B drawn at random so they change the UNet."""
  import numpy as np
  from mapo_jax import config as config_lib
  from mapo_jax.export import export_lora
  from mapo_jax.pipelines import sd
  from mapo_jax.toy.demo import BASE
  from mapo_jax.training import lora
  settings = config_lib.base_config().lora
  unet = sd.load_denoiser(BASE)
  lora.add_adapters(unet, rank=4, alpha=float(settings.alpha), targets=tuple(settings.targets), seed=0)
  rng = np.random.default_rng(0)
  for adapter in lora.adapted(unet).values():
    adapter.b.set_value(rng.normal(0, 0.1, adapter.b.get_value().shape).astype(np.float32))
  workdir = tmp_path_factory.mktemp("lora_run")
  export_lora(unet, workdir / "export")
  return workdir


@pytest.mark.parametrize("doc,index", CASES)
def test_doc_snippet_runs_on_the_toy_base(doc, index, request, tmp_path, monkeypatch):
  from mapo_jax.toy.demo import BASE, FLUX_BASE
  code = snippets(doc)[index]
  paths = {"FLUX_BASE": FLUX_BASE} if re.search(r"^FLUX_BASE\s*=", code, re.M) else {"BASE": BASE}
  if re.search(r"^WORKDIR\s*=", code, re.M):
    paths["WORKDIR"] = request.getfixturevalue("lora_workdir")
  code, found = with_paths(code, paths)
  assert found == set(paths), f"{doc}: the block assigns {sorted(found)}, expected {sorted(paths)}"
  monkeypatch.chdir(tmp_path)
  exec(compile(code, f"{doc} (block {index})", "exec"), {"__name__": "__doc_snippet__"})
