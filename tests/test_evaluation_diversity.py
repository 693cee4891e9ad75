"""The daily evaluation's DPP re-ranking figures (EvaluationSettings.diversity_theta)
and the intra-list diversity arithmetic (evaluation/diversity.py).

The planted world: 60 items in 6 clusters of 10. Item j of cluster c = j // 10
embeds as e_c + 0.3 e_(6 + j % 10) (same cluster: cos 0.917; other clusters: cos
at most 0.083), with channel ch<c> and topic t<c>. The query for a seed of cluster c
is e_c plus 0.35, 0.3, 0.25, 0.2, 0.15 of the next clusters and a little of the
jitter directions, so its plain top 10 is cluster c, all alike and of one channel,
and every score differs from every other (no ties to break).
"""

import datetime
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from core import workdir as workdir_lib
from evaluation import diversity
from evaluation import evaluator
from serving import exporter
from serving import index
import serving_testlib as tl

N = 60
CLUSTERS = 6
ITEMS = [f"i{j:03d}" for j in range(N)]
D = tl.DAY
P = D - datetime.timedelta(days=1)
CANDIDATES = 30
# metrics.json's keys before the diversity setting existed.
KEYS = {"ann_loss", "by_popularity_decile", "corpus_size", "day", "exports", "ks",
        "num_events", "num_events_seen_excluded", "num_training_events", "recall",
        "recall_curve", "recent_days", "target_in_corpus", "training_days"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _EmbeddedItems(tl._PlantedQueryTower):  # pylint: disable=protected-access
  """Item j -> row j of the embeddings given, unit length: the planted query tower,
  keyed by item_id."""

  def call(self, features):
    return super().call({"seed_item_id": features["item_id"]})


def _clustered_towers():
  """The towers of the module docstring (width N: the planted tower's)."""
  items, queries = np.zeros((N, N)), np.zeros((N, N))
  for j in range(N):
    c = j // 10
    items[j, c] = 1.0
    items[j, CLUSTERS + j % 10] = 0.3
    for step, weight in enumerate((1.0, 0.35, 0.3, 0.25, 0.2, 0.15)):
      queries[j, (c + step) % CLUSTERS] = weight
    queries[j, CLUSTERS:CLUSTERS + 10] = 0.02 * (10 - np.arange(10))
  query_tower = tl._PlantedQueryTower(ITEMS, queries)  # pylint: disable=protected-access
  return types.SimpleNamespace(query_tower=query_tower,
                               candidate_tower=_EmbeddedItems(ITEMS, items))


def _corpus_row(item):
  cluster = int(item[1:]) // 10
  return {**tl.corpus_row(item), "item_channel_id": f"ch{cluster}",
          "item_topics": [f"t{cluster}"]}


def _write_world(workdir):
  """Day P (training events, the corpus) and day D (the events scored)."""
  rng = np.random.default_rng(5)
  histories = {}
  for day, count in ((P, 20), (D, 40)):
    rows = []
    for n in range(count):
      user = f"u{rng.integers(5)}"
      seed = int(rng.integers(N))
      cluster, draw = seed // 10, rng.random()
      if draw < 0.4:  # in the plain top 10
        target = ITEMS[10 * cluster + int(rng.integers(3))]
      elif draw < 0.7:  # the next cluster: where a diverse list reaches
        target = ITEMS[10 * ((cluster + 1) % CLUSTERS) + int(rng.integers(10))]
      elif draw < 0.9:
        target = ITEMS[rng.integers(N)]
      else:
        target = "x-fresh"  # outside the corpus
      history = histories.setdefault(user, [])
      rows.append(tl.event_row(f"{day}-{n}", user, target, seed=ITEMS[seed],
                               history=history[:5], timestamp=1_709_600_000 + n))
      history.insert(0, target)
    tl.write_records(os.path.join(tl.day_dir(workdir, day), "examples-00.tfrecord.gz"),
                     rows)
  tl.write_records(os.path.join(tl.day_dir(workdir, P), "corpus-00.tfrecord.gz"),
                   [_corpus_row(i) for i in ITEMS])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("diversity"))
  _write_world(workdir)
  params = index.ScannParams(num_leaves=4, num_leaves_to_search=4,
                             num_reordering_candidates=N)
  exported = exporter.export_day(
      _clustered_towers(), tl.tiny_config(), workdir, P,
      exporter.ExportSettings(export_k=20, scann_params=params),
      trained=tl.position(P, 20, True))
  return workdir, exported, exporter.LoadedExports()


