"""Tests of models/config.py, layers.py, towers.py and retrieval.py."""

import datetime
import os

import numpy as np
import pytest
import tensorflow as tf

from models import config as config_lib
from models import features
from models import layers
from models.config import ModelConfig, ONE_PASS
from models.retrieval import in_batch_recall
from models.retrieval import make_frequency_estimator
from models.retrieval import TwoTowerModel

TINY = ModelConfig(
    embedding_dim=8, id_embedding_dim=8, feature_embedding_dim=4, item_buckets=100,
    user_buckets=50, channel_buckets=20, topic_buckets=20, category_buckets=10,
    query_hidden=(16,), candidate_hidden=(16,), temperature=0.2,
    estimator_buckets=64, estimator_hashes=2, estimator_alpha=0.5, **ONE_PASS)


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


def test_config_checks_the_model_levers():
  config = TINY.replace(query_encoder="attention", attention_heads=2, seed_residual=False,
                        history_positions=False, uniform_negatives=16)
  assert ModelConfig.from_json(config.to_json()) == config
  assert TINY.incompatibilities(config) == [
      "attention_heads: 1 != 2", "history_positions: True != False",
      "query_encoder: 'mean' != 'attention'", "seed_residual: True != False",
      "uniform_negatives: 0 != 16"]
  with pytest.raises(ValueError, match="query_encoder must be one of"):
    TINY.replace(query_encoder="gru")
  with pytest.raises(ValueError, match="uniform_negatives must be >= 0"):
    TINY.replace(uniform_negatives=-1)
  with pytest.raises(ValueError, match="attention_heads must be >= 1"):
    TINY.replace(attention_heads=0)


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


def test_parsing_an_empty_batch_gives_empty_columns():
  """A batch of no Examples (a replica's empty share, an empty window) parses; the
  mismatch message's row lookup must not fail on it (it did: ArgMax of nothing)."""
  parsed = features.parse_examples(tf.constant([], tf.string))
  assert set(parsed) == set(features.FEATURES)
  assert all(int(value.shape[0]) == 0 for value in parsed.values())
  assert parsed["item_topic_weights"].dtype == tf.float32


# --- towers -------------------------------------------------------------------

@pytest.fixture(name="model", scope="module")
def fixture_model():
  model = TwoTowerModel(TINY.replace(correction="none"))
  model(batch([{}]))
  return model


def test_towers_share_the_item_embedding(model):
  assert model.query_tower.item_embedding is model.candidate_tower.item_embedding
  tables = [v.name for v in model.variables if v.shape.rank and v.shape[0] == TINY.item_buckets + 1]
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


# --- estimators as corrections ------------------------------------------------

def _train_step(model: TwoTowerModel, inputs: dict, step: int) -> float:
  """One plain SGD step of compute_loss at global `step`; returns the loss."""
  with tf.GradientTape() as tape:
    loss = model.compute_loss(inputs, training=True, step=tf.constant(step, tf.int64))
  variables = model.trainable_variables
  gradients = tape.gradient(loss, variables)
  tf.keras.optimizers.SGD(0.1).apply_gradients(zip(gradients, variables))
  return float(loss)


@pytest.mark.parametrize("correction", config_lib.CORRECTIONS)
def test_every_correction_builds_and_trains(correction):
  config = TINY.replace(correction=correction)
  model = TwoTowerModel(config)
  inputs = batch([{"user_id": f"u{i}", "item_id": f"i{i % 3}"} for i in range(4)])
  model(inputs)
  before = [v.numpy().copy() for v in model.trainable_variables]
  for step in (1, 2):
    assert np.isfinite(_train_step(model, inputs, step))
  assert any(not np.array_equal(b, v.numpy())
             for b, v in zip(before, model.trainable_variables))
  if correction == "none":
    assert model.estimator is None
    return
  assert model.estimator.last_step.numpy() == 2
  # Each estimator got the config's sizes and rate where it takes them.
  for argument, field in config_lib.ESTIMATOR_FIELDS.items():
    if argument in type(model.estimator).arguments():
      assert getattr(model.estimator, argument) == getattr(config, field), argument
  p = model.estimator.estimate(tf.constant(["i0", "i1", "never"])).numpy()
  assert p[0] > p[2] and p[1] > p[2], p


