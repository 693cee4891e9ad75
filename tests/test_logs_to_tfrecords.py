"""The day's Beam job (pipeline.beam_day and its app, pipeline.logs_to_tfrecords) end to
end on the DirectRunner's engine, on tiny hand-made logs."""

import collections
import datetime as dt
import glob
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from core import workdir as workdir_lib
from models import config as config_lib
from models import features
from pipeline import beam_day
from pipeline import catalog_state
from pipeline import history
from pipeline import io
from pipeline import schema
from pipeline import synthetic_world
from pipeline import workdir_lock

DAY = dt.date(2024, 3, 10)
START, END = schema.day_bounds(DAY)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, lines):
  """Writes lines (str or bytes) to path, gzip when it ends in .gz."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines)
  if path.endswith(".gz"):
    data = gzip.compress(data, mtime=0)
  with open(path, "wb") as f:
    f.write(data)


def _event(event_id, ts, user, item, **extra):
  return json.dumps({"event_id": event_id, "ts": ts, "user_id": user, "item_id": item,
                     **extra})


def _records(pattern):
  """(file name, record) for every record of the files matching `pattern`, in name order."""
  out = []
  for path in sorted(glob.glob(pattern)):
    for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
      out.append((os.path.basename(path),
                  features.from_example(tf.train.Example.FromString(record.numpy()))))
  return out


def _examples(workdir, day=DAY):
  return _records(os.path.join(workdir, "data", day.isoformat(), "examples-*.tfrecord.gz"))


def _tree(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _hand_made_day(workdir):
  _write(f"{workdir}/catalog/2024-03-09/c.jsonl", [
      json.dumps({"item_id": "i1", "channel_id": "c1", "topics": ["t1", "t2"],
                  "topic_weights": [0.7, 0.3], "duration_s": 120}),
      json.dumps({"item_id": "i2", "channel_id": "c2", "topics": ["t3"],
                  "duration_s": 30.5}),
      json.dumps({"item_id": "i3", "channel_id": "old", "topics": ["t9"]}),
  ])
  _write(f"{workdir}/catalog/2024-03-10/c.jsonl.gz", [
      json.dumps({"item_id": "i3", "channel_id": "c3", "topics": []}),
      json.dumps({"item_id": "i4", "channel_id": "c4", "topics": ["t4"]}),
  ])
  # A later partition: not part of the corpus of DAY.
  _write(f"{workdir}/catalog/2024-03-11/c.jsonl", [
      json.dumps({"item_id": "i5", "channel_id": "c5"}),
      json.dumps({"item_id": "i1", "channel_id": "changed"}),
  ])
  _write(f"{workdir}/logs/2024-03-10/a.jsonl.gz", [
      _event("e1", START + 10, "u1", "i1", reward=0.5, device="ios", country="US"),
      _event("e3", "2024-03-10T05:00:00Z", "u1", "i2", seed_item_id="i9"),
      _event("e4", (START + 7200) * 1000, "u2", "i5"),
  ])
  _write(f"{workdir}/logs/2024-03-10/b.jsonl", [
      _event("e2", START + 20, "u1", "i3"),
      _event("e5", START - 600, "u2", "i1", device="web"),
      _event("e6", END + 100, "u1", "i4", reward=0),
  ])


def test_hand_made_day_gives_exact_features_corpus_and_stats(tmp_path):
  workdir = str(tmp_path)
  _hand_made_day(workdir)
  stats = beam_day.run_day(DAY, workdir)

  i1 = {"item_id": "i1", "item_channel_id": "c1", "item_topics": ["t1", "t2"],
        "item_topic_weights": [pytest.approx(0.7), pytest.approx(0.3)],
        "item_duration_s": 120.0}
  i2 = {"item_id": "i2", "item_channel_id": "c2", "item_topics": ["t3"],
        "item_topic_weights": [1.0], "item_duration_s": 30.5}
  i3 = {"item_id": "i3", "item_channel_id": "c3", "item_topics": [],
        "item_topic_weights": [], "item_duration_s": 0.0}
  i4 = {"item_id": "i4", "item_channel_id": "c4", "item_topics": ["t4"],
        "item_topic_weights": [1.0], "item_duration_s": 0.0}
  unknown_i5 = {"item_id": "i5", "item_channel_id": "", "item_topics": [],
                "item_topic_weights": [], "item_duration_s": 0.0}

  def query(event_id, ts, user, seed, hist, reward=1.0, device="", country=""):
    return {"event_id": event_id, "timestamp": ts, "user_id": user, "device": device,
            "country": country, "seed_item_id": seed, "history_item_ids": hist,
            "reward": reward}

  expected = [
      ("examples-00.tfrecord.gz", {**query("e5", START - 600, "u2", "", [], device="web"),
                                   **i1}),
      ("examples-00.tfrecord.gz", {**query("e1", START + 10, "u1", "", [], 0.5, "ios", "US"),
                                   **i1}),
      ("examples-00.tfrecord.gz", {**query("e2", START + 20, "u1", "i1", ["i1"]), **i3}),
      ("examples-02.tfrecord.gz", {**query("e4", START + 7200, "u2", "i1", ["i1"]),
                                   **unknown_i5}),
      ("examples-05.tfrecord.gz", {**query("e3", START + 5 * 3600, "u1", "i9",
                                           ["i3", "i1"]), **i2}),
      ("examples-23.tfrecord.gz", {**query("e6", END + 100, "u1", "i2", ["i2", "i3", "i1"],
                                           0.0), **i4}),
  ]
  assert _examples(workdir) == expected

  corpus = [record for _, record in _records(
      os.path.join(workdir, "data", DAY.isoformat(), "corpus-*.tfrecord.gz"))]
  assert sorted(corpus, key=lambda r: r["item_id"]) == [i1, i2, i3, i4]

  assert history.load_histories(workdir, DAY) == {"u1": ["i4", "i2", "i3", "i1"],
                                                  "u2": ["i5", "i1"]}
  assert (stats["input_lines"], stats["examples"], stats["duplicates"],
          stats["dead_letters"]) == (6, 6, 0, 0)
  assert (stats["unknown_item_events"], stats["corpus_items"], stats["users"],
          stats["history_users"]) == (1, 4, 2, 2)
  assert stats["catalog"]["lines"] == 5 and stats["catalog"]["superseded"] == 1
  assert sorted(os.path.basename(f) for f in stats["catalog"]["files"]) == [
      "c.jsonl", "c.jsonl.gz"]
  a, b = (f"{workdir}/logs/2024-03-10/{name}" for name in ("a.jsonl.gz", "b.jsonl"))
  assert stats["files"][a]["lines"] == 3 and stats["files"][b]["examples"] == 3
  assert sum(stats["examples_by_file"].values()) == 6 and len(stats["examples_by_file"]) == 24
  with open(os.path.join(workdir, "data", DAY.isoformat(), "stats.json")) as f:
    assert json.load(f) == stats


def test_histories_are_carried_across_days_and_required(tmp_path):
  workdir = str(tmp_path)
  day1, day2 = DAY, DAY + dt.timedelta(days=1)
  start2, _ = schema.day_bounds(day2)
  _write(f"{workdir}/logs/{day1}/a.jsonl", [
      _event("a1", START + 1, "u1", "i1"), _event("a2", START + 2, "u1", "i2"),
      _event("a3", START + 3, "u2", "i9")])
  _write(f"{workdir}/logs/{day2}/a.jsonl", [
      _event("b1", start2 + 1, "u1", "i3"), _event("b2", start2 + 2, "u1", "i4"),
      _event("b3", start2 + 3, "u1", "i5")])

  with pytest.raises(history.MissingHistoryError, match=str(day1)):
    beam_day.run_day(day2, workdir, beam_day.BeamSettings(max_history=3))

  beam_day.run_day(day1, workdir, beam_day.BeamSettings(max_history=3))
  stats = beam_day.run_day(day2, workdir, beam_day.BeamSettings(max_history=3))

  day2_examples = [(r["event_id"], r["history_item_ids"], r["seed_item_id"])
                   for _, r in _examples(workdir, day2)]
  assert day2_examples == [("b1", ["i2", "i1"], "i2"),
                           ("b2", ["i3", "i2", "i1"], "i3"),
                           ("b3", ["i4", "i3", "i2"], "i4")]
  assert history.load_histories(workdir, day2) == {"u1": ["i5", "i4", "i3"],
                                                   "u2": ["i9"]}
  assert stats["previous_history_state"] == workdir_lib.Workdir(workdir).history_dir(day1)
  assert (stats["users"], stats["history_users"]) == (1, 2)


def test_missing_history_can_be_allowed(tmp_path):
  workdir = str(tmp_path)
  day0 = DAY - dt.timedelta(days=1)
  _write(f"{workdir}/logs/{day0}/a.jsonl", [_event("z", START - 5000, "u1", "i0")])
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [_event("a", START + 1, "u1", "i1")])
  stats = beam_day.run_day(DAY, workdir, beam_day.BeamSettings(allow_missing_history=True))
  assert [r["history_item_ids"] for _, r in _examples(workdir)] == [[]]
  assert stats["previous_history_state"] is None


def _catalog(item_id, channel, **extra):
  return json.dumps({"item_id": item_id, "channel_id": channel, **extra})


def _two_catalog_days(workdir):
  """DAY - 1 and DAY: catalog lines that DAY's corpus must resolve across days."""
  day0 = DAY - dt.timedelta(days=1)
  start0, _ = schema.day_bounds(day0)
  _write(f"{workdir}/catalog/{day0}/c.jsonl.gz", [
      _catalog("i1", "c1", topics=["t1"], upload_ts="9000-01-01T00:00:01Z"),
      _catalog("i2", "c2", topics=["t2", "t3"], topic_weights=[2, 0.1], duration_s=1e-7),
      "{broken", _catalog("i5", "chaîne")])
  _write(f"{workdir}/catalog/{DAY}/a.jsonl", [_catalog("i1", "c1-new"), _catalog("i3", "c3")])
  _write(f"{workdir}/catalog/{DAY}/b.jsonl", [_catalog("i3", "c3-b"), _catalog("i4", "c4")])
  _write(f"{workdir}/logs/{day0}/a.jsonl", [_event("y", start0 + 5, "u1", "i2")])
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [
      _event("a", START + 1, "u1", "i1"), _event("b", START + 2, "u2", "i2"),
      _event("c", START + 3, "u2", "i3"), _event("d", START + 4, "u3", "i5")])
  return day0


