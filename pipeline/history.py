"""User histories carried from day to day: the state directories and the per-user pass.

`state/history/D` holds, for every user seen up to day D, the user's items with
their timestamps, most recent first, as gzip JSON lines sharded by a stable hash of
the user id and sorted by it, plus `summary.json`, written last:
    {"user_id": "u1", "items": ["i9", "i4"], "timestamps": [1704153600, 1704150000]}
Day D's job reads the state of the latest earlier day, gives each of D's events the
items of its user strictly earlier than the event (carried or of D, at most
`max_history`), and writes the state of D.

An event may precede items already carried: with --max_skew_s, partition D holds
events up to max_skew_s into D+1, and partition D+1 events from max_skew_s before
it. So the state keeps every item at or after `keep_from_ts` (the end of D minus
max_skew_s, the earliest a later day's event can be) and the `max_history` most
recent items before that: a late event still gets its `max_history` previous items.
A state line without "timestamps" (written before they were kept) counts its items
as at epoch 0, i.e. before every event.
"""

import bisect
import collections
import datetime as dt
import heapq
import json
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from core import workdir as workdir_lib
from models import features
from pipeline import coders
from pipeline import io
from pipeline import parse
from pipeline import writers

SUMMARY_FILE = "summary.json"
SHARD_PREFIX = "part"
_SHARD_SUFFIX = ".jsonl.gz"
STATE = "state"
USERS = "users"

# (item_id, timestamp) pairs, most recent first.
History = Tuple[Tuple[str, int], ...]
# The timestamp of items read from a state line written without timestamps.
LEGACY_TIMESTAMP = 0


def _shards(directory: str) -> str:
  """The pattern of a state directory's shard files."""
  return FileSystems.join(directory, f"{SHARD_PREFIX}-*")


class MissingHistoryError(RuntimeError):
  """Days before D have data but no history state: D's histories would be wrong."""


class CorruptHistoryError(ValueError):
  """A state file that this job did not write the way it writes them."""


def previous_state(paths: workdir_lib.Workdir, day: dt.date,
                   allow_missing: bool = False) -> Optional[str]:
  """The state directory that day `day` continues from, or None to start empty.

  That is the latest state before `day`. Days between it and `day` must have no
  data (no log files and no data/ output), otherwise their events would be missing
  from the histories.

  Raises:
    MissingHistoryError: such days exist and `allow_missing` is False.
  """
  states = workdir_lib.partition_files(paths.history_root, SUMMARY_FILE)
  earlier = [d for d in states if d < day]
  latest = earlier[-1] if earlier else None
  gap: dict[dt.date, list[str]] = {}
  for found in (workdir_lib.partition_files(paths.logs),
                workdir_lib.partition_files(paths.data_root, workdir_lib.STATS)):
    for d, files in found.items():
      if d < day and (latest is None or d > latest):
        gap.setdefault(d, []).extend(files)
  if gap and not allow_missing:
    first = min(gap)
    raise MissingHistoryError(
        f"user histories for {day} need {paths.history_dir(day - dt.timedelta(days=1))}, "
        f"but the latest state before {day} is "
        f"{paths.history_dir(latest) if latest else 'none'} and "
        f"{len(gap)} day(s) in between have data, first {first}: {sorted(gap[first])[0]}. "
        f"Run those days first, or pass --allow_missing_history to carry on from "
        f"{'that state' if latest else 'empty histories'}.")
  return paths.history_dir(latest) if latest else None


def history_line(user_id: str, entries: Sequence[tuple[str, int]]) -> bytes:
  """One state line, most recent first: {"user_id", "items", "timestamps"}."""
  return json.dumps({"user_id": user_id, "items": [item for item, _ in entries],
                     "timestamps": [ts for _, ts in entries]},
                    ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_history_line(line: io.RawLine) -> tuple[str, History]:
  """The inverse of `history_line`; a line without "timestamps" gets LEGACY_TIMESTAMP.

  Raises:
    CorruptHistoryError: naming the file and line.
  """
  try:
    obj = json.loads(line.data)
    user_id, items = obj["user_id"], obj["items"]
    if (line.size != len(line.data) or not isinstance(user_id, str) or not user_id
        or not isinstance(items, list) or not all(isinstance(i, str) for i in items)):
      raise ValueError("not {'user_id': str, 'items': [str], 'timestamps': [int]}")
    timestamps = obj.get("timestamps", [LEGACY_TIMESTAMP] * len(items))
    if (not isinstance(timestamps, list) or len(timestamps) != len(items) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in timestamps)):
      raise ValueError("timestamps must be integers, one per item")
    if any(later < earlier for later, earlier in zip(timestamps, timestamps[1:])):
      raise ValueError("timestamps are not most recent first")
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptHistoryError(
        f"{line.file}:{line.line_number}: bad history state line: {e}") from e
  return user_id, tuple(zip(items, timestamps))


class ReadHistories(beam.PTransform):
  """A state directory -> (user_id, History); nothing when `directory` is None."""

  def __init__(self, directory: Optional[str]):
    super().__init__()
    self._directory = directory

  def expand(self, begin):
    if self._directory is None:
      return begin | "NoState" >> io.Values([]).with_output_types(Tuple[str, History])
    read = (begin
            | "Pattern" >> io.Values([_shards(self._directory)])
            | "Read" >> io.ReadLines(allow_empty=False))
    return read.lines | "Parse" >> beam.Map(parse_history_line).with_output_types(
        Tuple[str, History])


