"""Tests of the query tower's sequence encoders (models/towers.py, models/layers.py).

The attention encoder must serve what it trains on (an export loaded in a fresh
process gives the training embeddings), ignore absent history slots, read the
order of the history when positions are on, and the seed residual must be a
plain linear path around the MLP.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import config as config_lib
from models import features
from models import layers
from models.config import ModelConfig, ONE_PASS
from models.retrieval import TwoTowerModel
from serving import servable

CONFIG = ModelConfig(
    embedding_dim=8, id_embedding_dim=8, feature_embedding_dim=4, item_buckets=100,
    user_buckets=50, channel_buckets=20, topic_buckets=20, category_buckets=10,
    query_hidden=(16,), candidate_hidden=(16,), temperature=0.2, max_history=4,
    correction="none", query_encoder="attention", attention_heads=2,
    seed_residual=True, **ONE_PASS)

QUERY_DEFAULTS = {"user_id": "", "seed_item_id": "", "device": "", "country": "",
                  "timestamp": 0, "history_item_ids": []}


def parsed(rows: list[dict], max_history: int = CONFIG.max_history
           ) -> dict[str, tf.Tensor]:
  """Rows as training parses them: Examples, history cut at `max_history`."""
  return features.parse_examples(tf.constant(
      [features.to_example(r).SerializeToString() for r in rows]),
      max_history=max_history)


def request(rows: list[dict], width: int = 0) -> dict[str, list]:
  """Rows as a raw serving request (JSON-able), history padded with "" to >= `width`."""
  rows = [{**QUERY_DEFAULTS, **r} for r in rows]
  width = max([width] + [len(r["history_item_ids"]) for r in rows])
  out = {name: [r[name] for r in rows] for name in QUERY_DEFAULTS}
  out["history_item_ids"] = [list(h) + [""] * (width - len(h))
                             for h in out["history_item_ids"]]
  return out


def tensors(values: dict[str, list]) -> dict[str, tf.Tensor]:
  """A request of `request` as tensors of the serving signature."""
  out = {name: tf.constant(values[name], features.FEATURES[name][0])
         for name in QUERY_DEFAULTS if name != "history_item_ids"}
  out["history_item_ids"] = tf.reshape(
      tf.constant(values["history_item_ids"], tf.string), [len(values["user_id"]), -1])
  return out


def query(model: TwoTowerModel, rows: list[dict], width: int = 0) -> np.ndarray:
  return model.query_tower(tensors(request(rows, width))).numpy()


@pytest.fixture(name="model", scope="module")
def fixture_model():
  model = TwoTowerModel(CONFIG)
  model(features.default_batch())
  return model


# Loads an export in a process that never built the model, and embeds requests.
_SERVE = """
import json, sys
import tensorflow as tf
embed = tf.saved_model.load(sys.argv[1]).signatures["query_embedding"]
out = []
for values in json.load(open(sys.argv[2])):
  inputs = {name: tf.constant(value, tf.int64 if name == "timestamp" else tf.string)
            for name, value in values.items() if name != "history_item_ids"}
  inputs["history_item_ids"] = tf.reshape(tf.constant(values["history_item_ids"],
                                                      tf.string),
                                          [len(values["user_id"]), -1])
  out.append(embed(**inputs)["query_embedding"].numpy().tolist())
