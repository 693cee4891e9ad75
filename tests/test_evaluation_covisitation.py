"""The co-visitation baseline: its ranking by hand, and its counts as a running total.

The end-to-end day (evaluate_day on a real export) is in tests/test_evaluate.py.
"""

import datetime
import os
import shutil

import numpy as np

from evaluation import baselines
from evaluation import recall
from core import workdir as workdir_lib
from evaluation import records
import serving_testlib as tl

D = tl.DAY


def _ids(*names):
  return np.array([n.encode() for n in names], object)


def test_covisitation_list_by_hand():
  corpus = _ids("a", "b", "c", "d", "e", "f")
  # Last 7 days: f 5, c 4, d 3, b 2, a and e 0: fallback f c d b a e.
  recent = np.array([0, 2, 4, 3, 0, 5])
  # Histories a->b->c and b->c: b is co-visited with c twice, with a once. zz is
  # co-visited most but outside the corpus: never ranked. x ties a and d.
  covisits = {b"b": {b"c": 2, b"a": 1, b"zz": 9}, b"x": {b"a": 1, b"d": 1}}
  # Query b: c a (by count), then f d b e (the fallback, c and a skipped).
  queries = _ids("b", "b", "b", "b", "b", "b", "x", "x", "", "nobody", "b")
  targets = _ids("c", "a", "f", "d", "b", "e", "d", "a", "d", "d", "zz")
  ranks = baselines.covisitation_ranks(corpus, recent, covisits, queries, targets)
  np.testing.assert_array_equal(ranks, [
      0, 1, 2, 3, 4, 5,  # query b: c a f d b e
      0, 1,  # query x: the tie a/d goes to d, the more popular of the last 7 days
      2, 2,  # no history, or a query never co-visited: the fallback f c d b a e
      recall.MISS])  # not in the corpus
  # Seen items are skipped: for e (rank 5), c and f above it go, b's own
  # history item b (rank 4) too; zz (outside) and e itself change nothing.
  seen = [{b"c", b"f", b"b", b"zz", b"e"}, set(), {b"f"}]
  np.testing.assert_array_equal(
      baselines.covisitation_ranks(corpus, recent, covisits, _ids("b", "b", ""),
                                   _ids("e", "a", "d"), seen), [2, 1, 1])
  assert baselines.covisitation_ranks(corpus, recent, covisits, _ids(), _ids()).shape == (0,)


def _write_day(workdir, day, rows):
  """rows: (user, item, timestamp); written in the order given."""
  tl.write_records(os.path.join(tl.day_dir(workdir, day), "examples-00.tfrecord.gz"), [
      tl.event_row(f"{day}-{n}", user, item, timestamp=ts)
      for n, (user, item, ts) in enumerate(rows)])


def _rebuilt(workdir, day):
  """A total built from W/data alone: without the persisted state."""
  shutil.rmtree(workdir_lib.Workdir(workdir).eval_state_dir, ignore_errors=True)
  return records.TrainingInteractions().before(workdir, day)


def _state(total):
  return (dict(total.counts), {u: set(s) for u, s in total.seen.items()},
          {i: dict(c) for i, c in total.covisits.items()}, dict(total.last_item),
          dict(total.recent), total.recent_day_names, total.day_names)


