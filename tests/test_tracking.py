"""What a run sends to the tools users watch: W&B (offline, read back from its own run files) and TensorBoard
(read back with tensorboard's EventAccumulator): the scalars of metrics.jsonl, the sample and judge grids as
images, the resolved config; a stop and resume continue the same W&B run with no step sent twice; the log
has a one-line summary with an ETA at every logged step."""
import json
import struct

import numpy as np
import pytest
from conftest import run_trainer

pytest.importorskip("wandb")

ARGS = ("--config.steps=4", "--config.log_every=1", "--config.checkpoint_every=2", "--config.sample_every=2",
        "--config.judge_every=2", "--config.judge_samples_per_prompt=2", "--config.wandb.project=mapo-jax-test",
        "--config.wandb.mode=offline", "--config.wandb.tags=('demo',)")
BLOCK = 32768  # the LevelDB log block size W&B's transaction log (.wandb) uses


def wandb_records(path):
  """The protobuf records of a .wandb transaction log: wandb's own `Record` messages (wandb.proto), framed as
  a LevelDB log after a 7-byte header (":W&B", a 2-byte magic, a version byte), as W&B writes it. W&B 0.31
  reads these files in its Go core only; this is the framing, the records are W&B's."""
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert data[:4] == b":W&B"
  out, pos, pending = [], 7, b""
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == 0 and length == 0:
      continue
    pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


def history(records):
  """[{key: value}] of each history record (its `_step` included); nested keys (an image's fields) joined by /."""
  rows = []
  for r in records:
    if r.WhichOneof("record_type") == "history":
      rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
  return rows


@pytest.fixture(scope="module")
def tracked(demo_assets, trainer_env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tracked")
  stopped = run_trainer(trainer_env(), workdir, demo_assets, *ARGS, "--stop-after-step=2", judge=True)
  run_trainer(trainer_env(), workdir, demo_assets, *ARGS, judge=True)
  return workdir, stopped


def test_wandb_records_the_scalars_images_and_config_once_per_step_across_a_resume(tracked):
  workdir, _ = tracked
  runs = sorted((workdir / "wandb").glob("offline-run-*"))
  run_id = (workdir / "wandb" / "run_id").read_text().strip()
  assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the restart resumed the same run
  rows = [row for run in runs for row in history(wandb_records(next(run.glob("*.wandb"))))]
  steps = [row["_step"] for row in rows]
  assert len(steps) == len(set(steps)) and sorted(steps) == [0, 1, 2, 3, 4]  # no step twice (0: the judged base)
  by_step = {row["_step"]: row for row in rows}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    logged = json.loads(line)
    for key in ("loss", "accuracy", "grad_norm", "lr"):
      assert by_step[logged["step"]][key] == pytest.approx(logged[key], rel=1e-6), (logged["step"], key)
  for step in (2, 4):  # an image's fields are nested under its key
    assert by_step[step]["samples/_type"] == "image-file" and by_step[step]["samples/width"] == 64
    assert by_step[step]["judge/samples/_type"] == "image-file"
  assert by_step[4]["judge/before_after/_type"] == "image-file"
  judged = [json.loads(line) for line in (workdir / "judge" / "judge.jsonl").read_text().splitlines()]
  assert [by_step[r["step"]]["judge/filled_rate"] for r in judged] == pytest.approx([r["filled_rate"] for r in judged])
  started = [r for r in wandb_records(next(runs[0].glob("*.wandb"))) if r.WhichOneof("record_type") == "run"]
  values = {item.key: json.loads(item.value_json) for item in started[0].run.config.update}
  assert values["objective"] == "mapo" and values["wandb"]["tags"] == ["demo"]


def test_tensorboard_holds_the_grids_as_images_at_their_steps(tracked):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir, _ = tracked
  events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0}).Reload()
  samples = events.Images("samples")
  assert sorted({e.step for e in samples}) == [2, 4]
  side = int(np.ceil(np.sqrt(4)))  # the demo's four sample prompts
  assert {(e.height, e.width) for e in samples} == {(32 * side, 32 * side)}
  judge = events.Images("judge/samples")
  assert sorted({e.step for e in judge}) == [0, 2, 4] and {e.width for e in judge} == {32 * 2}
  assert [e.step for e in events.Images("judge/before_after")] == [4]


def test_every_logged_step_has_a_summary_line_with_an_eta(tracked):
  _, stopped = tracked
  lines = [line for line in stopped.stderr.splitlines() if "step 1/4" in line or "step 2/4" in line]
  assert len(lines) == 2 and all("loss " in line and "pairs/s " in line and "ETA " in line for line in lines)
