"""User histories carried from day to day: the state directories and the per-user pass.

`state/history/D` holds, for every user seen up to day D, the user's most recent
items (most recent first, at most `max_history`), as gzip JSON lines sharded by a
stable hash of the user id and sorted by it, plus `summary.json`, written last:
    {"user_id": "u1", "items": ["i9", "i4"]}
Day D's job reads the state of the latest earlier day, gives each of D's events
the history before it, and writes the state of D.
"""

import collections
import datetime as dt
import json
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline import io
from pipeline import schema
from pipeline import transforms

SUMMARY_FILE = "summary.json"
STATE = "state"
USERS = "users"

History = Tuple[str, ...]


class MissingHistoryError(RuntimeError):
  """Days before D have data but no history state: D's histories would be wrong."""


class CorruptHistoryError(ValueError):
  """A state file that this job did not write the way it writes them."""


def state_root(workdir: str) -> str:
  return FileSystems.join(workdir, "state", "history")


def state_dir(workdir: str, day: dt.date) -> str:
  """state/history/YYYY-MM-DD of a workdir."""
  return FileSystems.join(state_root(workdir), schema.partition_name(day))


def _partition_days(pattern: str) -> dict[dt.date, list[str]]:
  """Files matching `pattern` (whose parent is a YYYY-MM-DD partition) by day."""
  days: dict[dt.date, list[str]] = {}
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    if not io.is_data_file(metadata.path):
      continue
    try:
      day = schema.parse_date(io.partition_of(metadata.path))
    except ValueError:
      continue
    days.setdefault(day, []).append(metadata.path)
  return days


def previous_state(workdir: str, day: dt.date, logs_root: str,
                   allow_missing: bool = False) -> Optional[str]:
  """The state directory that day `day` continues from, or None to start empty.

  That is the latest state before `day`. Days between it and `day` must have no
  data (no log files and no data/ output), otherwise their events would be missing
  from the histories.

  Raises:
    MissingHistoryError: such days exist and `allow_missing` is False.
  """
  states = _partition_days(FileSystems.join(state_root(workdir), "*", SUMMARY_FILE))
  earlier = sorted(d for d in states if d < day)
  latest = earlier[-1] if earlier else None
  gap = {}
  for pattern in (FileSystems.join(logs_root, "*", "*"),
                  FileSystems.join(workdir, "data", "*", transforms.STATS_FILE)):
    for d, paths in _partition_days(pattern).items():
      if d < day and (latest is None or d > latest):
        gap.setdefault(d, []).extend(paths)
  if gap and not allow_missing:
    first = min(gap)
    raise MissingHistoryError(
        f"user histories for {day} need {state_dir(workdir, day - dt.timedelta(days=1))}, "
        f"but the latest state before {day} is "
        f"{state_dir(workdir, latest) if latest else 'none'} and "
        f"{len(gap)} day(s) in between have data, first {first}: {sorted(gap[first])[0]}. "
        f"Run those days first, or pass --allow_missing_history to carry on from "
        f"{'that state' if latest else 'empty histories'}.")
  return state_dir(workdir, latest) if latest else None