def test_covisitation_counts_are_consecutive_pairs_of_days_before_d(tmp_path, monkeypatch):
  """Pairs of consecutive items of a user in time order, across days, both ways;
  only days before D; recent = days D-7..D-1; a running total equal to a fresh one."""
  workdir = str(tmp_path)
  _write_day(workdir, D - datetime.timedelta(days=9), [("u1", "a", 1), ("u1", "b", 2),
                                                       ("u2", "x", 1)])
  # Written out of time order: u2's y (t=10) comes before z (t=20).
  _write_day(workdir, D - datetime.timedelta(days=3), [("u2", "z", 20), ("u2", "y", 10),
                                                       ("u1", "c", 5)])
  _write_day(workdir, D - datetime.timedelta(days=1), [("u1", "c", 1), ("u1", "d", 2)])
  _write_day(workdir, D, [("u1", "e", 1)])  # the pair d-e only on D
  read = []
  real = records.read_columns
  monkeypatch.setattr(records, "read_columns",
                      lambda files, *a, **k: read.extend(files) or real(files, *a, **k))
  running = records.TrainingInteractions()
  running.before(workdir, D - datetime.timedelta(days=2))
  running.before(workdir, D)
  assert len(read) == 3  # each earlier day once, D never
  assert {i: dict(c) for i, c in running.covisits.items()} == {
      b"a": {b"b": 1}, b"b": {b"a": 1, b"c": 1},  # b (day D-9) -> c (D-3) counts
      b"c": {b"b": 1, b"d": 1}, b"d": {b"c": 1},  # c -> c is no pair
      b"x": {b"y": 1}, b"y": {b"x": 1, b"z": 1}, b"z": {b"y": 1}}
  assert running.recent == {b"y": 1, b"z": 1, b"c": 2, b"d": 1}
  assert running.recent_day_names == [(D - datetime.timedelta(days=d)).isoformat()
                                      for d in (3, 1)]
  assert _state(_rebuilt(workdir, D)) == _state(running)
  # The day after D: D's pair counts now, and D-9 and D-8 leave the recent window.
  later = D + datetime.timedelta(days=1)
  running.before(workdir, later)
  assert running.covisits[b"d"] == {b"c": 1, b"e": 1}
  assert running.recent == {b"y": 1, b"z": 1, b"c": 2, b"d": 1, b"e": 1}
  assert _state(_rebuilt(workdir, later)) == _state(running)
  assert len(read) == 3 + 3 + 1 + 4  # the running total read D alone


def _list_rank(listed, target, seen):
  """Brute force: the target's 0-based place in `listed` with `seen` taken out."""
  if target not in listed:
    return recall.MISS
  return [i for i in listed if i not in seen or i == target].index(target)


def test_vectorized_ranks_match_the_lists_written_out():
  """Both baselines on random corpora, co-visits and seen sets, against their lists
  built item by item: most co-visits first, then the fallback order; ties by id."""
  rng = np.random.default_rng(5)
  for trial in range(20):
    n = int(rng.integers(1, 30))
    corpus = _ids(*[f"c{j:02d}" for j in rng.permutation(40)[:n]])
    counts = rng.integers(0, 4, n)
    names = [f"c{j:02d}".encode() for j in range(40)] + [b"out"]
    covisits = {q: {i: int(rng.integers(0, 4)) for i in rng.choice(names, 6)}
                for q in rng.choice(names, 10)}
    queries = np.array([names[j] if j < len(names) else b"" for j in
                        rng.integers(0, len(names) + 5, 25)], object)
    targets = np.array(rng.choice(names, 25), object)
    seen = [set(rng.choice(names, int(rng.integers(0, 12)))) for _ in range(25)]
    fallback = [corpus[j] for j in baselines.popularity_order(corpus, counts)]
    for with_seen in (None, seen):
      skip = with_seen or [set()] * 25
      np.testing.assert_array_equal(
          baselines.popularity_ranks(corpus, counts, targets, with_seen),
          [_list_rank(fallback, t, s) for t, s in zip(targets, skip)], err_msg=str(trial))
      want = []
      for q, t, s in zip(queries, targets, skip):
        near = {i: c for i, c in (covisits.get(q, {}) if q else {}).items()
                if c > 0 and i in fallback}
        listed = sorted(near, key=lambda i: (-near[i], fallback.index(i))) + [
            i for i in fallback if i not in near]
        want.append(_list_rank(listed, t, s))
      np.testing.assert_array_equal(
          baselines.covisitation_ranks(corpus, counts, covisits, queries, targets,
                                       with_seen), want, err_msg=str(trial))
