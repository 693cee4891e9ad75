"""The day's named PTransforms one by one, on the DirectRunner's engine."""

import copy
import datetime as dt
import json
import os
import pickle

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
import pytest

from core import workdir as workdir_lib
from pipeline import beam_day
from pipeline import coders
from pipeline import history
from pipeline import io
from pipeline import parse
from pipeline import schema
from pipeline import stats

DAY = dt.date(2024, 3, 10)
START, _ = schema.day_bounds(DAY)


def _pipeline():
  return beam.Pipeline(runner=FnApiRunner())


def _event(event_id, ts, user="u", item="i", seed=""):
  return schema.Event(event_id=event_id, timestamp=ts, user_id=user, item_id=item,
                      seed_item_id=seed)


def test_parse_events_splits_lines_into_events_and_dead_letters():
  lines = [
      io.RawLine("f", 1, json.dumps({"event_id": "e", "ts": START, "user_id": "u",
                                     "item_id": "i"}).encode(), 40),
      io.RawLine("f", 2, b"{", 1),
      io.RawLine("f", 3, b'{"event_id": "x"', 5_000_000),
      io.RawLine("g", 9, json.dumps({"event_id": "e", "ts": START - 7200, "user_id": "u",
                                     "item_id": "i"}).encode(), 40),
  ]
  with _pipeline() as p:
    parsed = p | beam.Create(lines) | parse.ParseEvents(DAY, max_skew_s=3600)
    assert_that(parsed.events, equal_to([(_event("e", START), "f", 1)]), label="events")
    assert_that(
        parsed.dead_letters
        | beam.Map(lambda d: (d["file"], d["line_number"], d["reason"], d["line_bytes"])),
        equal_to([("f", 2, schema.MALFORMED_JSON, 1),
                  ("f", 3, schema.LINE_TOO_LONG, 5_000_000),
                  ("g", 9, schema.TIMESTAMP_OUT_OF_PARTITION, 40)]), label="dead")


def test_dedupe_keeps_the_earliest_copy_whatever_the_arrival_order():
  copies = [(_event("e", 50, item="late"), "a", 1), (_event("e", 10, item="first"), "b", 7),
            (_event("e", 10, item="tie"), "b", 9), (_event("f", 5), "a", 2)]
  with _pipeline() as p:
    result = p | beam.Create(copies) | parse.DedupeEvents()
    assert_that(result.events, equal_to([_event("e", 10, item="first"), _event("f", 5)]),
                label="events")
    assert_that(result.sources, equal_to(["b", "a"]), label="sources")
    assert_that(result.duplicates, equal_to(["a", "b"]), label="duplicates")


def test_latest_catalog_line_wins_by_partition_then_file_then_line():
  def entry(channel, path, line):
    return schema.CatalogItem(item_id="i", channel_id=channel), path, line
  entries = [entry("day2-z", "c/2024-01-02/z.jsonl", 9),
             entry("day3-a-2", "c/2024-01-03/a.jsonl", 2),
             entry("day3-a-1", "c/2024-01-03/a.jsonl", 1),
             entry("day1", "c/2024-01-01/z.jsonl", 99)]
  with _pipeline() as p:
    corpus = p | beam.Create(entries) | parse.LatestCatalog()
    assert_that(corpus, equal_to([("i", schema.CatalogItem(item_id="i",
                                                           channel_id="day3-a-2"))]))


def test_join_gives_known_items_their_features_and_counts_unknown_ones():
  known = schema.CatalogItem(item_id="k", channel_id="c", topics=("t",),
                             topic_weights=(1.0,))
  with _pipeline() as p:
    events = p | "Events" >> beam.Create([_event("1", 1, item="k"), _event("2", 2, item="u"),
                                          _event("3", 3, item="u")])
    corpus = p | "Corpus" >> beam.Create([("k", known), ("other", known)])
    joined = {"events": events, "corpus": corpus} | parse.JoinCatalog()
    unknown = schema.CatalogItem(item_id="u")
    assert_that(joined.events, equal_to([
        (_event("1", 1, item="k"), known), (_event("2", 2, item="u"), unknown),
        (_event("3", 3, item="u"), unknown)]), label="events")
    assert_that(joined.unknown_items, equal_to(["u", "u"]), label="unknown")


