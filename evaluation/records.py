"""What the evaluation reads from W/data: a day's events, and who saw what before it.

Interactions are (user_id, item_id) pairs of the examples of the data days before
the evaluated day: their item counts rank the popularity baseline and cut the
deciles, and each user's items are what "seen items excluded" leaves out. The
co-visitation baseline ranks by how often two items were consecutive in a user's
time-ordered interactions, with the counts of the last RECENT_DAYS days as its
fallback.
"""

from __future__ import annotations

import collections
import datetime

import numpy as np
import tensorflow as tf

from core import workdir as workdir_lib
from models import data
from models import features as features_lib
from serving import corpus as corpus_lib

# The co-visitation baseline falls back to the popularity of this many days before D.
RECENT_DAYS = 7

# The files of a day as read: (path, size, mtime) each, so a rewritten day differs.
_DayKey = tuple[datetime.date, tuple[tuple[str, int, int], ...]]


def read_events(workdir: str, day: datetime.date, max_history: int) -> dict[str, np.ndarray]:
  """Day D's events as columns: the query features and the target item_id."""
  return corpus_lib.read_columns(data.example_files(workdir, day),
                                 features_lib.QUERY_FEATURES + ("item_id",), max_history)


def _day_key(workdir: str, day: datetime.date) -> _DayKey:
  files = data.example_files(workdir, day)
  return day, tuple((path, stat.length, stat.mtime_nsec)
                    for path, stat in ((p, tf.io.gfile.stat(p)) for p in files))


class TrainingInteractions:
  """What the baselines know of the examples of the data days before a day.

  One running total, owned by the caller and kept across days: evaluating D+1
  after D reads only the days in between, not every earlier day again. The total
  is rebuilt from scratch when a day it holds was rewritten (a forced re-run) or
  removed, or when an earlier day than the last is asked for.

  Attributes:
    counts: interactions per item.
    seen: each user's items.
    covisits: per item, how often each other item came right before or after it
      in a user's interactions in time order (both directions counted; pairs
      across days count, a repeat of the same item does not). Sparse: only pairs
      that occurred.
    last_item: each user's latest item, the one the next day's first pairs with.
    recent: interactions per item in the RECENT_DAYS days before the day asked
      (days D-7..D-1 that have data).
    days: the days summed, with their files as read.
  """

  def __init__(self):
    self._reset()

  def _reset(self) -> None:
    self.counts: collections.Counter = collections.Counter()
    self.seen: dict[bytes, set[bytes]] = collections.defaultdict(set)
    self.covisits: dict[bytes, collections.Counter] = collections.defaultdict(
        collections.Counter)
    self.last_item: dict[bytes, bytes] = {}
    self.recent: collections.Counter = collections.Counter()
    self._by_day: dict[datetime.date, collections.Counter] = {}  # the recent days' counts
    self.days: list[_DayKey] = []

  def before(self, workdir: str, day: datetime.date) -> "TrainingInteractions":
    """Brings the total to the data days before `day`; returns self.

    The counts and sets are this object's own: read them before the next call.
    """
    root = workdir_lib.Workdir(workdir).data_root
    wanted = [_day_key(workdir, d) for d in workdir_lib.partition_dates(root) if d < day]
    if wanted[:len(self.days)] != self.days:
      self._reset()
    for key in wanted[len(self.days):]:
      self._add_day(key)
    # Later days only ask for later windows, so older days' counts are dropped.
    first = day - datetime.timedelta(days=RECENT_DAYS)
    self._by_day = {d: c for d, c in self._by_day.items() if d >= first}
    self.recent = sum(self._by_day.values(), collections.Counter())
    return self

  def _add_day(self, key: _DayKey) -> None:
    """Adds one day's examples (read once) in time order: by timestamp, then file order."""
    events = corpus_lib.read_columns([path for path, _, _ in key[1]],
                                     ("user_id", "item_id", "timestamp"))
    order = np.argsort(events["timestamp"], kind="stable")
    users, items = events["user_id"][order].tolist(), events["item_id"][order].tolist()
    self.counts.update(items)
    self._by_day[key[0]] = collections.Counter(items)
    for user, item in zip(users, items):
      self.seen[user].add(item)
      previous = self.last_item.get(user)
      if previous is not None and previous != item:
        self.covisits[previous][item] += 1
        self.covisits[item][previous] += 1
      self.last_item[user] = item
    self.days.append(key)

  @property
  def day_names(self) -> list[str]:
    """The days summed, as YYYY-MM-DD."""
    return [day.isoformat() for day, _ in self.days]

  @property
  def recent_day_names(self) -> list[str]:
    """The days `recent` sums, as YYYY-MM-DD."""
    return [day.isoformat() for day in sorted(self._by_day)]


def seen_sets(events: dict[str, np.ndarray],
              prior: dict[bytes, set[bytes]]) -> list[frozenset[bytes]]:
  """Per event, the items its user had interacted with before it.

  Seen = the event's history_item_ids, plus the user's items of the earlier days
  (`prior`), plus the user's earlier events of the day.
  """
  today: dict[bytes, set[bytes]] = collections.defaultdict(set)
  out = []
  for user, history, item in zip(events["user_id"].tolist(),
                                 events["history_item_ids"].tolist(),
                                 events["item_id"].tolist()):
    items = set(h for h in history if h) | prior.get(user, set()) | today[user]
    out.append(frozenset(items))
    today[user].add(item)
  return out
