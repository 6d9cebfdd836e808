"""Every new source format, written here in its real layout, encoded by the demo pipeline's own encoder
(`python -m mapo_jax.encode`), the caches merged (`--merge`), and trained on by the trainer."""
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
from conftest import REPO, run_trainer
from PIL import Image

from mapo_jax.toy import demo
from mapo_jax.toy import world as toy_world


def drawn(shape, color, seed):
  """A filled toy-world drawing at the demo pipeline's size: PNG bytes."""
  image = toy_world.draw(toy_world.Scene(shape, color, "filled"), np.random.default_rng(seed), demo.TOY_SIZE)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def save(data: bytes, path):
  Image.open(io.BytesIO(data)).save(path)


def test_every_new_source_is_encoded_and_trained_on(demo_assets, trainer_env, tmp_path):
  # Arrow IPC stream file, as the `datasets` cache holds Pick-a-Pic (Pick-a-Pic's columns).
  rows = [{"caption": f"a {c} circle", "jpg_0": drawn("circle", c, i), "jpg_1": drawn("circle", "blue", i + 9),
           "label_0": 1.0, "label_1": 0.0} for i, c in enumerate(["red", "green", "red", "green"])]
  table = pa.Table.from_pylist(rows)
  with pa.ipc.new_stream(str(tmp_path / "pickapic-train.arrow"), table.schema) as writer:
    writer.write_table(table)
  # HPDv2-style ranked set: one prompt, three images ranked 1 (best) to 3 -> 3 ordered pairs.
  (tmp_path / "hpd" / "train").mkdir(parents=True)
  for k, color in enumerate(["red", "green", "blue"]):
    save(drawn("square", color, k), tmp_path / "hpd" / "train" / f"{k}.png")
  (tmp_path / "hpd" / "train.json").write_text(json.dumps(
      [{"prompt": "a red square", "image_path": ["0.png", "1.png", "2.png"], "rank": [1, 2, 3]}]))
  # Preference folder: w/NAME.png, l/NAME.png, NAME.txt.
  for side in ("w", "l"):
    (tmp_path / "prefs" / side).mkdir(parents=True)
  save(drawn("circle", "green", 5), tmp_path / "prefs" / "w" / "p0.png")
  save(drawn("circle", "red", 6), tmp_path / "prefs" / "l" / "p0.png")
  (tmp_path / "prefs" / "p0.txt").write_text("a green circle")

  encode = [sys.executable, "-m", "mapo_jax.encode", "--pipeline", str(demo_assets / "pipeline"), "--resolution", str(demo.TOY_SIZE)]
  parts = []
  for name, data, pairs in (("arrow", tmp_path / "pickapic-train.arrow", 4), ("hpd", tmp_path / "hpd" / "train.json", 3),
                            ("prefs", tmp_path / "prefs", 1)):
    out = tmp_path / f"cache_{name}"
    subprocess.run([*encode, "--data", str(data), "--out", str(out), "--strict"], env=trainer_env(fast_compile=True), cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    assert json.loads((out / "manifest.json").read_text())["pairs"] == pairs, name
    parts.append(str(out))
  merged = tmp_path / "merged"
  subprocess.run([sys.executable, "-m", "mapo_jax.encode", "--merge", *parts, "--out", str(merged)],
                 env=trainer_env(fast_compile=True), cwd=REPO, check=True, capture_output=True, timeout=120)
  assert json.loads((merged / "manifest.json").read_text())["pairs"] == 8

  workdir = tmp_path / "run"
  run_trainer(trainer_env(fast_compile=True), workdir, demo_assets, f"--config.data.cache_dir={merged}", "--config.steps=2",
              "--config.global_batch_size=8",
              "--config.log_every=1", "--config.sample_every=0", "--config.checkpoint_every=2")
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2] and all(m["loss"] is not None for m in logged)