def _check_histories(events, state, expected_events, expected_state, expected_users=None,
                     **kwargs):
  """Runs AttachHistories and asserts (event_id, history, seed), state and users."""
  item = schema.CatalogItem(item_id="x")
  with _pipeline() as p:
    result = ({"events": p | "Events" >> beam.Create([(e, item) for e in events]),
               history.STATE: p | "State" >> beam.Create(state)}
              | history.AttachHistories(**kwargs))
    assert_that(result.events | beam.Map(lambda e: (e[0].event_id, e[2], e[3])),
                equal_to(expected_events), label="events")
    assert_that(result[history.STATE], equal_to(expected_state), label="state")
    if expected_users is not None:
      assert_that(result[history.USERS], equal_to(expected_users), label="users")


def test_attach_histories_carries_state_cuts_it_and_derives_seeds():
  _check_histories(
      [_event("b", 20, "u1", "i2"), _event("a", 20, "u1", "i1", seed="s"),
       _event("c", 30, "u1", "i3"), _event("d", 5, "u2", "i9")],
      [("u1", (("old1", 10), ("old2", 9))), ("u3", (("kept", 1),))],
      [("a", ("old1", "old2"), "s"), ("b", ("old1", "old2"), "old1"),
       ("c", ("i2", "i1"), "i2"), ("d", (), "")],
      [("u1", (("i3", 30), ("i2", 20))), ("u2", (("i9", 5),)), ("u3", (("kept", 1),))],
      ["u1", "u2"], max_history=2)


def test_same_second_events_do_not_enter_each_others_history():
  _check_histories(
      [_event("a", 20, "u", "i1"), _event("b", 20, "u", "i2"),
       _event("c", 21, "u", "i3"), _event("d", 21, "u", "i4", seed="s")], [],
      [("a", (), ""), ("b", (), ""), ("c", ("i2", "i1"), "i2"), ("d", ("i2", "i1"), "s")],
      [("u", (("i4", 21), ("i3", 21), ("i2", 20), ("i1", 20)))])


def test_carried_items_after_an_event_stay_out_of_its_history():
  # The state holds an item of the next day (an early event of the previous partition).
  _check_histories(
      [_event("late", 100, "u", "i1"), _event("on_time", 600, "u", "i2")],
      [("u", (("future", 500), ("recent", 90), ("old", 10)))],
      [("late", ("recent", "old"), "recent"), ("on_time", ("future", "i1"), "future")],
      [("u", (("i2", 600), ("future", 500)))], max_history=2)


def test_the_state_keeps_what_a_late_event_of_a_later_day_can_need():
  events = [_event(f"e{t}", t, "u", f"i{t}") for t in (10, 20, 30, 40, 50)]
  # Every item from keep_from_ts on, and the max_history items before it.
  _check_histories(
      events, [],
      [("e10", (), ""), ("e20", ("i10",), "i10"), ("e30", ("i20", "i10"), "i20"),
       ("e40", ("i30", "i20"), "i30"), ("e50", ("i40", "i30"), "i40")],
      [("u", (("i50", 50), ("i40", 40), ("i30", 30), ("i20", 20)))],
      max_history=2, keep_from_ts=40)
  _check_histories(events[:1], [], [("e10", (), "")], [("u", ())],
                   max_history=0, keep_from_ts=60)


