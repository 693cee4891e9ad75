"""Keras layers that turn raw feature values into embeddings, inside the graph.

They take the dense form of models/features.py, where "" means absent and
multi-valued features are [batch, width] matrices of any width (0 included), so
the same layers serve training batches and padded serving requests.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from models.features import TOPIC_WEIGHTS_MISMATCH

_SECONDS_PER_HOUR = 3600
_SECONDS_PER_DAY = 86400
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday is 0.


class HashedEmbedding(tf.keras.layers.Layer):
  """Embeds string ids of any shape by hashing them into buckets.

  No vocabulary: an id never seen before lands in some bucket and gets that
  bucket's vector. Row 0 is reserved for "" (absent), which embeds to zeros and
  receives no gradient, so absent values drop out of sums and means.

  Input: string tensor of any shape S. Output: float32 [*S, dim].
  """

  def __init__(self, num_buckets: int, dim: int, seed: int = 0, **kwargs):
    """Initializes the layer.

    Args:
      num_buckets: hash buckets for present ids; the table has num_buckets + 1 rows.
      dim: embedding width.
      seed: initializer seed.
      **kwargs: passed to tf.keras.layers.Layer (name, ...).
    """
    super().__init__(**kwargs)
    self.num_buckets = num_buckets
    self.dim = dim
    self.seed = seed
    self.embedding = tf.keras.layers.Embedding(
        num_buckets + 1, dim, name="table",
        embeddings_initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=seed))

  def bucket(self, ids: tf.Tensor) -> tf.Tensor:
    """The row of each id: 0 for "", else 1 + fingerprint bucket."""
    return tf.where(ids == "", tf.constant(0, tf.int64),
                    tf.strings.to_hash_bucket_fast(ids, self.num_buckets) + 1)

  def call(self, ids: tf.Tensor) -> tf.Tensor:
    present = tf.cast(ids != "", self.compute_dtype)
    return self.embedding(self.bucket(ids)) * present[..., tf.newaxis]

  def get_config(self):
    return {**super().get_config(), "num_buckets": self.num_buckets, "dim": self.dim,
            "seed": self.seed}


class WeightedMean(tf.keras.layers.Layer):
  """Weighted mean of embeddings over the last-but-one axis, zeros where none.

  Inputs: embeddings [B, T, d] and weights [B, T] (0 = absent; negative weights
  count as 0). Output: sum_t w_t e_t / sum_t w_t [B, d]; a row whose weights sum
  to 0 (empty history, no topics, T = 0) is all zeros, not NaN.
  """

  def call(self, embeddings: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    weights = tf.nn.relu(tf.cast(weights, embeddings.dtype))
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    summed = tf.reduce_sum(embeddings * weights[..., tf.newaxis], axis=1)
    return tf.math.divide_no_nan(summed, total)


class TimeFeatures(tf.keras.layers.Layer):
  """Hour-of-day and day-of-week embeddings from an epoch-seconds timestamp (UTC).

  Input: int64 [B] seconds. Output: float32 [B, 2 * dim].
  """

  def __init__(self, dim: int, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.seed = seed
    init = lambda s: tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=s)  # noqa: E731
    self.hour = tf.keras.layers.Embedding(24, dim, embeddings_initializer=init(seed),
                                          name="hour")
    self.weekday = tf.keras.layers.Embedding(7, dim, embeddings_initializer=init(seed + 1),
                                             name="weekday")

  def call(self, timestamp: tf.Tensor) -> tf.Tensor:
    seconds = tf.cast(timestamp, tf.int64)
    hour = tf.math.floormod(seconds // _SECONDS_PER_HOUR, 24)
    weekday = tf.math.floormod(seconds // _SECONDS_PER_DAY + _EPOCH_WEEKDAY, 7)
    return tf.concat([self.hour(hour), self.weekday(weekday)], axis=-1)

  def get_config(self):
    return {**super().get_config(), "dim": self.dim, "seed": self.seed}


class NormalizedMLP(tf.keras.layers.Layer):
  """ReLU hidden layers, a linear projection to `output_dim`, then L2 normalisation.

  Input: float [B, n], and optionally `residual` [B, output_dim], added to the
  projection before normalising (a path around the MLP, e.g. for the seed item).
  Output: float32 [B, output_dim] with unit rows, so that <u, v> is a cosine and
  the temperature alone sets the logits' scale.
  """

  def __init__(self, hidden: Sequence[int], output_dim: int, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.hidden = tuple(hidden)
    self.output_dim = output_dim
    self.seed = seed
    init = lambda i: tf.keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    self.dense = [tf.keras.layers.Dense(w, activation="relu", kernel_initializer=init(i),
                                        name=f"hidden_{i}")
                  for i, w in enumerate(self.hidden)]
    self.projection = tf.keras.layers.Dense(
        output_dim, kernel_initializer=init(len(self.hidden)), name="projection")

  def call(self, inputs: tf.Tensor, residual: Optional[tf.Tensor] = None) -> tf.Tensor:
    x = inputs
    for layer in self.dense:
      x = layer(x)
    x = self.projection(x)
    if residual is not None:
      x = x + residual
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)

  def get_config(self):
    return {**super().get_config(), "hidden": list(self.hidden),
            "output_dim": self.output_dim, "seed": self.seed}


class PositionEmbedding(tf.keras.layers.Layer):
  """Adds a learned vector per slot to a sequence: slot 0 is the most recent item.

  Input: float [B, T, d] with 0 <= T <= max_length (the caller cuts longer
  sequences; a longer one fails with an InvalidArgumentError that says so).
  Output: [B, T, d], input[:, t] + P[t]. Absent slots get P[t] too: mask them
  downstream (AttentionPooling does).
  """

  def __init__(self, max_length: int, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.max_length = max_length
    self.seed = seed

  def build(self, input_shape):
    self.positions = self.add_weight(
        name="positions", shape=(self.max_length, int(input_shape[-1])),
        initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=self.seed))
    super().build(input_shape)

  def call(self, sequence: tf.Tensor) -> tf.Tensor:
    width = tf.shape(sequence)[1]
    check = tf.debugging.assert_less_equal(
        width, self.max_length,
        message=f"a sequence is longer than the {self.max_length} positions embedded")
    with tf.control_dependencies([check]):
      return sequence + self.positions[tf.newaxis, :width]

  def get_config(self):
    return {**super().get_config(), "max_length": self.max_length, "seed": self.seed}


class AttentionPooling(tf.keras.layers.Layer):
  """Pools a masked sequence into one vector by attention from a query vector.

  Inputs: query [B, q], sequence [B, T, d] (T >= 0) and mask [B, T] (True or
  nonzero = present). Per head h (scaled dot-product attention, one query):

    s_t = <W_h query + b_h, K_h x_t> / sqrt(key_dim)       over present slots t
    a = softmax_t(s),   out_h = sum_t a_t V_h x_t

  Output: float32 [B, num_heads * key_dim], the heads side by side. Absent slots
  get weight exactly 0, so padding a row with absent slots leaves it unchanged;
  a row with no present slot (empty history, T = 0) is all zeros, not NaN.
  """

  def __init__(self, num_heads: int, key_dim: int, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.num_heads = num_heads
    self.key_dim = key_dim
    self.seed = seed
    width = num_heads * key_dim
    init = lambda i: tf.keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    self.query_dense = tf.keras.layers.Dense(width, kernel_initializer=init(0),
                                             name="query")
    self.key_dense = tf.keras.layers.Dense(width, use_bias=False,
                                           kernel_initializer=init(1), name="key")
    self.value_dense = tf.keras.layers.Dense(width, use_bias=False,
                                             kernel_initializer=init(2), name="value")

  def _heads(self, x: tf.Tensor) -> tf.Tensor:
    """[B, T, h * k] -> [B, T, h, k]."""
    shape = tf.shape(x)
    return tf.reshape(x, [shape[0], shape[1], self.num_heads, self.key_dim])

  def call(self, query: tf.Tensor, sequence: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    q = self._heads(self.query_dense(query)[:, tf.newaxis])[:, 0]
    keys = self._heads(self.key_dense(sequence))
    values = self._heads(self.value_dense(sequence))
    present = tf.cast(mask, tf.bool)[:, tf.newaxis, :]  # [B, 1, T]
    scores = tf.einsum("bhk,bthk->bht", q, keys) / float(self.key_dim) ** 0.5
    # A masked softmax without inf or NaN, in values and gradients: absent slots
    # score the lowest float, and their exponentials are multiplied by 0.
    scores = tf.where(present, scores, scores.dtype.min)
    top = tf.stop_gradient(tf.reduce_max(scores, axis=-1, keepdims=True))
    weights = tf.exp(scores - top) * tf.cast(present, scores.dtype)
    weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights, axis=-1,
                                                          keepdims=True))
    pooled = tf.einsum("bht,bthk->bhk", weights, values)
    return tf.reshape(pooled, [-1, self.num_heads * self.key_dim])

  def get_config(self):
    return {**super().get_config(), "num_heads": self.num_heads,
            "key_dim": self.key_dim, "seed": self.seed}


def align_weights(weights: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
  """Cuts or pads (with 1.0, the documented default) weights [B, W] to values [B, T].

  A batch may carry no weights at all (W = 0: uniform weights) or more weights
  than values (a padded serving request, cut); weights of absent values ("")
  become 0. A present value beyond the W > 0 weights given has no weight of its
  own: that fails with an InvalidArgumentError saying that topics and weights
  differ in length, in eager mode and inside exported graphs alike.
  """
  width = tf.shape(values)[1]
  given = tf.shape(weights)[1]
  unweighted = tf.reduce_any(values[:, given:] != "")
  check = tf.debugging.Assert(
      tf.logical_or(tf.equal(given, 0), tf.logical_not(unweighted)),
      [tf.strings.format(
          TOPIC_WEIGHTS_MISMATCH + ": a row has a topic beyond its {} weights (of {} "
          "topic columns); give one weight per topic, or no weights for uniform ones",
          (given, width))])
  with tf.control_dependencies([check]):
    weights = tf.cast(weights[:, :width], tf.float32)
  missing = width - tf.shape(weights)[1]
  weights = tf.pad(weights, [[0, 0], [0, missing]], constant_values=1.0)
  return weights * tf.cast(values != "", tf.float32)
