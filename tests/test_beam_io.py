"""pipeline.io and pipeline.writers: numbered line reading, damaged files, sorted
shards, TFRecords, atomic publishing."""

import datetime as dt
import gzip
import os
import random
import re

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
import pytest
import tensorflow as tf

from core import workdir as workdir_lib
from pipeline import io
from pipeline import writers


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def _lines(path, **kwargs):
  return [(line.line_number, line.data, line.size) for line in io.iter_lines(path, **kwargs)]


def test_lines_are_numbered_across_chunk_boundaries(tmp_path, monkeypatch):
  monkeypatch.setattr(io, "_CHUNK_BYTES", 5)
  data = b"first line\n\nthird, a longer line than a chunk\r\nlast without newline"
  for path in (_write(f"{tmp_path}/a.jsonl", data),
               _write(f"{tmp_path}/a.jsonl.gz", gzip.compress(data))):
    assert _lines(path) == [(1, b"first line", 10), (2, b"", 0),
                            (3, b"third, a longer line than a chunk\r", 34),
                            (4, b"last without newline", 20)]


def test_a_final_newline_does_not_make_a_line_and_empty_files_have_none(tmp_path):
  assert _lines(_write(f"{tmp_path}/a.jsonl", b"x\n")) == [(1, b"x", 1)]
  assert _lines(_write(f"{tmp_path}/b.jsonl", b"\n")) == [(1, b"", 0)]
  assert _lines(_write(f"{tmp_path}/c.jsonl", b"")) == []
  assert _lines(_write(f"{tmp_path}/d.jsonl.gz", gzip.compress(b""))) == []


def test_an_overlong_line_is_cut_but_keeps_its_size(tmp_path, monkeypatch):
  monkeypatch.setattr(io, "_CHUNK_BYTES", 8)
  path = _write(f"{tmp_path}/a.jsonl", b"short\n" + b"y" * 100 + b"\nnext\n" + b"z" * 11)
  assert _lines(path, max_line_bytes=10, keep_bytes=4) == [
      (1, b"short", 5), (2, b"yyyy", 100), (3, b"next", 4), (4, b"zzzz", 11)]


def test_concatenated_gzip_members_are_read_whole(tmp_path):
  path = _write(f"{tmp_path}/a.jsonl.gz",
                gzip.compress(b"a\nb") + gzip.compress(b"c\n") + gzip.compress(b"d\n"))
  assert [data for _, data, _ in _lines(path)] == [b"a", b"bc", b"d"]


@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "bad_checksum"])
def test_a_damaged_gzip_raises_naming_the_file(tmp_path, damage):
  data = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(5000)))
  if damage == "truncated":
    data = data[:-100]
  elif damage == "not_gzip":
    data = b"plain text\n"
  else:
    data = data[:-8] + bytes(8)
  path = _write(f"{tmp_path}/bad.jsonl.gz", data)
  with pytest.raises(io.UnreadableFileError, match=f"cannot read {path}"):
    list(io.iter_lines(path))


@pytest.mark.parametrize("suffix", [".tfrecord.gz", ".tfrecord"])
def test_tfrecords_are_tensorflows_bytes_and_readable(tmp_path, monkeypatch, suffix):
  # Small chunks: compression crosses many chunk boundaries, as a large shard does.
  monkeypatch.setattr(writers, "_CHUNK_BYTES", 100)
  rng = random.Random(0)
  records = [b"alpha", b"", b"\x00" * 1000] + [
      bytes(rng.randrange(256) for _ in range(rng.randrange(400))) for _ in range(200)]
  compression = "GZIP" if suffix.endswith(".gz") else ""
  for name, data in (("some", records), ("none", [])):
    ours = f"{tmp_path}/{name}{suffix}"
    assert writers.write_shard(ours, data) == len(data)
    theirs = f"{tmp_path}/{name}-tf{suffix}"
    with tf.io.TFRecordWriter(theirs, options=compression) as writer:
      for record in data:
        writer.write(record)
    with open(ours, "rb") as f, open(theirs, "rb") as g:
      assert f.read() == g.read()
    assert [r.numpy() for r in tf.data.TFRecordDataset(
        ours, compression_type=compression)] == data


def test_other_shards_are_newline_terminated_lines(tmp_path):
  writers.write_shard(f"{tmp_path}/lines.jsonl.gz", [b"x", b"y"])
  assert gzip.decompress(open(f"{tmp_path}/lines.jsonl.gz", "rb").read()) == b"x\ny\n"


def test_sharded_by_key_groups_by_the_keys_first_field_in_key_order(tmp_path):
  keyed = [((f"f{k % 5}", k), f"{k}".encode()) for k in range(60)]
  random.Random(1).shuffle(keyed)
  out = f"{tmp_path}/out"
  with beam.Pipeline(runner=FnApiRunner()) as p:
    written = (p | beam.Create(keyed)
               | writers.WriteShardedByKey(out, "dead", 3, ".jsonl", f"{tmp_path}/runs"))
    assert_that(written | beam.Map(lambda kv: kv[1]) | beam.CombineGlobally(sum),
                equal_to([60]))
  assert sorted(os.listdir(out)) == writers.shard_names("dead", 3, ".jsonl")
  shard_of_file = {}
  for name in os.listdir(out):
    lines = open(f"{out}/{name}", "rb").read().split()
    keys = [(f"f{int(line) % 5}", int(line)) for line in lines]
    assert keys == sorted(keys)
    for file, _ in keys:
      assert shard_of_file.setdefault(file, name) == name  # a file's records stay together
  assert len(shard_of_file) == 5