def _evaluate(world, theta=None, **settings):
  """Day D's metrics, as written to metrics.json."""
  workdir, exported, loaded = world
  evaluator.evaluate_day(
      workdir, D, exported["scann_dir"], exported["exact_dir"],
      state=evaluator.EvaluationState(exports=loaded), plot=False,
      settings=evaluator.EvaluationSettings(diversity_theta=theta,
                                            diversity_candidates=CANDIDATES, **settings))
  with open(os.path.join(workdir_lib.Workdir(workdir).eval_dir(D),
                         workdir_lib.METRICS)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def plain(world):
  return _evaluate(world)


def test_without_the_setting_metrics_json_is_unchanged(plain):
  assert set(plain) == KEYS
  assert evaluator.diversity_summary(plain) is None


def test_at_theta_1_the_diverse_list_is_the_plain_top_k(world, plain):
  metrics = _evaluate(world, 1.0)
  # Nothing else changes.
  assert {key: value for key, value in metrics.items() if key != "diversity"} == plain
  found = metrics["diversity"]
  assert (found["theta"], found["k"], found["num_candidates"], found["ks"]) == (
      1.0, 10, CANDIDATES, [10])
  for mode in ("all", "seen_excluded"):
    for name in ("scann", "exact"):
      recall = found["recall"][mode][name]
      assert recall["diverse"] == recall["plain"], (mode, name)
      assert recall["plain"]["10"] == plain["recall"][mode][name]["10"]
      lists = found["lists"][mode][name]
      assert lists["diverse"] == lists["plain"], (mode, name)
      assert lists["plain"]["list_length"] == 10
  # The events make recall@10 neither 0 nor 1: the equalities above compare hits.
  assert 0 < plain["recall"]["all"]["exact"]["10"] < 1
  assert 0 < plain["recall"]["seen_excluded"]["exact"]["10"] < 1


def test_at_a_small_theta_the_diverse_lists_are_more_diverse_and_deterministic(world):
  metrics = _evaluate(world, 0.1)
  for mode in ("all", "seen_excluded"):
    for name in ("scann", "exact"):
      lists = metrics["diversity"]["lists"][mode][name]
      plain, diverse = lists["plain"], lists["diverse"]
      # Plain: one cluster (1 - cos about 0.08), but where seen items are excluded
      # from it; diverse: across the clusters.
      assert diverse["pairwise_distance"] >= plain["pairwise_distance"], (mode, name)
      assert diverse["channels"] > plain["channels"]
      assert diverse["topics"] > plain["topics"]
      assert diverse["list_length"] == plain["list_length"] == 10
  assert metrics["diversity"]["lists"]["all"]["exact"]["plain"]["channels"] == 1
  summary = evaluator.diversity_summary(metrics)
  assert summary["all"]["exact"]["recall"]["plain"] == (
      metrics["recall"]["all"]["exact"]["10"])
  assert _evaluate(world, 0.1)["diversity"] == metrics["diversity"]


def test_the_diverse_list_length_follows_the_setting(world):
  found = _evaluate(world, 0.5, diversity_k=5)["diversity"]
  assert (found["k"], found["ks"]) == (5, [5])
  assert found["lists"]["all"]["exact"]["diverse"]["list_length"] == 5
  assert set(found["recall"]["all"]["exact"]["plain"]) == {"5"}


def test_settings_are_checked():
  with pytest.raises(ValueError, match="diversity_theta must be in"):
    evaluator.EvaluationSettings(diversity_theta=1.5)
  with pytest.raises(ValueError, match="diversity_k <= diversity_candidates"):
    evaluator.EvaluationSettings(diversity_theta=0.5, diversity_k=20,
                                 diversity_candidates=10)


def test_evaluate_cli_prints_the_diversity_headline(world, tmp_path):
  workdir, exported, _ = world
  env = {**os.environ, "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, "-m", "evaluation.evaluate", f"--workdir={workdir}",
       f"--date={D.isoformat()}", "--diversity_theta=0.1",
       f"--diversity_candidates={CANDIDATES}"],
      env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout)
  assert printed["diversity"]["theta"] == pytest.approx(0.1)
  headline = printed["diversity"]["all"]["exact"]["pairwise_distance"]
  assert headline["diverse"] > headline["plain"]
  result = subprocess.run(
      [sys.executable, "-m", "evaluation.evaluate", f"--workdir={workdir}",
       f"--date={D.isoformat()}", "--diversity_theta=2"],
      env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 2
  assert "diversity_theta must be in [0, 1]" in result.stderr


def _corpus_items(tmp_path, ids):
  """Items a b c d e: a = d = (1, 0), b = (0, 1), c = (1, 1) / sqrt 2, e = (0, 1); the
  corpus file lists them in another order than the export (`ids`)."""
  embeddings = {"a": (1, 0), "b": (0, 1), "c": (3, 3), "d": (2, 0), "e": (0, 1)}
  channels = {"a": "x", "b": "x", "c": "y", "d": "", "e": "z"}
  topics = {"a": ["p", "q"], "b": ["q"], "c": [], "d": ["r"], "e": ["p"]}
  pattern = tl.write_records(str(tmp_path / "corpus-00.tfrecord.gz"), [
      {**tl.corpus_row(i), "item_channel_id": channels[i], "item_topics": topics[i],
       "item_topic_weights": [1.0] * len(topics[i])} for i in "edcba"])
  return diversity.CorpusItems.of(np.array([i.encode() for i in ids], object),
                                  np.array([embeddings.get(i, (1, 1)) for i in ids],
                                           np.float32),
                                  pattern)


def test_list_figures_match_hand_computation(tmp_path):
  items = _corpus_items(tmp_path, "abcde")
  lists = np.array([[b"a", b"b", b""], [b"a", b"c", b"d"], [b"", b"", b""]], object)
  rows = items.rows_of(lists)
  np.testing.assert_array_equal(rows, [[0, 1, -1], [0, 2, 3], [-1, -1, -1]])
  figures = items.figures(rows)
  # List 1: a b, orthogonal: distance 1; channel x; topics p q.
  # List 2: a c d: cos(a, c) = cos(c, d) = 0.7071, cos(a, d) = 1, over the 6 ordered
  # pairs (6 - 2 (0.7071 + 1 + 0.7071)) / 6; channels x y (d has none); topics p q r.
  # List 3: empty: 0 everywhere.
  second = (6 - 2 * (2 * np.sqrt(0.5) + 1)) / 6
  assert figures == pytest.approx({
      "pairwise_distance": (1 + second + 0) / 3, "channels": (1 + 2 + 0) / 3,
      "topics": (2 + 3 + 0) / 3, "coverage": 4 / 5, "list_length": (2 + 3 + 0) / 3})
  assert items.figures(np.zeros((0, 3), np.int64)) == {
      name: None for name in diversity.FIGURES}


def test_an_export_item_missing_from_the_corpus_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"corpus-00.*no corpus record of the export's "
                                       r"item b'zz'"):
    _corpus_items(tmp_path, ["a", "zz"])