@pytest.mark.parametrize("correction,options", [
    ("streaming", {"init": "prior"}),
    ("exact", {"method": "gap", "init": "prior"}),
])
def test_prior_init_keeps_a_late_item_from_a_tiny_p(correction, options):
  """An item first seen at step 400 gets p = 1 / initial_gap, not 1 / (~steps so far)."""
  p_new = {}
  for init in ("paper", "prior"):
    model = TwoTowerModel(TINY.replace(correction=correction,
                                       estimator_options={**options, "init": init}))
    for step in (1, 399):
      model.estimator(tf.constant(["old"]), tf.constant(step, tf.int64))
    p = model.estimator(tf.constant(["new"]), tf.constant(400, tf.int64))
    p_new[init] = float(p[0])
  # alpha 0.5, B = 100 unseen: "paper" takes the 400 steps since the origin as
  # the first gap, B = 0.5 * 100 + 0.5 * 400; "prior" takes 100, B = 100.
  assert p_new["prior"] == pytest.approx(1 / 100.0)
  assert p_new["paper"] == pytest.approx(1 / 250.0)
  # No kind is given options it cannot take.
  for kind in ("count_min", "decayed_count"):
    with pytest.raises(ValueError, match=rf"estimator '{kind}' does not take \['init'\]"):
      TINY.replace(correction=kind, estimator_options={"init": "prior"})
  with pytest.raises(ValueError, match="apply to method 'gap' only"):
    TwoTowerModel(TINY.replace(correction="exact", estimator_options={"init": "prior"}))
  with pytest.raises(ValueError, match=r"set \['estimator_alpha'\] instead"):
    TINY.replace(estimator_options={"alpha": 0.3})


# --- mixed negatives ----------------------------------------------------------

CORPUS_IDS = [f"c{k}" for k in range(8)]


def corpus_rows(ids: list[str]) -> list[dict]:
  return [{"item_id": item, "item_channel_id": f"ch{k % 2}", "item_duration_s": 10.0 * k,
           "item_topics": [f"t{j}" for j in range(k % 3)]} for k, item in enumerate(ids)]


def test_each_sampled_column_carries_its_own_log_q():
  """In-batch columns: the estimator's log p; sampled ones: log(N / n); hits masked."""
  config = TINY.replace(correction="exact", uniform_negatives=6)
  model = TwoTowerModel(config)
  model.set_negative_corpus(batch(corpus_rows(CORPUS_IDS)))
  reference = make_frequency_estimator(config)
  for step, ids in enumerate([["c0", "c1"], ["c0"], ["c0", "c2", "c1"]], start=1):
    model.estimator(tf.constant(ids), tf.constant(step, tf.int64))
    reference(tf.constant(ids), tf.constant(step, tf.int64))
  ids = ["c0", "c1", "c0", "c3"]
  reward = np.array([1.0, 0.5, 2.0, 1.0])
  inputs = batch([{**corpus_rows(CORPUS_IDS)[int(item[1:])], "user_id": f"u{i}",
                   "history_item_ids": ids[:i], "reward": r}
                  for i, (item, r) in enumerate(zip(ids, reward))])
  step = tf.constant(4, tf.int64)
  drawn, q = model.negatives.sample(step)
  drawn_ids = [x.decode() for x in drawn["item_id"].numpy()]
  assert any(d in ids for d in drawn_ids) and any(d not in ids for d in drawn_ids), \
      f"draws {drawn_ids} test neither hits nor misses"
  np.testing.assert_allclose(q, [6 / 8] * 6, rtol=1e-6)
  u, v = (x.numpy().astype(np.float64) for x in model(inputs))
  v_drawn = model.candidate_tower(drawn).numpy().astype(np.float64)
  p = reference(tf.constant(ids), step).numpy().astype(np.float64)
  assert len(set(np.round(p, 6))) >= 2, "a correction that is not informative"

  got = float(model.compute_loss(inputs, training=True, step=step))

  columns = np.array(ids + drawn_ids)
  scores = u @ np.concatenate([v, v_drawn]).T / config.temperature
  hits = (np.array(ids)[:, None] == columns[None, :]) & ~np.eye(4, 10, dtype=bool)
  log_q = np.log(np.concatenate([p, np.full(6, 6 / 8)]))
  want = _softmax_loss(np.where(hits, -np.inf, scores - log_q), reward)
  assert got == pytest.approx(want, rel=1e-5)
  drawn_p = reference.estimate(tf.constant(drawn_ids)).numpy().astype(np.float64)
  mistakes = {
      "drawn columns take the estimator's p": np.log(np.concatenate([p, drawn_p])),
      "drawn columns uncorrected": np.concatenate([np.log(p), np.zeros(6)]),
      "no columns corrected": np.zeros(10),
  }
  for name, wrong in mistakes.items():
    assert abs(_softmax_loss(np.where(hits, -np.inf, scores - wrong), reward) - want) > \
        1e-3, name
  assert abs(_softmax_loss(scores - log_q, reward) - want) > 1e-3, "drawn hits kept"
  # Evaluation (training=False) stays in-batch: B columns only.
  in_batch = _softmax_loss(np.where(hits[:, :4], -np.inf,
                                    scores[:, :4] - np.log(model.estimator.estimate(
                                        tf.constant(ids)).numpy())[None, :]), reward)
  assert float(model.compute_loss(inputs)) == pytest.approx(in_batch, rel=1e-5)


