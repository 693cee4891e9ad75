"""The ranking teacher: a pointwise DCN-v2 over user x candidate features.

The towers score a pair by a dot product of two vectors computed apart, so no
feature of the candidate can change how the query is read. The ranker sees the
pair whole (issue 16, part 1; the K-song system's fine ranker):

  query:      user id, seed item id, mean of the history's item embeddings,
              log(1 + history size), device, country, hour and day of week;
  candidate:  item id, channel, topics (weighted mean), log duration;
  interaction: DIN-style attention of the candidate's item embedding over the
              history items (Zhou et al. 2018; scaled dot product, masked), and
              the dot products of the candidate's item embedding with the seed,
              the history mean and that attention's output;

concatenated into x0, then `cross_layers` DCN-v2 cross layers (Wang et al.
2021, `tfrs.layers.dcn.Cross`: x_{l+1} = x0 * (W x_l + b) + x_l), a small ReLU
MLP and one logit. DCN-v2 because its crosses are explicit and cheap on the
small dense input (a few hundred floats), and the attention term gives what
DIN gives (which history item the candidate is like) at the cost of one
[B, M, W] product. It owns all its variables: it shares nothing with the towers.

Inputs are the dense form of models/features.py. Candidates come as lists:
`score_lists` scores query b against candidates [R, M] with R = B (each query
its own list) or R = 1 (one list for all); `score_pairs` (B queries x N
candidates) and `call` (each example's own candidate) are its two special
cases. Scores are logits; sigmoid(logit) estimates the reward.

`CorpusTable` holds a day's corpus in variables and gives the candidate
features of any item ids (absent features for ids it does not hold), in stock
ops: the trainer reads the negatives' features from it, and the `rank` export
(serving/ranker_export.py) bakes it into its SavedModel.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from core import workdir as workdir_lib
from models import features as features_lib
from models import layers
from models.config import DayConfig, ModelConfig

# Fields that may differ between days of one workdir's ranker.
RUNTIME_FIELDS = frozenset({"batch_size", "learning_rate", "checkpoint_every_steps",
                            "max_checkpoints"})
# Fingerprints live in [0, _KEY_SPACE); _KEY_SPACE itself pads the sorted keys.
_KEY_SPACE = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class RankerConfig(DayConfig):
  """Sizes of the ranker and its training, saved as W/ranker/config.json.

  Attributes:
    id_embedding_dim, feature_embedding_dim: widths of the id (item, user) and
      the small categorical embeddings.
    item_buckets, user_buckets, channel_buckets, topic_buckets, category_buckets:
      hash bucket counts (as ModelConfig's).
    cross_layers: DCN-v2 cross layers.
    cross_projection_dim: rank of each cross layer's weight (0: full rank).
    deep_hidden: ReLU layer widths after the crosses.
    negatives: negatives per example, drawn from the retrieval model's top
      `candidates_k` for the example's query (its own item excluded).
    candidates_k: the retrieval list negatives are drawn from.
    max_history: history items read, most recent first.
    batch_size: examples per step (each with 1 + negatives candidates).
    optimizer, learning_rate: "adam" or "adagrad", and its learning rate. Adam
      at 0.01 learned a useful teacher within two small synthetic days where
      Adagrad (0.05 to 1.0) stayed near a constant or diverged
      (bench/funnel_quality.py, README).
    checkpoint_every_steps, max_checkpoints: as ModelConfig's.
    seed: initialisation and negative-sampling seed.
  """
  id_embedding_dim: int = 32
  feature_embedding_dim: int = 8
  item_buckets: int = 200_000
  user_buckets: int = 100_000
  channel_buckets: int = 10_000
  topic_buckets: int = 2_000
  category_buckets: int = 100
  cross_layers: int = 2
  cross_projection_dim: int = 0
  deep_hidden: tuple[int, ...] = (64, 32)
  negatives: int = 4
  candidates_k: int = 100
  max_history: int = features_lib.MAX_HISTORY
  batch_size: int = 128
  optimizer: str = "adam"
  learning_rate: float = 0.01
  checkpoint_every_steps: int = 500
  max_checkpoints: int = 3
  seed: int = 0
  runtime_fields: ClassVar[frozenset[str]] = RUNTIME_FIELDS

  def __post_init__(self):
    object.__setattr__(self, "deep_hidden", tuple(int(w) for w in self.deep_hidden))
    self.require_at_least(1, (
        "id_embedding_dim", "feature_embedding_dim", "item_buckets", "user_buckets",
        "channel_buckets", "topic_buckets", "category_buckets", "negatives",
        "candidates_k", "max_history", "batch_size", "checkpoint_every_steps",
        "max_checkpoints"), prefix="RankerConfig.")
    if self.cross_layers < 0 or self.cross_projection_dim < 0:
      raise ValueError("RankerConfig.cross_layers and cross_projection_dim must be >= 0")
    if self.optimizer not in ("adagrad", "adam"):
      raise ValueError(f"RankerConfig.optimizer must be adagrad or adam, got "
                       f"{self.optimizer!r}")
    if self.negatives > self.candidates_k:
      raise ValueError(f"RankerConfig: negatives ({self.negatives}) > candidates_k "
                       f"({self.candidates_k})")

  @classmethod
  def like(cls, model: ModelConfig, **overrides: Any) -> "RankerConfig":
    """The default ranker for a two-tower config: its table sizes, widths, history
    and seed (so a small test model gets a small ranker), then `overrides`."""
    shared = {name: getattr(model, name) for name in (
        "id_embedding_dim", "feature_embedding_dim", "item_buckets", "user_buckets",
        "channel_buckets", "topic_buckets", "category_buckets", "max_history", "seed")}
    return cls(**{**shared, **overrides})


def ranker_dir(workdir: str) -> str:
  """W/ranker: the ranker's config.json and checkpoints/ (beside W/checkpoints)."""
  return workdir_lib.Workdir(workdir).join("ranker")


def config_path(workdir: str) -> str:
  """W/ranker/config.json."""
  return workdir_lib.Workdir(ranker_dir(workdir)).join(workdir_lib.CONFIG)


def checkpoints_dir(workdir: str) -> str:
  """W/ranker/checkpoints."""
  return workdir_lib.Workdir(ranker_dir(workdir)).join("checkpoints")


def saved_config(workdir: str) -> Optional[RankerConfig]:
  """W/ranker/config.json, or None before the ranker's first day.

  Raises:
    ValueError: the file is not a RankerConfig (naming it).
  """
  path = config_path(workdir)
  if not workdir_lib.exists(path):
    return None
  try:
    values = workdir_lib.read_json(path)
    if not isinstance(values, dict):
      raise ValueError("expected a JSON object")
    return RankerConfig.from_dict(values)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a valid RankerConfig: {e}") from e


def write_config(workdir: str, config: RankerConfig) -> None:
  """Writes W/ranker/config.json whole or not at all."""
  workdir_lib.atomic_write(config_path(workdir),
                           json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def _flatten(value: tf.Tensor, rank: int) -> tf.Tensor:
  """[*S, ...] -> [prod(S), ...], keeping the last `rank` - 1 axes."""
  if rank == 1:
    return tf.reshape(value, [-1])
  return tf.reshape(value, tf.concat([[-1], tf.shape(value)[-(rank - 1):]], 0))


class Ranker(tf.keras.Model):
  """The teacher (module docstring): logits of (query, candidate) pairs."""

  def __init__(self, config: RankerConfig, **kwargs):
    super().__init__(**kwargs)
    self.config = config
    seed = config.seed + 1000
    dim, small = config.id_embedding_dim, config.feature_embedding_dim
    self.item_embedding = layers.HashedEmbedding(config.item_buckets, dim, seed=seed,
                                                 name="item_id_embedding")
    self.user_embedding = layers.HashedEmbedding(config.user_buckets, dim, seed=seed + 1,
                                                 name="user_id_embedding")
    self.device_embedding = layers.HashedEmbedding(
        config.category_buckets, small, seed=seed + 2, name="device_embedding")
    self.country_embedding = layers.HashedEmbedding(
        config.category_buckets, small, seed=seed + 3, name="country_embedding")
    self.time_features = layers.TimeFeatures(small, seed=seed + 4, name="time")
    self.channel_embedding = layers.HashedEmbedding(
        config.channel_buckets, small, seed=seed + 5, name="channel_embedding")
    self.topic_embedding = layers.HashedEmbedding(
        config.topic_buckets, small, seed=seed + 6, name="topic_embedding")
    self.history_mean = layers.WeightedMean(name="history_mean")
    self.topic_mean = layers.WeightedMean(name="topic_mean")
    init = tf.keras.initializers.GlorotUniform
    self.crosses = [tfrs.layers.dcn.Cross(
        projection_dim=config.cross_projection_dim or None,
        kernel_initializer=init(seed=seed + 10 + i), name=f"cross_{i}")
                    for i in range(config.cross_layers)]
    self.deep = [tf.keras.layers.Dense(width, activation="relu", name=f"deep_{i}",
                                       kernel_initializer=init(seed=seed + 20 + i))
                 for i, width in enumerate(config.deep_hidden)]
    self.logit = tf.keras.layers.Dense(1, name="logit",
                                       kernel_initializer=init(seed=seed + 30))

  def _query(self, features: Mapping[str, tf.Tensor]
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(query vector [B, Dq], history embeddings [B, W, d], its mask [B, W],
    seed embedding [B, d], history mean [B, d])."""
    history = features["history_item_ids"][:, :self.config.max_history]
    present = tf.cast(history != "", tf.float32)
    embedded = self.item_embedding(history)
    mean = self.history_mean(embedded, present)
    seed = self.item_embedding(features["seed_item_id"])
    vector = tf.concat([
        self.user_embedding(features["user_id"]), seed, mean,
        tf.math.log1p(tf.reduce_sum(present, axis=1, keepdims=True)),
        self.device_embedding(features["device"]),
        self.country_embedding(features["country"]),
        self.time_features(features["timestamp"])], axis=-1)
    return vector, embedded, present, seed, mean

  def _candidates(self, features: Mapping[str, tf.Tensor]
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """(candidate vectors [R, M, Dc], item embeddings [R, M, d]) of candidate
    features whose leading shape is [R, M]."""
    shape = tf.shape(features["item_id"])
    ids = _flatten(features["item_id"], 1)
    topics = _flatten(features["item_topics"], 2)
    weights = layers.align_weights(_flatten(features["item_topic_weights"], 2), topics)
    duration = tf.nn.relu(tf.cast(_flatten(features["item_duration_s"], 1), tf.float32))
    item = self.item_embedding(ids)
    vector = tf.concat([
        item, self.channel_embedding(_flatten(features["item_channel_id"], 1)),
        self.topic_mean(self.topic_embedding(topics), weights),
        tf.math.log1p(duration)[:, tf.newaxis]], axis=-1)

    def unflatten(value: tf.Tensor) -> tf.Tensor:
      return tf.reshape(value, tf.concat([shape, tf.shape(value)[-1:]], 0))
    return unflatten(vector), unflatten(item)

  def score_lists(self, query_features: Mapping[str, tf.Tensor],
                  candidate_features: Mapping[str, tf.Tensor],
                  training: bool = False) -> tf.Tensor:
    """Logits [B, M] of B queries against candidate lists [R, M] (R = B or 1).

    Args:
      query_features: features.QUERY_FEATURES, dense form, batch B.
      candidate_features: features.CANDIDATE_FEATURES with leading shape [R, M]
        (multi-valued ones [R, M, T]).
      training: Keras' flag (no layer here behaves differently).
    """
    del training
    query, history, present, seed, mean = self._query(query_features)
    candidate, item = self._candidates(candidate_features)
    batch, width = tf.shape(query)[0], tf.shape(item)[1]
    # DIN-style: each candidate attends over the history ([R, M, d] x [B, d, W]).
    logits = tf.linalg.matmul(item, history, transpose_b=True) / tf.sqrt(
        float(self.config.id_embedding_dim))
    logits += (1.0 - present[:, tf.newaxis, :]) * -1e9
    # Absent items embed to zeros, so a row without history pools to zeros.
    pooled = tf.linalg.matmul(tf.nn.softmax(logits, axis=-1), history)
    item = tf.broadcast_to(item, tf.shape(pooled))
    dots = tf.stack([tf.reduce_sum(item * seed[:, tf.newaxis], -1),
                     tf.reduce_sum(item * mean[:, tf.newaxis], -1),
                     tf.reduce_sum(item * pooled, -1)], axis=-1)
    query = tf.broadcast_to(query[:, tf.newaxis], [batch, width, query.shape[-1]])
    candidate = tf.broadcast_to(candidate, [batch, width, candidate.shape[-1]])
    x0 = tf.concat([query, candidate, pooled, dots], axis=-1)
    x0 = tf.reshape(x0, [-1, x0.shape[-1]])
    x = x0
    for cross in self.crosses:
      x = cross(x0, x)
    for dense in self.deep:
      x = dense(x)
    return tf.reshape(self.logit(x), [batch, width])

  def score_pairs(self, query_features: Mapping[str, tf.Tensor],
                  candidate_features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """Logits [B, N]: every one of B queries against each of N candidates
    (candidate features [N] or [N, T])."""
    return self.score_lists(query_features, {
        name: candidate_features[name][tf.newaxis]
        for name in features_lib.CANDIDATE_FEATURES})

  def call(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
    """Logits [B] of each example's own (query, candidate)."""
    return self.score_lists(features, {
        name: features[name][:, tf.newaxis]
        for name in features_lib.CANDIDATE_FEATURES}, training=training)[:, 0]


class _Absent(NamedTuple):
  dtype: tf.dtypes.DType
  value: Any


class CorpusTable(tf.Module):
  """A corpus in variables, and the candidate features of item ids (stock ops).

  Lookup is a binary search of each id's 64-bit fingerprint in the sorted
  fingerprints of the corpus; an id the corpus lacks gets absent features
  (but its own id, which the ranker embeds by hashing). Each variable holds one
  extra all-absent row at the end, which misses point at, so an empty corpus
  works too. `set_corpus` replaces the corpus (any size) without new variables,
  so a SavedModel made once can be saved again over the next day's corpus.
  """

  def __init__(self, name: str = "corpus_table"):
    super().__init__(name=name)
    self.columns = {}
    for feature in features_lib.CANDIDATE_FEATURES:
      dtype, multi, _ = features_lib.FEATURES[feature]
      shape = [1, 0] if multi else [1]
      self.columns[feature] = tf.Variable(tf.zeros(shape, dtype), trainable=False,
                                          shape=[None] * len(shape), name=feature)
    self.keys = tf.Variable(tf.fill([1], tf.constant(_KEY_SPACE, tf.int64)),
                            trainable=False, shape=[None], name="sorted_keys")
    self.rows = tf.Variable(tf.zeros([1], tf.int64), trainable=False, shape=[None],
                            name="rows")

  @property
  def size(self) -> int:
    return int(tf.shape(self.keys)[0]) - 1

  def set_corpus(self, corpus: Mapping[str, Any]) -> None:
    """Holds `corpus` (CANDIDATE_FEATURES in dense form, [n] or [n, T]) from now on."""
    ids = tf.convert_to_tensor(corpus["item_id"], tf.string)
    for feature in features_lib.CANDIDATE_FEATURES:
      dtype, _, absent = features_lib.FEATURES[feature]
      value = tf.convert_to_tensor(corpus[feature], dtype)
      pad = [[0, 1]] + [[0, 0]] * (value.shape.rank - 1)
      self.columns[feature].assign(tf.pad(value, pad, constant_values=absent))
    keys = tf.strings.to_hash_bucket_fast(ids, _KEY_SPACE)
    order = tf.argsort(keys, stable=True)
    self.keys.assign(tf.concat([tf.gather(keys, order), [_KEY_SPACE]], 0))
    self.rows.assign(tf.concat([tf.cast(order, tf.int64),
                                tf.shape(ids, out_type=tf.int64)[:1]], 0))

  def lookup(self, item_ids: tf.Tensor) -> dict[str, tf.Tensor]:
    """CANDIDATE_FEATURES of `item_ids` (any shape S): [*S] or [*S, T]."""
    shape = tf.shape(item_ids)
    flat = tf.reshape(item_ids, [-1])
    wanted = tf.strings.to_hash_bucket_fast(flat, _KEY_SPACE)
    at = tf.searchsorted(self.keys, wanted)  # the last key (_KEY_SPACE) bounds it
    found = tf.logical_and(tf.equal(tf.gather(self.keys, at), wanted), flat != "")
    rows = tf.where(found, tf.gather(self.rows, at), tf.shape(self.keys,
                                                              out_type=tf.int64)[0] - 1)
    out = {"item_id": item_ids}
    for feature in features_lib.CANDIDATE_FEATURES[1:]:
      value = tf.gather(self.columns[feature], rows)
      out[feature] = tf.reshape(value, tf.concat([shape, tf.shape(value)[1:]], 0))
    return out


def build(config: RankerConfig) -> Ranker:
  """A Ranker with every variable made (Keras makes them on the first call)."""
  ranker = Ranker(config, name="ranker")
  ranker(features_lib.default_batch())
  return ranker
