"""Tests of models/config.py, layers.py, towers.py and retrieval.py."""

import datetime
import os

import numpy as np
import pytest
import tensorflow as tf

from models import config as config_lib
from models import features
from models import layers
from models.config import ModelConfig
from models.retrieval import in_batch_recall
from models.retrieval import make_frequency_estimator
from models.retrieval import TwoTowerModel

TINY = ModelConfig(
    embedding_dim=8, id_embedding_dim=8, feature_embedding_dim=4, item_buckets=100,
    user_buckets=50, channel_buckets=20, topic_buckets=20, category_buckets=10,
    query_hidden=(16,), candidate_hidden=(16,), temperature=0.2,
    estimator_buckets=64, estimator_hashes=2, estimator_alpha=0.5)


def batch(rows: list[dict]) -> dict[str, tf.Tensor]:
  return features.parse_examples(tf.constant(
      [features.to_example(r).SerializeToString() for r in rows]))


def serving_query(**values) -> dict[str, tf.Tensor]:
  """A one-row query in the serving form, with defaults for absent features."""
  out = {"user_id": [""], "seed_item_id": [""], "device": [""], "country": [""],
         "timestamp": [0], "history_item_ids": [[]]}
  out.update(values)
  return {name: tf.constant(value, dtype=features.FEATURES[name][0]) if name !=
          "history_item_ids" else tf.reshape(tf.constant(value, tf.string),
                                             [len(value), -1])
          for name, value in out.items()}


def serving_candidate(**values) -> dict[str, tf.Tensor]:
  out = {"item_id": ["i1"], "item_channel_id": ["c1"], "item_duration_s": [60.0]}
  out.update(values)
  tensors = {name: tf.constant(value, dtype=features.FEATURES[name][0])
             for name, value in out.items() if name not in ("item_topics",
                                                              "item_topic_weights")}
  tensors["item_topics"] = tf.reshape(
      tf.constant(values.get("item_topics", [["t1"]]), tf.string), [1, -1])
  tensors["item_topic_weights"] = tf.reshape(
      tf.constant(values.get("item_topic_weights", [[1.0]]), tf.float32), [1, -1])
  return tensors


# --- config -------------------------------------------------------------------

def test_config_round_trips_and_lists_incompatibilities():
  config = TINY.replace(estimator_options={"init": "prior"})
  assert ModelConfig.from_json(config.to_json()) == config
  other = config.replace(item_buckets=7, batch_size=3, learning_rate=1.0)
  assert config.incompatibilities(other) == ["item_buckets: 100 != 7"]
  with pytest.raises(ValueError, match="correction"):
    TINY.replace(correction="logq")
  with pytest.raises(ValueError, match="temperature"):
    TINY.replace(temperature=0.0)
  with pytest.raises(ValueError, match=r"unknown ModelConfig fields: \['embedding_size'\]"):
    ModelConfig.from_dict({"embedding_size": 3})


def test_config_from_overrides_merges_onto_the_saved_config():
  assert config_lib.config_from_overrides(TINY, {}) is None
  assert config_lib.config_from_overrides(None, {}) is None
  assert config_lib.config_from_overrides(TINY, {"batch_size": 7}) == TINY.replace(
      batch_size=7)
  assert config_lib.config_from_overrides(None, {"temperature": 0.3}) == ModelConfig(
      temperature=0.3)
  with pytest.raises(ValueError, match=r"unknown ModelConfig fields: \['embeding_dim'\]"):
    config_lib.config_from_overrides(TINY, {"embeding_dim": 8})
  with pytest.raises(ValueError, match="query_hidden"):
    config_lib.config_from_overrides(None, {"query_hidden": 5})  # not a list: TypeError


def test_history_width_has_one_default():
  assert ModelConfig().max_history == features.MAX_HISTORY


def test_saved_config_round_trips_through_the_workdir(tmp_path):
  workdir = str(tmp_path / "w")
  assert config_lib.saved_config(workdir) is None
  config_lib.write_config(TINY, os.path.join(workdir, "config.json"))
  assert config_lib.saved_config(workdir) == TINY
  assert os.listdir(workdir) == ["config.json"]  # no temp file left behind


# --- layers -------------------------------------------------------------------

