"""File I/O of the Beam job, all through Beam's filesystems: lines, shards, publishing.

Three jobs, each needed because Beam's stock transforms do not do it:
- `ReadLines` yields every line with its file and 1-based line number (ReadFromText
  drops both), decompresses gzip itself so that a corrupt or truncated file fails
  with its name (Beam's reader returns a truncated gzip's prefix without complaint),
  and keeps at most `max_line_bytes` of any line in memory.
- `WriteSortedShards` writes one file per shard with its records in key order (an
  external merge sort), so output bytes depend only on the input, never on bundle
  order, and no shard has to fit in memory.
- `publish` moves a finished temporary directory into place, so a reader never
  sees half a day.

Paths may be local, gs://, hdfs:// or anything else Beam has a filesystem for.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import heapq  # noqa: E402
import posixpath  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
import zlib  # noqa: E402
from typing import Any, Iterable, Iterator, NamedTuple, Sequence  # noqa: E402

import apache_beam as beam  # noqa: E402
from apache_beam.io import fileio  # noqa: E402
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.transforms.window import GlobalWindows  # noqa: E402
from apache_beam.utils.windowed_value import WindowedValue  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline import schema  # noqa: E402

_CHUNK_BYTES = 1 << 20
_GZIP_WBITS = zlib.MAX_WBITS | 16
# Filesystems whose directory rename is a single atomic operation.
_DIRECTORY_RENAME_SCHEMES = (None, "file", "hdfs")
LINE_COUNTS = "line_counts"
# A run entry: key length, record length, then both.
_RUN_HEADER = struct.Struct(">II")
# What a buffered (key, record) costs beyond the record's bytes, roughly.
_ENTRY_OVERHEAD_BYTES = 200


class UnreadableFileError(IOError):
  """A file that cannot be read to its end (corrupt or truncated compression, I/O)."""


class RawLine(NamedTuple):
  """One input line: where it is, its bytes, and its true length.

  `data` is the whole line without its newline, except when the line is longer
  than the reader's `max_line_bytes`: then `data` is only its first `keep_bytes`
  and `size` (> max_line_bytes) says how long it really was.
  """
  file: str
  line_number: int
  data: bytes
  size: int


def _gunzip(raw: Any) -> Iterator[bytes]:
  """Decompresses a gzip stream (concatenated members too) in bounded chunks.

  Raises:
    EOFError: the stream ends inside a member (a truncated file).
    zlib.error: the stream is not gzip or fails its checksum.
  """
  decompressor = zlib.decompressobj(_GZIP_WBITS)
  member_started = False
  while True:
    data = raw.read(_CHUNK_BYTES)
    if not data:
      break
    while data:
      member_started = True
      out = decompressor.decompress(data, _CHUNK_BYTES)
      if out:
        yield out
      if decompressor.eof:
        data = decompressor.unused_data
        decompressor = zlib.decompressobj(_GZIP_WBITS)
        member_started = False
      else:
        data = decompressor.unconsumed_tail
  tail = decompressor.flush()
  if tail:
    yield tail
  if member_started and not decompressor.eof:
    raise EOFError("compressed stream ends before the end of its last gzip member")


def _chunks(path: str) -> Iterator[bytes]:
  """The decompressed bytes of a file, by its extension (.gz is read by `_gunzip`)."""
  compression = CompressionTypes.detect_compression_type(path)
  if compression == CompressionTypes.GZIP:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
      yield from _gunzip(raw)
    return
  with FileSystems.open(path, compression_type=compression) as f:
    while True:
      chunk = f.read(_CHUNK_BYTES)
      if not chunk:
        return
      yield chunk


def iter_lines(path: str, max_line_bytes: int = schema.MAX_LINE_BYTES,
               keep_bytes: int = schema.DEAD_LETTER_LINE_BYTES) -> Iterator[RawLine]:
  """Yields every line of a file as a `RawLine`, numbered from 1.

  Lines are split on b"\\n" only; a last line without a newline is still a line,
  and a final newline does not start an empty one. Memory per line is bounded by
  `max_line_bytes` whatever the input (a 10 GB line of binary garbage included).

  Raises:
    UnreadableFileError: naming the file, when it cannot be read to its end.
  """
  number = 0
  head = b""
  size = 0
  try:
    for chunk in _chunks(path):
      pieces = chunk.split(b"\n")
      last = len(pieces) - 1
      for i, piece in enumerate(pieces):
        size += len(piece)
        if size <= max_line_bytes:
          head = head + piece if head else piece
        elif len(head) < keep_bytes:
          head += piece[:keep_bytes - len(head)]
        else:
          head = head[:keep_bytes]
        if i < last:
          number += 1
          yield RawLine(path, number, head, size)
          head, size = b"", 0
  except (OSError, EOFError, zlib.error, ValueError) as e:
    raise UnreadableFileError(
        f"cannot read {path} (after line {number}): {type(e).__name__}: {e}") from e
  if size or head:
    yield RawLine(path, number + 1, head, size)


def partition_of(path: str) -> str:
  """The partition (parent directory name, YYYY-MM-DD) a file belongs to."""
  return posixpath.basename(posixpath.dirname(path.replace("\\", "/")))


def is_data_file(path: str) -> bool:
  """False for names that writers use for temporary or marker files: .* and _*."""
  return not posixpath.basename(path.replace("\\", "/")).startswith((".", "_"))


class PartitionLayoutError(FileNotFoundError):
  """A partition holds data files that the job would not read (in a subfolder, or
  a dangling symbolic link): like a missing file, part of the input is not where
  the job reads it."""


def is_local_path(path: str) -> bool:
  """Whether a path is on the local disk (no scheme): symbolic links, flock, os.walk."""
  return FileSystems.get_scheme(path) is None


def _relative_parts(root: str, path: str) -> list[str]:
  """The components of `path` below `root`."""
  return path[len(root):].replace("\\", "/").strip("/").split("/")


def _local_partition(directory: str) -> tuple[list[str], list[str]]:
  """(data files directly in `directory`, data files it would not read, with why)."""
  files, unread, seen = [], [], set()

  def fail(error: OSError) -> None:
    raise error

  for dirpath, dirnames, filenames in os.walk(directory, onerror=fail, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # a symbolic link loop
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(name for name in dirnames if is_data_file(name))
    nested = os.path.normpath(dirpath) != os.path.normpath(directory)
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if not is_data_file(name):
        continue
      if not os.path.exists(path):
        unread.append(f"{path} (a dangling symbolic link to {os.readlink(path)})")
      elif nested:
        unread.append(f"{path} (in a subfolder)")
      else:
        files.append(path)
  return files, unread


def partition_files(directory: str) -> list[str]:
  """The data files directly in a partition directory, sorted: what the job reads.

  Hidden and marker names (.*, _*) are left out, files and subfolders alike. An
  absent directory has no files.

  Raises:
    PartitionLayoutError: naming every other file that the job would not read: one
      in a subfolder, or a dangling symbolic link.
  """
  if is_local_path(directory):
    if not os.path.isdir(directory):
      return []
    files, unread = _local_partition(directory)
  else:
    files, unread = [], []
    for metadata in FileSystems.match(
        [FileSystems.join(directory, "**")])[0].metadata_list:
      parts = _relative_parts(directory, metadata.path)
      if all(is_data_file(part) for part in parts):
        if len(parts) == 1:
          files.append(metadata.path)
        else:
          unread.append(f"{metadata.path} (in a subfolder)")
  if unread:
    raise PartitionLayoutError(
        f"{directory} holds {len(unread)} file(s) that the job would not read: "
        f"{'; '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}. Only files "
        "directly in a partition are read: move or remove these.")
  return sorted(files)


def partition_names(root: str) -> list[str]:
  """The names of the directories in `root` (its partitions), sorted."""
  if is_local_path(root):
    if not os.path.isdir(root):
      return []
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  names = set()
  for metadata in FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list:
    parts = _relative_parts(root, metadata.path)
    if len(parts) > 1:
      names.add(parts[0])
  return sorted(names)


class _ReadLinesFn(beam.DoFn):
  """Path -> its `RawLine`s, plus the file's line count on the LINE_COUNTS output."""

  def __init__(self, max_line_bytes: int, keep_bytes: int):
    self._max_line_bytes = max_line_bytes
    self._keep_bytes = keep_bytes

  def process(self, path: str) -> Iterator[Any]:
    count = 0
    for line in iter_lines(path, self._max_line_bytes, self._keep_bytes):
      count += 1
      yield line
    yield beam.pvalue.TaggedOutput(LINE_COUNTS, (path, count))


