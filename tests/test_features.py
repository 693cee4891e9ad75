"""Tests of models/features.py's parse: the dense form it promises, whichever way
the parse gets there (issue 14 parses the history straight to dense)."""

from typing import Any, Sequence

import numpy as np
import pytest
import tensorflow as tf

from models import features
from models.config import ModelConfig, ONE_PASS
from models.layers import HashedEmbedding
from models.towers import CandidateTower, QueryTower

MAX = 4  # max_history of the planted batches: short, so every case is cheap

TINY = ModelConfig(
    embedding_dim=8, id_embedding_dim=8, feature_embedding_dim=4, item_buckets=100,
    user_buckets=50, channel_buckets=20, topic_buckets=20, category_buckets=10,
    query_hidden=(16,), candidate_hidden=(16,), max_history=MAX, **ONE_PASS)


def history(n: int, start: int = 0) -> list[str]:
  """n distinct items, most recent first."""
  return [f"i{start + k}" for k in range(n)]


# Histories of 0, 1, MAX - 1, MAX and MAX + 5 items, empty strings among them,
# a history absent from its Example; topics with weights, without (uniform), none.
ROWS: list[dict[str, Any]] = [
    {"user_id": "u0", "history_item_ids": [], "item_id": "a",
     "item_topics": ["t1", "t2"], "item_topic_weights": [0.5, 2.0]},
    {"user_id": "u1", "history_item_ids": history(1, 10), "item_id": "b",
     "item_topics": ["t3"]},
    {"user_id": "u2", "history_item_ids": history(MAX - 1, 20), "item_id": "c"},
    {"user_id": "u3", "history_item_ids": history(MAX, 30), "item_id": "d",
     "item_topics": ["t1", "", "t4"]},
    {"user_id": "u4", "history_item_ids": history(MAX + 5, 40), "item_id": "e",
     "item_topics": ["t5", "t6"], "item_topic_weights": [1.0, 0.0]},
    {"user_id": "u5", "history_item_ids": ["i1", "", "i2"], "seed_item_id": "i9",
     "item_topics": [], "item_topic_weights": []},
    {"user_id": "u6", "item_id": "f"},  # no history, topics nor weights at all
]


def serialize(rows: Sequence[dict[str, Any]]) -> tf.Tensor:
  return tf.constant([features.to_example(r).SerializeToString() for r in rows],
                     tf.string)


def expected(rows: Sequence[dict[str, Any]], name: str, max_history: int) -> np.ndarray:
  """The dense form by hand: rows padded to the batch's widest (the history cut to
  its first max_history items first) with the absent value; missing topic weights
  are 1.0 per topic."""
  absent = features.FEATURES[name][2]
  values = []
  for row in rows:
    if name == "item_topic_weights" and not row.get(name):
      value = [1.0] * len(row.get("item_topics", []))
    else:
      value = list(row.get(name, []))
    values.append(value[:max_history] if name == "history_item_ids" else value)
  width = max([len(v) for v in values], default=0)
  dtype = object if isinstance(absent, str) else np.float32
  return np.array([v + [absent] * (width - len(v)) for v in values],
                  dtype=dtype).reshape(len(rows), width)


def ragged_then_dense(serialized: tf.Tensor, max_history: int) -> dict[str, tf.Tensor]:
  """The parse before issue 14: every multi-valued feature ragged, the history cut
  as a ragged tensor, then each densified (its weights filled in ragged first)."""
  spec = {name: tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64) if multi else
          tf.io.FixedLenFeature([], dtype, default_value=default)
          for name, (dtype, multi, default) in features.FEATURES.items()}
  parsed = tf.io.parse_example(serialized, spec)
  topics, weights = parsed["item_topics"], parsed["item_topic_weights"]
  fill = tf.where(weights.row_lengths() == 0, topics.row_lengths(), 0)
  parsed["item_topic_weights"] = tf.concat([weights, tf.RaggedTensor.from_row_lengths(
      tf.ones([tf.reduce_sum(fill)], tf.float32), fill)], axis=1)
  parsed["history_item_ids"] = parsed["history_item_ids"][:, :max_history]
  return {name: value.to_tensor(default_value=features.FEATURES[name][2])
          if isinstance(value, tf.RaggedTensor) else value
          for name, value in parsed.items()}


def assert_same(got: dict[str, tf.Tensor], want: dict[str, Any]) -> None:
  assert set(got) == set(want)
  for name, value in want.items():
    value = np.asarray(value)
    assert got[name].dtype == features.FEATURES[name][0], name
    assert tuple(got[name].shape) == value.shape, name
    want_value = tf.constant(value, features.FEATURES[name][0], shape=value.shape)
    np.testing.assert_array_equal(got[name].numpy(), want_value.numpy(), err_msg=name)


