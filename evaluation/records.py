"""What the evaluation reads from W/data: a day's events, and who saw what before it.

Interactions are (user_id, item_id) pairs of the examples of the data days before
the evaluated day: their item counts rank the popularity baseline and cut the
deciles, and each user's items are what "seen items excluded" leaves out. The
co-visitation baseline ranks by how often two items were consecutive in a user's
time-ordered interactions, with the counts of the last RECENT_DAYS days as its
fallback.

`TrainingInteractions` keeps these totals as a running total that each day
extends, in numpy arrays over dense indices of the ids, and persists it in
W/state/evaluation (Workdir.eval_state_path) with the days it covers and their
files. A new process reads that file instead of every earlier day; whatever does
not match W/data (a day rewritten by a forced re-run, a removed day, a missing,
torn or corrupt file) is rebuilt from W/data.

Day D's events are read in chunks (`iter_events`), and `DaySeen` carries what each
user saw from one chunk to the next, so a day of any size is scored in bounded memory.
"""

from __future__ import annotations

import bisect
import collections.abc
import dataclasses
import datetime
import fnmatch
import gzip
import io
import json
import os
import posixpath
import struct
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence
import zlib

from absl import logging
import numpy as np
import tensorflow as tf

from core import tfrecord
from core import workdir as workdir_lib
from models import data
from models import features as features_lib
from serving import corpus as corpus_lib

# The co-visitation baseline falls back to the popularity of this many days before D.
RECENT_DAYS = 7
# The layout of the persisted state; a file of another format is rebuilt.
STATE_FORMAT = 1

# A day's example files as read: (name, size, mtime in ns) each, so a rewritten day
# differs. Names, not paths: a copied workdir keeps its state.
DayFiles = tuple[tuple[str, int, int], ...]
# A day directory's (inode, mtime in ns): while it stays the same, so do its entries,
# and the files need no stat (None: unknown, or too recent to trust; see list_days).
Stamp = Optional[tuple[int, int]]
# A directory modified less than this long before it is listed gets no stamp: a
# file system's clock ticks coarsely, and a change within the same tick would keep it.
_RACY_NS = 2_000_000_000
# Pair keys: first index << _SHIFT | second index (indices stay below 2**31).
_SHIFT = 32
_MAX_INDEX = 1 << 31
_PARSE_BATCH = 1 << 16
# What parsing a damaged record raises: TensorFlow's error, or, when its message
# would quote bytes that are not UTF-8, the failure to decode that message.
_PARSE_ERRORS = (tf.errors.InvalidArgumentError, UnicodeDecodeError)
# What the evaluation reads of a day's events: the query features and the target.
EVENT_FEATURES = features_lib.QUERY_FEATURES + ("item_id",)
# TFRecord framing: a little-endian u64 length and the masked CRC32C of it, the data
# and its masked CRC32C (as pipeline/writers.py writes them).
_LENGTH = struct.Struct("<QI")
_CRC = struct.Struct("<I")


def read_events(workdir: str, day: datetime.date, max_history: int) -> dict[str, np.ndarray]:
  """Day D's events as columns: the query features and the target item_id."""
  return read_columns(data.example_files(workdir, day), EVENT_FEATURES, max_history)


def iter_events(workdir: str, day: datetime.date, max_history: int,
                chunk: int = _PARSE_BATCH) -> Iterator[dict[str, np.ndarray]]:
  """Day D's events as `read_events` gives them, `chunk` events at a time (the last
  fewer), in the same order: a day of any size in bounded memory."""
  return iter_columns(data.example_files(workdir, day), EVENT_FEATURES, max_history,
                      chunk)


def read_columns(files: Sequence[str], names: Sequence[str],
                 max_history: int = features_lib.MAX_HISTORY) -> dict[str, np.ndarray]:
  """The `names` features of every record of `files`, in order, as numpy columns.

  The columns of serving.corpus.read_columns, at a fraction of the cost for a day
  of Beam's two dozen hourly shards: the records are unframed here and parsed
  together, not through a tf.data pipeline per file.

  Raises:
    ValueError: a file cannot be read or parsed (naming it and the record reached).
  """
  parts = list(iter_columns(files, names, max_history))
  return {name: corpus_lib.concat_padded([p[name] for p in parts]) if parts
          else corpus_lib.empty_column(name) for name in names}