class ReadLines(beam.PTransform):
  """File patterns -> the `RawLine`s of every matching data file.

  Returns a tuple-like result: `.lines` (RawLine) and `.line_counts` ((file, n) for
  every file read, n may be 0). Files are spread over workers one by one (gzip does
  not split). Hidden and marker files (.*, _*) are not read.
  """

  def __init__(self, file_filter=is_data_file, allow_empty: bool = True,
               max_line_bytes: int = schema.MAX_LINE_BYTES,
               keep_bytes: int = schema.DEAD_LETTER_LINE_BYTES):
    super().__init__()
    self._file_filter = file_filter
    self._empty = fileio.EmptyMatchTreatment.ALLOW if allow_empty else (
        fileio.EmptyMatchTreatment.DISALLOW)
    self._max_line_bytes = max_line_bytes
    self._keep_bytes = keep_bytes

  def expand(self, patterns):
    return (
        patterns
        | "Match" >> fileio.MatchAll(self._empty)
        | "Paths" >> beam.Map(lambda metadata: metadata.path)
        | "DataFiles" >> beam.Filter(self._file_filter)
        | "SpreadFiles" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(_ReadLinesFn(self._max_line_bytes, self._keep_bytes))
        .with_outputs(LINE_COUNTS, main="lines"))


