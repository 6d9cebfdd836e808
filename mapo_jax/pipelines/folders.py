"""What every family reads from a diffusers pipeline folder the same way: which components model_index.json
lists, and the CLIP tokenizers."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def in_folder(model_index: Mapping[str, Any], name: str) -> bool:
  """Whether model_index.json lists component `name` (diffusers writes [null, null] for an absent one)."""
  entry = model_index.get(name)  # ["library", "ClassName"], or [null, null] for an absent component
  return isinstance(entry, (list, tuple)) and entry[0] is not None


def load_clip_tokenizer(folder: Path):
  """A CLIP tokenizer folder (transformers' CLIPTokenizer, as every family with CLIP towers loads it)."""
  from transformers import CLIPTokenizer  # imported here: only tokenization needs transformers
  return CLIPTokenizer.from_pretrained(folder)
