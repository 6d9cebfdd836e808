"""Relabel preference pairs by a reward model (AI feedback), in the format they were read in.

    python -m mapo_jax.relabel --data SRC --reward pickscore=DIR --out DST [--soft] [--margin M]

Scores both images of every pair with its caption (`mapo_jax.rewards.load_reward`), then:
- the image with the higher score becomes the winner (label_0/label_1, or chosen/rejected);
- a pair whose scores differ by at most --margin (default 0: equal scores) is a tie and is dropped;
- with --soft, each kept pair also stores its winner's and loser's scores as `score_w` and `score_l` (the
  fields soft-label objectives such as SmPO read); without it, stale `score_w` / `score_l` are removed;
- rows the trainer would skip (unreadable image, non-string caption, bad labels) are dropped and counted.
It prints how often the reward agrees with the human label (over pairs with a human winner; equal scores
count one half), and how many pairs were flipped, dropped as ties and skipped, then one JSON line of them.

DST is written in SRC's format, so `python -m mapo_jax.encode --data DST` takes it unchanged:
  FILE.jsonl           -> FILE.jsonl (other keys kept; relative image paths rewritten for DST's folder)
  parquet file/folder  -> the same files under DST (other columns kept; each file is read whole)
  FILE.arrow, or a `Dataset.save_to_disk` folder -> the same Arrow files (and the folder's JSON files)
  a w/ + l/ folder     -> a w/ + l/ folder (images copied; no --soft: the format has no per-pair fields)
HPDv2-style ranked .json, TFDS, `DatasetDict` folders and Arrow cache folders cannot be written back and are
refused before anything is scored. DST must not exist; it appears (renamed from a temporary) only when done.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, logging

from mapo_jax import cli, rewards
from mapo_jax.rewards import scoring
from mapo_jax.data import sources
from mapo_jax.data.pairs import BadPair, _winner_is_jpg1, decode_image

READ_CHUNK = 64  # rows decoded and scored at a time
SCORE_FIELDS = ("score_w", "score_l")


@dataclasses.dataclass
class Scores:
  """Per source row: the reward's score of image 0 and image 1 (NaN for a skipped row) and the human winner
  (0, 1, -1 for a tie, -2 for a skipped row)."""
  score_0: np.ndarray
  score_1: np.ndarray
  human: np.ndarray


def score_rows(source: sources.Source, reward: rewards.Reward, pool: concurrent.futures.Executor) -> Scores:
  """Both images of every row scored with its caption, as stored (no training crop); rows that the pair rules
  (`mapo_jax.data.pairs`) would skip are logged and marked skipped. Images are decoded on `pool`."""
  n = len(source)
  out = Scores(np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32), np.full(n, -2, np.int8))

  def decode(row):
    try:
      if row.problem:
        raise BadPair(f"{row.where}: {row.problem}")
      human = _winner_is_jpg1(row)
      if not isinstance(row.caption, str):
        raise BadPair(f"{row.where}: caption is {type(row.caption).__name__}, not a string")
      images = [np.asarray(decode_image(getattr(row, c), row.where, c)) for c in ("jpg_0", "jpg_1")]
      return row, {None: -1, False: 0, True: 1}[human], images
    except BadPair as e:
      return row, e, None

  for start in range(0, n, READ_CHUNK):
    prompts, images, index = [], [], []
    for row, human, pair in pool.map(decode, list(source.read(start, min(n, start + READ_CHUNK)))):
      if isinstance(human, BadPair):
        logging.warning("skipped %s", human)
        continue
      out.human[row.index] = human
      prompts += [row.caption] * 2
      images += pair
      index.append(row.index)
    if index:
      s = scoring.score(reward, prompts, images)
      out.score_0[index], out.score_1[index] = s[0::2], s[1::2]
    if (start // READ_CHUNK) % 100 == 99:
      logging.info("%s: scored %d of %d rows", source.name, start + READ_CHUNK, n)
  return out


@dataclasses.dataclass
class Decision:
  """Per source row: keep it?, the reward's winner (0 or 1), and the winner's / loser's scores."""
  keep: np.ndarray
  winner: np.ndarray
  score_w: np.ndarray
  score_l: np.ndarray
  stats: dict


