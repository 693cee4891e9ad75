"""The Beam job's output files, sorted and sharded, written through Beam's filesystems.

- `WriteSortedShards` writes one file per shard with its records in key order: an
  external merge sort (kept: no Beam sink writes a file per key in key order, and
  sorting in memory would hold a whole shard), so output bytes depend only on the
  input, never on bundle order.
- `WriteShardedByKey` is that for records sharded by a stable hash of a key: the
  corpus, the dead letters and the user histories.
- `write_tfrecords` frames records as TFRecords itself (8 bytes of length and two
  masked CRC32Cs from google-crc32c) and gzips them as TensorFlow's writer does,
  straight to any Beam filesystem: the bytes are tf.io.TFRecordWriter's.
"""

import functools
import heapq
import json
import struct
import uuid
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from core import tfrecord
from pipeline import io

_CHUNK_BYTES = 1 << 20
# A run entry: key length, record length, then both.
_RUN_HEADER = struct.Struct(">II")
# What a buffered (key, record) costs beyond the record's bytes, roughly.
_ENTRY_OVERHEAD_BYTES = 200
# tf.io.TFRecordWriter's GZIP options (ZlibCompressionOptions::GZIP): default level,
# gzip wrapper, memLevel 9. The same options give the same bytes.
_TF_GZIP = (zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, zlib.MAX_WBITS | 16, 9)


def _masked_crc32c(data: bytes) -> bytes:
  """TFRecord's masked CRC32C of `data`, little-endian."""
  return struct.pack("<I", tfrecord.masked_crc32c(data))


def tfrecord_frame(record: bytes) -> bytes:
  """One record in TFRecord framing: length, its masked CRC, the data, its masked CRC."""
  length = struct.pack("<Q", len(record))
  return b"".join((length, _masked_crc32c(length), record, _masked_crc32c(record)))


def write_tfrecords(path: str, records: Iterable[bytes]) -> int:
  """Writes records as a TFRecord file (gzip when `path` ends in .gz); returns the count.

  Framed records are compressed in chunks of about 1 MB; zlib's output does not
  depend on how its input is chunked, so the file is byte for byte what
  tf.io.TFRecordWriter writes.
  """
  compressor = zlib.compressobj(*_TF_GZIP) if path.endswith(".gz") else None
  count = 0
  buffer = bytearray()
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:

    def drain() -> None:
      f.write(compressor.compress(buffer) if compressor else bytes(buffer))
      buffer.clear()

    for record in records:
      buffer += tfrecord_frame(record)
      count += 1
      if len(buffer) >= _CHUNK_BYTES:
        drain()
    drain()
    if compressor:
      f.write(compressor.flush())
  return count