@pytest.mark.parametrize("buffer_bytes", [1, 1 << 20])
def test_sorted_shards_merge_runs_into_the_same_bytes(tmp_path, buffer_bytes):
  rng = random.Random(0)
  keys = [(rng.randrange(50), f"id{k}") for k in range(400)]
  records = [(f"s{k % 3}.tfrecord.gz", (key, repr(key).encode())) for k, key in
             enumerate(keys)]
  names = ["s0.tfrecord.gz", "s1.tfrecord.gz", "s2.tfrecord.gz", "empty.tfrecord.gz"]
  out = f"{tmp_path}/out"
  with beam.Pipeline(runner=FnApiRunner()) as p:
    written = (p | beam.Create(records)
               | writers.WriteSortedShards(out, names, f"{tmp_path}/runs", buffer_bytes))
    assert_that(written, equal_to([("s0.tfrecord.gz", 134), ("s1.tfrecord.gz", 133),
                                   ("s2.tfrecord.gz", 133), ("empty.tfrecord.gz", 0)]))
  runs = os.listdir(f"{tmp_path}/runs")
  assert len(runs) == (400 if buffer_bytes == 1 else 3)
  for k, name in enumerate(names[:3]):
    read = [r.numpy() for r in tf.data.TFRecordDataset(f"{out}/{name}", compression_type="GZIP")]
    assert read == [repr(key).encode() for key in sorted(keys[k::3])]
  assert list(tf.data.TFRecordDataset(f"{out}/empty.tfrecord.gz", compression_type="GZIP")) == []


def test_publish_replaces_the_previous_directory(tmp_path):
  final = f"{tmp_path}/data/2024-01-01"
  _write(f"{final}/old-only.txt", b"old")
  _write(f"{final}/stats.json", b"old")
  tmp = io.temp_dir(final)
  assert os.path.basename(tmp).startswith(".tmp-2024-01-01-")
  _write(f"{tmp}/stats.json", b"new")
  io.publish(tmp, final, "stats.json")
  assert sorted(os.listdir(f"{tmp_path}/data")) == ["2024-01-01"]
  assert os.listdir(final) == ["stats.json"]
  assert open(f"{final}/stats.json", "rb").read() == b"new"


def test_stale_attempts_are_removed_and_nothing_else(tmp_path):
  final = f"{tmp_path}/data/2024-01-01"
  for name in (".tmp-2024-01-01-aaa", ".old-2024-01-01-bbb", ".tmp-2024-01-02-ccc",
               "2024-01-01"):
    _write(f"{tmp_path}/data/{name}/f", b"x")
  removed = io.remove_stale_temp_dirs(final)
  assert [os.path.basename(r) for r in removed] == [".old-2024-01-01-bbb",
                                                     ".tmp-2024-01-01-aaa"]
  assert sorted(os.listdir(f"{tmp_path}/data")) == [".tmp-2024-01-02-ccc", "2024-01-01"]


@pytest.mark.parametrize("local", [True, False])
def test_partition_files_are_the_files_directly_in_it(tmp_path, monkeypatch, local):
  # local=False lists through Beam's match, as on gs:// (no symbolic links there).
  monkeypatch.setattr(io, "is_local_path", lambda path: local)
  part = f"{tmp_path}/logs/2024-01-01"
  for name in ("b.jsonl", "a.jsonl.gz", ".hidden", "_SUCCESS", ".tmp/x.jsonl",
               "_temporary/0/x.jsonl"):
    _write(f"{part}/{name}", b"{}\n")
  os.makedirs(f"{part}/empty_folder")
  assert io.partition_inputs(part) == [f"{part}/a.jsonl.gz", f"{part}/b.jsonl"]
  assert workdir_lib.partition_dates(f"{tmp_path}/logs") == [dt.date(2024, 1, 1)]
  assert io.partition_inputs(f"{tmp_path}/logs/2024-01-02") == []
  _write(f"{part}/sub/c.jsonl", b"{}\n")
  with pytest.raises(io.PartitionLayoutError,
                     match=re.escape(f"{part}/sub/c.jsonl (in a subfolder)")):
    io.partition_inputs(part)


def test_partition_files_refuse_dangling_and_followed_links(tmp_path):
  part = f"{tmp_path}/logs/2024-01-01"
  _write(f"{part}/a.jsonl", b"{}\n")
  _write(f"{tmp_path}/elsewhere/x.jsonl", b"{}\n")
  os.symlink(f"{tmp_path}/elsewhere/x.jsonl", f"{part}/linked.jsonl")   # read
  os.symlink(f"{tmp_path}/missing.jsonl", f"{part}/.hidden_link")       # not read
  os.symlink(part, f"{part}/_loop")                                      # hidden
  assert io.partition_inputs(part) == [f"{part}/a.jsonl", f"{part}/linked.jsonl"]
  os.symlink(f"{tmp_path}/missing.jsonl", f"{part}/dangling.jsonl")
  os.symlink(f"{tmp_path}/elsewhere", f"{part}/linked_folder")
  os.symlink(part, f"{part}/loop")  # its files are the partition's own: walked once
  with pytest.raises(io.PartitionLayoutError) as raised:
    io.partition_inputs(part)
  assert str(raised.value) == (
      f"{part} holds 2 file(s) that the job would not read: "
      f"{part}/dangling.jsonl (a dangling symbolic link to {tmp_path}/missing.jsonl); "
      f"{part}/linked_folder/x.jsonl (in a subfolder). Only files directly in a "
      "partition are read: move or remove these.")
