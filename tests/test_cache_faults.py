"""A damaged cache and a full disk (issue 31, items 4 and 5).

A truncated or corrupted ArrayRecord shard is found at open (size and record count against the manifest), at its
first bad read or by `encode --verify`, named with what differs, and a re-run of encode re-encodes only that shard.
`encode` out of disk stops with one line naming the path and the free space, keeps the shards it finished, and the
run after space is freed encodes only the missing ones.

Facts relied on (tried with array_record 0.8.6): an ArrayRecord file is a Riegeli records file whose block headers,
chunk headers and chunk data each carry a hash (riegeli/records/records_format.md), so a flipped byte inside a record
fails that record's read with "Corrupted Riegeli/records file"; a file cut short loses its footer and opens as 0
records, silently; files are padded to 64 KiB blocks, so a shard of a few pairs takes 128 KiB. Python ignores SIGXFSZ,
so a write past `ulimit -f` fails with EFBIG ("File too large"), as one past a full disk fails with ENOSPC.
The full-disk runs use a tmpfs mounted in a private mount namespace (`unshare -m`, as root): it vanishes with the
process, so nothing stays mounted if a test dies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from conftest import REPO
from test_data_helpers import fake_encode, pair_id, read_cache, solid, write_parquet

from mapo_jax import encode
from mapo_jax.data import cache, loader, sources

R = 64  # rows per shard; 4 shards
NUM_SHARDS = 4
SETTINGS = cache.EncodeSettings(resolution=64, shard_size=R)


def kept(i: int) -> bool:
  """Shard 2 keeps all its rows (the biggest shard: 64 pairs, 256 KiB); the others one row in 8 (128 KiB)."""
  return i // R == 2 or i % 8 == 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A parquet of 4 shards' rows (ties where not `kept`) and its finished cache: the original every test damages a
  copy of."""
  root = tmp_path_factory.mktemp("faults")
  rows = [{"caption": f"pair {i}", "jpg_0": solid(i % 200 + 5), "jpg_1": solid(i % 200 + 50),
           "label_0": 1.0 if kept(i) else 0.5, "label_1": 0.0 if kept(i) else 0.5} for i in range(NUM_SHARDS * R)]
  write_parquet(root / "pairs.parquet", rows, row_group_size=R)
  source = sources.open_source(str(root / "pairs.parquet"))
  manifest = cache.write_cache(source, root / "cache", fake_encode, SETTINGS, pipeline="fake", batch_size=16)
  ids = [[i for i in range(k * R, (k + 1) * R) if kept(i)] for k in range(NUM_SHARDS)]
  sizes = [(root / "cache" / s["file"]).stat().st_size for s in manifest["shards"]]
  # The full-disk tests need a first shard smaller than the third by at least a 64 KiB block.
  assert sizes[0] == sizes[1] and sizes[2] >= sizes[0] + 65536, sizes
  return SimpleNamespace(root=root, parquet=root / "pairs.parquet", source=source, cache=root / "cache",
                         manifest=manifest, ids=ids, sizes=sizes)


def copy_cache(base, tmp_path) -> Path:
  out = tmp_path / "cache"
  shutil.copytree(base.cache, out)  # copy2: mtimes kept, so "untouched" can be told by mtime
  return out


def shard(cache_dir: Path, k: int) -> Path:
  return cache_dir / f"{cache.shard_name(k, NUM_SHARDS)}.array_record"


def mtimes(cache_dir: Path, shards) -> dict[int, int]:
  return {k: shard(cache_dir, k).stat().st_mtime_ns for k in shards}


def assert_same_records(cache_dir: Path, original: Path) -> None:
  (_, got), (_, want) = read_cache(cache_dir), read_cache(original)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys() and all(np.array_equal(g[k], w[k]) for k in g)


def counting_encoder(seen: list[int]):
  def encode_fn(pixels_w, pixels_l, captions):
    seen.extend(pair_id(c) for c in captions)
    return fake_encode(pixels_w, pixels_l, captions)
  return encode_fn


def truncate(path: Path) -> int:
  size = path.stat().st_size
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  return size