def iter_columns(files: Sequence[str], names: Sequence[str],
                 max_history: int = features_lib.MAX_HISTORY,
                 chunk: int = _PARSE_BATCH) -> Iterator[dict[str, np.ndarray]]:
  """`read_columns`, `chunk` records at a time (the last fewer; none for no records):
  only one chunk's records and columns are held, whatever the files hold. A 2-D
  column is as wide as the widest value of its chunk.

  Raises:
    ValueError: as `read_columns`, once the chunk holding the damage is reached.
  """
  if chunk < 1:
    raise ValueError(f"chunk must be positive, got {chunk}")
  pending: list[bytes] = []
  spans: list[tuple[int, str, int]] = []  # where each file starts in pending (_parse)
  for path in files:
    for number, record in enumerate(iter_records(path)):
      if not pending or spans[-1][1] != path:
        spans.append((len(pending), path, number))
      pending.append(record)
      if len(pending) == chunk:
        yield _parse(pending, spans, names, max_history)
        pending, spans = [], []
  if pending:
    yield _parse(pending, spans, names, max_history)


def _parse(records: list[bytes], spans: Sequence[tuple[int, str, int]],
           names: Sequence[str], max_history: int) -> dict[str, np.ndarray]:
  """The columns of `records`; `spans` says where they come from: (index in
  `records`, file, record number in the file) of each file's first one.

  Raises:
    ValueError: a record is not a valid Example (naming its file and number).
  """
  try:
    return {name: value.numpy() for name, value in features_lib.parse_examples(
        tf.constant(records), names, max_history=max_history).items()}
  except _PARSE_ERRORS as e:
    starts = [start for start, _, _ in spans]
    for at, record in enumerate(records):  # which record: parse each alone
      try:
        features_lib.parse_examples(tf.constant([record]), names, max_history=max_history)
      except _PARSE_ERRORS as error:
        start, path, number = spans[bisect.bisect_right(starts, at) - 1]
        raise ValueError(f"{path}: record {number + at - start} is not a valid Example: "
                         f"{getattr(error, 'message', error)}") from e
    raise ValueError(f"{spans[0][1]} and {len(spans) - 1} more: unparsable: "
                     f"{getattr(e, 'message', e)}") from e


def read_records(path: str) -> list[bytes]:
  """The records of a gzip TFRecord file, each length and record checked by its CRC.

  Raises:
    ValueError: the file is not whole gzip, or a record is truncated or corrupt
      (naming the file and the record).
  """
  return list(iter_records(path))


def iter_records(path: str) -> Iterator[bytes]:
  """`read_records`, one record at a time: the file is decompressed as it is read.

  Raises:
    ValueError: as `read_records`, once the damage is reached.
  """
  with tf.io.gfile.GFile(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
    number, at = 0, 0

    def read(size: int) -> bytes:
      try:
        return f.read(size)
      except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a whole gzip file: {e}") from e

    while head := read(_LENGTH.size):
      where = f"{path}: record {number} (byte {at} uncompressed)"
      if len(head) < _LENGTH.size:
        raise ValueError(f"{where}: truncated length")
      length, crc = _LENGTH.unpack(head)
      if tfrecord.masked_crc32c(head[:8]) != crc:
        raise ValueError(f"{where}: corrupt length (CRC mismatch)")
      record = read(length)
      check = read(_CRC.size)
      if len(record) < length or len(check) < _CRC.size:
        raise ValueError(f"{where}: truncated ({length} bytes announced)")
      if tfrecord.masked_crc32c(record) != _CRC.unpack(check)[0]:
        raise ValueError(f"{where}: corrupt data (CRC mismatch)")
      yield record
      number += 1
      at += _LENGTH.size + length + _CRC.size


def list_days(workdir: str,
              known: Optional[Mapping[datetime.date, tuple[Stamp, DayFiles]]] = None,
              until: Optional[datetime.date] = None
              ) -> dict[datetime.date, tuple[Stamp, DayFiles]]:
  """Every data day of W/data up to `until` (all without it): its directory's stamp,
  and its example files in name (= time) order.

  This runs every day over every earlier day, so on a local disk a day whose
  directory keeps the stamp `known` for it keeps its files without a stat per file
  (Beam publishes a day as a new directory; adding, removing or renaming a file
  changes the directory's mtime). Other file systems are listed by one glob and a
  stat per file.
  """
  root = workdir_lib.Workdir(workdir).data_root
  known = known or {}
  listed: dict[datetime.date, tuple[Stamp, DayFiles]] = {}
  if "://" not in root:
    if not os.path.isdir(root):
      return {}
    now = time.time_ns()
    with os.scandir(root) as entries:
      for entry in entries:
        day = _date_of(entry.name)
        if day is None or (until is not None and day > until) or not entry.is_dir():
          continue
        stat = entry.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns) if now - stat.st_mtime_ns > _RACY_NS else None
        if stamp is not None and known.get(day, (None,))[0] == stamp:
          listed[day] = known[day]
          continue
        with os.scandir(entry.path) as files:
          found = [(f.name, f.stat()) for f in files if _is_examples(f.name)]
        listed[day] = stamp, tuple(sorted((name, stat.st_size, stat.st_mtime_ns)
                                          for name, stat in found))
  else:
    found = workdir_lib.partition_files(root, data.EXAMPLES_PATTERN)
    for day in workdir_lib.partition_dates(root):
      if until is not None and day > until:
        continue
      stats = ((path, tf.io.gfile.stat(path)) for path in found.get(day, []))
      listed[day] = None, tuple(sorted((posixpath.basename(path), stat.length,
                                        stat.mtime_nsec) for path, stat in stats))
  return dict(sorted(listed.items()))


