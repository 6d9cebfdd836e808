"""How often each reward model agrees with Pick-a-Pic's human labels: one markdown table and JSON lines.

    python bench/pickapic_agreement.py --data /data/pickapic_v2_test \
        --rewards pickscore=/models/PickScore_v1,hps=/models/HPS_v2.1_compressed.pt,\
aesthetic=/models/sac+logos+ava1-l14-linearMSE.pth,clip=/models/clip-vit-large-patch14

--data: any pair source of `mapo_jax.encode` (docs/data.md), e.g. a folder holding only the test split's
parquet files of a local Pick-a-Pic v2 copy (a parquet folder is read recursively; bench/RESULTS.md has the
exact commands). Each pair's two images are scored with its caption, as `mapo_jax.relabel` scores them (the
same functions); agreement is over the pairs with a human winner (human ties are counted apart), a pair whose
two scores are equal counting one half.
Rows `encode` would skip are skipped and counted. Nothing is written.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time

from mapo_jax import relabel, rewards
from mapo_jax.rewards import scoring
from mapo_jax.data.sources import open_source


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="preference pairs, as `mapo_jax.encode --data`")
  p.add_argument("--rewards", required=True, type=scoring.rewards_flag, help="KIND=PATH[,KIND=PATH...]")
  args = p.parse_args()
  source = open_source(args.data)
  rows = []
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    for kind, path in args.rewards.items():
      start = time.perf_counter()
      stats = relabel.decide(relabel.score_rows(source, rewards.load_reward(kind, path), pool), 0.0).stats
      rows.append({"reward": kind, "path": path, **stats, "seconds": round(time.perf_counter() - start, 1)})
  print(f"`{source.name}`: {rows[0]['rows']} rows\n")
  print("| reward | agreement with the human winner | pairs with a human winner | human ties | skipped |")
  print("|---|---|---|---|---|")
  for r in rows:
    agreement = "n/a" if r["agreement"] is None else f"{r['agreement']:.4f}"
    print(f"| {r['reward']} | {agreement} | {r['human_decisive']} | {r['human_ties']} | {r['skipped']} |")
  print()
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