def corrupt_record(path: Path, j: int) -> None:
  """Flips 4 bytes in the middle of record j's bytes in the file: the size and the record count stay."""
  reader = ArrayRecordReader(str(path))
  record = reader.read([j])[0]
  reader.close()
  data = bytearray(path.read_bytes())
  assert data.count(record) == 1
  at = data.find(record) + len(record) // 2
  data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
  path.write_bytes(bytes(data))


def open_loader(cache_dir, **kwargs):
  return loader.cached_loader(cache_dir, batch_size=4, seed=0, process_index=0, process_count=1, num_threads=2,
                              **kwargs)


def test_truncated_shard_is_found_at_open_and_reencoded_alone(base, tmp_path):
  out = copy_cache(base, tmp_path)
  size = truncate(shard(out, 1))
  what = rf"{re.escape(str(shard(out, 1)))}: {size // 2} bytes on disk, but .*manifest.json records {size}"
  with pytest.raises(cache.DamagedShardError, match=what) as error:
    open_loader(out)
  assert f"python -m mapo_jax.encode --verify --out {out}" in str(error.value)  # how to find and redo it
  with pytest.raises(cache.DamagedShardError, match=what):
    loader.cached_eval_batch(out, 4)
  before = mtimes(out, (0, 2, 3))
  seen = []
  manifest = cache.write_cache(base.source, out, counting_encoder(seen), SETTINGS, pipeline="fake", batch_size=16)
  assert sorted(seen) == base.ids[1]  # only shard 1 was encoded again
  assert mtimes(out, (0, 2, 3)) == before
  assert manifest == base.manifest
  assert_same_records(out, base.cache)
  assert len(list(open_loader(out, num_epochs=1))) == sum(map(len, base.ids)) // 4


def test_corrupted_record_is_found_at_its_first_read_and_reencoded(base, tmp_path):
  out = copy_cache(base, tmp_path)
  corrupt_record(shard(out, 2), 5)
  first = len(base.ids[0]) + len(base.ids[1])  # shard 2's first record in the cache
  what = rf"{re.escape(str(shard(out, 2)))}: record 5 \(record {first + 5} of the cache\) does not read"
  batches = open_loader(out, num_epochs=1)  # opens: size and record count agree with the manifest
  with pytest.raises(cache.DamagedShardError, match=what):
    list(batches)
  records = cache.open_records(out)  # a direct reader goes through the same check
  records[first + 4]
  with pytest.raises(cache.DamagedShardError, match=what):
    records[first + 5]
  before = mtimes(out, (0, 1, 3))
  seen = []
  cache.write_cache(base.source, out, counting_encoder(seen), SETTINGS, pipeline="fake", batch_size=16)
  assert sorted(seen) == base.ids[2] and mtimes(out, (0, 1, 3)) == before
  assert_same_records(out, base.cache)