def write_tfrecords(path: str, records: Iterable[bytes]) -> int:
  """Writes records as a TFRecord file (gzip when `path` ends in .gz); returns the count.

  TFRecord framing needs CRC32C. On this stack only TensorFlow's writer has a fast
  one (Beam's WriteToTFRecord wants crcmod/google-crc32c), so the file is written
  locally by TensorFlow and then copied to `path` through Beam's filesystems.
  """
  options = "GZIP" if path.endswith(".gz") else ""
  count = 0
  with tempfile.TemporaryDirectory(prefix="towerstream-") as tmp:
    local = os.path.join(tmp, "records")
    with tf.io.TFRecordWriter(local, options=options) as writer:
      for record in records:
        writer.write(record)
        count += 1
    with open(local, "rb") as src, FileSystems.create(
        path, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
      shutil.copyfileobj(src, dst, _CHUNK_BYTES)
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

  Buffers at most about `buffer_bytes` of records per DoFn instance; a full buffer,
  and the end of a bundle, writes one run per shard it holds.
  """

  def __init__(self, scratch_dir: str, buffer_bytes: int):
    self._scratch_dir = scratch_dir
    self._buffer_bytes = buffer_bytes

  def start_bundle(self) -> None:
    self._buffer: dict[str, list[tuple[Any, bytes]]] = {}
    self._size = 0

  def _spill(self) -> Iterator[tuple[str, str]]:
    for shard, entries in self._buffer.items():
      entries.sort(key=lambda entry: entry[0])
      path = FileSystems.join(self._scratch_dir, f"{shard}.{uuid.uuid4().hex}.run")
      _write_run(path, entries)
      yield shard, path
    self._buffer, self._size = {}, 0

  def process(self, element: tuple[str, tuple[Any, bytes]]) -> Iterator[tuple[str, str]]:
    shard, entry = element
    self._buffer.setdefault(shard, []).append(entry)
    self._size += len(entry[1]) + _ENTRY_OVERHEAD_BYTES
    if self._size >= self._buffer_bytes:
      yield from self._spill()

  def finish_bundle(self) -> Iterator[WindowedValue]:
    for run in self._spill():
      yield GlobalWindows.windowed_value(run)


class _MergeRunsFn(beam.DoFn):
  """(shard, run paths) -> the shard's file: its runs merged in sort-key order."""

  def __init__(self, directory: str):
    self._directory = directory

  def process(self, element: tuple[str, Iterable[str]]) -> Iterator[tuple[str, int]]:
    shard, runs = element
    merged = heapq.merge(*(_read_run(run) for run in sorted(runs)),
                         key=lambda entry: entry[0])
    yield shard, write_shard(FileSystems.join(self._directory, shard),
                             (record for _, record in merged))


class _WriteEmptyShardFn(beam.DoFn):
  """Shard name -> an empty shard, unless a record was written to it."""

  def __init__(self, directory: str):
    self._directory = directory

  def process(self, name: str, written: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    if name not in {shard for shard, _ in written}:
      yield name, write_shard(FileSystems.join(self._directory, name), [])


class WriteSortedShards(beam.PTransform):
  """(shard name, (sort key, record bytes)) -> one file per shard, records in key order.

  An external merge sort: workers spill sorted runs of their records to
  `scratch_dir` (at most `buffer_bytes` held per worker), then one merge per shard
  streams its runs into the shard's file. No shard has to fit in memory, and no
  record goes through a shuffle (only run paths do). Sort keys are primitives
  (str, int, tuples of them) and unique within a shard, so the bytes written do
  not depend on how the records were split into runs.

  Every name in `shard_names` gets a file, empty when no record names it, so the
  files of an output do not depend on the data. Runs are left in `scratch_dir`
  for the caller to delete with it: deleting them in the merge would make a retried
  merge fail. Returns (shard name, records written).
  """

  def __init__(self, directory: str, shard_names: Sequence[str], scratch_dir: str,
               buffer_bytes: int = 64 << 20):
    super().__init__()
    self._directory = directory
    self._shard_names = list(shard_names)
    self._scratch_dir = scratch_dir
    self._buffer_bytes = buffer_bytes

  def expand(self, keyed):
    written = (keyed
               | "SpillRuns" >> beam.ParDo(
                   _SpillSortedRunsFn(self._scratch_dir, self._buffer_bytes))
               | "GroupRuns" >> beam.GroupByKey()
               | "MergeRuns" >> beam.ParDo(_MergeRunsFn(self._directory)))
    # Empty shards are written after the others (the side input waits for them).
    empty = (keyed.pipeline
             | "ShardNames" >> beam.Create(self._shard_names)
             | "WriteEmpty" >> beam.ParDo(_WriteEmptyShardFn(self._directory),
                                          beam.pvalue.AsList(written)))
    return (written, empty) | "AllShards" >> beam.Flatten()


def shard_names(prefix: str, num_shards: int, suffix: str) -> list[str]:
  """prefix-00000-of-00004suffix, ...: names that sort in shard order."""
  return [f"{prefix}-{i:05d}-of-{num_shards:05d}{suffix}" for i in range(num_shards)]


def shard_of(key: str, num_shards: int) -> int:
  """A stable shard for a key (Python's hash() differs between processes)."""
  return zlib.crc32(key.encode("utf-8")) % num_shards


def temp_dir(final_dir: str) -> str:
  """A fresh sibling of `final_dir` to write into: <parent>/.tmp-<name>-<uuid>."""
  parent, name = FileSystems.split(final_dir)
  return FileSystems.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:12]}")