def test_hashed_embedding_absent_is_zero_and_gets_no_gradient():
  layer = layers.HashedEmbedding(10, 3)
  ids = tf.constant([["a", "", "never-seen-before"], ["a", "b", ""]])
  with tf.GradientTape() as tape:
    out = layer(ids)
    loss = tf.reduce_sum(out)
  np.testing.assert_array_equal(out[0, 1], [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(out[0, 0], out[1, 0])
  assert np.all(np.abs(out[0, 2].numpy()) > 0)
  gradient = tf.convert_to_tensor(tape.gradient(loss, layer.trainable_variables[0]))
  np.testing.assert_array_equal(gradient[0], [0.0, 0.0, 0.0])
  assert layer.bucket(tf.constant([""])).numpy()[0] == 0


def test_weighted_mean_by_hand_with_empty_rows():
  embeddings = tf.constant([[[1.0, 0.0], [0.0, 4.0], [9.0, 9.0]],
                            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
  weights = tf.constant([[1.0, 3.0, 0.0], [0.0, -1.0, 0.0]])
  out = layers.WeightedMean()(embeddings, weights).numpy()
  np.testing.assert_allclose(out, [[0.25, 3.0], [0.0, 0.0]])
  assert layers.WeightedMean()(tf.zeros([2, 0, 2]), tf.zeros([2, 0])).shape == (2, 2)


def test_time_features_read_hour_and_weekday_in_utc():
  layer = layers.TimeFeatures(2)
  monday_13h = int(datetime.datetime(2024, 1, 1, 13, 5,
                                     tzinfo=datetime.timezone.utc).timestamp())
  sunday_23h = monday_13h - 14 * 3600
  out = layer(tf.constant([monday_13h, sunday_23h], tf.int64)).numpy()
  hours, weekdays = layer.hour.embeddings.numpy(), layer.weekday.embeddings.numpy()
  np.testing.assert_array_equal(out[0], np.concatenate([hours[13], weekdays[0]]))
  np.testing.assert_array_equal(out[1], np.concatenate([hours[23], weekdays[6]]))


def test_align_weights_pads_with_one_and_masks_absent():
  topics = tf.constant([["a", "b", ""], ["c", "", ""]])
  np.testing.assert_array_equal(layers.align_weights(tf.zeros([2, 0]), topics),
                                [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(
      layers.align_weights(tf.constant([[0.5, 2.0, 7.0, 7.0], [3.0, 0.0, 0.0, 7.0]]),
                           topics), [[0.5, 2.0, 0.0], [3.0, 0.0, 0.0]])
  # Fewer weight columns than topic columns is fine while the extra columns are "".
  np.testing.assert_array_equal(
      layers.align_weights(tf.constant([[0.5, 2.0], [3.0, 0.0]]), topics),
      [[0.5, 2.0, 0.0], [3.0, 0.0, 0.0]])


def test_align_weights_refuses_a_topic_without_a_weight():
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="topics and weights differ in length"):
    layers.align_weights(tf.constant([[0.5, 2.0], [1.0, 1.0]]),
                         tf.constant([["a", "b", ""], ["c", "d", "e"]]))


def test_parsing_refuses_topics_and_weights_of_different_lengths():
  good = {"item_id": "i1", "item_topics": ["a", "b", "c"],
          "item_topic_weights": [1.0, 2.0, 3.0]}
  bad = {"item_id": "i2", "item_topics": ["a", "b", "c"], "item_topic_weights": [1.0, 2.0]}
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="topics and weights differ in length: Example 1 of the batch "
                     "has 3 item_topics and 2 item_topic_weights"):
    batch([good, bad])
  with pytest.raises(tf.errors.InvalidArgumentError, match="differ in length"):
    batch([{"item_topics": [], "item_topic_weights": [1.0]}])


def test_parsing_gives_an_example_without_weights_uniform_ones():
  """Also in a batch where other Examples carry weights (they were 0.0 before)."""
  parsed = batch([{"item_topics": ["a", "b"], "item_topic_weights": [0.5, 2.0]},
                  {"item_topics": ["c", "d", "e"]}, {}])
  np.testing.assert_array_equal(parsed["item_topic_weights"],
                                [[0.5, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


# --- towers -------------------------------------------------------------------

@pytest.fixture(name="model", scope="module")
def fixture_model():
  model = TwoTowerModel(TINY.replace(correction="none"))
  model(batch([{}]))
  return model


def test_towers_share_the_item_embedding(model):
  assert model.query_tower.item_embedding is model.candidate_tower.item_embedding
  tables = [v.name for v in model.variables if v.shape[0] == TINY.item_buckets + 1]
  assert len(tables) == 1 and tables[0].endswith("item_id_embedding/table/embeddings:0")


def test_query_tower_handles_unseen_empty_and_any_width(model):
  queries = [
      serving_query(),  # every feature absent, history [1, 0]
      serving_query(user_id=["new-user"], seed_item_id=["new-item"], device=["tv"],
                    country=["zz"], timestamp=[1_700_000_000],
                    history_item_ids=[["x"] * 80]),
  ]
  for query in queries:
    out = model.query_tower(query).numpy()
    assert out.shape == (1, TINY.embedding_dim) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  short = serving_query(user_id=["u"], history_item_ids=[["x", "y"]])
  padded = serving_query(user_id=["u"], history_item_ids=[["x", "y", "", "", ""]])
  np.testing.assert_allclose(model.query_tower(short), model.query_tower(padded),
                             atol=1e-6)
  other = serving_query(user_id=["u"], history_item_ids=[["x", "z"]])
  assert not np.allclose(model.query_tower(short), model.query_tower(other))
  # Beyond max_history (50), as in training, items do not count.
  cut = serving_query(history_item_ids=[["x"] * 50 + ["y"] * 30])
  full = serving_query(history_item_ids=[["x"] * 50])
  np.testing.assert_allclose(model.query_tower(cut), model.query_tower(full), atol=1e-6)


def test_candidate_tower_weights_topics_and_defaults(model):
  default_weights = serving_candidate(item_topics=[["t1", "t2"]],
                                      item_topic_weights=np.zeros([1, 0]))
  unit_weights = serving_candidate(item_topics=[["t1", "t2", ""]],
                                   item_topic_weights=[[1.0, 1.0, 0.0]])
  np.testing.assert_allclose(model.candidate_tower(default_weights),
                             model.candidate_tower(unit_weights), atol=1e-6)
  only_t1 = serving_candidate(item_topics=[["t1"]], item_topic_weights=[[2.0]])
  weighted = serving_candidate(item_topics=[["t1", "t2"]],
                               item_topic_weights=[[2.0, 0.0]])
  np.testing.assert_allclose(model.candidate_tower(only_t1),
                             model.candidate_tower(weighted), atol=1e-6)
  empty = serving_candidate(item_id=["never-seen"], item_channel_id=[""],
                            item_topics=np.zeros([1, 0], str),
                            item_topic_weights=np.zeros([1, 0]), item_duration_s=[0.0])
  out = model.candidate_tower(empty).numpy()
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_towers_export_in_a_saved_model(model, tmp_path):
  module = tf.Module()
  module.model = model
  module.query = tf.function(lambda f: model.query_tower(f),
                             input_signature=[features.query_input_signature()])
  module.candidate = tf.function(lambda f: model.candidate_tower(f),
                                 input_signature=[features.candidate_input_signature()])
  tf.saved_model.save(module, str(tmp_path))
  loaded = tf.saved_model.load(str(tmp_path))
  query = serving_query(user_id=["u"], seed_item_id=["i3"], timestamp=[1_700_000_000],
                        history_item_ids=[["i1", "i2", "", ""]])
  candidate = serving_candidate(item_topics=[["t1", "t2"]],
                                item_topic_weights=[[1.0, 0.5]])
  np.testing.assert_allclose(loaded.query(query), model.query_tower(query), atol=1e-6)
  np.testing.assert_allclose(loaded.candidate(candidate), model.candidate_tower(candidate),
                             atol=1e-6)
  # 3 topics, 2 weights: refused inside the exported graph too.
  mismatch = serving_candidate(item_topics=[["t1", "t2", "t3"]],
                               item_topic_weights=[[1.0, 0.5]])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="topics and weights differ in length"):
    loaded.candidate(mismatch)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="topics and weights differ in length"):
    model.candidate_tower(mismatch)


# --- loss ---------------------------------------------------------------------

def _softmax_loss(logits: np.ndarray, reward: np.ndarray) -> float:
  """-(1/B) sum_i r_i log softmax(logits_i)[i], in float64."""
  log_norm = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), axis=1)) + \
      logits.max(1)
  return float(np.mean(reward * (log_norm - np.diag(logits))))


def test_loss_matches_hand_computation():
  """<u,v>/tau - log p on every logit, accidental hits masked, reward-weighted."""
  config = TINY.replace(correction="streaming")
  model = TwoTowerModel(config)
  reference = make_frequency_estimator(config)
  warm_up = [["a", "b", "c"], ["a", "e"], ["a", "b"], ["a"], ["a", "b", "e"]]
  for step, ids in enumerate(warm_up, start=1):
    model.estimator(tf.constant(ids), tf.constant(step, tf.int64))
    reference(tf.constant(ids), tf.constant(step, tf.int64))
  ids = ["a", "b", "a", "c", "d", "b"]
  reward = np.array([1.0, 0.5, 2.0, 1.0, 0.0, 1.5])
  rows = [{"user_id": f"u{i}", "item_id": item, "item_topics": [f"t{i % 2}"],
           "history_item_ids": ids[:i], "reward": r, "timestamp": 1_700_000_000 + i}
          for i, (item, r) in enumerate(zip(ids, reward))]
  inputs = batch(rows)
  u, v = (x.numpy().astype(np.float64) for x in model(inputs))
  p = reference(tf.constant(ids), tf.constant(6, tf.int64)).numpy().astype(np.float64)
  assert len(set(np.round(p, 6))) >= 3, "a correction that is not informative"

  got = float(model.compute_loss(inputs, training=True, step=tf.constant(6, tf.int64)))

  scores = u @ v.T
  hits = (np.array(ids)[:, None] == np.array(ids)[None, :]) & ~np.eye(6, dtype=bool)
  logits = scores / config.temperature - np.log(p)[None, :]
  want = _softmax_loss(np.where(hits, -np.inf, logits), reward)
  assert got == pytest.approx(want, rel=1e-5)
  # The test tells apart the mistakes it guards against.
  mistakes = {
      "correction scaled by 1/tau": (scores - np.log(p)[None, :]) / config.temperature,
      "positive not corrected": np.where(np.eye(6, dtype=bool), scores / config.temperature,
                                         logits),
  }
  for name, wrong in mistakes.items():
    assert abs(_softmax_loss(np.where(hits, -np.inf, wrong), reward) - want) > 1e-3, name
  assert abs(_softmax_loss(logits, reward) - want) > 1e-3, "accidental hits kept"
  assert abs(_softmax_loss(np.where(hits, -np.inf, logits), np.ones(6)) - want) > 1e-3
  # The estimator was updated by the training call exactly like the reference.
  np.testing.assert_allclose(model.estimator.estimate(tf.constant(ids)), p, rtol=1e-6)


def test_expected_counts_above_one_change_the_logits():
  """An estimated count of 4 gets a logit log 4 below a count of 1.

  TFRS clips p to [1e-6, 1]: passed as is, 4 and 1 would give the same logit.
  """
  config = TINY.replace(correction="exact", estimator_options={
      "method": "count", "count_multiplicity": True, "max_probability": 64.0})
  model = TwoTowerModel(config)
  for step in (1, 2, 3):  # "a" 4 times a batch, "b", "c" and "d" once
    model.estimator(tf.constant(["a"] * 4 + ["b", "c", "d"]), tf.constant(step, tf.int64))
  ids = ["a", "b", "c", "d"]
  p = model.estimator.estimate(tf.constant(ids)).numpy().astype(np.float64)
  np.testing.assert_allclose(p, [4.0, 1.0, 1.0, 1.0], rtol=1e-6)
  inputs = batch([{"user_id": f"u{i}", "item_id": item, "seed_item_id": "a",
                   "timestamp": 1_700_000_000 + 3600 * i} for i, item in enumerate(ids)])
  u, v = (x.numpy().astype(np.float64) for x in model(inputs))

  got = float(model.compute_loss(inputs, training=False))

  scores = u @ v.T / config.temperature
  want = _softmax_loss(scores - np.log(p)[None, :], np.ones(4))
  clipped = _softmax_loss(scores - np.log(np.minimum(p, 1.0))[None, :], np.ones(4))
  assert got == pytest.approx(want, rel=1e-5)
  assert abs(clipped - want) > 1e-2, "the counts do not tell the losses apart"


def test_count_multiplicity_caps_the_estimate_at_the_batch_size():
  """Not at 1, the estimators' default, where counts above 1 could not show."""
  options = {"count_multiplicity": True}
  for correction in ("streaming", "exact"):
    config = TINY.replace(correction=correction, batch_size=16, estimator_options=options)
    assert make_frequency_estimator(config).max_probability == 16.0
    explicit = config.replace(estimator_options={**options, "max_probability": 5.0})
    assert make_frequency_estimator(explicit).max_probability == 5.0
  assert make_frequency_estimator(TINY).max_probability == 1.0


def test_loss_without_correction_and_read_only_evaluation():
  config = TINY.replace(correction="none")
  model = TwoTowerModel(config)
  rows = [{"item_id": f"i{i}", "user_id": f"u{i}"} for i in range(4)]
  inputs = batch(rows)
  u, v = (x.numpy().astype(np.float64) for x in model(inputs))
  want = _softmax_loss(u @ v.T / config.temperature, np.ones(4))
  assert float(model.compute_loss(inputs)) == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(model.score(u, v), u @ v.T / config.temperature, rtol=1e-6)


def test_training_loss_needs_a_step_for_the_estimator():
  model = TwoTowerModel(TINY)
  with pytest.raises(ValueError, match="global step"):
    model.compute_loss(batch([{"item_id": "a"}]), training=True)


def test_in_batch_recall_by_hand():
  q = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  c = tf.constant([[0.5, 0.0], [1.0, 0.0], [0.9, 0.1]])
  # Row 0: candidates 1 and 2 beat it; row 1: nothing beats it; row 2: candidate 1
  # beats it, but shares its item id, so it does not count.
  ids = tf.constant(["a", "b", "b"])
  assert float(in_batch_recall(q, c, ids, 1)) == pytest.approx(2 / 3)
  assert float(in_batch_recall(q, c, ids, 3)) == pytest.approx(1.0)