def test_the_catalog_state_is_carried_and_gives_what_reading_every_partition_gives(
    tmp_path):
  carried, full = f"{tmp_path}/carried", f"{tmp_path}/full"
  day0 = _two_catalog_days(carried)
  beam_day.run_day(day0, carried)
  shutil.copytree(carried, full)
  shutil.rmtree(f"{full}/state/catalog")  # DAY then reads every partition up to it
  stats = beam_day.run_day(DAY, carried)
  full_stats = beam_day.run_day(DAY, full)

  paths = workdir_lib.Workdir(carried)
  assert stats["previous_catalog_state"] == catalog_state.state_dir(paths, day0)
  assert full_stats["previous_catalog_state"] is None
  read = sorted(os.path.relpath(f, carried) for f in stats["catalog"]["files"])
  assert read == [f"catalog/{DAY}/a.jsonl", f"catalog/{DAY}/b.jsonl"] + [
      f"state/catalog/{day0}/part-{i:05d}-of-00004.jsonl.gz" for i in range(4)]
  assert stats["catalog"]["dead_letters"] == 0  # day0's broken line is not read again
  assert full_stats["catalog"]["dead_letters"] == 1
  assert stats["corpus_items"] == full_stats["corpus_items"] == 5
  assert stats["unknown_item_events"] == 0

  def outputs(root):  # what the catalog's reading must not change
    data = {name: content for name, content in _tree(f"{root}/data/{DAY}").items()
            if name != "stats.json" and not name.startswith("dead_letter-catalog")}
    return data, _tree(f"{root}/state/catalog/{DAY}"), _tree(f"{root}/state/history/{DAY}")

  assert outputs(carried) == outputs(full)
  corpus = {r["item_id"]: r["item_channel_id"] for _, r in _records(
      f"{carried}/data/{DAY}/corpus-*.tfrecord.gz")}
  assert corpus == {"i1": "c1-new", "i2": "c2", "i3": "c3-b", "i4": "c4", "i5": "chaîne"}


