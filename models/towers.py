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
from models import memory
from models.config import ModelConfig


class QueryTower(tf.keras.Model):
  """User id, seed item, history, device, country, time -> MLP -> unit vector.

  The seed contributes its id embedding only: an Example carries no features of
  the seed item beyond its id. History is [B, W] for any W (0 included), padded
  with ""; only its first `max_history` (most recent) items count, as in
  training. It is read by `config.query_encoder`:
    "mean":      the mean of the present items' embeddings;
    "attention": the items' embeddings (plus a learned embedding of each slot,
                 i.e. recency, when `config.history_positions`) pooled by
                 AttentionPooling, whose query is the seed item's embedding, or
                 the most recent history item's when the seed is empty.
  Both add log(1 + history size). With `config.seed_residual`, a linear
  projection of the seed's id embedding is added to the MLP's output before it
  is normalised, so that "items like the seed" is learnable directly. Empty
  seed, empty history and unseen ids all work; absent values embed to zeros.
  """

  def __init__(self, config: ModelConfig, item_embedding: layers.HashedEmbedding,
               **kwargs):
    super().__init__(**kwargs)
    self.max_history = config.max_history
    self.query_encoder = config.query_encoder
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
    # Layers exist only where the config uses them: a model without them has
    # exactly the variables (and checkpoint) it had before they were added.
    if config.query_encoder == "attention":
      self.history_positions = (
          layers.PositionEmbedding(config.max_history, seed=config.seed + 8,
                                   name="history_positions")
          if config.history_positions else None)
      self.history_attention = layers.AttentionPooling(
          config.attention_heads, config.id_embedding_dim, seed=config.seed + 9,
          name="history_attention")
    else:
      self.history_mean = layers.WeightedMean(name="history_mean")
    residual_init = tf.keras.initializers.GlorotUniform(seed=config.seed + 101)
    self.seed_residual = (
        tf.keras.layers.Dense(config.embedding_dim, use_bias=False, name="seed_residual",
                              kernel_initializer=residual_init)
        if config.seed_residual else None)
    self.transition_scale = config.transition_scale
    self.seed_transition = (
        layers.HashedEmbedding(config.item_buckets, config.embedding_dim,
                               seed=config.seed + 102, name="seed_transition")
        if config.transition_embeddings else None)
    self.mlp = layers.NormalizedMLP(config.query_hidden, config.embedding_dim,
                                    seed=config.seed + 100, name="query_mlp")

  def encode_history(self, seed_ids: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
    """The history's vector [B, n] from seed ids [B] and history ids [B, W].

    W <= max_history (`call` cuts wider requests).
    """
    embeddings = self.item_embedding(history)
    present = history != ""
    if self.query_encoder != "attention":
      return self.history_mean(embeddings, tf.cast(present, tf.float32))
    # The most recent item stands in for an absent seed (as the Beam job fills it).
    anchor = memory.anchor_ids(seed_ids, history)
    if self.history_positions is not None:
      embeddings = self.history_positions(embeddings)
    return self.history_attention(self.item_embedding(anchor), embeddings, present)

  def call(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    # Training parses at most max_history items; serving may send more.
    history = features["history_item_ids"][:, :self.max_history]
    history_size = tf.reduce_sum(tf.cast(history != "", tf.float32), axis=1,
                                  keepdims=True)
    seed = self.item_embedding(features["seed_item_id"])
    inputs = [
        self.user_embedding(features["user_id"]),
        seed,
        self.encode_history(features["seed_item_id"], history),
        tf.math.log1p(history_size),
        self.device_embedding(features["device"]),
        self.country_embedding(features["country"]),
        self.time_features(features["timestamp"]),
    ]
    residuals = []
    if self.seed_residual is not None:
      residuals.append(self.seed_residual(seed))
    if self.seed_transition is not None:
      residuals.append(self.transition_scale
                       * self.seed_transition(features["seed_item_id"]))
    residual = tf.math.add_n(residuals) if residuals else None
    return self.mlp(tf.concat(inputs, axis=-1), residual=residual)


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
    self.transition_scale = config.transition_scale
    self.item_transition = (
        layers.HashedEmbedding(config.item_buckets, config.embedding_dim,
                               seed=config.seed + 202, name="item_transition")
        if config.transition_embeddings else None)

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
    residual = (self.transition_scale * self.item_transition(features["item_id"])
                if self.item_transition is not None else None)
    return self.mlp(tf.concat(inputs, axis=-1), residual=residual)
