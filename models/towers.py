"""The query and candidate towers: raw feature dicts in, unit-norm embeddings out.

Both are Keras Models over the dense form of models/features.py (QUERY_FEATURES,
CANDIDATE_FEATURES; extra keys are ignored), so the exporter can wrap them in a
tf.function with `query_input_signature()` / `candidate_input_signature()` and the
SavedModel takes the same raw values as the logs. They share one hashed item-id
embedding, passed in by the model that owns both.
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from models import layers
from models.config import ModelConfig


class QueryTower(tf.keras.Model):
  """User id, seed item, mean of history, device, country, time -> MLP -> unit vector.

  The seed contributes its id embedding only: an Example carries no features of
  the seed item beyond its id. History is [B, W] for any W (0 included), padded
  with ""; only its first `max_history` (most recent) items count, as in
  training. Empty seed, empty history and unseen ids all work; absent values
  embed to zeros.
  """

  def __init__(self, config: ModelConfig, item_embedding: layers.HashedEmbedding,
               **kwargs):
    super().__init__(**kwargs)
    self.max_history = config.max_history
    self.item_embedding = item_embedding
    self.user_embedding = layers.HashedEmbedding(
        config.user_buckets, config.id_embedding_dim, seed=config.seed + 1,
        name="user_id_embedding")
    self.device_embedding = layers.HashedEmbedding(
        config.category_buckets, config.feature_embedding_dim, seed=config.seed + 2,
        name="device_embedding")
    self.country_embedding = layers.HashedEmbedding(
        config.category_buckets, config.feature_embedding_dim, seed=config.seed + 3,
        name="country_embedding")
    self.time_features = layers.TimeFeatures(
        config.feature_embedding_dim, seed=config.seed + 4, name="time")
    self.history_mean = layers.WeightedMean(name="history_mean")
    self.mlp = layers.NormalizedMLP(config.query_hidden, config.embedding_dim,
                                    seed=config.seed + 100, name="query_mlp")

  def call(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    # Training parses at most max_history items; serving may send more.
    history = features["history_item_ids"][:, :self.max_history]
    present = tf.cast(history != "", tf.float32)
    history_size = tf.reduce_sum(present, axis=1, keepdims=True)
    inputs = [
        self.user_embedding(features["user_id"]),
        self.item_embedding(features["seed_item_id"]),
        self.history_mean(self.item_embedding(history), present),
        tf.math.log1p(history_size),
        self.device_embedding(features["device"]),
        self.country_embedding(features["country"]),
        self.time_features(features["timestamp"]),
    ]
    return self.mlp(tf.concat(inputs, axis=-1))


class CandidateTower(tf.keras.Model):
  """Item id, channel, weighted mean of topics, log duration -> MLP -> unit vector.

  Topic weights default to 1.0 where missing; an unknown duration (0) gives
  log1p(0) = 0.
  """

  def __init__(self, config: ModelConfig, item_embedding: layers.HashedEmbedding,
               **kwargs):
    super().__init__(**kwargs)
    self.item_embedding = item_embedding
    self.channel_embedding = layers.HashedEmbedding(
        config.channel_buckets, config.feature_embedding_dim, seed=config.seed + 6,
        name="channel_embedding")
    self.topic_embedding = layers.HashedEmbedding(
        config.topic_buckets, config.feature_embedding_dim, seed=config.seed + 7,
        name="topic_embedding")
    self.topic_mean = layers.WeightedMean(name="topic_mean")
    self.mlp = layers.NormalizedMLP(config.candidate_hidden, config.embedding_dim,
                                    seed=config.seed + 200, name="candidate_mlp")

  def call(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    topics = features["item_topics"]
    weights = layers.align_weights(features["item_topic_weights"], topics)
    duration = tf.nn.relu(tf.cast(features["item_duration_s"], tf.float32))
    inputs = [
        self.item_embedding(features["item_id"]),
        self.channel_embedding(features["item_channel_id"]),
        self.topic_mean(self.topic_embedding(topics), weights),
        tf.math.log1p(duration)[:, tf.newaxis],
    ]
    return self.mlp(tf.concat(inputs, axis=-1))