@pytest.mark.parametrize("damage", ["old_partition_changed", "state_missing",
                                    "state_shard_missing"])
def test_a_stale_or_missing_catalog_state_is_rebuilt_from_every_partition(tmp_path,
                                                                          damage):
  workdir = str(tmp_path)
  day0 = _two_catalog_days(workdir)
  beam_day.run_day(day0, workdir)
  state0 = catalog_state.state_dir(workdir_lib.Workdir(workdir), day0)
  if damage == "old_partition_changed":  # a late fix of an earlier partition
    with open(f"{workdir}/catalog/{day0}/late.jsonl", "w") as f:
      f.write(_catalog("i2", "c2-fixed") + "\n")
  elif damage == "state_missing":
    shutil.rmtree(state0)
  else:
    os.remove(f"{state0}/part-00002-of-00004.jsonl.gz")
  stats = beam_day.run_day(DAY, workdir)
  assert stats["previous_catalog_state"] is None
  corpus = {r["item_id"]: r["item_channel_id"] for _, r in _records(
      f"{workdir}/data/{DAY}/corpus-*.tfrecord.gz")}
  assert corpus["i2"] == ("c2-fixed" if damage == "old_partition_changed" else "c2")
  assert len(corpus) == 5
  held = catalog_state.summary(workdir_lib.Workdir(workdir), DAY)
  assert sorted(held["catalog_files"]) == sorted(
      os.path.relpath(f, f"{workdir}/catalog") for f in glob.glob(
          f"{workdir}/catalog/*/*"))