def write_lines(path: str, lines: Iterable[bytes]) -> int:
  """Writes newline-terminated lines (gzip when `path` ends in .gz); returns the count."""
  count = 0
  with FileSystems.create(path, compression_type=CompressionTypes.AUTO) as f:
    for line in lines:
      f.write(line)
      f.write(b"\n")
      count += 1
  return count


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes a shard in the format its name says: *.tfrecord[.gz] or lines."""
  if path.endswith((".tfrecord", ".tfrecord.gz")):
    return write_tfrecords(path, records)
  return write_lines(path, records)


def _write_run(path: str, entries: list[tuple[Any, bytes]]) -> None:
  """Writes (sort key, record) pairs as a run: length-prefixed key and record bytes."""
  coder = beam.coders.FastPrimitivesCoder()
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    for key, record in entries:
      encoded = coder.encode(key)
      f.write(_RUN_HEADER.pack(len(encoded), len(record)))
      f.write(encoded)
      f.write(record)


def _read_run(path: str) -> Iterator[tuple[Any, bytes]]:
  """The (sort key, record) pairs of a run, in order."""
  coder = beam.coders.FastPrimitivesCoder()
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    while header := f.read(_RUN_HEADER.size):
      key_size, record_size = _RUN_HEADER.unpack(header)
      key = coder.decode(f.read(key_size))
      yield key, f.read(record_size)


class _SpillSortedRunsFn(beam.DoFn):
  """(shard, (sort key, record)) -> sorted runs on disk, one (shard, run path) each.

  With a `shard_fn`, elements are (sort key, record) and `shard_fn` names their
  shard. Buffers at most about `buffer_bytes` of records per DoFn instance; a full
  buffer, and the end of a bundle, writes one run per shard it holds.

  A run's path is emitted when its first record arrives, and the run is written
  before the bundle ends: nothing is emitted from finish_bundle, whose outputs
  Beam's DaskRunner drops. Downstream is a GroupByKey, which reads a bundle's
  outputs only once the bundle has finished, its runs with it.
  """

  def __init__(self, scratch_dir: str, buffer_bytes: int,
               shard_fn: Optional[Callable[[tuple[Any, bytes]], str]] = None):
    self._scratch_dir = scratch_dir
    self._buffer_bytes = buffer_bytes
    self._shard_fn = shard_fn

  def start_bundle(self) -> None:
    # shard -> (its run's path, the run's entries).
    self._buffer: dict[str, tuple[str, list[tuple[Any, bytes]]]] = {}
    self._size = 0

  def _spill(self) -> None:
    for path, entries in self._buffer.values():
      entries.sort(key=lambda entry: entry[0])
      _write_run(path, entries)
    self._buffer, self._size = {}, 0

  def process(self, element: Any) -> Iterator[tuple[str, str]]:
    if self._shard_fn is None:
      shard, entry = element
    else:
      shard, entry = self._shard_fn(element), element
    if shard not in self._buffer:
      path = FileSystems.join(self._scratch_dir, f"{shard}.{uuid.uuid4().hex}.run")
      self._buffer[shard] = (path, [])
      yield shard, path
    self._buffer[shard][1].append(entry)
    self._size += len(entry[1]) + _ENTRY_OVERHEAD_BYTES
    if self._size >= self._buffer_bytes:
      self._spill()

  def finish_bundle(self) -> None:
    self._spill()


class _MergeRunsFn(beam.DoFn):
  """(shard, run paths) -> the shard's file: its runs merged in sort-key order.

  A None among the paths is the shard's name seeded by `WriteSortedShards`, so a
  shard without records still gets its (empty) file.
  """

  def __init__(self, directory: str):
    self._directory = directory

  def process(self, element: tuple[str, Iterable[Optional[str]]]
              ) -> Iterator[tuple[str, int]]:
    shard, runs = element
    merged = heapq.merge(*(_read_run(run) for run in sorted(r for r in runs if r)),
                         key=lambda entry: entry[0])
    yield shard, write_shard(FileSystems.join(self._directory, shard),
                             (record for _, record in merged))


class WriteSortedShards(beam.PTransform):
  """(shard name, (sort key, record bytes)) -> one file per shard, records in key order.

  Not WriteToTFRecord/WriteToText: their files hold records in arrival order, split
  by bundle, so a re-run would not give the same bytes. An external merge sort:
  workers spill sorted runs of their records to `scratch_dir` (at most
  `buffer_bytes` held per worker), then one merge per shard streams its runs into
  the shard's file. No shard has to fit in memory, and no record goes through a
  shuffle (only run paths do). Sort keys are primitives (str, int, tuples of them)
  and unique within a shard, so the bytes written do not depend on how the records
  were split into runs.

  Every name in `shard_names` gets a file, empty when no record names it, so the
  files of an output do not depend on the data. With `shard_fn`, the input is
  (sort key, record bytes) and `shard_fn` of it names the shard. Runs are left in
  `scratch_dir` for the caller to delete with it: deleting them in the merge would
  make a retried merge fail. Returns (shard name, records written).
  """

  def __init__(self, directory: str, shard_names: Sequence[str], scratch_dir: str,
               buffer_bytes: int = 64 << 20,
               shard_fn: Optional[Callable[[tuple[Any, bytes]], str]] = None):
    super().__init__()
    self._directory = directory
    self._shard_names = list(shard_names)
    self._scratch_dir = scratch_dir
    self._buffer_bytes = buffer_bytes
    self._shard_fn = shard_fn

  def expand(self, keyed):
    runs = keyed | "SpillRuns" >> beam.ParDo(
        _SpillSortedRunsFn(self._scratch_dir, self._buffer_bytes, self._shard_fn))
    # Every shard name joins the group with no run, so that each gets its file.
    names = (keyed.pipeline
             | "ShardNames" >> io.Values([(name, None) for name in self._shard_names]))
    return ((runs, names)
            | "RunsAndNames" >> beam.Flatten()
            | "GroupRuns" >> beam.GroupByKey()
            | "MergeRuns" >> beam.ParDo(_MergeRunsFn(self._directory)))


def shard_names(prefix: str, num_shards: int, suffix: str) -> list[str]:
  """prefix-00000-of-00004suffix, ...: names that sort in shard order."""
  return [f"{prefix}-{i:05d}-of-{num_shards:05d}{suffix}" for i in range(num_shards)]


def shard_of(key: str, num_shards: int) -> int:
  """A stable shard for a key (Python's hash() differs between processes)."""
  return zlib.crc32(key.encode("utf-8")) % num_shards


class WriteShardedByKey(beam.PTransform):
  """(key, record bytes) -> `prefix`-SSSSS-of-NNNNN`suffix` files in `directory`.

  `key` is a tuple of primitives, unique across the input; its first field (a
  string) picks the shard by a stable hash, and each shard holds its records in
  key order. Returns (shard name, records written) for every shard.
  """

  def __init__(self, directory: str, prefix: str, num_shards: int, suffix: str,
               scratch_dir: str):
    super().__init__()
    self._directory = directory
    self._names = shard_names(prefix, num_shards, suffix)
    self._scratch_dir = scratch_dir

  def expand(self, keyed):
    return keyed | "Write" >> WriteSortedShards(
        self._directory, self._names, self._scratch_dir,
        shard_fn=functools.partial(_shard_name, self._names))


def _shard_name(names: Sequence[str], entry: tuple[tuple[Any, ...], bytes]) -> str:
  """The shard of a (key, record) of `WriteShardedByKey`: by its key's first field."""
  return names[shard_of(entry[0][0], len(names))]


def write_json(path: str, value: Any) -> None:
  """Writes `value` as sorted, indented JSON and a newline (stats.json, summary.json).

  Plain FileSystems.create: these files go into a temporary directory that
  `io.publish` moves into place whole.
  """
  with FileSystems.create(path) as f:
    f.write(json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n")