def remove_stale_temp_dirs(final_dir: str) -> list[str]:
  """Deletes what crashed attempts at `final_dir` left behind; returns what it removed.

  Temporary directories come into being with their first file, so matching files
  finds every attempt that wrote anything.
  """
  parent, name = FileSystems.split(final_dir)
  stale = set()
  for prefix in (".tmp-", ".old-"):
    pattern = FileSystems.join(parent, f"{prefix}{name}-*", "**")
    for metadata in FileSystems.match([pattern])[0].metadata_list:
      relative = metadata.path[len(parent):].lstrip("/\\")
      stale.add(FileSystems.join(parent, relative.replace("\\", "/").split("/")[0]))
  if stale:
    FileSystems.delete(sorted(stale))
  return sorted(stale)


def list_files(directory: str) -> list[str]:
  """Every file under `directory`, sorted."""
  pattern = FileSystems.join(directory, "**")
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def publish(tmp_dir: str, final_dir: str, marker: str) -> None:
  """Moves a finished `tmp_dir` to `final_dir`, replacing a previous `final_dir`.

  Where directories rename atomically (local disk, HDFS) the directory is renamed,
  so `final_dir` appears whole. On object stores (gs://, s3://) renames are per
  object: the old `marker` goes first and the new `marker` last, so a reader that
  trusts only directories holding `marker` never sees a mixed or partial one.
  """
  if FileSystems.get_scheme(final_dir) in _DIRECTORY_RENAME_SCHEMES:
    old = None
    if FileSystems.exists(final_dir):
      parent, name = FileSystems.split(final_dir)
      old = FileSystems.join(parent, f".old-{name}-{uuid.uuid4().hex[:12]}")
      FileSystems.rename([final_dir], [old])
    parent, _ = FileSystems.split(final_dir)
    if not FileSystems.exists(parent):
      FileSystems.mkdirs(parent)
    FileSystems.rename([tmp_dir], [final_dir])
    if old is not None:
      FileSystems.delete([old])
    return
  old_marker = FileSystems.join(final_dir, marker)
  if FileSystems.exists(old_marker):
    FileSystems.delete([old_marker])
  old_files = list_files(final_dir)
  if old_files:
    FileSystems.delete(old_files)
  sources = list_files(tmp_dir)
  sources.sort(key=lambda path: posixpath.basename(path) == marker)
  destinations = [FileSystems.join(final_dir, path[len(tmp_dir):].lstrip("/"))
                  for path in sources]
  FileSystems.rename(sources, destinations)
  FileSystems.delete([tmp_dir])