def history_line(user_id: str, items: Sequence[str]) -> bytes:
  """One state line: {"user_id": ..., "items": [most recent first]}."""
  return json.dumps({"user_id": user_id, "items": list(items)},
                    ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_history_line(line: io.RawLine) -> tuple[str, History]:
  """The inverse of `history_line`.

  Raises:
    CorruptHistoryError: naming the file and line.
  """
  try:
    obj = json.loads(line.data)
    user_id, items = obj["user_id"], obj["items"]
    if (line.size != len(line.data) or not isinstance(user_id, str) or not user_id
        or not isinstance(items, list) or not all(isinstance(i, str) for i in items)):
      raise ValueError("not {'user_id': str, 'items': [str]}")
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptHistoryError(
        f"{line.file}:{line.line_number}: bad history state line: {e}") from e
  return user_id, tuple(items)


class ReadHistories(beam.PTransform):
  """A state directory -> (user_id, items); nothing when `directory` is None."""

  def __init__(self, directory: Optional[str]):
    super().__init__()
    self._directory = directory

  def expand(self, begin):
    if self._directory is None:
      return begin | "NoState" >> beam.Create([]).with_output_types(Tuple[str, History])
    read = (begin
            | "Pattern" >> beam.Create([FileSystems.join(self._directory, "part-*")])
            | "Read" >> io.ReadLines(allow_empty=False))
    return read.lines | "Parse" >> beam.Map(parse_history_line).with_output_types(
        Tuple[str, History])


class _HistoryFn(beam.DoFn):
  """(user_id, {events, state}) -> each event with the history before it.

  Events are taken in (timestamp, event_id) order. Emits (event, item, history,
  seed) per event, the user's new state on STATE, and 1 on USERS for a
  user with events. Memory: one user's events of the day.
  """

  def __init__(self, max_history: int):
    self._max_history = max_history

  def process(self, element: tuple[str, Mapping[str, Iterable[Any]]]) -> Iterator[Any]:
    user_id, grouped = element
    carried = list(grouped[STATE])
    if len(carried) > 1:
      raise CorruptHistoryError(f"user {user_id!r} has {len(carried)} carried histories")
    history = collections.deque(carried[0] if carried else (), maxlen=self._max_history)
    events = sorted(grouped["events"], key=lambda e: (e[0].timestamp, e[0].event_id))
    for event, item in events:
      previous = tuple(history)
      seed = event.seed_item_id or (previous[0] if previous else "")
      yield event, item, previous, seed
      history.appendleft(event.item_id)
    yield beam.pvalue.TaggedOutput(STATE, (user_id, tuple(history)))
    if events:
      yield beam.pvalue.TaggedOutput(USERS, user_id)


class AttachHistories(beam.PTransform):
  """{"events": (Event, item), "state": (user_id, items)} ->
  `.events` (Event, item, history, seed), `.state` (the users' new
  histories, carried ones included) and `.users` (ids of users with events).

  `history` is the user's previous items, most recent first, at most
  `max_history`, counting earlier days; `seed` is the logged seed_item_id, else
  the previous item, else "".
  """

  def __init__(self, max_history: int = 50):
    super().__init__()
    self._max_history = max_history

  def expand(self, inputs):
    events = inputs["events"] | "ByUser" >> beam.Map(
        lambda e: (e[0].user_id, e)).with_output_types(Tuple[str, transforms.JoinedEvent])
    return (
        {"events": events, STATE: inputs[STATE]}
        | "CoGroup" >> transforms.EncodedCoGroupByKey()
        | "History" >> beam.ParDo(_HistoryFn(self._max_history)).with_outputs(
            STATE, USERS, main="events"))


def _summary(written: list[tuple[str, int]], directory: str, day: dt.date,
             max_history: int) -> tuple[str, int]:
  users = sum(n for _, n in written)
  summary = {"day": schema.partition_name(day), "users": users,
             "max_history": max_history, "shards": sorted(name for name, _ in written)}
  with FileSystems.create(FileSystems.join(directory, SUMMARY_FILE)) as f:
    f.write(json.dumps(summary, indent=2, sort_keys=True).encode("utf-8") + b"\n")
  return SUMMARY_FILE, users


class WriteHistories(beam.PTransform):
  """(user_id, items) -> part-SSSSS-of-NNNNN.jsonl.gz + summary.json in `directory`.

  Returns the written (shard, users) counts; summary.json comes after the shards.
  """

  def __init__(self, directory: str, day: dt.date, max_history: int, scratch_dir: str,
               num_shards: int = 4):
    super().__init__()
    self._directory = directory
    self._scratch_dir = scratch_dir
    self._day = day
    self._max_history = max_history
    self._names = io.shard_names("part", num_shards, ".jsonl.gz")

  def expand(self, state):
    names = self._names
    written = (
        state
        | "Serialize" >> beam.Map(lambda kv: (
            names[io.shard_of(kv[0], len(names))], (kv[0], history_line(*kv))))
        | "Shards" >> io.WriteSortedShards(self._directory, names, self._scratch_dir))
    _ = (written
         | "Gather" >> beam.combiners.ToList()
         | "Summary" >> beam.Map(_summary, self._directory, self._day, self._max_history))
    return written


def load_histories(workdir: str, day: dt.date) -> dict[str, list[str]]:
  """The state after `day` as {user_id: items}, read in this process (small data, tools)."""
  directory = state_dir(workdir, day)
  if not FileSystems.exists(FileSystems.join(directory, SUMMARY_FILE)):
    raise FileNotFoundError(f"no history state at {directory}")
  out = {}
  for path in sorted(m.path for m in FileSystems.match(
      [FileSystems.join(directory, "part-*")])[0].metadata_list):
    for line in io.iter_lines(path):
      user_id, items = parse_history_line(line)
      out[user_id] = list(items)
  return out
