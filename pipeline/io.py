"""Reading the day's input and publishing its output, through Beam's filesystems.

- `ReadLines`/`iter_lines` yield every line with its file and 1-based line number
  (kept: ReadFromText drops both, and returns a truncated gzip's prefix without
  complaint), decompress gzip themselves so that a corrupt or truncated file fails
  with its name, and keep at most `max_line_bytes` of any line in memory.
- `partition_inputs` lists what a partition holds, refusing files it would not read.
- `publish` moves a finished temporary directory into place, so a reader never
  sees half a day.

Writing the output files is `pipeline.writers`. Paths may be local, gs://, hdfs://
or anything else Beam has a filesystem for.
"""

import os
import posixpath
import uuid
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from core import workdir as workdir_lib
from pipeline import schema

_CHUNK_BYTES = 1 << 20
_GZIP_WBITS = zlib.MAX_WBITS | 16
# Filesystems whose directory rename is a single atomic operation.
_DIRECTORY_RENAME_SCHEMES = (None, "file", "hdfs")
LINE_COUNTS = "line_counts"


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
    dirnames[:] = sorted(name for name in dirnames if workdir_lib.is_data_file(name))
    nested = os.path.normpath(dirpath) != os.path.normpath(directory)
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if not workdir_lib.is_data_file(name):
        continue
      if not os.path.exists(path):
        unread.append(f"{path} (a dangling symbolic link to {os.readlink(path)})")
      elif nested:
        unread.append(f"{path} (in a subfolder)")
      else:
        files.append(path)
  return files, unread


def partition_inputs(directory: str) -> list[str]:
  """The data files directly in a partition directory, sorted: what the job reads.

  Not `core.workdir.partition_files`, which lists data files by date: this walks
  one partition to find what the job would miss there. Hidden and marker names
  (.*, _*) are left out, files and subfolders alike. An absent directory has no
  files.

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
      if all(workdir_lib.is_data_file(part) for part in parts):
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


class Values(beam.PTransform):
  """PBegin -> a PCollection of a few `values` known when the pipeline is built.

  beam.Create costs two steps and, for more than one value, a reshuffle; these lists
  (file patterns, shard names) are tiny, and every step costs the day's job time
  to build, translate and start (bench/daily_catchup.py).
  """

  def __init__(self, values: Sequence[Any]):
    super().__init__()
    self._values = list(values)

  def expand(self, begin):
    values = self._values
    return begin | "Impulse" >> beam.Impulse() | "Values" >> beam.FlatMap(
        lambda _: values)


def _match_paths(pattern: str, allow_empty: bool, file_filter: Callable[[str], bool]
                 ) -> Iterator[tuple[str, None]]:
  """A pattern -> (path, None) for every file it matches that `file_filter` keeps.

  Raises:
    FileNotFoundError: the pattern matches nothing and `allow_empty` is False.
  """
  metadata = FileSystems.match([pattern])[0].metadata_list
  if not metadata and not allow_empty:
    raise FileNotFoundError(f"no file matches {pattern}")
  for path in sorted(m.path for m in metadata):
    if file_filter(path):
      yield path, None


class _ReadLinesFn(beam.DoFn):
  """(path, _) -> its `RawLine`s, plus the file's line count on the LINE_COUNTS output."""

  def __init__(self, max_line_bytes: int, keep_bytes: int):
    self._max_line_bytes = max_line_bytes
    self._keep_bytes = keep_bytes

  def process(self, element: tuple[str, Any]) -> Iterator[Any]:
    path, _ = element
    count = 0
    for line in iter_lines(path, self._max_line_bytes, self._keep_bytes):
      count += 1
      yield line
    yield beam.pvalue.TaggedOutput(LINE_COUNTS, (path, count))


class ReadLines(beam.PTransform):
  """File patterns -> the `RawLine`s of every matching data file.

  Not ReadFromText: that drops the file and line number, and reads a truncated gzip's
  prefix without complaint.

  Returns a tuple-like result: `.lines` (RawLine) and `.line_counts` ((file, n) for
  every file read, n may be 0). Files are spread over workers one by one (gzip does
  not split): a shuffle keyed by path, which is what beam.Reshuffle does with more
  steps. Hidden and marker files (.*, _*) are not read; with `allow_empty=False` a
  pattern that matches no file fails the pipeline.
  """

  def __init__(self, file_filter: Callable[[str], bool] = workdir_lib.is_data_file,
               allow_empty: bool = True, max_line_bytes: int = schema.MAX_LINE_BYTES,
               keep_bytes: int = schema.DEAD_LETTER_LINE_BYTES):
    super().__init__()
    self._file_filter = file_filter
    self._allow_empty = allow_empty
    self._max_line_bytes = max_line_bytes
    self._keep_bytes = keep_bytes

  def expand(self, patterns):
    return (
        patterns
        | "Match" >> beam.FlatMap(_match_paths, self._allow_empty, self._file_filter)
        .with_output_types(Tuple[str, Any])
        | "SpreadFiles" >> beam.GroupByKey()
        | "Read" >> beam.ParDo(_ReadLinesFn(self._max_line_bytes, self._keep_bytes))
        .with_outputs(LINE_COUNTS, main="lines"))


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