def test_a_day_that_failed_after_publishing_its_states_runs_again(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  day0 = _two_catalog_days(workdir)
  beam_day.run_day(day0, workdir)
  publish = io.publish

  def fail_on_data(tmp_dir, final_dir, marker):
    if "/data/" in final_dir:
      raise OSError("killed before publishing data")
    publish(tmp_dir, final_dir, marker)

  monkeypatch.setattr(io, "publish", fail_on_data)
  with pytest.raises(OSError, match="killed"):
    beam_day.run_day(DAY, workdir)
  states = {kind: _tree(f"{workdir}/state/{kind}/{DAY}") for kind in ("catalog", "history")}
  assert all(states.values()) and not os.path.exists(f"{workdir}/data/{DAY}")
  monkeypatch.setattr(io, "publish", publish)
  stats = beam_day.run_day(DAY, workdir)
  assert stats["previous_catalog_state"] == catalog_state.state_dir(
      workdir_lib.Workdir(workdir), day0)
  assert {kind: _tree(f"{workdir}/state/{kind}/{DAY}")
          for kind in ("catalog", "history")} == states
  assert not glob.glob(f"{workdir}/data/.*") + glob.glob(f"{workdir}/state/*/.*")


def test_catalog_state_lines_read_back_as_the_same_items():
  items = [
      schema.CatalogItem("i1"),
      schema.CatalogItem("é/\"", "c", ("t1", "t2"), (2.0, 1e-7), 0.1, 2 * 10**11),
      schema.CatalogItem("i3", "", (), (), 3.4e38, schema.MAX_TIMESTAMP_S),
  ]
  for item in items:
    assert schema.validate_catalog(catalog_state.state_line(item)) == item
  with pytest.raises(ValueError, match="'big' makes a state line of"):
    catalog_state.state_line(schema.CatalogItem("big", "x" * schema.MAX_LINE_BYTES))


def test_dedupe_keeps_the_earliest_copy_and_output_is_in_time_order(tmp_path):
  workdir = str(tmp_path)
  rng = random.Random(5)
  files = {name: [] for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl")}
  expected, origin = {}, {}
  for k in range(150):
    ts = START + rng.choice([0, 59, 3599, 3600, 7000, 40000, 86399])  # many ties
    user = f"u{rng.randrange(5)}"
    origin[k] = rng.choice(list(files))
    files[origin[k]].append(_event(f"e{k:03d}", ts, user, f"i{k % 7}", reward=1.0))
    expected[f"e{k:03d}"] = ts
  # Copies of e000..e009: a later copy (dropped), and for e000..e004 an earlier one
  # in another file (kept: its reward tells them apart).
  for k in range(10):
    event_id = f"e{k:03d}"
    files["c.jsonl"].append(_event(event_id, expected[event_id] + 30, "u9", "late",
                                   reward=3.0))
    if k < 5:
      files["a.jsonl"].append(_event(event_id, expected[event_id] - 30, "u9", "early",
                                     reward=2.0))
      expected[event_id] -= 30
  for name, lines in files.items():
    _write(f"{workdir}/logs/{DAY}/{name}", lines)

  stats = beam_day.run_day(DAY, workdir)
  records = [r for _, r in _examples(workdir)]
  order = [(r["timestamp"], r["event_id"]) for r in records]
  assert order == sorted(order) and len(set(order)) == len(order)
  assert {r["event_id"]: r["timestamp"] for r in records} == expected
  rewards = {r["event_id"]: r["reward"] for r in records}
  assert [rewards[f"e{k:03d}"] for k in range(10)] == [2.0] * 5 + [1.0] * 5
  assert stats["duplicates"] == 15 and stats["examples"] == 150
  dropped = collections.Counter(["c.jsonl"] * 10 + [origin[k] for k in range(5)])
  assert {os.path.basename(f): e["duplicates"] for f, e in stats["files"].items()} == {
      name: dropped[name] for name in files}


def _reference(paths, day):
  """Independent expectations: what each line should become, by plain Python."""
  reasons, seen, duplicates = collections.Counter(), set(), 0
  for path in paths:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      data = f.read()
    for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
      result = schema.validate_event(line, day)
      if isinstance(result, schema.Invalid):
        reasons[result.reason] += 1
      elif result.event_id in seen:
        duplicates += 1
      else:
        seen.add(result.event_id)
  return reasons, len(seen), duplicates


def test_fuzzed_day_produces_every_reason_and_loses_no_line(tmp_path):
  workdir = str(tmp_path)
  synthetic_world.generate(workdir, synthetic_world.WorldConfig(
      start_date=DAY, days=1, users=40, items=80, new_items_per_day=5,
      events_per_day=2000, shards=2, bad_line_rate=0.05, seed=3))
  huge = b'{"event_id":"' + b"x" * (10 << 20) + b'","user_id":"u","item_id":"i","ts":1}'
  nasty = [
      b"\xff\xfe\x00\x81binary\x00garbage\xc3",                       # bad_encoding
      b"\x00\x01\x02 binary but utf-8",                               # malformed_json
      b"",                                                            # malformed_json
      huge,                                                           # line_too_long
      b"[1, 2, 3]",                                                   # not_an_object
      _event("", START, "u", "i").encode(),                           # empty_id
      _event(7, START, "u", "i").encode(),                            # wrong_type
      _event("n1", START, "u", "i", reward="high").encode(),          # wrong_type
      _event("n2", START, "u", "i", reward=float("inf")).encode(),    # non_finite_reward
      _event("n3", [START], "u", "i").encode(),                       # bad_timestamp
      _event("n4", START + 5, "u", "i").encode() + b"\r",             # valid (CRLF)
  ]
  nasty_path = f"{workdir}/logs/{DAY}/zz-nasty.jsonl"
  _write(nasty_path, nasty)
  paths = sorted(glob.glob(f"{workdir}/logs/{DAY}/*"))

  stats = beam_day.run_day(DAY, workdir)

  reasons, examples, duplicates = _reference(paths, DAY)
  assert set(stats["dead_letters_by_reason"]) == set(schema.EVENT_REASONS)
  assert stats["dead_letters_by_reason"] == dict(reasons)
  assert (stats["examples"], stats["duplicates"]) == (examples, duplicates)
  assert duplicates > 0
  assert stats["input_lines"] == stats["examples"] + stats["duplicates"] + stats["dead_letters"]
  for path in paths:
    entry = stats["files"][path]
    assert entry["lines"] == entry["examples"] + entry["duplicates"] + entry["dead_letters"]
  assert stats["files"][nasty_path]["lines"] == len(nasty)
  assert len(_examples(workdir)) == examples

  with open(f"{workdir}/data/{DAY}/dead_letter-logs-00000-of-00001.jsonl") as f:
    dead = [json.loads(line) for line in f]
  assert len(dead) == stats["dead_letters"]
  assert [(d["file"], d["line_number"]) for d in dead] == sorted(
      (d["file"], d["line_number"]) for d in dead)
  by_line = {d["line_number"]: d for d in dead if d["file"] == nasty_path}
  assert by_line[4]["reason"] == schema.LINE_TOO_LONG
  assert by_line[4]["line_bytes"] == len(huge) and by_line[4]["line_truncated"]
  assert len(by_line[4]["line"]) == schema.DEAD_LETTER_LINE_BYTES
  assert by_line[1]["reason"] == schema.BAD_ENCODING
  assert sorted(by_line) == list(range(1, 11))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_gzip_fails_the_day_naming_the_file(tmp_path, damage):
  workdir = str(tmp_path)
  lines = [_event(f"e{k}", START + k, "u", "i") for k in range(3000)]
  _write(f"{workdir}/logs/{DAY}/good.jsonl.gz", lines[:10])
  bad = f"{workdir}/logs/{DAY}/bad.jsonl.gz"
  _write(bad, lines)
  with open(bad, "rb") as f:
    data = bytearray(f.read())
  if damage == "corrupt":
    data[len(data) // 2: len(data) // 2 + 16] = b"\x00" * 16
  else:
    data = data[: len(data) * 2 // 3]
  with open(bad, "wb") as f:
    f.write(bytes(data))

  with pytest.raises(Exception, match=re.escape(f"cannot read {bad}")):
    beam_day.run_day(DAY, workdir)
  assert not os.path.exists(f"{workdir}/data/{DAY}")
  assert not glob.glob(f"{workdir}/data/.*") and not glob.glob(f"{workdir}/state/history/.*")


def test_a_rerun_gives_the_same_bytes_and_clears_a_crashed_attempt(tmp_path):
  workdir = str(tmp_path)
  _hand_made_day(workdir)
  # A day before, so that the run also reads and carries history state.
  _write(f"{workdir}/logs/{DAY - dt.timedelta(days=1)}/a.jsonl",
         [_event("y1", START - 9000, "u1", "i7"), _event("y2", START - 8000, "u3", "i8")])
  beam_day.run_day(DAY - dt.timedelta(days=1), workdir)
  beam_day.run_day(DAY, workdir)
  kinds = ("data", "state/history", "state/catalog")
  first = {kind: _tree(f"{workdir}/{kind}/{DAY}") for kind in kinds}
  crashed = f"{workdir}/data/.tmp-{DAY}-0123456789ab"
  _write(f"{crashed}/examples-00.tfrecord.gz", [b"half written"])
  crashed_catalog = f"{workdir}/state/catalog/.tmp-{DAY}-0123456789ab"
  _write(f"{crashed_catalog}/part-00000-of-00004.jsonl.gz", [b"half written"])

  # The re-run goes through the absl app, with Beam options passed through.
  subprocess.run(
      [sys.executable, "-m", "pipeline.logs_to_tfrecords", f"--workdir={workdir}",
       f"--date={DAY}", "--direct_num_workers=2",
       "--direct_running_mode=multi_processing"],
      cwd=REPO, check=True, capture_output=True)
  second = {kind: _tree(f"{workdir}/{kind}/{DAY}") for kind in kinds}
  assert second == first
  assert not os.path.exists(crashed) and not os.path.exists(crashed_catalog)
  assert history.load_histories(workdir, DAY)["u3"] == ["i8"]


def test_a_late_event_gets_only_items_from_before_it(tmp_path):
  # Partition DAY holds an early event of the next day (00:30), partition DAY + 1 a
  # late event of DAY (23:30): the late event must not see the 00:30 item, and the
  # carried state must still hold the item it needs although max_history is 1.
  workdir = str(tmp_path)
  day2 = DAY + dt.timedelta(days=1)
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [
      _event("a", START + 100, "u1", "before"), _event("b", END + 1800, "u1", "after")])
  _write(f"{workdir}/logs/{day2}/a.jsonl", [
      _event("late", END - 1800, "u1", "late_item"),
      _event("next", END + 3600, "u1", "next_item")])
  beam_day.run_day(DAY, workdir, beam_day.BeamSettings(max_history=1))
  assert history.load_histories(workdir, DAY, with_timestamps=True) == {
      "u1": [("after", END + 1800), ("before", START + 100)]}
  beam_day.run_day(day2, workdir, beam_day.BeamSettings(max_history=1))
  assert [(r["event_id"], r["history_item_ids"], r["seed_item_id"])
          for _, r in _examples(workdir, day2)] == [("late", ["before"], "before"),
                                                    ("next", ["after"], "after")]
  assert history.load_histories(workdir, day2, with_timestamps=True) == {
      "u1": [("next_item", END + 3600)]}


def test_lone_surrogates_are_bad_encoding_dead_letters_in_logs_and_catalog(tmp_path):
  workdir = str(tmp_path)
  # json.dumps writes lone surrogates as \ud800 escapes, as a buggy producer would.
  _write(f"{workdir}/catalog/{DAY - dt.timedelta(days=1)}/c.jsonl", [
      json.dumps({"item_id": "i1", "topics": ["t1"]}),
      json.dumps({"item_id": "i2", "topics": ["t\ud800"]})])
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [
      _event("e1", START + 1, "u1", "i1"), _event("e2", START + 2, "u\udfff", "i1"),
      _event("e3", START + 3, "u1", "i2", device="\ud83d")])
  stats = beam_day.run_day(DAY, workdir)
  assert (stats["examples"], stats["dead_letters_by_reason"]) == (1, {"bad_encoding": 2})
  assert stats["catalog"]["dead_letters_by_reason"] == {"bad_encoding": 1}
  dead = []
  for kind in ("logs", "catalog"):
    with open(f"{workdir}/data/{DAY}/dead_letter-{kind}-00000-of-00001.jsonl") as f:
      dead += [(os.path.basename(d["file"]), d["line_number"], d["reason"])
               for d in map(json.loads, f)]
  assert dead == [("a.jsonl", 2, "bad_encoding"), ("a.jsonl", 3, "bad_encoding"),
                  ("c.jsonl", 2, "bad_encoding")]


def test_a_far_future_timestamp_is_a_dead_letter_whatever_the_skew(tmp_path):
  workdir = str(tmp_path)
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [
      _event("e1", START + 1, "u1", "i1"), _event("e2", 1e25, "u1", "i1")])
  stats = beam_day.run_day(DAY, workdir, beam_day.BeamSettings(max_skew_s=10**30))
  assert (stats["examples"], stats["dead_letters_by_reason"]) == (1, {"bad_timestamp": 1})


@pytest.mark.parametrize("where", ["logs", "catalog"])
@pytest.mark.parametrize("what", ["subfolder", "dangling_link"])
def test_files_the_job_would_not_read_fail_the_day_naming_them(tmp_path, where, what):
  workdir = str(tmp_path)
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [_event("e1", START + 1, "u1", "i1")])
  _write(f"{workdir}/catalog/{DAY}/c.jsonl", [json.dumps({"item_id": "i1"})])
  # Not read for DAY, so not checked: a later catalog partition, hidden folders.
  _write(f"{workdir}/catalog/{DAY + dt.timedelta(days=1)}/sub/c.jsonl", ["{}"])
  _write(f"{workdir}/{where}/{DAY}/_temporary/0/c.jsonl", ["{}"])
  partition = f"{workdir}/{where}/{DAY}"
  if what == "subfolder":
    unread = f"{partition}/sub/b.jsonl"
    _write(unread, ["{}"])
  else:
    unread = f"{partition}/b.jsonl"
    os.symlink(f"{workdir}/nowhere.jsonl", unread)
  with pytest.raises(FileNotFoundError, match=re.escape(unread)) as raised:
    beam_day.run_day(DAY, workdir)
  assert isinstance(raised.value, io.PartitionLayoutError)
  assert "_temporary" not in str(raised.value)
  assert not os.path.exists(f"{workdir}/data")