def _state_entries(timeline: Sequence[tuple[str, int]], max_history: int,
                   keep_from_ts: Optional[int]) -> History:
  """What a user's state keeps of its oldest-first timeline, most recent first.

  Every entry at or after `keep_from_ts` (a later day's event may precede it), and
  the `max_history` most recent ones before (all that event can need).
  """
  split = (len(timeline) if keep_from_ts is None else
           bisect.bisect_left(timeline, keep_from_ts, key=lambda entry: entry[1]))
  return tuple(reversed(timeline[max(0, split - max_history):]))


class _HistoryFn(beam.DoFn):
  """(user_id, {events, state}) -> each event with the history before it.

  An event's history is its user's items strictly earlier in time, carried or of
  the day, most recent first: same-second events are simultaneous and do not see
  each other, and a late event does not see items carried from after it. Emits
  (event, item, history, seed) per event in (timestamp, event_id) order, the
  user's new state on STATE, and the user id on USERS for a user with events.
  Memory: one user's events of the day and carried state.
  """

  def __init__(self, max_history: int, keep_from_ts: Optional[int]):
    self._max_history = max_history
    self._keep_from_ts = keep_from_ts

  def process(self, element: tuple[str, Mapping[str, Iterable[Any]]]) -> Iterator[Any]:
    user_id, grouped = element
    carried = list(grouped[STATE])
    if len(carried) > 1:
      raise CorruptHistoryError(f"user {user_id!r} has {len(carried)} carried histories")
    events = sorted(grouped["events"], key=lambda e: (e[0].timestamp, e[0].event_id))
    # Oldest first; heapq.merge is stable, so carried items precede the day's at a tie.
    timeline = list(heapq.merge(
        reversed(carried[0]) if carried else (),
        ((event.item_id, event.timestamp) for event, _ in events),
        key=lambda entry: entry[1]))
    history = collections.deque(maxlen=self._max_history)
    earlier = 0
    for event, item in events:
      while earlier < len(timeline) and timeline[earlier][1] < event.timestamp:
        history.appendleft(timeline[earlier][0])
        earlier += 1
      previous = tuple(history)
      seed = event.seed_item_id or (previous[0] if previous else "")
      yield event, item, previous, seed
    yield beam.pvalue.TaggedOutput(STATE, (user_id, _state_entries(
        timeline, self._max_history, self._keep_from_ts)))
    if events:
      yield beam.pvalue.TaggedOutput(USERS, user_id)


class AttachHistories(beam.PTransform):
  """{"events": (Event, item), "state": (user_id, History)} ->
  `.events` (Event, item, history, seed), `.state` (the users' new
  histories, carried ones included) and `.users` (ids of users with events).

  `history` is the item ids of the user's items strictly earlier than the event,
  most recent first, at most `max_history`, counting earlier days; `seed` is the
  logged seed_item_id, else the most recent of those, else "". The state keeps
  the `max_history` most recent items, and every item at or after `keep_from_ts`
  (give the earliest timestamp a later day's event may have; None keeps
  `max_history` items).
  """

  def __init__(self, max_history: int = features.MAX_HISTORY,
               keep_from_ts: Optional[int] = None):
    super().__init__()
    self._max_history = max_history
    self._keep_from_ts = keep_from_ts

  def expand(self, inputs):
    events = inputs["events"] | "ByUser" >> beam.Map(
        lambda e: (e[0].user_id, e)).with_output_types(Tuple[str, parse.JoinedEvent])
    return (
        {"events": events, STATE: inputs[STATE]}
        | "CoGroup" >> coders.EncodedCoGroupByKey()
        | "History" >> beam.ParDo(_HistoryFn(
            self._max_history, self._keep_from_ts)).with_outputs(
                STATE, USERS, main="events"))


def write_summary(directory: str, day: dt.date, users: int, max_history: int,
                  num_shards: int) -> None:
  """summary.json of a state whose `num_shards` shards are written (by
  `WriteHistories`): it makes the state usable."""
  writers.write_json(FileSystems.join(directory, SUMMARY_FILE), {
      "day": workdir_lib.partition_name(day), "users": users, "max_history": max_history,
      "shards": writers.shard_names(SHARD_PREFIX, num_shards, _SHARD_SUFFIX)})


def _state_record(entry: tuple[str, History]) -> tuple[tuple[str], bytes]:
  """(user_id, History) -> its state line keyed for `writers.WriteShardedByKey`."""
  user_id, history = entry
  return (user_id,), history_line(user_id, history)


class WriteHistories(beam.PTransform):
  """(user_id, History) -> part-SSSSS-of-NNNNN.jsonl.gz in `directory`.

  Returns the written (shard, users) counts. summary.json is `write_summary`'s, once
  the day's pipeline has succeeded.
  """

  def __init__(self, directory: str, scratch_dir: str, num_shards: int = 4):
    super().__init__()
    self._write = writers.WriteShardedByKey(directory, SHARD_PREFIX, num_shards,
                                            _SHARD_SUFFIX, scratch_dir)

  def expand(self, state):
    return state | "Serialize" >> beam.Map(_state_record) | "Shards" >> self._write


def load_histories(workdir: str, day: dt.date, with_timestamps: bool = False
                   ) -> dict[str, list[Any]]:
  """The state after `day` as {user_id: items} (or (item, timestamp) pairs), most
  recent first, read in this process (small data, tools)."""
  directory = workdir_lib.Workdir(workdir).history_dir(day)
  if not FileSystems.exists(FileSystems.join(directory, SUMMARY_FILE)):
    raise FileNotFoundError(f"no history state at {directory}")
  out = {}
  for path in sorted(m.path for m in FileSystems.match(
      [_shards(directory)])[0].metadata_list):
    for line in io.iter_lines(path):
      user_id, entries = parse_history_line(line)
      out[user_id] = [entry if with_timestamps else entry[0] for entry in entries]
  return out
