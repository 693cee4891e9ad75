"""The ranking teacher (models/ranker.py) and its day-by-day trainer
(models/ranker_trainer.py): scoring shapes, the corpus table, exact resume."""

import datetime
import os

import numpy as np
import pytest
import tensorflow as tf

from models import features
from models import ranker as ranker_lib
from models import ranker_trainer
from models import trainer as trainer_lib
from tests.trainer_testlib import world_examples, write_corpus, write_day

DAY1 = datetime.date(2024, 2, 1)
DAY2 = datetime.date(2024, 2, 2)
SMALL = ranker_lib.RankerConfig(
    id_embedding_dim=8, feature_embedding_dim=4, item_buckets=500, user_buckets=200,
    channel_buckets=50, topic_buckets=50, category_buckets=10, deep_hidden=(16,),
    negatives=3, candidates_k=20, max_history=10, batch_size=16, learning_rate=0.01,
    checkpoint_every_steps=4)


def _batch(rows):
  return features.parse_examples(tf.constant(
      [features.to_example(r).SerializeToString() for r in rows]), max_history=10)


def _items(n=160):
  return [f"i{i}" for i in range(n)]


LISTED = _items()[::7][:20]


def planted_retrieve(query, exclude):
  """20 items of every cluster of the world, the excluded ones blanked: a fixed
  retrieval list, so the negatives depend on the seeded draw alone."""
  ids = tf.constant(LISTED)
  rows = tf.shape(exclude)[0]
  tiled = tf.tile(ids[tf.newaxis], [rows, 1])
  return tf.where(tf.equal(tiled, exclude[:, :1]), "", tiled)


def _world(workdir, days=(DAY1,), n=200):
  for i, day in enumerate(days):
    examples = world_examples(day, n, seed=10 + i)
    write_day(workdir, day, examples)
    write_corpus(workdir, day, examples)


def test_score_pairs_call_and_lists_agree():
  model = ranker_lib.build(SMALL)
  rows = world_examples(DAY1, 5, seed=1)
  batch = _batch(rows)
  candidates = {name: batch[name] for name in features.CANDIDATE_FEATURES}
  pairs = model.score_pairs(batch, candidates).numpy()
  assert pairs.shape == (5, 5)
  # Each example's own pair is the diagonal; one list for all = each its own copy.
  np.testing.assert_allclose(model(batch).numpy(), np.diag(pairs), rtol=1e-5, atol=1e-6)
  each = {name: tf.repeat(value[tf.newaxis], 5, axis=0)
          for name, value in candidates.items()}
  np.testing.assert_allclose(model.score_lists(batch, each).numpy(), pairs, rtol=1e-5,
                             atol=1e-6)
  # Queries score differently against the same candidate (user x item interactions).
  assert np.ptp(pairs, axis=0).min() > 0


def test_corpus_table_gives_features_by_id_and_absent_ones_for_unknown_ids():
  table = ranker_lib.CorpusTable()
  assert table.lookup(tf.constant(["a"]))["item_channel_id"].numpy().tolist() == [b""]
  table.set_corpus({"item_id": ["a", "b"], "item_channel_id": ["ca", "cb"],
                    "item_topics": [["x", "y"], ["z", ""]],
                    "item_topic_weights": [[1.0, 0.5], [1.0, 0.0]],
                    "item_duration_s": [10.0, 20.0]})
  found = table.lookup(tf.constant([["b", "nope", ""], ["a", "a", "b"]]))
  assert found["item_id"].numpy().tolist() == [[b"b", b"nope", b""], [b"a", b"a", b"b"]]
  assert found["item_channel_id"].numpy().tolist() == [[b"cb", b"", b""],
                                                        [b"ca", b"ca", b"cb"]]
  assert found["item_topics"].numpy()[0].tolist() == [[b"z", b""], [b"", b""], [b"", b""]]
  assert found["item_duration_s"].numpy().tolist() == [[20, 0, 0], [10, 10, 20]]
  table.set_corpus({"item_id": ["c"], "item_channel_id": ["cc"], "item_topics": [["t"]],
                    "item_topic_weights": [[1.0]], "item_duration_s": [5.0]})
  assert table.lookup(tf.constant(["a", "c"]))["item_channel_id"].numpy().tolist() == [
      b"", b"cc"]