def test_settings_out_of_range_are_one_line_errors(tmp_path):
  workdir = str(tmp_path)
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [_event("e1", START + 1, "u1", "i1")])
  with pytest.raises(ValueError, match="corpus_shards must be >= 1, not 0"):
    beam_day.BeamSettings(corpus_shards=0)
  result = subprocess.run(
      [sys.executable, "-m", "pipeline.logs_to_tfrecords", f"--workdir={workdir}",
       f"--date={DAY}", "--corpus_shards=0"],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert "--corpus_shards=0" in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(f"{workdir}/data")


def test_the_standalone_job_is_refused_while_another_process_holds_the_workdir(tmp_path):
  workdir = str(tmp_path)
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [_event("e1", START + 1, "u1", "i1")])
  with workdir_lock.WorkdirLock(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.logs_to_tfrecords", f"--workdir={workdir}",
         f"--date={DAY}"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  assert f"error: {workdir}/.lock is held by pid {os.getpid()}" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(f"{workdir}/data")


def test_the_standalone_job_follows_the_models_history_length(tmp_path):
  # W/config.json says 1: a different --max_history is refused before anything runs,
  # and without the flag the histories are cut to the model's length.
  workdir = str(tmp_path)
  _write(f"{workdir}/logs/{DAY}/a.jsonl", [
      _event("e1", START + 1, "u1", "i1"), _event("e2", START + 2, "u1", "i2")])
  config_lib.write_config(config_lib.ModelConfig(max_history=1),
                          workdir_lib.Workdir(workdir).config_path)
  command = [sys.executable, "-m", "pipeline.logs_to_tfrecords", f"--workdir={workdir}",
             f"--date={DAY}"]
  refused = subprocess.run(command + [f"--max_history={features.MAX_HISTORY}"],
                           cwd=REPO, capture_output=True, text=True)
  assert refused.returncode == 2
  assert refused.stderr.strip() == (
      f"error: --max_history={features.MAX_HISTORY} differs from max_history=1 in "
      f"{workdir}/config.json: the model reads histories of that length (leave "
      "--max_history out to use it)")
  assert not os.path.exists(f"{workdir}/data")
  subprocess.run(command, cwd=REPO, check=True, capture_output=True)
  assert history.load_histories(workdir, DAY) == {"u1": ["i2"]}
  with open(workdir_lib.Workdir(workdir).stats_path(DAY)) as f:
    assert json.load(f)["max_history"] == 1
