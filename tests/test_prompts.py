"""Prompt sets in their published formats (mapo_jax/rewards/prompts.py): tiny files written here in each format."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapo_jax.rewards.prompts import PromptSet, read_prompt_set


def test_partiprompts_tsv(tmp_path):
  # PartiPrompts.tsv's header and layout; a prompt may start with a double quote, a note may be empty.
  path = tmp_path / "PartiPrompts.tsv"
  path.write_text("Prompt\tCategory\tChallenge\tNote\n"
                  "a red cat\tAnimals\tBasic\t\n"
                  "\"Hello\" written on a sign, in a \"quoted\" style\tArts\tWriting & Symbols\tA note, with a comma\n"
                  "\n"
                  "a map of the world\tWorld Knowledge\tComplex\t\n")
  assert read_prompt_set(path) == PromptSet(
      ["a red cat", "\"Hello\" written on a sign, in a \"quoted\" style", "a map of the world"],
      ["Animals", "Arts", "World Knowledge"])


def test_hps_benchmark_json_file_and_folder(tmp_path):
  styles = {"photo": ["a photo of a dog", "a street at night"], "anime": ["an anime girl"],
            "concept-art": ["a castle"], "paintings": ["a still life", "a portrait"]}
  for style, prompts in styles.items():
    (tmp_path / f"{style}.json").write_text(json.dumps(prompts))
  assert read_prompt_set(tmp_path / "photo.json") == PromptSet(styles["photo"], ["photo", "photo"])
  order = ["anime", "concept-art", "paintings", "photo"]  # sorted file names
  assert read_prompt_set(tmp_path) == PromptSet([p for s in order for p in styles[s]],
                                                [s for s in order for _ in styles[s]])


def test_pickapic_parquet_unique_captions_in_first_seen_order(tmp_path):
  path = tmp_path / "test_unique-00000-of-00001.parquet"
  pq.write_table(pa.table({"caption": ["b cat", "a dog", "b cat", "c", "a dog"], "label_0": [1.0, 0.0, 0.5, 1.0, 1.0],
                           "jpg_0": [b"x"] * 5}), path)
  assert read_prompt_set(path) == PromptSet(["b cat", "a dog", "c"])


def test_text_file_one_prompt_per_line(tmp_path):
  (tmp_path / "prompts.txt").write_text("a cat\n\n  the red dog!  \n")
  assert read_prompt_set(tmp_path / "prompts.txt") == PromptSet(["a cat", "the red dog!"])


def test_bad_prompt_files_name_the_file(tmp_path):
  cases = {"prompts.csv": ("a,b\n", "unknown prompt file format '.csv'"),
           "bad.tsv": ("Text\tKind\na cat\tAnimals\n", "needs a header with columns Prompt and Category"),
           "bad.json": (json.dumps({"prompts": ["a"]}), "JSON list of prompt strings"),
           "empty.txt": ("\n\n", "holds no prompts")}
  for name, (text, message) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"{tmp_path / name}.*{message}"):
      read_prompt_set(tmp_path / name)
  pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "x.parquet")
  with pytest.raises(ValueError, match=f"{tmp_path / 'x.parquet'}: a Pick-a-Pic parquet needs a 'caption' column"):
    read_prompt_set(tmp_path / "x.parquet")
  (tmp_path / "folder").mkdir()
  with pytest.raises(ValueError, match=f"{tmp_path / 'folder'}: a prompt folder must hold HPS v2"):
    read_prompt_set(tmp_path / "folder")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    read_prompt_set(tmp_path / "missing.txt")