def decide(scores: Scores, margin: float) -> Decision:
  """The reward's labels: the higher score wins; |score_0 − score_1| <= margin is a tie (dropped). Agreement is
  over the rows with a human winner: 1 where the reward scores it higher, ½ for equal scores."""
  scored = scores.human != -2
  diff = scores.score_0.astype(np.float64) - scores.score_1
  keep = scored & (np.abs(diff) > margin)
  winner = np.where(diff >= 0, 0, 1)
  score_w = np.where(winner == 0, scores.score_0, scores.score_1)
  score_l = np.where(winner == 0, scores.score_1, scores.score_0)
  decisive = scored & (scores.human >= 0)
  reward_agrees = np.sign(diff) == np.where(scores.human == 0, 1, -1)
  agree = np.sum(decisive & reward_agrees) + 0.5 * np.sum(decisive & (diff == 0))
  stats = {"rows": len(keep), "scored": int(scored.sum()), "skipped": int((~scored).sum()),
           "human_decisive": int(decisive.sum()), "human_ties": int((scored & (scores.human == -1)).sum()),
           "agreement": float(agree / decisive.sum()) if decisive.any() else None,
           "flipped": int((keep & decisive & (winner != scores.human)).sum()),
           "dropped_ties": int((scored & ~keep).sum()), "kept": int(keep.sum()),
           "human_ties_kept": int((keep & (scores.human == -1)).sum())}
  return Decision(keep, winner, score_w.astype(np.float32), score_l.astype(np.float32), stats)


# --- Writers: one per source format, each writes DST in SRC's format --------------------------------------

def _relative_to(path: str, src_folder: Path, dst_folder: Path) -> str:
  """An image path as the JSONL at dst_folder must store it to reach what src_folder's JSONL meant."""
  if os.path.isabs(path):
    return path
  return os.path.relpath(os.path.abspath(src_folder / path), os.path.abspath(dst_folder))


def write_jsonl(src: Path, dst: Path, final: Path, d: Decision, soft: bool) -> None:
  index = 0
  with src.open("rb") as f, dst.open("w") as out:
    for line in f:
      if not line.strip():
        continue
      i, index = index, index + 1
      if not d.keep[i]:
        continue
      obj = json.loads(line)
      chosen, rejected = (obj["chosen"], obj["rejected"])[::1 if d.winner[i] == 0 else -1]
      obj["chosen"], obj["rejected"] = (_relative_to(p, src.parent, final.parent) for p in (chosen, rejected))
      for key in SCORE_FIELDS:
        obj.pop(key, None)
      if soft:
        obj["score_w"], obj["score_l"] = float(d.score_w[i]), float(d.score_l[i])
      out.write(json.dumps(obj) + "\n")


def _score_features(features: dict, soft: bool) -> dict:
  """A `datasets` features dict (dataset_info.json, or the "huggingface" schema metadata that `datasets` writes
  into Arrow and parquet files) with the score columns this run writes, so `datasets` loads the output."""
  features = {k: v for k, v in features.items() if k not in SCORE_FIELDS}
  if soft:
    features |= {k: {"dtype": "float32", "_type": "Value"} for k in SCORE_FIELDS}
  return features


def _relabel_table(table: pa.Table, first: int, d: Decision, soft: bool) -> pa.Table:
  """Rows first..first+len of the source: labels set by the reward, score fields, dropped rows removed."""
  rows = slice(first, first + table.num_rows)
  winner = d.winner[rows]
  for name, value in (("label_0", winner == 0), ("label_1", winner == 1)):
    column = pa.array(value.astype(np.float64)).cast(table.schema.field(name).type)
    table = table.set_column(table.schema.get_field_index(name), name, column)
  table = table.drop_columns([c for c in SCORE_FIELDS if c in table.column_names])
  if soft:
    for name, values in (("score_w", d.score_w), ("score_l", d.score_l)):
      table = table.append_column(name, pa.array(values[rows]))
  metadata = dict(table.schema.metadata or {})
  if b"huggingface" in metadata:
    hf = json.loads(metadata[b"huggingface"])
    if "features" in hf.get("info", {}):
      hf["info"]["features"] = _score_features(hf["info"]["features"], soft)
      metadata[b"huggingface"] = json.dumps(hf).encode()
  return table.filter(pa.array(d.keep[rows])).replace_schema_metadata(metadata)


def write_parquet(src: Path, dst: Path, d: Decision, soft: bool) -> None:
  files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]  # ParquetSource's order
  first = 0
  for f in files:
    table = pq.read_table(f)
    target = dst / f.relative_to(src) if src.is_dir() else dst
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_relabel_table(table, first, d, soft), target)
    first += table.num_rows


def write_arrow(src: Path, dst: Path, d: Decision, soft: bool) -> None:
  files = sources.ArrowSource._files_of(src, None)  # pylint: disable=protected-access  # the source's order
  if src.is_dir():
    dst.mkdir(parents=True)
    shutil.copy2(src / "state.json", dst / "state.json")
    if (src / "dataset_info.json").exists():
      info = json.loads((src / "dataset_info.json").read_text())
      if "features" in info:
        info["features"] = _score_features(info["features"], soft)
      info.pop("splits", None)  # its row counts are the source's
      (dst / "dataset_info.json").write_text(json.dumps(info, indent=2))
  first = 0
  for f in files:
    reader = sources._open_arrow(f)  # pylint: disable=protected-access
    table = reader.read_all()
    target = dst / f.relative_to(src) if src.is_dir() else dst
    new = _relabel_table(table, first, d, soft)
    writer = pa.ipc.new_file if isinstance(reader, pa.ipc.RecordBatchFileReader) else pa.ipc.new_stream
    with pa.OSFile(str(target), "wb") as sink, writer(sink, new.schema) as w:
      w.write_table(new)
    first += table.num_rows