def _date_of(name: str) -> Optional[datetime.date]:
  try:
    return datetime.date.fromisoformat(name)
  except ValueError:
    return None


def _is_examples(name: str) -> bool:
  return fnmatch.fnmatchcase(name, data.EXAMPLES_PATTERN) and workdir_lib.is_data_file(name)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """starts[0] .. starts[0] + lengths[0] - 1, starts[1] .., concatenated."""
  lengths = np.asarray(lengths, np.int64)
  total = int(lengths.sum())
  if total == 0:
    return np.zeros(0, np.int64)
  before = np.cumsum(lengths) - lengths
  return np.repeat(np.asarray(starts, np.int64) - before, lengths) + np.arange(total)


def _pair_keys(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  return (np.asarray(first, np.int64) << _SHIFT) | np.asarray(second, np.int64)


def _seconds(keys: np.ndarray) -> np.ndarray:
  return keys & ((1 << _SHIFT) - 1)


def _slices(keys: np.ndarray, firsts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(start, length) of the keys whose first index is each of `firsts` (-1: none)."""
  firsts = np.asarray(firsts, np.int64)
  starts = np.searchsorted(keys, firsts << _SHIFT)
  ends = np.searchsorted(keys, (firsts + 1) << _SHIFT)
  return starts, np.where(firsts >= 0, ends - starts, 0)


def _merge(keys: np.ndarray, counts: Optional[np.ndarray], new_keys: np.ndarray,
           new_counts: Optional[np.ndarray] = None
           ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Adds sorted unique `new_keys` (with their counts) into sorted unique `keys`."""
  at = np.searchsorted(keys, new_keys)
  found = at < len(keys)
  found[found] = keys[at[found]] == new_keys[found]
  if counts is not None:
    counts = counts.copy()
    counts[at[found]] += new_counts[found]
    counts = np.insert(counts, at[~found], new_counts[~found])
  return np.insert(keys, at[~found], new_keys[~found]), counts


class _Vocab:
  """Ids (bytes) to dense indices 0, 1, ... in the order they first came."""

  def __init__(self, names: Iterable[bytes] = ()):
    self.index: dict[bytes, int] = {}
    for name in names:
      self.index.setdefault(name, len(self.index))
    self._names: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.index)

  def add(self, ids: Sequence[bytes]) -> np.ndarray:
    """The indices of `ids`, giving the next ones to new ids."""
    index = self.index
    size = len(index)
    found = np.fromiter((index.setdefault(i, len(index)) for i in ids), np.int64, len(ids))
    if len(index) != size:
      if len(index) > _MAX_INDEX:
        raise ValueError(f"more than {_MAX_INDEX} distinct ids")
      self._names = None
    return found

  def get(self, ids: Sequence[bytes]) -> np.ndarray:
    """The indices of `ids`, -1 for ids never added."""
    index = self.index
    return np.fromiter((index.get(i, -1) for i in ids), np.int64, len(ids))

  @property
  def names(self) -> np.ndarray:
    """The ids by index, as an object array."""
    if self._names is None:
      self._names = np.array(list(self.index), object).reshape(-1)
    return self._names


def _pack(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ids as one byte buffer and their end offsets (no pickle in the state file)."""
  lengths = np.fromiter((len(n) for n in names.tolist()), np.int64, len(names))
  return np.frombuffer(b"".join(names.tolist()), np.uint8), np.cumsum(lengths)


def _unpack(blob: np.ndarray, ends: np.ndarray) -> list[bytes]:
  raw = blob.tobytes()
  starts = [0] + ends[:-1].tolist()
  return [raw[s:e] for s, e in zip(starts, ends.tolist())]


class TrainingInteractions:
  """What the baselines know of the examples of the data days before a day.

  One running total, kept across days by the caller and persisted in the workdir:
  evaluating D+1 after D reads only the days in between (not even day D, when
  `remember` got its events), and a new process reads the state file instead of
  every earlier day. The total covers a list of days with their files, only ever
  extended by later days, in order, so no day is counted twice: a total that is
  not a prefix of the data days before the day asked (a day rewritten or removed,
  or an earlier day asked than the total covers) is rebuilt from W/data.

  Ids are held as dense indices (items and users in the order they first came).
  The mappings by id (`counts`, `seen`, `covisits`, `last_item`, `recent`) read
  the arrays on access; the evaluator asks `counts_of`, `recent_of`,
  `prior_items` and `covisits_of`.
  """

  def __init__(self):
    self._reset()
    self._asked: Optional[datetime.date] = None
    self._listed: Optional[tuple[Stamp, DayFiles]] = None  # the day asked, as listed
    # The day asked and read (remember): its listing and its (user, item, timestamp).
    self._remembered: Optional[tuple[datetime.date, tuple[Stamp, DayFiles],
                                     tuple[np.ndarray, ...]]] = None
    self._on_disk: Optional[list[tuple[datetime.date, DayFiles]]] = None

  def _reset(self) -> None:
    self._items = _Vocab()
    self._users = _Vocab()
    self._counts = np.zeros(0, np.int64)     # per item index
    self._seen = np.zeros(0, np.int64)       # sorted pair keys (user, item)
    self._cov_keys = np.zeros(0, np.int64)   # sorted pair keys (item, item), both ways
    self._cov_counts = np.zeros(0, np.int64)
    self._last = np.zeros(0, np.int64)       # per user index: latest item index, or -1
    self._by_day: dict[datetime.date, np.ndarray] = {}  # the recent days' item indices
    self._stamps: dict[datetime.date, Stamp] = {}
    self.days: list[tuple[datetime.date, DayFiles]] = []
    self._views: dict[str, Mapping[bytes, Any]] = {}

  # --- bringing the total to a day -------------------------------------------------

  def before(self, workdir: str, day: datetime.date) -> "TrainingInteractions":
    """Brings the total to the data days before `day`, persists it; returns self.

    The mappings by id are this object's own: read them before the next call.

    Raises:
      ValueError: an earlier day's examples cannot be read.
    """
    known = {d: (self._stamps.get(d), files) for d, files in self.days}
    if self._remembered is not None:
      known.setdefault(self._remembered[0], self._remembered[1])
    listing = list_days(workdir, known, until=day)
    self._listed = listing.get(day)
    wanted = [(d, files) for d, (_, files) in listing.items() if d < day]
    path = workdir_lib.Workdir(workdir).eval_state_path
    if not self.days or self.days != wanted[:len(self.days)]:
      self._load(path)
    if self.days != wanted[:len(self.days)]:
      logging.info("%s covers %s..%s, not a prefix of the data days before %s: "
                   "rebuilding it from W/data", path, self.days[0][0], self.days[-1][0],
                   day)
      self._reset()
    covered = len(self.days)
    for d, files in wanted[covered:]:
      self._add_day(workdir, d, files)
    stamps = {d: listing[d][0] for d, _ in self.days}
    if len(self.days) != covered or stamps != self._stamps:
      self._stamps = stamps
      self._save(path, workdir, known)
    self._asked = day
    self._views = {}
    return self

  def remember(self, day: datetime.date, events: Mapping[str, np.ndarray]) -> None:
    """Keeps the events of `day` (just asked with `before`, and read) to add them
    the next day without reading them again, as long as its files stay the same."""
    if day == self._asked and self._listed is not None:
      self._remembered = (day, self._listed, tuple(
          np.asarray(events[name]) for name in ("user_id", "item_id", "timestamp")))

  def _add_day(self, workdir: str, day: datetime.date, files: DayFiles) -> None:
    """Adds one day's examples (read once) in time order: by timestamp, then file order."""
    remembered = self._remembered
    if remembered is not None and (remembered[0], remembered[1][1]) == (day, files):
      users, items, timestamps = remembered[2]
    else:
      root = workdir_lib.Workdir(workdir)
      events = read_columns([root.join("data", workdir_lib.partition_name(day), name)
                             for name, _, _ in files], ("user_id", "item_id", "timestamp"))
      users, items, timestamps = events["user_id"], events["item_id"], events["timestamp"]
    order = np.argsort(timestamps, kind="stable")
    self._add(day, files, users[order].tolist(), items[order].tolist())

  def _add(self, day: datetime.date, files: DayFiles, users: list[bytes],
           items: list[bytes]) -> None:
    """Adds a day's (user, item) pairs, in time order."""
    user, item = self._users.add(users), self._items.add(items)
    self._counts = np.pad(self._counts, (0, len(self._items) - len(self._counts)))
    self._last = np.pad(self._last, (0, len(self._users) - len(self._last)),
                        constant_values=-1)
    self._counts += np.bincount(item, minlength=len(self._counts))
    self._seen, _ = _merge(self._seen, None, np.unique(_pair_keys(user, item)))
    # Each user's items in time order, after the user's latest item of earlier days.
    order = np.argsort(user, kind="stable")
    user, item = user[order], item[order]
    first = np.ones(len(user), bool)
    first[1:] = user[1:] != user[:-1]
    previous = np.empty_like(item)
    previous[1:] = item[:-1]
    previous[first] = self._last[user[first]]
    pair = (previous >= 0) & (previous != item)
    keys, counts = np.unique(np.concatenate([_pair_keys(previous[pair], item[pair]),
                                             _pair_keys(item[pair], previous[pair])]),
                             return_counts=True)
    self._cov_keys, self._cov_counts = _merge(self._cov_keys, self._cov_counts, keys,
                                              counts.astype(np.int64))
    last = np.ones(len(user), bool)
    last[:-1] = user[:-1] != user[1:]
    self._last[user[last]] = item[last]
    # A later day D > day sums the days from D - RECENT_DAYS >= day - RECENT_DAYS + 1.
    first_kept = day - datetime.timedelta(days=RECENT_DAYS - 1)
    self._by_day = {d: i for d, i in self._by_day.items() if d >= first_kept}
    self._by_day[day] = item
    self.days.append((day, files))
    self._views = {}

  # --- persistence -----------------------------------------------------------------

  def _save(self, path: str, workdir: str,
            known: Mapping[datetime.date, tuple[Stamp, DayFiles]]) -> None:
    """Writes the state (atomically), unless the file holds a longer total that still
    matches W/data (an earlier day was asked: the daily job goes on from the longer)."""
    disk = self._on_disk
    if disk and len(disk) > len(self.days):
      listing = list_days(workdir, known)
      if all(d in listing and listing[d][1] == files for d, files in disk):
        return
    header = {"format": STATE_FORMAT, "recent_days": RECENT_DAYS,
              "days": [[d.isoformat(), [list(f) for f in files], self._stamps.get(d)]
                       for d, files in self.days],
              "by_day": [d.isoformat() for d in sorted(self._by_day)]}
    items, item_ends = _pack(self._items.names)
    users, user_ends = _pack(self._users.names)
    by_day = [self._by_day[d] for d in sorted(self._by_day)]
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
             items=items, item_ends=item_ends, users=users, user_ends=user_ends,
             counts=self._counts, seen=self._seen, cov_keys=self._cov_keys,
             cov_counts=self._cov_counts, last=self._last,
             by_day=np.concatenate(by_day or [np.zeros(0, np.int64)]),
             by_day_ends=np.cumsum([len(i) for i in by_day], dtype=np.int64))
    try:
      workdir_lib.atomic_write(path, buffer.getvalue())
    except OSError as e:  # a cache: the figures stand, the next run reads W/data again
      logging.warning("%s: cannot write the evaluation state (%s); the next process "
                      "will rebuild it from W/data", path, e)
      return
    self._on_disk = list(self.days)

  def _load(self, path: str) -> None:
    """Replaces the total by the persisted one; by nothing when there is no readable one."""
    self._reset()
    self._on_disk = []
    if not workdir_lib.exists(path):
      return
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        self._read(f.read())
    except Exception as e:  # pylint: disable=broad-except  (any damage: rebuild)
      logging.warning("%s: unreadable (%s: %s); rebuilding the evaluation state from "
                      "W/data", path, type(e).__name__, e)
      self._reset()
      return
    self._on_disk = list(self.days)

  def _read(self, content: bytes) -> None:
    """Parses and checks a state file's content (raises on anything amiss)."""
    with np.load(io.BytesIO(content), allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in npz.files}  # each read checks its CRC-32
    header = json.loads(arrays["header"].tobytes())
    if (header["format"], header["recent_days"]) != (STATE_FORMAT, RECENT_DAYS):
      raise ValueError(f"format {header['format']} with {header['recent_days']} recent "
                       f"days, not {STATE_FORMAT} with {RECENT_DAYS}")
    self._items = _Vocab(_unpack(arrays["items"], arrays["item_ends"]))
    self._users = _Vocab(_unpack(arrays["users"], arrays["user_ends"]))
    self._counts, self._seen = arrays["counts"], arrays["seen"]
    self._cov_keys, self._cov_counts = arrays["cov_keys"], arrays["cov_counts"]
    self._last = arrays["last"]
    ends = arrays["by_day_ends"].tolist()
    parts = np.split(arrays["by_day"], ends[:-1]) if ends else []
    self._by_day = {datetime.date.fromisoformat(d): p
                    for d, p in zip(header["by_day"], parts)}
    self.days = [(datetime.date.fromisoformat(d), tuple(tuple(f) for f in files))
                 for d, files, _ in header["days"]]
    self._stamps = {datetime.date.fromisoformat(d): tuple(stamp) if stamp else None
                    for d, _, stamp in header["days"]}
    items, users = len(self._items), len(self._users)
    sizes = (len(self._counts), len(self._last), len(self._cov_counts), len(self._by_day))
    if sizes != (items, users, len(self._cov_keys), len(header["by_day"])):
      raise ValueError(f"inconsistent sizes {sizes}")
    for keys, firsts, seconds in ((self._seen, users, items),
                                  (self._cov_keys, items, items)):
      if np.any(np.diff(keys) <= 0) or np.any(keys < 0) or np.any(
          keys >> _SHIFT >= firsts) or np.any(_seconds(keys) >= seconds):
        raise ValueError("pair keys out of order or range")
    if np.any(self._last >= items) or any(
        np.any((i < 0) | (i >= items)) for i in self._by_day.values()):
      raise ValueError("item index out of range")
    if any(a >= b for (a, _), (b, _) in zip(self.days, self.days[1:])):
      raise ValueError("days out of order")

  # --- what the evaluation asks ------------------------------------------------------

  def counts_of(self, ids: Sequence[bytes]) -> np.ndarray:
    """Interactions of each id (0 for ids never seen)."""
    return _at(self._counts, self._items.get(ids))

  def recent_of(self, ids: Sequence[bytes]) -> np.ndarray:
    """Interactions of each id in the RECENT_DAYS days before the day asked."""
    return _at(self._recent_counts(), self._items.get(ids))

  def _recent_counts(self) -> np.ndarray:
    days = self._recent_days()
    items = np.concatenate([self._by_day[d] for d in days] or [np.zeros(0, np.int64)])
    return np.bincount(items, minlength=len(self._items)).astype(np.int64)

  def _recent_days(self) -> list[datetime.date]:
    if self._asked is None:
      return []
    first = self._asked - datetime.timedelta(days=RECENT_DAYS)
    return [d for d in sorted(self._by_day) if first <= d < self._asked]

  @property
  def items(self) -> _Vocab:
    """The item ids and their indices."""
    return self._items

  def prior_items(self, users: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(row, item index) pairs: the items of the days covered of the user of each row."""
    starts, lengths = _slices(self._seen, self._users.get(users))
    return (np.repeat(np.arange(len(users)), lengths),
            _seconds(self._seen[_ranges(starts, lengths)]))

  def covisits_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, item index, count): the items co-visited with each of `items` (item
    indices, -1 for none)."""
    starts, lengths = _slices(self._cov_keys, items)
    at = _ranges(starts, lengths)
    return (np.repeat(np.arange(len(items)), lengths), _seconds(self._cov_keys[at]),
            self._cov_counts[at])

  @property
  def num_events(self) -> int:
    return int(self._counts.sum())

  @property
  def day_names(self) -> list[str]:
    """The days summed, as YYYY-MM-DD."""
    return [day.isoformat() for day, _ in self.days]

  @property
  def recent_day_names(self) -> list[str]:
    """The days `recent` sums, as YYYY-MM-DD."""
    return [day.isoformat() for day in self._recent_days()]

  # --- mappings by id ---------------------------------------------------------------

  def _view(self, name: str, make: Callable[[], Mapping[bytes, Any]]) -> Mapping[bytes, Any]:
    """The mapping `name`, made once until the total or the day asked changes."""
    if name not in self._views:
      self._views[name] = make()
    return self._views[name]

  def _counts_view(self, counts: np.ndarray) -> Mapping[bytes, int]:
    return _View(self._items, np.flatnonzero(counts), lambda i: int(counts[i]))

  @property
  def counts(self) -> Mapping[bytes, int]:
    """Interactions per item."""
    return self._view("counts", lambda: self._counts_view(self._counts))

  @property
  def recent(self) -> Mapping[bytes, int]:
    """Interactions per item in the RECENT_DAYS days before the day asked (days
    D-7..D-1 that have data)."""
    return self._view("recent", lambda: self._counts_view(self._recent_counts()))

  @property
  def seen(self) -> Mapping[bytes, set[bytes]]:
    """Each user's items."""
    seen, names = self._seen, self._items.names

    def of(user: int) -> set[bytes]:
      return set(names[_seconds(seen[_ranges(*_slices(seen, [user]))])].tolist())

    return self._view("seen", lambda: _View(self._users, np.unique(seen >> _SHIFT), of))

  @property
  def covisits(self) -> Mapping[bytes, Mapping[bytes, int]]:
    """Per item, how often each other item came right before or after it in a user's
    interactions in time order (both directions counted; pairs across days count, a
    repeat of the same item does not). Sparse: only pairs that occurred."""
    names = self._items.names

    def of(item: int) -> dict[bytes, int]:
      _, items, counts = self.covisits_of(np.array([item]))
      return dict(zip(names[items].tolist(), counts.tolist()))

    return self._view("covisits", lambda: _View(
        self._items, np.unique(self._cov_keys >> _SHIFT), of))

  @property
  def last_item(self) -> Mapping[bytes, bytes]:
    """Each user's latest item, the one the next day's first pairs with."""
    last, names = self._last, self._items.names
    return self._view("last_item", lambda: _View(
        self._users, np.flatnonzero(last >= 0), lambda u: names[last[u]]))


def _at(values: np.ndarray, index: np.ndarray) -> np.ndarray:
  """values[index], 0 where index is -1."""
  if len(values) == 0:
    return np.zeros(len(index), np.int64)
  return np.where(index >= 0, values[np.maximum(index, 0)], 0).astype(np.int64)


class _View(collections.abc.Mapping):
  """A read-only mapping by id over the indices `present` of `vocab`."""

  def __init__(self, vocab: _Vocab, present: np.ndarray, value: Callable[[int], Any]):
    self._vocab, self._value = vocab, value
    self._present = set(present.tolist())

  def __getitem__(self, key: bytes) -> Any:
    index = self._vocab.index.get(key, -1)
    if index not in self._present:
      raise KeyError(key)
    return self._value(index)

  def __iter__(self) -> Iterator[bytes]:
    return iter(self._vocab.names[sorted(self._present)].tolist())

  def __len__(self) -> int:
    return len(self._present)


@dataclasses.dataclass
class SeenItems:
  """Per event of a day, the items its user had interacted with before it.

  Seen = the event's history_item_ids, plus the user's items of the earlier days,
  plus the user's earlier events of the day. Held as unique (event, item) pairs
  sorted by event; `item` and `target` index `names`, whose first ids are those
  of the vocabulary it was built with (at the same indices), then the day's new ids.
  """
  event: np.ndarray    # [P] row of the event
  item: np.ndarray     # [P] index into names
  names: np.ndarray    # ids (object)
  target: np.ndarray   # [B] each event's target, index into names
  starts: np.ndarray   # [B + 1] each event's first pair

  @classmethod
  def build(cls, events: Mapping[str, np.ndarray], vocab: _Vocab, prior_rows: np.ndarray,
            prior_items: np.ndarray) -> "SeenItems":
    """From the day's events and each event's prior items (indices of `vocab`)."""
    return DaySeen(vocab).add(events, prior_rows, prior_items)

  @classmethod
  def of(cls, events: Mapping[str, np.ndarray], training: TrainingInteractions
         ) -> "SeenItems":
    """With the prior items of the training interactions (`names` starts with its
    item ids, at their indices)."""
    return cls.build(events, training.items, *training.prior_items(
        events["user_id"].tolist()))

  def novel_rows(self) -> np.ndarray:
    """The events whose target was not seen before (not a re-consumption)."""
    size = max(len(self.names), 1)
    keys = self.event * size + self.item
    wanted = np.arange(len(self.target)) * size + self.target
    if len(keys) == 0:
      return np.arange(len(self.target))
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.flatnonzero(keys[at] != wanted)

  def pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `rows`, item index) of the seen items of the events `rows`."""
    starts = self.starts[rows]
    lengths = self.starts[np.asarray(rows) + 1] - starts
    return np.repeat(np.arange(len(rows)), lengths), self.item[_ranges(starts, lengths)]

  def matrix(self, rows: np.ndarray) -> np.ndarray:
    """The seen ids of the events `rows`, one row each, padded with b"" [len(rows), W]."""
    starts = self.starts[rows]
    lengths = self.starts[np.asarray(rows) + 1] - starts
    out = np.full((len(rows), int(lengths.max(initial=0))), b"", object)
    out[np.repeat(np.arange(len(rows)), lengths),
        _ranges(np.zeros(len(rows), np.int64), lengths)] = (
            self.names[self.item[_ranges(starts, lengths)]])
    return out

  def sets(self) -> list[frozenset[bytes]]:
    """Per event, its seen ids."""
    names = self.names
    return [frozenset(names[self.item[s:e]].tolist())
            for s, e in zip(self.starts[:-1].tolist(), self.starts[1:].tolist())]


class DaySeen:
  """SeenItems of a day's events read in chunks, one chunk after the other.

  Each chunk's SeenItems are those of its events in `SeenItems.build` of the whole
  day (rows are the chunk's): the user's earlier events of the day include those of
  the earlier chunks, and the day's new ids keep their indices from one chunk to the
  next (`names` only grows). What is kept between chunks is each user's distinct
  items of the day so far, as sorted pair keys.
  """

  def __init__(self, vocab: _Vocab):
    self._vocab = vocab
    self._extra: dict[bytes, int] = {}        # the day's ids `vocab` lacks, after them
    self._users: dict[bytes, int] = {}        # the day's users, in the order they came
    self._today = np.zeros(0, np.int64)       # sorted pair keys (day's user, item)
    self._names: Optional[np.ndarray] = None

  @property
  def names(self) -> np.ndarray:
    """The ids by index: `vocab`'s, then the day's new ones so far (object)."""
    if self._names is None or len(self._names) != len(self._vocab) + len(self._extra):
      self._names = np.concatenate([self._vocab.names,
                                    np.array(list(self._extra), object).reshape(-1)])
    return self._names

  def _index_of(self, ids: list[bytes]) -> np.ndarray:
    known, extra, base = self._vocab.index, self._extra, len(self._vocab)
    return np.fromiter((k if (k := known.get(i)) is not None
                        else extra.setdefault(i, base + len(extra)) for i in ids),
                       np.int64, len(ids))

  def add(self, events: Mapping[str, np.ndarray], prior_rows: np.ndarray,
          prior_items: np.ndarray) -> SeenItems:
    """The next chunk's SeenItems, from its events and each event's prior items
    (rows of the chunk, indices of `vocab`)."""
    users = events["user_id"].tolist()
    num = len(users)
    target = self._index_of(events["item_id"].tolist())
    history = events["history_item_ids"]
    if history.ndim < 2:
      history = history.reshape(num, 0)
    listed = history != b""
    history_rows = np.nonzero(listed)[0]
    history_items = self._index_of(history[listed].tolist())
    group = np.fromiter((self._users.setdefault(u, len(self._users)) for u in users),
                        np.int64, num)
    # The user's events of the earlier chunks.
    starts, lengths = _slices(self._today, group)
    earlier_rows = np.repeat(np.arange(num), lengths)
    earlier_items = _seconds(self._today[_ranges(starts, lengths)])
    # The user's earlier events of this chunk: grouped by user, in event order.
    order = np.argsort(group, kind="stable")
    first = np.ones(num, bool)
    first[1:] = group[order][1:] != group[order][:-1]
    begins = np.maximum.accumulate(np.where(first, np.arange(num), 0))
    before = np.arange(num) - begins
    today_rows = np.repeat(order, before)
    today_items = target[order[_ranges(begins, before)]]
    size = max(len(self._vocab) + len(self._extra), 1)
    keys = np.unique(np.concatenate([
        np.asarray(prior_rows, np.int64) * size + np.asarray(prior_items, np.int64),
        history_rows * size + history_items, earlier_rows * size + earlier_items,
        today_rows * size + today_items]))
    self._today, _ = _merge(self._today, None, np.unique(_pair_keys(group, target)))
    event, item = keys // size, keys % size
    return SeenItems(event=event, item=item, names=self.names, target=target,
                     starts=np.searchsorted(event, np.arange(num + 1)))


def seen_sets(events: dict[str, np.ndarray],
              prior: Mapping[bytes, Iterable[bytes]]) -> list[frozenset[bytes]]:
  """Per event, the items its user had interacted with before it (see SeenItems).

  `prior`: each user's items of the earlier days.
  """
  vocab = _Vocab()
  rows, items = [], []
  for row, user in enumerate(events["user_id"].tolist()):
    for item in prior.get(user, ()):
      rows.append(row)
      items.append(item)
  return SeenItems.build(events, vocab, np.array(rows, np.int64), vocab.add(items)).sets()
