"""Offline evaluation: the recall arithmetic, and a whole day computed by hand.

The end-to-end case uses towers whose rankings are known in closed form: over a
corpus of n one-hot items, the query for seed item s ranks items s+1, s+2, ...
(mod n) first, so the target t of an event with seed s sits at rank
(t - s - 1) mod n. Every expected figure below is derived in the comments.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from core import workdir as workdir_lib
from evaluation import baselines
from evaluation import evaluator
from evaluation import recall
from evaluation import records
from models import memory
from serving import exporter
from serving import index
from serving import versions
import serving_testlib as tl

N = 120
ITEMS = [f"i{j:03d}" for j in range(N)]
D = tl.DAY
P1 = D - datetime.timedelta(days=3)  # two earlier data days: training data
P2 = D - datetime.timedelta(days=1)


def test_hit_ranks_and_recall():
  retrieved = np.array([[b"a", b"b", b"c"], [b"c", b"", b""], [b"b", b"a", b"c"]], object)
  ranks = recall.hit_ranks(retrieved, np.array([b"b", b"a", b"a"], object))
  np.testing.assert_array_equal(ranks, [1, recall.MISS, 1])
  assert recall.recall_at(ranks, [1, 2, 3]) == {1: 0.0, 2: 2 / 3, 3: 2 / 3}
  assert recall.recall_curve(ranks, 3) == [0.0, 2 / 3, 2 / 3]
  assert recall.recall_at(np.array([], np.int64), [10]) == {10: None}


def test_popularity_order_deciles_and_ranks_with_exclusions():
  ids = np.array([f"x{j:02d}".encode() for j in range(20)], object)
  counts = np.zeros(20, np.int64)
  counts[[7, 3, 12]] = [5, 2, 2]  # x07 first, then the tie x03 < x12, then by id
  order = baselines.popularity_order(ids, counts)
  np.testing.assert_array_equal(order[:5], [7, 3, 12, 0, 1])
  deciles = baselines.popularity_deciles(ids, counts)
  assert np.bincount(deciles).tolist() == [2] * 10
  assert set(np.flatnonzero(deciles == 9)) == {7, 3}
  assert set(np.flatnonzero(deciles == 8)) == {12, 0}
  # x05 is 8th in the list (0-based): x07 x03 x12 x00 x01 x02 x04 x05.
  targets = np.array([b"x05", b"x05", b"zz"], object)
  seen = [set(), {b"x03", b"x04", b"x19"}, set()]
  # Skipping x03 and x04 (ranked above x05) moves it up two; x19 is below it.
  np.testing.assert_array_equal(baselines.popularity_ranks(ids, counts, targets, seen),
                                [7, 5, recall.MISS])


def test_exclusion_membership_matches_python_sets():
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 60, (5, 40)).astype(str).astype(object)
  exclude = rng.integers(0, 60, (5, 30)).astype(str).astype(object)
  exclude[1] = ""  # a row that excludes nothing
  exclude[2, 10:] = ""  # a row padded with ""
  got = memory.excluded(tf.constant(ids), tf.constant(exclude)).numpy()
  want = [[i in set(row) - {""} for i in id_row] for id_row, row in zip(ids, exclude)]
  np.testing.assert_array_equal(got, want)
  assert got[0].any() and not got[0].all()
  none = memory.excluded(tf.constant(ids), tf.zeros([5, 0], tf.string)).numpy()
  assert not none.any()
  empty = memory.excluded(tf.zeros([0, 0], tf.string), tf.zeros([0, 0], tf.string))
  assert empty.shape == (0, 0)


def _write_world(workdir):
  """Two training days and day D, exactly as in the hand computation below."""
  first, second = P1.isoformat(), P2.isoformat()
  tl.write_records(os.path.join(tl.day_dir(workdir, P1), "examples-00.tfrecord.gz"), [
      tl.event_row(f"{first}-1", "u1", "i010"), tl.event_row(f"{first}-2", "u1", "i011"),
      tl.event_row(f"{first}-3", "u2", "i010")])
  tl.write_records(os.path.join(tl.day_dir(workdir, P2), "examples-00.tfrecord.gz"), [
      tl.event_row(f"{second}-1", "u3", "i010"), tl.event_row(f"{second}-2", "u3", "i020"),
      tl.event_row(f"{second}-3", "u1", "i020")])
  tl.write_records(os.path.join(tl.day_dir(workdir, P2), "corpus-00.tfrecord.gz"),
                   [tl.corpus_row(i) for i in ITEMS])
  events = [  # (user, seed, history, target)
      ("u1", "i000", ["i020", "i011"], "i005"),
      ("u1", "i100", ["i005", "i020"], "i011"),
      ("u4", "i050", [], "i070"),
      ("u4", "i065", [], "i075"),
      ("u2", "i119", [], "i999"),
      ("u3", "i010", ["i011"], "i012"),
  ]
  tl.write_records(os.path.join(tl.day_dir(workdir, D), "examples-00.tfrecord.gz"), [
      tl.event_row(f"d{n}", user, target, seed=seed, history=history,
                   timestamp=1_709_600_000 + n)
      for n, (user, seed, history, target) in enumerate(events)])


@pytest.fixture(scope="module")
def hand_world(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval"))
  _write_world(workdir)
  # Seed s ranks s+1, s+2, ... (mod N) first: item j scores N - ((j - s - 1) mod N).
  model = tl.planted_towers(ITEMS, [[(s + 1 + r) % N for r in range(N)] for s in range(N)])
  # All 11 leaves searched and all 120 items reordered: ScaNN is exact here.
  params = index.ScannParams(num_leaves=11, num_leaves_to_search=11,
                             num_reordering_candidates=N)
  exported = exporter.export_day(
      model, tl.tiny_config(), workdir, P2,
      exporter.ExportSettings(export_k=100, scann_params=params),
      trained=tl.position(P2, 3, True))
  # Standalone: no state given, a fresh one.
  metrics = evaluator.evaluate_day(workdir, D, exported["scann_dir"],
                                   exported["exact_dir"])
  return workdir, exported, metrics


def test_evaluation_matches_hand_computation(hand_world):
  workdir, _, metrics = hand_world
  # Training counts (days P1, P2): i010: 3, i020: 2, i011: 1, all others 0.
  # Popularity list: i010 i020 i011 i000 i001 ... (ties by id).
  # Event: rotation rank | seen before | rank, seen excluded | popularity ranks
  #  1 u1 i000->i005: 4  | i010 i011 i020 (history + P1/P2) | 4 | 8, 5 (3 skipped)
  #  2 u1 i100->i011: 30 | i011 seen: a re-consumption, left out of "seen excluded" | 2
  #  3 u4 i050->i070: 19 | nothing | 19 | 3 + (70 - 3) = 70, 70
  #  4 u4 i065->i075: 9  | i070 (event 3, ranked 4th) | 8 | 75, 74
  #  5 u2 i119->i999: not in the corpus: a miss everywhere
  #  6 u3 i010->i012: 1  | i010 i020 (P2) i011 (history, ranked 1st) | 0 | 13, 10
  assert metrics["num_events"] == 6
  assert metrics["num_events_seen_excluded"] == 5
  assert metrics["target_in_corpus"] == pytest.approx(5 / 6)
  assert metrics["num_training_events"] == 6
  assert metrics["training_days"] == [P1.isoformat(), P2.isoformat()]
  assert metrics["ks"] == [10, 50, 100]
  expected = {
      "all": {"exact": [3 / 6, 5 / 6, 5 / 6], "popularity": [2 / 6, 3 / 6, 5 / 6]},
      "seen_excluded": {"exact": [3 / 5, 4 / 5, 4 / 5],
                        "popularity": [1 / 5, 2 / 5, 4 / 5]},
  }
  for mode, methods in expected.items():
    for method, values in methods.items():
      got = [metrics["recall"][mode][method][str(k)] for k in (10, 50, 100)]
      np.testing.assert_allclose(got, values, err_msg=f"{mode}/{method}")
    # ScaNN searches everything here, so it loses nothing.
    assert metrics["recall"][mode]["scann"] == metrics["recall"][mode]["exact"]
    assert all(v == 0 for v in metrics["ann_loss"][mode].values())
  curve = metrics["recall_curve"]["all"]["exact"]
  assert len(curve) == 100
  assert curve[0] == 0 and curve[1] == pytest.approx(1 / 6)  # rank 1 is a hit@2
  # Seen excluded, the exact ranks are 4, 19, 8, miss, 0; popularity's 5, 70, 74, miss, 10.
  curve = metrics["recall_curve"]["seen_excluded"]["exact"]
  np.testing.assert_allclose([curve[0], curve[7], curve[8]], [1 / 5, 2 / 5, 3 / 5])
  curve = metrics["recall_curve"]["seen_excluded"]["popularity"]
  np.testing.assert_allclose([curve[9], curve[10]], [1 / 5, 2 / 5])

  # Deciles of 12 items each; ascending popularity, ties by descending id, so
  # decile 9 = i000..i008 + i011 i020 i010, decile 8 = i009 i012..i019 i021..i023,
  # i070 is 49th (decile 4) and i075 44th (decile 3).
  table = metrics["by_popularity_decile"]
  assert [d["num_items"] for d in table["deciles"]] == [12] * 10
  assert (table["deciles"][9]["min_count"], table["deciles"][9]["max_count"]) == (0, 3)
  assert [d["num_events"] for d in table["deciles"]] == [0, 0, 0, 1, 1, 0, 0, 0, 1, 2]
  exact10 = table["all"]["exact"]["10"]
  assert [exact10[d] for d in (9, 8, 4, 3)] == [0.5, 1.0, 0.0, 1.0]
  assert exact10[0] is None
  assert table["seen_excluded"]["exact"]["10"][9] == 1.0
  pop10 = table["all"]["popularity"]["10"]
  assert [pop10[d] for d in (9, 8, 4, 3)] == [1.0, 0.0, 0.0, 0.0]

  directory = os.path.join(workdir, "eval", D.isoformat())
  with open(os.path.join(directory, "metrics.json")) as f:
    assert json.load(f)["recall"] == metrics["recall"]
  with open(os.path.join(directory, "recall.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_retrieve_signature_excludes_and_pads(hand_world):
  _, exported, _ = hand_world
  loaded = tf.saved_model.load(exported["exact_dir"])
  inputs = {"user_id": tf.constant(["u"]), "seed_item_id": tf.constant(["i118"]),
            "history_item_ids": tf.constant([[""]]), "device": tf.constant([""]),
            "country": tf.constant([""]), "timestamp": tf.constant([0], tf.int64)}
  out = loaded.signatures["retrieve"](**inputs, k=tf.constant(4),
                                      exclude_item_ids=tf.constant([["i000", ""]]))
  # From seed i118: i119, i000, i001, i002, ...; i000 is excluded.
  assert out["item_ids"].numpy().tolist() == [[b"i119", b"i001", b"i002", b"i003"]]
  scores = out["scores"].numpy()[0]
  assert np.all(np.diff(scores) < 0)
  everything = tf.constant([ITEMS[:118] + ["", ""]])
  out = loaded.signatures["retrieve"](**inputs, k=tf.constant(4),
                                      exclude_item_ids=everything)
  # Only i118 and i119 remain; the rest is padding.
  assert out["item_ids"].numpy().tolist() == [[b"i119", b"i118", b"", b""]]
  assert np.isneginf(out["scores"].numpy()[0, 2:]).all()


def _publish_copy(workdir, model_name, source, version, day):
  """Publishes a copy of version `source` of `model_name` as `version`, labelled `day`."""
  base = workdir_lib.Workdir(workdir).exports_base(model_name)
  shutil.copytree(os.path.join(base, str(source)), os.path.join(base, str(version)))
  path = versions.metadata_path(os.path.join(base, str(version)))
  with open(path) as f:
    meta = json.load(f)
  meta.update(version=version, day=day.isoformat())
  with open(path, "w") as f:
    json.dump(meta, f)


def test_evaluate_cli_scores_both_exports_of_the_newest_version_before_the_day(
    hand_world, tmp_path):
  source, exported, metrics = hand_world
  workdir = str(tmp_path / "w")
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("eval"))
  # Version 1 is labelled P2. Version 2 (P2) crashed between its publications:
  # ScaNN only. Version 3 is labelled D: trained on D, it must not score D.
  assert exported["version"] == 1
  _publish_copy(workdir, versions.SCANN_MODEL, 1, 2, P2)
  for name in (versions.SCANN_MODEL, versions.EXACT_MODEL):
    _publish_copy(workdir, name, 1, 3, D)
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
  result = subprocess.run(
      [sys.executable, "-m", "evaluation.evaluate", f"--workdir={workdir}",
       f"--date={D.isoformat()}"], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval", D.isoformat(), "metrics.json")) as f:
    written = json.load(f)
  assert written["recall"] == metrics["recall"]
  for variant, name in (("scann", versions.SCANN_MODEL), ("exact", versions.EXACT_MODEL)):
    assert written["exports"][variant]["dir"] == os.path.join(
        workdir_lib.Workdir(workdir).exports_base(name), "1")
  # The only exports are labelled P2 and D, so day P1 has none to score.
  result = subprocess.run(
      [sys.executable, "-m", "evaluation.evaluate", f"--workdir={workdir}",
       f"--date={P1.isoformat()}"], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "error: no export from a day before" in result.stderr


def test_training_interactions_are_a_running_total_rebuilt_when_a_day_changes(
    tmp_path, monkeypatch):
  """Evaluating day after day reads each earlier day once; a rewritten day counts anew."""
  workdir = str(tmp_path)
  days = [P1 + datetime.timedelta(days=i) for i in range(3)]
  for n, day in enumerate(days):
    tl.write_records(os.path.join(tl.day_dir(workdir, day), "examples-00.tfrecord.gz"),
                     [tl.event_row(f"e{n}", f"u{n}", "a"), tl.event_row(f"f{n}", "u", "b")])
  read = []
  real = records.read_columns
  monkeypatch.setattr(records, "read_columns",
                      lambda files, *a, **k: read.extend(files) or real(files, *a, **k))
  total = records.TrainingInteractions()
  assert total.before(workdir, days[1]).day_names == [days[0].isoformat()]
  total.before(workdir, days[2] + datetime.timedelta(days=1))
  assert total.day_names == [d.isoformat() for d in days]
  assert total.counts == {b"a": 3, b"b": 3}
  assert total.seen == {b"u0": {b"a"}, b"u1": {b"a"}, b"u2": {b"a"}, b"u": {b"b"}}
  assert len(read) == 3  # each day once
  # A forced re-run rewrites day 1: the total is rebuilt, from the new files.
  path = os.path.join(tl.day_dir(workdir, days[1]), "examples-00.tfrecord.gz")
  os.remove(path)
  tl.write_records(path, [tl.event_row("g", "u9", "c")])
  os.utime(path, ns=(1, 1))
  total.before(workdir, days[2])
  assert total.counts == {b"a": 1, b"b": 1, b"c": 1}
  assert total.seen == {b"u0": {b"a"}, b"u": {b"b"}, b"u9": {b"c"}}
  # An earlier day than the last asked for: rebuilt too, not the later total.
  assert total.before(workdir, days[1]).counts == {b"a": 1, b"b": 1}
  assert len(read) == 3 + 2 + 1


def test_the_evaluation_scores_the_exports_the_daily_state_holds(hand_world, tmp_path,
                                                                 monkeypatch):
  """Given the ExportState's published exports, evaluate_day loads none from disk,
  and its figures are those of a standalone evaluation."""
  source, exported, metrics = hand_world
  state = evaluator.EvaluationState(exports=exporter.LoadedExports())
  for path in (exported["scann_dir"], exported["exact_dir"]):
    state.exports.put(path, tf.saved_model.load(path))

  def no_load(path, *args, **kwargs):
    raise AssertionError(f"loaded {path} again")

  monkeypatch.setattr(tf.saved_model, "load", no_load)
  workdir = str(tmp_path / "w")
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("eval"))
  again = evaluator.evaluate_day(workdir, D, exported["scann_dir"],
                                 exported["exact_dir"], state=state)
  assert again["recall"] == metrics["recall"]
  assert state.interactions.day_names == [P1.isoformat(), P2.isoformat()]


def _days_before(n):
  return D - datetime.timedelta(days=n)


def _write_covisitation_world(workdir):
  """Data days around D whose co-visitation ranks are derived by hand below."""
  training = {  # day: [(user, item)] in time order
      _days_before(10): [("u1", "i001"), ("u1", "i002")] + [
          (f"u1{n}", "i100") for n in range(5)],  # i100: popular, but 10 days ago
      _days_before(3): [("u2", "i001"), ("u2", "i002"), ("u2", "i003"), ("u3", "i002"),
                        ("u3", "i003"), ("u5", "i050"), ("u6", "i050"), ("u7", "i060")],
      _days_before(2): [(f"v{n}", "i001") for n in range(3)],
      _days_before(1): [("u1", "i003")],  # u1's i002 (10 days ago) -> i003 counts
      D + datetime.timedelta(days=1): [("w", "i004"), ("w", "i005")] * 3,  # after D
  }
  for day, rows in training.items():
    tl.write_records(os.path.join(tl.day_dir(workdir, day), "examples-00.tfrecord.gz"), [
        tl.event_row(f"{day}-{n}", user, item, timestamp=1_709_000_000 + n)
        for n, (user, item) in enumerate(rows)])
  events = [  # (user, history, target)
      ("u9", ["i002"], "i001"),
      ("u9", ["i001", "i002"], "i050"),
      ("u8", [], "i004"),
      ("u8", ["i004"], "i005"),  # i004 -> i005 is a pair of day D only
      ("u1", ["i003"], "i002"),
      ("u2", ["i003"], "i100"),
  ]
  tl.write_records(os.path.join(tl.day_dir(workdir, D), "examples-00.tfrecord.gz"), [
      tl.event_row(f"d{n}", user, target, history=history, timestamp=1_709_600_000 + n)
      for n, (user, history, target) in enumerate(events)])


def _hit_ranks(curve, num_events):
  """The sorted ranks of the hits a recall curve counts."""
  hits = np.round(np.diff(np.concatenate([[0.0], curve])) * num_events).astype(int)
  return [rank for rank, n in enumerate(hits) for _ in range(n)]


def test_covisitation_baseline_matches_hand_computation(hand_world, tmp_path):
  _, exported, _ = hand_world
  workdir = str(tmp_path)
  _write_covisitation_world(workdir)
  # Co-visits before D (consecutive items of a user, both ways, across days; not
  # day D's i004-i005, nor the day after): i002: {i003: 3, i001: 2}, i001: {i002: 2},
  # i003: {i002: 3}. Last 7 days (D-3, D-2, D-1): i001 4, i003 3, i002 2, i050 2,
  # i060 1: fallback list i001 i003 i002 i050 i060 i000 i004 i005 ... (ties by id).
  # Event: query (history[0]) | its list | rank | seen | rank, seen excluded
  #  1 u9 i002->i001: i003 i001 | i002 ... | 1 | i002 (below) | 1
  #  2 u9 i001->i050: i002 | i001 i003 i050 | 3 | i001 i002 (above) | 1
  #  3 u8 none ->i004: the fallback alone | 6 | nothing | 6
  #  4 u8 i004->i005: never co-visited before D: the fallback | 7 | i004 | 6
  #  5 u1 i003->i002: i002 | 0 | i002 (day D-10): re-consumption, left out
  #  6 u2 i003->i100: i002 | i001 i003 i050 i060 i000 i004..i099 | 1 + 99 = 100 (a
  #    miss at 100, where popularity over all days has it 2nd) | i001 i002 i003 | 97
  want = {"all": [0, 1, 3, 6, 7], "seen_excluded": [1, 1, 6, 6, 97]}
  state = evaluator.EvaluationState()
  evaluator.evaluate_day(workdir, _days_before(1), exported["scann_dir"],
                         exported["exact_dir"], state=state)
  metrics = evaluator.evaluate_day(workdir, D, exported["scann_dir"],
                                   exported["exact_dir"], state=state)
  assert metrics["recent_days"] == [_days_before(n).isoformat() for n in (3, 2, 1)]
  assert metrics["num_events_seen_excluded"] == 5
  for mode, ranks in want.items():
    num = metrics["num_events" if mode == "all" else "num_events_seen_excluded"]
    assert _hit_ranks(metrics["recall_curve"][mode]["covisitation"], num) == ranks
    found = metrics["recall"][mode]["covisitation"]
    assert [found[k] for k in ("10", "50", "100")] == [
        sum(r < k for r in ranks) / num for k in (10, 50, 100)]
    assert set(metrics["by_popularity_decile"][mode]["covisitation"]) == {"10", "50", "100"}
  assert metrics["recall"]["all"]["popularity"]["10"] > 0  # i100 is 2nd there
  # The state carried from D-1 gives what a fresh evaluation of D gives.
  fresh = evaluator.evaluate_day(workdir, D, exported["scann_dir"], exported["exact_dir"])
  for key in ("recall", "recall_curve", "by_popularity_decile", "recent_days"):
    assert fresh[key] == metrics[key], key
  with open(os.path.join(workdir, "eval", D.isoformat(), "metrics.json")) as f:
    assert json.load(f)["recall"]["seen_excluded"]["covisitation"] == found