def test_negatives_without_correction_are_not_corrected():
  config = TINY.replace(correction="none", uniform_negatives=3)
  model = TwoTowerModel(config)
  model.set_negative_corpus(batch(corpus_rows(CORPUS_IDS)))
  ids = ["c1", "c2"]
  inputs = batch(corpus_rows(CORPUS_IDS)[1:3])
  drawn, _ = model.negatives.sample(tf.constant(9, tf.int64))
  u, v = (x.numpy().astype(np.float64) for x in model(inputs))
  v_all = np.concatenate([v, model.candidate_tower(drawn).numpy()])
  columns = np.array(ids + [x.decode() for x in drawn["item_id"].numpy()])
  hits = (np.array(ids)[:, None] == columns[None, :]) & ~np.eye(2, 5, dtype=bool)
  want = _softmax_loss(np.where(hits, -np.inf, u @ v_all.T / config.temperature),
                       np.ones(2))
  got = model.compute_loss(inputs, training=True, step=tf.constant(9, tf.int64))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_draws_are_a_function_of_the_step_and_follow_a_new_corpus():
  """Resumable (same step, same draw) and traced once across corpora of any shape."""
  config = TINY.replace(correction="none", uniform_negatives=50)
  model = TwoTowerModel(config)
  model.set_negative_corpus(batch(corpus_rows(CORPUS_IDS)))
  draw = tf.function(lambda step: model.negatives.sample(step)[0]["item_id"])
  first = draw(tf.constant(5, tf.int64)).numpy()
  again = TwoTowerModel(config)
  again.set_negative_corpus(batch(corpus_rows(CORPUS_IDS)))
  np.testing.assert_array_equal(again.negatives.sample(tf.constant(5, tf.int64))[0][
      "item_id"], first)
  assert not np.array_equal(draw(tf.constant(6, tf.int64)).numpy(), first)
  assert set(first) == {x.encode() for x in CORPUS_IDS}  # 50 draws of 8 items
  # A smaller corpus with wider topics: the traced draw reads the new one.
  small = corpus_rows(["n0", "n1"])
  small[1]["item_topics"] = ["a", "b", "c", "d", "e"]
  model.set_negative_corpus(batch(small))
  assert set(draw(tf.constant(5, tf.int64)).numpy()) == {b"n0", b"n1"}
  inputs = batch(corpus_rows(CORPUS_IDS)[:3])
  model(inputs)  # variables first: a tf.function that makes them traces twice
  train = tf.function(lambda inputs, step: model.compute_loss(inputs, training=True,
                                                              step=step))
  assert np.isfinite(float(train(inputs, tf.constant(7, tf.int64))))
  model.set_negative_corpus(batch(corpus_rows(CORPUS_IDS)))
  assert np.isfinite(float(train(inputs, tf.constant(8, tf.int64))))
  assert draw.experimental_get_tracing_count() == 1
  assert train.experimental_get_tracing_count() == 1


def _write_corpus(directory, rows: list[dict]) -> None:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "corpus-00000-of-00001.tfrecord.gz")
  with tf.io.TFRecordWriter(path, "GZIP") as writer:
    for row in rows:
      writer.write(features.to_example(row).SerializeToString())


def test_negative_corpus_comes_from_the_day_and_is_required(tmp_path):
  day = datetime.date(2024, 1, 2)
  workdir = str(tmp_path / "w")
  TwoTowerModel(TINY).load_negative_corpus(workdir, day)  # no negatives: no read
  model = TwoTowerModel(TINY.replace(correction="none", uniform_negatives=2))
  inputs = batch(corpus_rows(CORPUS_IDS)[:2])
  with pytest.raises(tf.errors.InvalidArgumentError, match="uniform negatives need a "
                     "corpus"):
    model.compute_loss(inputs, training=True, step=tf.constant(1, tf.int64))
  with pytest.raises(FileNotFoundError, match="no corpus"):
    model.load_negative_corpus(workdir, day)
  _write_corpus(os.path.join(workdir, "data", "2024-01-02"), corpus_rows(CORPUS_IDS[:5]))
  model.load_negative_corpus(workdir, day)
  np.testing.assert_array_equal(model.negatives.corpus["item_id"].numpy(),
                                [x.encode() for x in CORPUS_IDS[:5]])
  np.testing.assert_array_equal(model.negatives.corpus["item_topic_weights"].numpy()[2],
                                [1.0, 1.0])  # filled in as when training
  assert np.isfinite(float(model.compute_loss(inputs, training=True,
                                              step=tf.constant(1, tf.int64))))
  # The corpus is not part of the model's checkpoint or variables.
  assert not [v.name for v in model.variables if "negatives" in v.name]
  with pytest.raises(ValueError, match="distinct"):
    model.set_negative_corpus(batch(corpus_rows(["a", "a"])))
  with pytest.raises(ValueError, match="uniform_negatives = 0"):
    TwoTowerModel(TINY).set_negative_corpus(batch(corpus_rows(["a"])))