def test_negatives_come_from_the_retrieval_without_the_positive(tmp_path):
  workdir = str(tmp_path)
  _world(workdir)
  trainer = ranker_trainer.RankerTrainer(workdir, SMALL)
  trainer.table.set_corpus({name: _batch(world_examples(DAY1, 200, 10))[name]
                            for name in features.CANDIDATE_FEATURES})
  rows = world_examples(DAY1, 16, seed=10)
  batch = _batch(rows)
  candidates, labels, weights = trainer.candidate_lists(batch, planted_retrieve, DAY1, 0)
  ids = candidates["item_id"].numpy()
  assert ids.shape == (16, 4)
  assert (ids[:, 0] == batch["item_id"].numpy()).all()
  listed = set(x.encode() for x in LISTED)
  for row in range(16):
    negatives = ids[row, 1:].tolist()
    assert len(set(negatives)) == 3 and set(negatives) <= listed
    assert ids[row, 0] not in negatives
  np.testing.assert_allclose(labels.numpy()[:, 0],
                             np.clip([r["reward"] for r in rows], 0, 1), rtol=1e-6)
  assert (labels.numpy()[:, 1:] == 0).all() and (weights.numpy() == 1).all()
  # The draw is a function of (seed, day, first example): the same again.
  again, _, _ = trainer.candidate_lists(batch, planted_retrieve, DAY1, 0)
  assert (again["item_id"].numpy() == ids).all()
  other, _, _ = trainer.candidate_lists(batch, planted_retrieve, DAY1, 16)
  assert (other["item_id"].numpy() != ids).any()


class _Killed(Exception):
  pass


def _raise_killed():
  raise _Killed()


def test_killed_ranker_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch):
  """Killed after step 6 (checkpoint at 4): a new trainer resumes from example 64,
  and two days end with the weights, position and loss of a run never killed."""
  killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
  for workdir in (killed, reference):
    _world(workdir, (DAY1, DAY2))
  trainer = ranker_trainer.RankerTrainer(killed, SMALL)
  monkeypatch.setattr(trainer_lib, "kill_self", _raise_killed)
  monkeypatch.setenv(ranker_trainer.KILL_AFTER_STEP_ENV, "6")
  with pytest.raises(_Killed):
    trainer.train_day(DAY1, planted_retrieve)
  monkeypatch.delenv(ranker_trainer.KILL_AFTER_STEP_ENV)
  with pytest.raises(RuntimeError, match="the ranker.s day 2024-02-01 stopped after 64 examples"):
    ranker_trainer.RankerTrainer(killed).train_day(DAY2, planted_retrieve)
  resumed = ranker_trainer.RankerTrainer(killed)  # its config from W/ranker
  assert resumed.position() == (DAY1, 64, False) and resumed.global_step == 4
  first = resumed.train_day(DAY1, planted_retrieve)
  assert (first["status"], first["examples_this_run"]) == ("resumed", 200 - 64)
  resumed.train_day(DAY2, planted_retrieve)

  whole = ranker_trainer.RankerTrainer(reference, SMALL)
  uninterrupted = whole.train_day(DAY1, planted_retrieve)
  whole.train_day(DAY2, planted_retrieve)
  assert first["mean_loss"] == pytest.approx(uninterrupted["mean_loss"], rel=1e-5)
  assert resumed.position() == whole.position() == (DAY2, 200, True)
  assert resumed.global_step == whole.global_step == 26
  for a, b in zip(resumed.model.variables, whole.model.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
  assert resumed.train_day(DAY2, planted_retrieve)["status"] == "already_trained"

  loaded, position = ranker_trainer.load_ranker(killed)
  assert (position.day, position.complete, position.global_step) == (DAY2, True, 26)
  for a, b in zip(loaded.variables, whole.model.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_the_teacher_learns_to_put_the_logged_item_above_its_negatives(tmp_path):
  """Two days of the clustered world; on a third, the logged item outscores the
  retrieval's other items for most events (chance is about 1 in 2)."""
  workdir = str(tmp_path)
  _world(workdir, (DAY1, DAY2), n=600)
  trainer = ranker_trainer.RankerTrainer(workdir, SMALL)
  for day in (DAY1, DAY2):
    trainer.train_day(day, planted_retrieve)
  test = _batch(world_examples(datetime.date(2024, 2, 3), 200, seed=99))
  candidates, _, _ = trainer.candidate_lists(test, planted_retrieve, DAY2, 0)
  scores = trainer.model.score_lists(test, candidates).numpy()
  wins = np.mean(scores[:, :1] > scores[:, 1:])
  assert wins > 0.7, wins
