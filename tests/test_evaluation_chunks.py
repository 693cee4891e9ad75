"""The evaluation reads and scores a day in chunks (evaluator.compute_metrics'
chunk_events): the figures are those of the whole day at once, to the last bit, with
chunks that cut files, users' days and the exports' batches anywhere."""

import datetime
import os
import types

import numpy as np
import pytest
import tensorflow as tf

from evaluation import evaluator
from evaluation import records
from models import data
from models import features
from serving import exporter
from serving import index
from serving import ranker_export
from serving import versions
import serving_testlib as tl

N = 30
ITEMS = [f"i{j:03d}" for j in range(N)]
BEFORE, DAY = tl.DAY, tl.DAY + datetime.timedelta(days=1)
EVENTS = 40


def _rows(rng, day, events):
  """Six users re-consuming their items of the day often; histories of 0..2 items
  (not all of the day's earlier ones), some targets outside the corpus."""
  rows, today = [], {}
  for e in range(events):
    user = f"u{rng.integers(6)}"
    mine = today.setdefault(user, [])
    if mine and rng.random() < 0.4:
      item = mine[rng.integers(len(mine))]  # seen earlier today, maybe not in history
    elif rng.random() < 0.1:
      item = f"x{rng.integers(3)}"
    else:
      item = ITEMS[rng.integers(N)]
    history = mine[-int(rng.integers(3)):] if mine else []
    rows.append(tl.event_row(f"{day}-{e}", user, item, seed=mine[-1] if mine else "",
                             history=history[::-1], timestamp=1_709_600_000 + e))
    mine.append(item)
  return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A training day (with the corpus and the export) and the day scored, in 4 files."""
  workdir = str(tmp_path_factory.mktemp("chunks"))
  rng = np.random.default_rng(11)
  tl.write_records(os.path.join(tl.day_dir(workdir, BEFORE), "examples-00.tfrecord.gz"),
                   _rows(rng, BEFORE, 20))
  tl.write_records(os.path.join(tl.day_dir(workdir, BEFORE), "corpus-00.tfrecord.gz"),
                   [tl.corpus_row(i) for i in ITEMS])
  rows = _rows(rng, DAY, EVENTS)
  for shard, at in enumerate(range(0, EVENTS, 11)):
    tl.write_records(os.path.join(tl.day_dir(workdir, DAY), f"examples-{shard:02d}.tfrecord.gz"),
                     rows[at:at + 11])
  orders = [list(rng.permutation(N)) for _ in range(N)]
  # Two leaves of five searched: ScaNN is approximate here.
  params = index.ScannParams(num_leaves=5, num_leaves_to_search=2,
                             num_reordering_candidates=8)
  exported = exporter.export_day(
      tl.planted_towers(ITEMS, orders), tl.tiny_config(), workdir, BEFORE,
      exporter.ExportSettings(export_k=N, scann_params=params),
      trained=tl.position(BEFORE, 20, True))
  # A planted teacher for the funnel: scores from the user and the candidate.
  ranker_dir = os.path.join(workdir, "ranker")
  versions.write_metadata(ranker_dir, {"version": 1, "day": BEFORE.isoformat()})

  def rank(user_id, candidate_ids, **query):
    del query
    mixed = tf.strings.join([tf.broadcast_to(user_id[:, None], tf.shape(candidate_ids)),
                             candidate_ids])
    return {"scores": tf.cast(tf.strings.to_hash_bucket_fast(mixed, 97), tf.float32)}

  teacher = types.SimpleNamespace(signatures={ranker_export.RANK: rank})
  return workdir, exported, ranker_dir, teacher


def _metrics(world, monkeypatch, chunk_events):
  """Day DAY's metrics with every extra, from a fresh state, `chunk_events` at a time;
  and the sizes of the chunks read."""
  workdir, exported, ranker_dir, teacher = world
  monkeypatch.setattr(ranker_export, "ranker_before", lambda w, d: ranker_dir)
  sizes = []
  real = records.iter_columns

  def counting(*args, **kwargs):
    for chunk in real(*args, **kwargs):
      sizes.append(len(chunk["item_id"]))
      yield chunk

  monkeypatch.setattr(records, "iter_columns", counting)
  state = evaluator.EvaluationState(rankers=types.SimpleNamespace(load=lambda path: teacher))
  settings = evaluator.EvaluationSettings(diversity_theta=0.5, diversity_candidates=12,
                                          diversity_k=5, funnel=True)
  metrics = evaluator.compute_metrics(
      workdir, DAY, {"scann": exported["scann_dir"], "exact": exported["exact_dir"]},
      state, settings, chunk_events=chunk_events)
  del metrics["funnel"]["seconds"]  # a duration
  return metrics, sizes


@pytest.mark.parametrize("chunk_events", [1, 3])
def test_chunked_evaluation_gives_the_figures_of_the_whole_day(world, monkeypatch,
                                                               chunk_events):
  # Batches of 4 events: the exports' batches cut across chunks too.
  monkeypatch.setattr(evaluator, "_BATCH", 4)
  whole, sizes = _metrics(world, monkeypatch, EVENTS)
  assert sizes[-1] == EVENTS  # the last read: the day, in one chunk
  chunked, sizes = _metrics(world, monkeypatch, chunk_events)
  assert sizes[-1] <= chunk_events and len(sizes) >= EVENTS // chunk_events
  assert chunked == whole
  assert whole["num_events"] == EVENTS
  # Re-consumptions of the day that no history lists: seen across chunks.
  assert 0 < whole["num_events_seen_excluded"] < EVENTS
  assert set(whole) >= {"diversity", "funnel"} and "skipped" not in whole["funnel"]


def test_the_seen_items_carry_across_chunks(world):
  """records.DaySeen chunk by chunk = the history, the earlier days' items and the
  day's earlier events, whichever chunk they were in."""
  workdir = world[0]
  training = records.TrainingInteractions().before(workdir, DAY)
  chunked, carried = [], 0
  seen = records.DaySeen(training.items)
  today = {}
  for chunk in records.iter_events(workdir, DAY, 5, chunk=3):
    chunked += seen.add(chunk, *training.prior_items(chunk["user_id"].tolist())).sets()
    for user, history in zip(chunk["user_id"].tolist(),
                             chunk["history_item_ids"].tolist()):
      carried += bool(today.get(user, set()) - set(history))
    for user, item in zip(chunk["user_id"].tolist(), chunk["item_id"].tolist()):
      today.setdefault(user, set()).add(item)
  events = records.read_events(workdir, DAY, 5)
  assert chunked == records.SeenItems.of(events, training).sets()
  want, today = [], {}
  for user, history, item in zip(events["user_id"].tolist(),
                                 events["history_item_ids"].tolist(),
                                 events["item_id"].tolist()):
    want.append({h for h in history if h} | training.seen.get(user, set())
                | today.get(user, set()))
    today.setdefault(user, set()).add(item)
  assert [set(s) for s in chunked] == want
  assert carried > 0  # items of earlier chunks that no history lists


def test_a_chunk_names_the_file_and_record_that_is_not_an_example(world, tmp_path):
  files = sorted(data.example_files(world[0], DAY))
  good = [tl.event_row(f"e{e}", "u1", "i001") for e in range(3)]
  broken = str(tmp_path / "examples-09.tfrecord.gz")
  with tf.io.TFRecordWriter(broken, options="GZIP") as writer:
    for row in good:
      writer.write(features.to_example(row).SerializeToString())
    writer.write(b"\xff not an Example")
  chunks = records.iter_columns([files[0], broken], ("user_id", "item_id"), chunk=5)
  assert len(next(chunks)["item_id"]) == 5  # 11 events in files[0]: 5, 5, then 1 + 3 + bad
  assert len(next(chunks)["item_id"]) == 5
  with pytest.raises(ValueError, match=r"examples-09.tfrecord.gz: record 3 is not a valid"):
    next(chunks)