def write_folder(source: sources.PreferenceFolderSource, dst: Path, d: Decision) -> None:
  for side in ("w", "l"):
    (dst / side).mkdir(parents=True)
  for row in source.read(0, len(source)):
    if not d.keep[row.index]:
      continue
    name = Path(row.jpg_0).stem
    win, lose = (row.jpg_0, row.jpg_1)[::1 if d.winner[row.index] == 0 else -1]
    shutil.copy2(win, dst / "w" / f"{name}{Path(win).suffix}")
    shutil.copy2(lose, dst / "l" / f"{name}{Path(lose).suffix}")
    (dst / f"{name}.txt").write_text(row.caption + "\n", encoding="utf-8")


def writer_for(source: sources.Source, path: Path, soft: bool):
  """`write(tmp_dst, final_dst, decision)` for the source's format; raises before any scoring if there is none."""
  if isinstance(source, sources.JsonlSource):
    return lambda tmp, final, d: write_jsonl(path, tmp, final, d, soft)
  if isinstance(source, sources.ParquetSource):
    return lambda tmp, final, d: write_parquet(path, tmp, d, soft)
  if isinstance(source, sources.ArrowSource) and (path.is_file() or (path / "state.json").exists()):
    return lambda tmp, final, d: write_arrow(path, tmp, d, soft)
  if isinstance(source, sources.PreferenceFolderSource):
    if soft:
      raise ValueError(f"{path}: a w/ + l/ preference folder has no per-pair fields for --soft scores; "
                       "convert it to JSONL or parquet first")
    return lambda tmp, final, d: write_folder(source, tmp, d)
  raise ValueError(f"{source.name}: relabel cannot write a {type(source).__name__} back in its own format "
                   "(it writes JSONL, parquet, a single .arrow file or a Dataset.save_to_disk folder, and w/ + l/ "
                   "folders); convert the pairs to one of those first")


def relabel(data: str, reward: rewards.Reward, out: str | os.PathLike, *, soft: bool = False,
            margin: float = 0.0) -> dict:
  """Relabels `data` (a `sources.open_source` spec) into `out`; returns the counts and agreement."""
  if margin < 0:
    raise ValueError(f"margin={margin} must be >= 0")
  out = Path(out)
  if out.exists():
    raise FileExistsError(f"{out} exists; relabel writes a new dataset and never overwrites one")
  source = sources.open_source(data)
  path = Path(sources.parse_spec(data)[0])
  write = writer_for(source, path, soft)
  if path.is_file() and out.suffix != path.suffix:  # the suffix is how `open_source` knows the format
    raise ValueError(f"--out {out}: the source {path} is a {path.suffix} file, so the output must be one too")
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without the GIL
    decision = decide(score_rows(source, reward, pool), margin)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  write(tmp, out, decision)
  os.replace(tmp, out)
  return decision.stats


def parse_flags(argv: list[str]) -> argparse.Namespace:
  p = cli.parser(__doc__)
  p.add_argument("--data", required=True, help="preference pairs, as `mapo_jax.encode --data` (docs/data.md)")
  p.add_argument("--reward", required=True, type=scoring.reward_flag, help="KIND=PATH, e.g. pickscore=DIR")
  p.add_argument("--out", required=True, help="the relabelled pairs, in --data's format (must not exist)")
  p.add_argument("--soft", action="store_true", help="store the winner's and loser's scores as score_w, score_l")
  p.add_argument("--margin", type=float, default=0.0, help="drop pairs whose scores differ by at most this")
  return cli.parse(p, argv)


def report(stats: dict) -> str:
  agreement = "n/a (no pair has a human winner)" if stats["agreement"] is None else f"{stats['agreement']:.4f}"
  return (f"reward agrees with the human label on {agreement} of {stats['human_decisive']} pairs with a human "
          f"winner (equal scores count 1/2)\n"
          f"rows {stats['rows']}: kept {stats['kept']}, flipped {stats['flipped']}, dropped as ties "
          f"{stats['dropped_ties']}, skipped {stats['skipped']}; human ties given a winner "
          f"{stats['human_ties_kept']} of {stats['human_ties']}\n" + json.dumps(stats))


def main(args: argparse.Namespace) -> None:
  kind, path = args.reward
  stats = relabel(args.data, rewards.load_reward(kind, path), args.out, soft=args.soft, margin=args.margin)
  print(report(stats))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
