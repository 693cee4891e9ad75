"""The tf.train.Example contract between the pipeline, the model and serving.

One table of features (docs/design.md, "Examples") drives everything here: the
Beam job builds Examples with `to_example`, the trainer parses them with
`parse_examples`, and the exporter declares its serving inputs with
`query_input_signature`, so the three cannot drift apart.

Dense form: after parsing, every feature is a dense tensor with a leading batch
dimension. Multi-valued string features are padded with "" and their weights with
0.0; an empty string always means "absent" to the towers. A multi-valued feature
is as wide as the batch's widest row, the history cut to its first (most recent)
`max_history` items; padding it wider with absent values changes no embedding
(tests/test_features.py), so models/data.py may pad batches to a common width.

Topic weights: an Example carries one `item_topic_weights` value per
`item_topics` value, or none (uniform weights: parsing fills in 1.0 per topic).
Any other count fails the parse with an InvalidArgumentError saying that topics
and weights differ in length; a batch is never silently misaligned.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import tensorflow as tf

# The error's words, shared with models/layers.py's check of the dense form.
TOPIC_WEIGHTS_MISMATCH = "topics and weights differ in length"

# name -> (dtype, multi-valued, default when absent)
FEATURES: dict[str, tuple[tf.dtypes.DType, bool, Any]] = {
    "event_id": (tf.string, False, ""),
    "timestamp": (tf.int64, False, 0),
    "user_id": (tf.string, False, ""),
    "device": (tf.string, False, ""),
    "country": (tf.string, False, ""),
    "seed_item_id": (tf.string, False, ""),
    "history_item_ids": (tf.string, True, ""),
    "item_id": (tf.string, False, ""),
    "item_channel_id": (tf.string, False, ""),
    "item_topics": (tf.string, True, ""),
    "item_topic_weights": (tf.float32, True, 0.0),
    "item_duration_s": (tf.float32, False, 0.0),
    "reward": (tf.float32, False, 1.0),
}

QUERY_FEATURES = ("user_id", "seed_item_id", "history_item_ids", "device", "country",
                  "timestamp")
CANDIDATE_FEATURES = ("item_id", "item_channel_id", "item_topics", "item_topic_weights",
                      "item_duration_s")
# What a training step reads: the towers' inputs and the reward (not event_id).
TRAINING_FEATURES = QUERY_FEATURES + CANDIDATE_FEATURES + ("reward",)
# History items kept per example, most recent first: the default of the Beam job,
# of ModelConfig.max_history and of parsing. Defined here only.
MAX_HISTORY = 50


# Multi-valued features parsed ragged: their per-row counts are checked against
# each other (`_dense_topics`), which a dense parse would lose. The others
# (history) parse straight to the dense form, padded to the batch's widest row:
# that skips building a ragged tensor, cutting it and densifying it, which cost
# more than parsing them (bench/train_throughput.py, "parse").
_RAGGED = ("item_topics", "item_topic_weights")


def _parse_spec(names: Sequence[str]) -> dict[str, Any]:
  spec = {}
  for name in names:
    dtype, multi, default = FEATURES[name]
    if multi and name in _RAGGED:
      spec[name] = tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64)
    elif multi:
      spec[name] = tf.io.FixedLenSequenceFeature([], dtype, allow_missing=True,
                                                 default_value=default)
    else:
      spec[name] = tf.io.FixedLenFeature([], dtype, default_value=default)
  return spec


def _dense_topics(parsed: dict[str, Any]) -> None:
  """Densifies the ragged topics and weights in place, checking one weight per
  topic, or none (then 1.0 each), row by row: both become [batch, most topics]."""
  topics, weights = parsed.get("item_topics"), parsed.get("item_topic_weights")
  if topics is None or weights is None:  # one alone: nothing to check
    for name in set(_RAGGED) & set(parsed):
      parsed[name] = parsed[name].to_tensor(default_value=FEATURES[name][2])
    return
  topic_counts, weight_counts = topics.row_lengths(), weights.row_lengths()
  bad = (weight_counts != topic_counts) & (weight_counts > 0)
  # One padding row keeps the message's ops defined on an empty batch.
  padded = [tf.concat([values, tf.zeros([1], values.dtype)], 0)
            for values in (tf.cast(bad, tf.int64), topic_counts, weight_counts)]
  row = tf.argmax(padded[0], output_type=tf.int64)
  check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [tf.strings.format(
      TOPIC_WEIGHTS_MISMATCH + ": Example {} of the batch has {} item_topics and {} "
      "item_topic_weights (give one weight per topic, or none for uniform weights)",
      (row, tf.gather(padded[1], row), tf.gather(padded[2], row)))])
  with tf.control_dependencies([check]):
    dense_topics = topics.to_tensor(default_value="")
    width = tf.shape(dense_topics, tf.int64)[1]
    given = weights.to_tensor(default_value=0.0, shape=tf.stack(
        [tf.shape(dense_topics, tf.int64)[0], width]))
  uniform = tf.sequence_mask(tf.where(weight_counts == 0, topic_counts, 0), width,
                             tf.float32)
  parsed["item_topics"], parsed["item_topic_weights"] = dense_topics, given + uniform


def parse_examples(serialized: tf.Tensor, names: Sequence[str] = tuple(FEATURES),
                   max_history: int = MAX_HISTORY) -> dict[str, tf.Tensor]:
  """Parses a batch of serialized Examples into the dense form.

  Args:
    serialized: string tensor [batch] of serialized `tf.train.Example`s.
    names: which features to parse (default all of them).
    max_history: history beyond this many items is cut (most recent are first).

  Returns:
    name -> dense tensor [batch] or [batch, width].
  """
  parsed = tf.io.parse_example(serialized, _parse_spec(names))
  _dense_topics(parsed)
  if "history_item_ids" in parsed:  # [batch, widest]: an identity slice when narrower
    parsed["history_item_ids"] = parsed["history_item_ids"][:, :max_history]
  return parsed


def default_batch(names: Sequence[str] = TRAINING_FEATURES) -> dict[str, tf.Tensor]:
  """One all-default example of the features `names`, parsed: calling a tower on it
  creates every variable (Keras makes them on the first call)."""
  return parse_examples(tf.constant([to_example({}).SerializeToString()]), names)


def concat_padded(first: Mapping[str, tf.Tensor], second: Mapping[str, tf.Tensor],
                  axis: int) -> dict[str, tf.Tensor]:
  """`second` after `first` along `axis`, feature by feature (first's names).

  Multi-valued features (their values on the last axis) are padded to the wider
  of the two with the feature's absent value, which the towers read as absent:
  rows of a batch ([n, width], axis 0) or candidate lists ([b, m, width], axis 1).
  """
  out = {}
  for name, a in first.items():
    b = second[name]
    _, multi, absent = FEATURES[name]
    if multi:
      width = tf.maximum(tf.shape(a)[-1], tf.shape(b)[-1])
      a, b = (tf.pad(x, [[0, 0]] * (x.shape.rank - 1) + [[0, width - tf.shape(x)[-1]]],
                     constant_values=absent) for x in (a, b))
    out[name] = tf.concat([a, b], axis)
  return out


def query_input_signature() -> dict[str, tf.TensorSpec]:
  """The serving inputs of a query: raw values, batched; history is [batch, width]."""
  return {
      name: tf.TensorSpec([None, None] if FEATURES[name][1] else [None],
                          FEATURES[name][0], name=name)
      for name in QUERY_FEATURES
  }


def candidate_input_signature() -> dict[str, tf.TensorSpec]:
  """The inputs of the candidate tower: raw item features, batched."""
  return {
      name: tf.TensorSpec([None, None] if FEATURES[name][1] else [None],
                          FEATURES[name][0], name=name)
      for name in CANDIDATE_FEATURES
  }


def _feature(name: str, value: Any) -> tf.train.Feature:
  dtype, multi, _ = FEATURES[name]
  values = list(value) if multi else [value]
  if dtype == tf.string:
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]))
  if dtype == tf.int64:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def to_example(values: Mapping[str, Any]) -> tf.train.Example:
  """Builds an Example from name -> Python value (str/bytes, int, float, or lists).

  Raises:
    KeyError: a name that is not in `FEATURES`.
  """
  unknown = set(values) - set(FEATURES)
  if unknown:
    raise KeyError(f"not Example features: {sorted(unknown)}")
  return tf.train.Example(features=tf.train.Features(
      feature={name: _feature(name, value) for name, value in values.items()}))


def from_example(example: tf.train.Example) -> dict[str, Any]:
  """The inverse of `to_example`, for tests and tools: name -> Python value."""
  out: dict[str, Any] = {}
  for name, feature in example.features.feature.items():
    dtype, multi, _ = FEATURES[name]
    if dtype == tf.string:
      values = [v.decode("utf-8") for v in feature.bytes_list.value]
    elif dtype == tf.int64:
      values = list(feature.int64_list.value)
    else:
      values = list(feature.float_list.value)
    out[name] = values if multi else values[0]
  return out