json.dump(out, open(sys.argv[3], "w"))
"""


def test_attention_tower_serves_what_it_trains(model, tmp_path):
  rows = [
      # Wider than max_history (4): training parses and serving cut it alike.
      {"user_id": "u1", "seed_item_id": "i1", "device": "web", "country": "de",
       "timestamp": 1_700_000_000, "history_item_ids": [f"i{k}" for k in range(1, 8)]},
      {"user_id": "u2", "seed_item_id": "i9", "timestamp": 1_700_003_600},  # no history
      {"user_id": "u3"},  # no seed, no history
      {"user_id": "u4", "history_item_ids": ["i2", "i5"]},  # no seed: i2 leads
  ]
  trained = model.query_tower(parsed(rows), training=True).numpy()
  corpus = parsed([{"item_id": "i1"}, {"item_id": "i2"}])
  servable.ExactRetriever(
      model.query_tower, model.candidate_tower, tf.constant(["i1", "i2"]),
      model.candidate_tower(corpus), CONFIG.temperature, k=1,
      max_history=CONFIG.max_history).save(str(tmp_path / "export"))
  # Each row alone at its own width (7, 0, 0, 2), one padded to 6, and the batch.
  requests = [request([row]) for row in rows] + [request(rows[3:], 6), request(rows)]
  (tmp_path / "requests.json").write_text(json.dumps(requests))
  subprocess.run([sys.executable, "-c", _SERVE, str(tmp_path / "export"),
                  str(tmp_path / "requests.json"), str(tmp_path / "out.json")],
                 check=True, env=dict(os.environ), timeout=600)
  served = [np.array(x) for x in json.loads((tmp_path / "out.json").read_text())]
  for i in range(len(rows)):
    np.testing.assert_allclose(served[i][0], trained[i], atol=1e-5, err_msg=f"row {i}")
  np.testing.assert_allclose(served[4][0], trained[3], atol=1e-5)
  np.testing.assert_allclose(served[5], trained, atol=1e-5)
  assert np.all(np.isfinite(trained))
  np.testing.assert_allclose(np.linalg.norm(trained, axis=1), 1.0, rtol=1e-5)


def test_absent_history_slots_change_nothing(model):
  base = {"user_id": "u", "seed_item_id": "s"}
  two = [{**base, "history_item_ids": ["x", "y"]}]
  np.testing.assert_allclose(query(model, two), query(model, two, width=4), atol=1e-6)
  empty = [{**base, "history_item_ids": []}]
  blanks = [{**base, "history_item_ids": ["", "", ""]}]
  np.testing.assert_allclose(query(model, empty), query(model, blanks), atol=1e-6)
  np.testing.assert_allclose(query(model, empty), query(model, empty, width=3), atol=1e-6)
  # The history does count where present.
  assert np.abs(query(model, two) - query(model, empty)).max() > 1e-3


def _scaled(model: TwoTowerModel) -> None:
  """Item and position vectors of unit scale (the random init is small), so that
  attention weights differ clearly between slots."""
  tower = model.query_tower
  variables = [tower.item_embedding.embedding.embeddings]
  if tower.history_positions is not None:
    variables.append(tower.history_positions.positions)
  for i, variable in enumerate(variables):
    variable.assign(tf.random.stateless_normal(variable.shape, [3, i]))


@pytest.mark.parametrize("positions", [True, False])
def test_history_order_counts_only_with_positions(positions):
  model = TwoTowerModel(CONFIG.replace(history_positions=positions))
  model(features.default_batch())
  _scaled(model)
  seed = tf.constant(["s"])
  xyz = model.query_tower.encode_history(seed, tf.constant([["x", "y", "z"]]))
  yxz = model.query_tower.encode_history(seed, tf.constant([["y", "x", "z"]]))
  base = {"user_id": "u", "seed_item_id": "s"}
  xy = query(model, [{**base, "history_item_ids": ["x", "y", "z"]}])
  yx = query(model, [{**base, "history_item_ids": ["y", "x", "z"]}])
  if positions:
    assert np.abs(xyz - yxz).max() > 1e-2
    assert np.abs(xy - yx).max() > 1e-3
  else:
    np.testing.assert_allclose(xyz, yxz, atol=1e-6)
    np.testing.assert_allclose(xy, yx, atol=1e-6)


def test_an_absent_seed_is_replaced_by_the_most_recent_item():
  model = TwoTowerModel(CONFIG)
  model(features.default_batch())
  _scaled(model)
  tower = model.query_tower
  history = tf.constant([["x", "y", ""]])
  without = tower.encode_history(tf.constant([""]), history)
  np.testing.assert_allclose(without, tower.encode_history(tf.constant(["x"]), history),
                             atol=1e-6)
  other = tower.encode_history(tf.constant(["y"]), history)
  assert np.abs(without - other).max() > 1e-2


@pytest.mark.parametrize("encoder", ["mean", "attention"])
def test_seed_residual_is_a_linear_path_around_the_mlp(encoder):
  model = TwoTowerModel(CONFIG.replace(query_encoder=encoder))
  model(features.default_batch())
  tower = model.query_tower
  projection = tower.mlp.projection
  for weight in projection.weights:
    weight.assign(tf.zeros_like(weight))
  rows = [{"user_id": "u", "seed_item_id": "s1", "history_item_ids": ["a", "b"]},
          {"user_id": "v", "seed_item_id": "s2", "device": "tv"}]
  got = query(model, rows)
  seed = tower.item_embedding(tf.constant(["s1", "s2"])).numpy()
  want = seed @ tower.seed_residual.kernel.numpy()
  np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True),
                             atol=1e-6)


def test_the_default_tower_is_mean_with_the_seed_residual():
  """The default reads history by its mean and adds the seed residual, nothing else."""
  model = TwoTowerModel(ModelConfig(item_buckets=50, user_buckets=50,
                                    estimator_buckets=64))
  model(features.default_batch())
  names = [v.name for v in model.query_tower.variables]
  assert not [n for n in names if any(word in n for word in ("attention", "positions"))], names
  assert [n for n in names if "seed_residual" in n], names


@pytest.mark.parametrize("field", ["seed_residual", "transition_embeddings"])
def test_a_config_saved_before_the_field_keeps_the_old_towers(tmp_path, field):
  """W/config.json written before `field` existed reads as False (the model its
  checkpoints hold), while a new config gets the new default."""
  saved = ModelConfig().to_dict()
  del saved[field]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  assert getattr(config_lib.read_config(str(path)), field) is False
  assert getattr(ModelConfig(), field) is True
  config_lib.write_config(ModelConfig(), str(path))
  assert config_lib.read_config(str(path)) == ModelConfig()
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match="config.json: not a valid ModelConfig"):
    config_lib.read_config(str(path))


def test_attention_pooling_by_hand():
  layer = layers.AttentionPooling(num_heads=2, key_dim=3, seed=5)
  query = tf.constant([[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]])
  sequence = tf.random.stateless_normal([3, 4, 5], [1, 2])
  mask = tf.constant([[True, True, False, True], [False] * 4,
                      [True, False, False, False]])
  got = layer(query, sequence, mask).numpy()
  wq, bq = layer.query_dense.kernel.numpy(), layer.query_dense.bias.numpy()
  wk, wv = layer.key_dense.kernel.numpy(), layer.value_dense.kernel.numpy()
  x = sequence.numpy().astype(np.float64)
  want = np.zeros([3, 6])
  for b in range(3):
    present = mask.numpy()[b]
    if not present.any():
      continue  # no history: zeros
    q, k, v = query.numpy()[b] @ wq + bq, x[b] @ wk, x[b] @ wv
    for h in range(2):
      cols = slice(3 * h, 3 * h + 3)
      scores = k[present, cols] @ q[cols] / np.sqrt(3)
      weights = np.exp(scores - scores.max())
      want[b, cols] = (weights / weights.sum()) @ v[present, cols]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert layer(query, tf.zeros([3, 0, 5]), tf.zeros([3, 0], tf.bool)).shape == (3, 6)
  np.testing.assert_array_equal(layer(query, tf.zeros([3, 0, 5]), tf.zeros([3, 0])), 0.0)


def test_attention_gradients_are_finite_on_empty_rows():
  layer = layers.AttentionPooling(num_heads=1, key_dim=4)
  sequence = tf.Variable(tf.random.stateless_normal([2, 3, 4], [0, 1]) * 30.0)
  mask = tf.constant([[True, False, False], [False, False, False]])
  with tf.GradientTape() as tape:
    out = tf.reduce_sum(layer(tf.ones([2, 4]) * 30.0, sequence, mask))
  gradients = tape.gradient(out, [sequence] + layer.trainable_variables)
  assert all(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())) for g in gradients)
  np.testing.assert_array_equal(tf.convert_to_tensor(gradients[0])[:, 1:], 0.0)


def test_position_embedding_refuses_a_sequence_longer_than_its_table():
  layer = layers.PositionEmbedding(max_length=2)
  out = layer(tf.zeros([1, 2, 3]))
  np.testing.assert_array_equal(out[0], layer.positions.numpy())
  with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the 2 positions"):
    layer(tf.zeros([1, 3, 3]))