def test_history_state_lines_round_trip_and_old_lines_still_load():
  entries = (("i9", 200), ("i4", 200), ("i1", 7))
  line = history.history_line("u1", entries)
  assert json.loads(line) == {"user_id": "u1", "items": ["i9", "i4", "i1"],
                              "timestamps": [200, 200, 7]}
  assert history.parse_history_line(io.RawLine("f", 1, line, len(line))) == ("u1", entries)
  old = b'{"user_id":"u2","items":["a","b"]}'
  assert history.parse_history_line(io.RawLine("f", 2, old, len(old))) == (
      "u2", (("a", history.LEGACY_TIMESTAMP), ("b", history.LEGACY_TIMESTAMP)))
  for bad in (b'{"user_id":"u","items":["a","b"],"timestamps":[1,2]}',
              b'{"user_id":"u","items":["a"],"timestamps":["1"]}',
              b'{"user_id":"u","items":["a"],"timestamps":[1,2]}'):
    with pytest.raises(history.CorruptHistoryError, match="f:3: bad history state line"):
      history.parse_history_line(io.RawLine("f", 3, bad, len(bad)))


def test_encoded_cogroup_matches_beams_cogroup():
  left = [("k", _event("1", 1)), ("k", _event("2", 2)), ("j", _event("3", 3))]
  right = [("k", schema.CatalogItem(item_id="k")), ("z", schema.CatalogItem(item_id="z"))]
  normal = lambda kv: (kv[0], {tag: sorted(v, key=repr) for tag, v in kv[1].items()})  # noqa
  with _pipeline() as p:
    inputs = {
        "l": p | "L" >> beam.Create(left).with_output_types(tuple[str, schema.Event]),
        "r": p | "R" >> beam.Create(right).with_output_types(
            tuple[str, schema.CatalogItem])}
    expected = [
        ("k", {"l": [_event("1", 1), _event("2", 2)], "r": [schema.CatalogItem("k")]}),
        ("j", {"l": [_event("3", 3)], "r": []}),
        ("z", {"l": [], "r": [schema.CatalogItem("z")]})]
    ours = inputs | "Ours" >> coders.EncodedCoGroupByKey() | "N1" >> beam.Map(normal)
    beams = inputs | "Beams" >> beam.CoGroupByKey() | "N2" >> beam.Map(normal)
    assert_that(ours, equal_to(expected), label="ours")
    assert_that(beams, equal_to(expected), label="beams")


def test_event_coder_round_trips_without_pickling():
  coder = coders.EventCoder()
  event = schema.Event("e", 1704067200, "u", "i", 0.25, "s", "ios", "US")
  encoded = coder.encode(event)
  assert coder.decode(encoded) == event
  assert b"pipeline.schema" not in encoded and len(encoded) < 60


def _counts(**by_file):
  """((metric, file, detail), n) pairs from {metric: {(file, detail): n}}."""
  return [((metric, file, detail), n) for metric, entries in by_file.items()
          for (file, detail), n in entries.items()]


def test_stats_hold_the_equation_and_refuse_a_lost_line():
  good = _counts(lines={("a", ""): 5}, examples={("a", ""): 2},
                 duplicates={("a", ""): 1}, dead_letters={("a", "malformed_json"): 2},
                 written={(stats.OUT_EXAMPLES, "examples-00.tfrecord.gz"): 2,
                          (stats.OUT_DEAD_LETTERS, "dead_letter-logs-00000-of-00001.jsonl"): 2})
  day = stats.assemble_stats(good, {"day": "2024-03-10"})
  assert day["files"]["a"] == {"lines": 5, "examples": 2, "duplicates": 1,
                               "dead_letters": 2,
                               "dead_letters_by_reason": {"malformed_json": 2}}
  assert day["day"] == "2024-03-10" and day["input_lines"] == 5
  assert day["examples_by_file"] == {"examples-00.tfrecord.gz": 2}

  lost = [pair for pair in good if pair[0][0] != "duplicates"]
  with pytest.raises(stats.StatsMismatchError, match="a: lines != examples"):
    stats.assemble_stats(lost, {})
  unwritten = [pair for pair in good if pair[0][2] != "examples-00.tfrecord.gz"]
  with pytest.raises(stats.StatsMismatchError, match="examples: counted 2 but wrote 0"):
    stats.assemble_stats(unwritten, {})


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "w").close()