def test_verify_lists_bad_shards(base, tmp_path, capsys):
  assert encode.main(encode.parse_flags(["encode", "--verify", "--out", str(base.cache)])) == 0
  assert "4 of 4 shards good" in capsys.readouterr().out
  out = copy_cache(base, tmp_path)
  size = truncate(shard(out, 1))
  corrupt_record(shard(out, 2), 7)
  proc = subprocess.run([sys.executable, "-m", "mapo_jax.encode", "--verify", "--out", str(out)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD ")]
  assert len(bad) == 2, proc.stdout
  assert f"{shard(out, 1)}: {size // 2} bytes on disk, but" in bad[0]
  assert f"{shard(out, 2)}: record 7 (record {len(base.ids[0]) + len(base.ids[1]) + 7} of the cache) does not read" \
      in bad[1]
  assert "2 of 4 shards bad" in proc.stdout
  # --quick: sizes and record counts only, so it misses the flipped bytes of shard 2.
  assert encode.main(encode.parse_flags(["encode", "--verify", "--quick", "--out", str(out)])) == 1
  quick = capsys.readouterr().out
  assert f"BAD {shard(out, 1)}" in quick and f"BAD {shard(out, 2)}" not in quick and "1 of 4 shards bad" in quick


def test_old_manifest_reads_and_says_what_cannot_be_checked(base, tmp_path, caplog, capsys):
  out = copy_cache(base, tmp_path)
  for path in [out / "manifest.json", *out.glob("shard-*.json")]:  # as written before the shard facts were
    entry = json.loads(path.read_text())
    for s in entry.get("shards", [entry]):
      for key in cache.SHARD_FACTS:
        del s[key]
    path.write_text(json.dumps(entry))
  assert len(list(open_loader(out, num_epochs=1))) == sum(map(len, base.ids)) // 4
  assert "records no shard sizes or checksums" in caplog.text
  assert encode.main(encode.parse_flags(["encode", "--verify", "--out", str(out)])) == 0
  assert "4 of 4 shards have no checksum recorded" in capsys.readouterr().out
  # A re-run of encode reads every shard once and records the facts, encoding nothing.
  seen = []
  assert cache.write_cache(base.source, out, counting_encoder(seen), SETTINGS, pipeline="fake") == base.manifest
  assert seen == []
  truncate(shard(out, 0))
  manifest = json.loads((out / "manifest.json").read_text())
  del manifest["shards"][0]["bytes"]
  (out / "manifest.json").write_text(json.dumps(manifest))
  # Without its size, a truncated shard is still found at open, by its record count (the footer is gone).
  what = rf"{re.escape(str(shard(out, 0)))}: 0 records, but .*manifest.json records {len(base.ids[0])}"
  with pytest.raises(cache.DamagedShardError, match=what):
    open_loader(out)


# --- out of disk -------------------------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    # encode's cache writing (encode.encode_cache, as `python -m mapo_jax.encode` runs it) with the tests' stand-in
    # encoder, printing the pair ids it encoded.
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_data_helpers import fake_encode, pair_id
    from mapo_jax import encode
    from mapo_jax.data import cache, sources
    seen = []
    def encode_fn(pixels_w, pixels_l, captions):
      seen.extend(pair_id(c) for c in captions)
      return fake_encode(pixels_w, pixels_l, captions)
    try:
      encode.encode_cache(sources.open_source(sys.argv[1]), sys.argv[2], encode_fn,
                          cache.EncodeSettings(resolution=64, shard_size={R}), pipeline="fake", batch_size=16)
    finally:
      print("encoded", json.dumps(seen), flush=True)
""").format(tests=str(Path(__file__).parent), R=R)


def driver(tmp_path) -> Path:
  path = tmp_path / "driver.py"
  path.write_text(DRIVER)
  return path


def encoded(stdout: str) -> list[int]:
  return sorted(json.loads(stdout.split("encoded ", 1)[1]))


def error_line(stderr: str) -> str:
  """The last line, which must be the only message: no traceback."""
  assert "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def free_in(line: str) -> int:
  return int(re.search(r"(\d+) bytes (\([^)]*\) )?free", line).group(1))


def assert_finished_shards_verify(cache_dir: Path, finished, missing) -> None:
  report = cache.verify_cache(cache_dir)
  assert not report.finished and not report.bad
  assert report.good == [str(shard(cache_dir, k)) for k in finished]
  assert report.missing == [str(shard(cache_dir, k)) for k in missing]
  assert not list(cache_dir.glob(".*"))  # no half-written shard or sidecar left behind


def tmpfs_usable(tmp_path) -> str | None:
  """None if this process may mount a tmpfs in a private mount namespace, else why not."""
  if shutil.which("unshare") is None:
    return "no unshare command"
  (tmp_path / "probe").mkdir()
  proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path / 'probe'}"],
                        capture_output=True, text=True)
  return None if proc.returncode == 0 else f"cannot mount a tmpfs in a mount namespace: {proc.stderr.strip()}"


def test_out_of_disk_on_a_small_tmpfs(base, tmp_path):
  """Three runs on one tmpfs: one that stops before a shard that cannot fit (the free-space check), one that runs
  out of space writing it (ENOSPC), and one after the tmpfs is grown (space freed) that completes the cache."""
  if reason := tmpfs_usable(tmp_path):
    pytest.skip(reason)
  s0, s1, s2 = base.sizes[:3]
  page = 4096
  slack = 4 * page  # sidecars and their temporaries
  sizes = {"a": s0 + s1 + slack + s0 // 2,  # shards 0 and 1 fit, then less than a shard's size is free
           "b": s0 + s1 + slack + s2 - 65536,  # more than shard 0's size free, less than shard 2's
           "c": 8 << 20}
  mnt, keep = tmp_path / "mnt", tmp_path / "keep"
  mnt.mkdir()
  keep.mkdir()
  phases = []
  for phase in "abc":
    mount = (f"mount -t tmpfs -o size={sizes[phase]} tmpfs {mnt}" if phase == "a"
             else f"mount -o remount,size={sizes[phase]} {mnt}")
    phases.append(f"{mount} || exit 97\n"
                  f"{sys.executable} {driver(tmp_path)} {base.parquet} {mnt}/cache > {keep}/{phase}.out "
                  f"2> {keep}/{phase}.err; echo $? > {keep}/{phase}.rc\n"
                  f"stat -f -c '%a %S' {mnt} > {keep}/{phase}.df && cp -a {mnt}/cache {keep}/{phase} || exit 98\n")
  proc = subprocess.run(["unshare", "-m", "bash", "-c", "".join(phases)], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = {}
  for p in "abc":
    avail, block = map(int, (keep / f"{p}.df").read_text().split())
    result[p] = SimpleNamespace(rc=int((keep / f"{p}.rc").read_text()), out=(keep / f"{p}.out").read_text(),
                                err=(keep / f"{p}.err").read_text(), free=avail * block)
  target = f"{mnt}/cache/{cache.shard_name(2, NUM_SHARDS)}.array_record"

  a = result["a"]  # stopped by the free-space check, before encoding shard 2
  assert a.rc == 1, a.err[-3000:]
  line = error_line(a.err)
  assert line.startswith("error: not enough disk space") and target in line and free_in(line) == a.free, line
  assert encoded(a.out) == base.ids[0] + base.ids[1]
  assert_finished_shards_verify(keep / "a", finished=(0, 1), missing=(2, 3))

  b = result["b"]  # the free-space check passes; writing shard 2 runs out of space
  assert b.rc == 1, b.err[-3000:]
  line = error_line(b.err)
  assert line.startswith("error: out of disk space") and target in line and "No space left on device" in line, line
  assert free_in(line) == b.free  # measured after the half-written shard was removed
  assert encoded(b.out) == base.ids[2]
  assert_finished_shards_verify(keep / "b", finished=(0, 1), missing=(2, 3))
  assert mtimes(keep / "b", (0, 1)) == mtimes(keep / "a", (0, 1))

  c = result["c"]  # after space was freed: only the missing shards
  assert c.rc == 0, c.err[-3000:]
  assert encoded(c.out) == base.ids[2] + base.ids[3]
  assert mtimes(keep / "c", (0, 1)) == mtimes(keep / "a", (0, 1))
  assert json.loads((keep / "c" / "manifest.json").read_text()) == base.manifest
  assert cache.verify_cache(keep / "c").ok
  assert_same_records(keep / "c", base.cache)


def test_out_of_disk_by_a_file_size_limit(base, tmp_path):
  """`ulimit -f`: no file may grow past a size between shard 0's and shard 2's, so writing shard 2 fails (EFBIG, as
  ENOSPC on a full disk); without the limit the re-run completes only the missing shards."""
  out = tmp_path / "cache"
  limit_kib = (base.sizes[0] + base.sizes[2]) // 2 // 1024
  cmd = [sys.executable, str(driver(tmp_path)), str(base.parquet), str(out)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(["bash", "-c", f'ulimit -f {limit_kib} && exec "$@"', "bash", *cmd], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  line = error_line(run.stderr)
  target = f"{out}/{cache.shard_name(2, NUM_SHARDS)}.array_record"
  assert line.startswith("error: out of disk space") and target in line and "File too large" in line, line
  assert free_in(line) > 0
  assert encoded(run.stdout) == base.ids[0] + base.ids[1] + base.ids[2]
  assert_finished_shards_verify(out, finished=(0, 1), missing=(2, 3))
  before = mtimes(out, (0, 1))
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert encoded(again.stdout) == base.ids[2] + base.ids[3]
  assert mtimes(out, (0, 1)) == before
  assert cache.read_manifest(out) == base.manifest
  assert_same_records(out, base.cache)