BATCHES = {
    "all": ROWS,
    "narrower_than_max": [ROWS[i] for i in (0, 1, 2, 5)],  # widest history MAX - 1
    "no_history": [ROWS[0], ROWS[6]],  # width 0
    "empty_batch": [],
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("max_history", [MAX, features.MAX_HISTORY])
def test_parse_gives_the_dense_form(batch: str, max_history: int):
  """Values kept in order, the history cut to its first (most recent) max_history,
  each multi-valued feature as wide as the batch's widest row, padded absent."""
  rows = BATCHES[batch]
  parsed = features.parse_examples(serialize(rows), max_history=max_history)
  for name, (_, multi, _) in features.FEATURES.items():
    if multi:
      assert_same({name: parsed[name]}, {name: expected(rows, name, max_history)})
  if batch == "all" and max_history == MAX:  # the oracle's own cut, checked
    assert parsed["history_item_ids"].shape == (len(rows), MAX)
    assert [v.decode() for v in parsed["history_item_ids"][4].numpy()] == history(MAX, 40)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("max_history", [MAX, features.MAX_HISTORY])
def test_parse_equals_the_ragged_then_dense_parse(batch: str, max_history: int):
  serialized = serialize(BATCHES[batch])
  assert_same(features.parse_examples(serialized, max_history=max_history),
              {name: value.numpy() for name, value in
               ragged_then_dense(serialized, max_history).items()})


def test_parse_of_some_features_and_in_a_graph():
  """Any subset parses alike (the towers' features, one side's), also traced."""
  serialized = serialize(ROWS)
  parse = tf.function(lambda s: features.parse_examples(
      s, features.TRAINING_FEATURES, max_history=MAX))
  want = ragged_then_dense(serialized, MAX)
  assert_same(parse(serialized), {n: want[n].numpy() for n in features.TRAINING_FEATURES})
  for names in (features.QUERY_FEATURES, features.CANDIDATE_FEATURES, ("item_topics",),
                ("item_topic_weights",)):
    got = features.parse_examples(serialized, names, max_history=MAX)
    if names == ("item_topic_weights",):  # alone: as given, not filled in
      assert_same(got, {names[0]: expected(
          [{k: v for k, v in r.items() if k != "item_topics"} for r in ROWS],
          names[0], MAX)})
    else:
      assert_same(got, {n: want[n].numpy() for n in names})


def test_topic_weight_mismatch_names_the_example():
  serialized = serialize([ROWS[0], {"item_topics": ["t1", "t2"],
                                    "item_topic_weights": [1.0]}])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=features.TOPIC_WEIGHTS_MISMATCH + ": Example 1 of the batch "
                     "has 2 item_topics and 1 item_topic_weights"):
    features.parse_examples(serialized)


@pytest.mark.parametrize("encoder", ["mean", "attention"])
def test_towers_agree_on_both_parses_and_any_padding(encoder: str):
  """The towers' embeddings: the same from both parses, and unchanged when a
  narrower batch's history and topics are padded to max_history with absent
  values (as models/data.py's parse_window pads its parts to the window's widest)."""
  config = TINY.replace(query_encoder=encoder, history_positions=True)
  item_embedding = HashedEmbedding(config.item_buckets, config.id_embedding_dim)
  query, candidate = QueryTower(config, item_embedding), CandidateTower(
      config, item_embedding)
  serialized = serialize(ROWS)
  new = features.parse_examples(serialized, max_history=MAX)
  old = ragged_then_dense(serialized, MAX)
  for tower in (query, candidate):
    np.testing.assert_array_equal(tower(new), tower(old))
  narrow = features.parse_examples(serialize(BATCHES["narrower_than_max"]),
                                   max_history=MAX)
  assert narrow["history_item_ids"].shape[1] == MAX - 1
  wide = dict(narrow)
  for name, width in (("history_item_ids", MAX), ("item_topics", 5),
                      ("item_topic_weights", 5)):
    wide[name] = tf.pad(narrow[name], [[0, 0], [0, width - narrow[name].shape[1]]],
                        constant_values=features.FEATURES[name][2])
  for tower in (query, candidate):
    np.testing.assert_allclose(tower(narrow), tower(wide), atol=1e-6)
  # The towers do read the cut: a history kept from its far end embeds otherwise.
  tails = [dict(r, history_item_ids=r.get("history_item_ids", [])[-MAX:]) for r in ROWS]
  far_end = dict(new, history_item_ids=tf.constant(
      expected(tails, "history_item_ids", MAX), tf.string))
  assert not np.allclose(query(new)[4], query(far_end)[4], atol=1e-4)