def test_previous_state_skips_empty_days_but_not_days_with_data(tmp_path):
  workdir, logs = str(tmp_path), f"{tmp_path}/logs"
  paths = workdir_lib.Workdir(workdir)
  day = dt.date(2024, 1, 10)
  assert history.previous_state(paths, day) is None
  _touch(f"{workdir}/state/history/2024-01-07/{history.SUMMARY_FILE}")
  _touch(f"{logs}/2024-01-07/a.jsonl")
  _touch(f"{logs}/2024-01-10/a.jsonl")
  _touch(f"{logs}/2024-01-11/a.jsonl")
  _touch(f"{logs}/2024-01-08/.hidden")           # not data
  _touch(f"{workdir}/state/history/.tmp-2024-01-09-x/{history.SUMMARY_FILE}")  # not state
  assert history.previous_state(paths, day) == paths.history_dir(dt.date(2024, 1, 7))
  _touch(f"{workdir}/data/2024-01-09/stats.json")
  with pytest.raises(history.MissingHistoryError, match="2024-01-09"):
    history.previous_state(paths, day)
  assert history.previous_state(paths, day, allow_missing=True) == (
      paths.history_dir(dt.date(2024, 1, 7)))


def test_options_that_keep_their_views_behave_like_beams():
  options = beam_day._ViewCachingOptions(["--direct_num_workers=2"])
  direct = options.view_as(DirectOptions)
  assert direct.direct_num_workers == 2 and options.view_as(DirectOptions) is direct
  options.view_as(StandardOptions).runner = "SomeRunner"  # set through one view ...
  assert options.get_all_options()["runner"] == "SomeRunner"  # ... seen by all
  copied = copy.deepcopy(options)
  copied.view_as(DirectOptions).direct_num_workers = 3
  assert (direct.direct_num_workers, copied.view_as(DirectOptions).direct_num_workers
          ) == (2, 3)
  restored = pickle.loads(pickle.dumps(options))
  assert "_views" not in restored.__dict__  # the views are made again, not carried
  assert restored.view_as(StandardOptions).runner == "SomeRunner"


def test_latest_line_fn_merges_partial_results_in_any_order():
  fn = parse._LatestLineFn()
  lines = [(("2024-01-02", "c/2024-01-02/a", 3), schema.CatalogItem(item_id="i",
                                                                    channel_id=str(n)))
           for n in range(3)]
  lines[1] = (("2024-01-03", "c/2024-01-03/a", 1), lines[1][1])  # the latest
  parts = [fn.add_input(fn.create_accumulator(), line) for line in lines]
  for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
    merged = fn.merge_accumulators([fn.create_accumulator()] + [parts[i] for i in order])
    assert fn.extract_output(merged).channel_id == "1"
  coder = fn.get_accumulator_coder()
  assert [coder.decode(coder.encode(a)) for a in (None, parts[1])] == [None, parts[1]]


class _StatefulFn(beam.DoFn):
  SEEN = beam.transforms.userstate.BagStateSpec("seen", beam.coders.StrUtf8Coder())

  def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
    seen.add(element[1])
    yield element[0], sorted(seen.read())


def test_memoized_dofn_specs_are_beams_and_stateful_dofns_still_run():
  specs = beam.transforms.userstate.get_dofn_specs
  fn = _StatefulFn()
  assert specs(fn) == specs.__wrapped__(fn) == ({_StatefulFn.SEEN}, set())
  assert specs(fn) == specs.__wrapped__(fn)  # kept on the DoFn: the same answer
  plain = beam.Map(str).dofn
  assert specs(plain) == specs.__wrapped__(plain) == (set(), set())
  with _pipeline() as p:
    seen = (p | beam.Create([("k", "a"), ("k", "b")]) | beam.ParDo(_StatefulFn())
            | beam.Filter(lambda kv: len(kv[1]) == 2))
    assert_that(seen, equal_to([("k", ["a", "b"])]))
