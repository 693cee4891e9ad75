"""Shared by the serving and evaluation tests: tiny configs, hand-made W/data days,
and towers whose rankings are planted (known exactly, nothing learned)."""

from __future__ import annotations

import datetime
import os
import types
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from models import features
from models import trainer
from models.config import ModelConfig, ONE_PASS

DAY = datetime.date(2024, 3, 5)


def tiny_config(**overrides: Any) -> ModelConfig:
  """A model small enough to train for a few hundred steps in seconds."""
  values = dict(embedding_dim=16, id_embedding_dim=16, feature_embedding_dim=4,
                item_buckets=4096, user_buckets=512, channel_buckets=64,
                topic_buckets=64, category_buckets=16, query_hidden=(32,),
                candidate_hidden=(32,), batch_size=32, optimizer="adam",
                learning_rate=0.02, correction="none", checkpoint_every_steps=10_000,
                log_every_steps=10_000, max_history=5, **ONE_PASS)
  values.update(overrides)
  return ModelConfig(**values)


def position(day: datetime.date | None, examples: int, complete: bool,
             global_step: int = 0) -> trainer.TrainedPosition:
  """A trained position given by hand (no checkpoint holds it)."""
  return trainer.TrainedPosition(day, examples, complete, global_step, None)


def write_records(path: str, rows: Iterable[Mapping[str, Any]]) -> str:
  """Writes Examples built from `rows` to a gzip TFRecord file."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path, options="GZIP") as writer:
    for row in rows:
      writer.write(features.to_example(row).SerializeToString())
  return path


def day_dir(workdir: str, day: datetime.date) -> str:
  return os.path.join(workdir, "data", day.isoformat())


def corpus_row(item: str) -> dict[str, Any]:
  return {"item_id": item, "item_channel_id": f"channel-{item[-1]}",
          "item_topics": ["t"], "item_topic_weights": [1.0], "item_duration_s": 60.0}


def event_row(event: str, user: str, item: str, seed: str = "",
              history: Iterable[str] = (), timestamp: int = 1_709_600_000) -> dict[str, Any]:
  return {"event_id": event, "timestamp": timestamp, "user_id": user, "device": "web",
          "country": "de", "seed_item_id": seed, "history_item_ids": list(history),
          **corpus_row(item), "reward": 1.0}


class _ItemIndex(tf.keras.layers.Layer):
  """Item id -> its position in `items` (-1 when unknown)."""

  def __init__(self, items: Sequence[str], **kwargs):
    super().__init__(**kwargs)
    self.table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(items)),
                                            tf.range(len(items))), -1)

  def call(self, ids: tf.Tensor) -> tf.Tensor:
    return self.table.lookup(ids)


class _PlantedQueryTower(tf.keras.Model):
  """Seed item s -> row s of the planted scores, unit length (zeros when unknown)."""

  def __init__(self, items: Sequence[str], scores: np.ndarray):
    super().__init__()
    self.lookup = _ItemIndex(items)
    rows = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    rows = np.concatenate([rows, np.zeros((1, len(items)))]).astype(np.float32)
    self.rows = tf.Variable(rows, trainable=False, name="planted_rows")

  def call(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    seed = self.lookup(features["seed_item_id"])
    return tf.gather(self.rows, tf.where(seed < 0, tf.shape(self.rows)[0] - 1, seed))


class _OneHotCandidateTower(tf.keras.Model):
  """Item j -> the j-th unit vector (zeros when unknown)."""

  def __init__(self, items: Sequence[str]):
    super().__init__()
    self.lookup = _ItemIndex(items)
    self.num_items = len(items)

  def call(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    return tf.one_hot(self.lookup(features["item_id"]), self.num_items)


def planted_towers(items: Sequence[str],
                   orders: Sequence[Sequence[int]]) -> types.SimpleNamespace:
  """Towers under which seed items[s] ranks the corpus `items` exactly as orders[s].

  The query for seed s scores item orders[s][r] by n - r (then normalised), and an
  item embeds as a one-hot vector: neighbouring ranks differ in score by about
  1.7 / n^1.5 (0.0024 for n = 80), far above float error. An unknown seed embeds
  to zeros.
  """
  n = len(items)
  scores = np.zeros((n, n))
  for s, order in enumerate(orders):
    if sorted(order) != list(range(n)):
      raise ValueError(f"orders[{s}] is not a permutation of range({n})")
    scores[s, list(order)] = n - np.arange(n)
  return types.SimpleNamespace(query_tower=_PlantedQueryTower(items, scores),
                               candidate_tower=_OneHotCandidateTower(items))


def dpp_reference(embeddings: np.ndarray, scores: np.ndarray, k: int, theta: float,
                  valid: np.ndarray | None = None, epsilon: float = 1e-4
                  ) -> tuple[list[int], list[float], list[float]]:
  """Chen et al.'s Algorithm 1, literally, in float64, for one query (the oracle of
  serving/dpp.py): the kernel L = diag(r) S diag(r), r = exp(alpha s) with
  alpha = theta / (2 (1 - theta)) (scores shifted by their maximum, which scales L
  and changes no choice), S_ij = <v_i, v_j> of the normalised embeddings (S_ii = 1
  exactly). theta = 1 is the plain top k by score. A candidate whose S-residual
  d_L^2 / r^2 is <= epsilon is not chosen (theta < 1); ties go to the earlier column.

  Returns:
    (indices, padded with -1 to k; log-det increments of S (-inf padding); the
    margin of each choice over the runner-up in f = theta sum s + (1 - theta)
    log det S_Y units: inf where nothing was left to compare, or where the tie is
    by design, the first pick at theta = 0).
  """
  scores = np.asarray(scores, np.float64)
  num = len(scores)
  valid = np.ones(num, bool) if valid is None else np.asarray(valid, bool)
  valid = valid & np.isfinite(scores)
  norms = np.linalg.norm(embeddings, axis=1)
  units = np.asarray(embeddings, np.float64) / np.where(norms > 0, norms, 1.0)[:, None]
  similarity = units @ units.T
  np.fill_diagonal(similarity, (norms > 0).astype(np.float64))
  picks, increments, margins = [], [], []
  if theta >= 1:
    order = [int(i) for i in np.argsort(-np.where(valid, scores, -np.inf), kind="stable")
             if valid[i]][:k]
    picks = order
    ranked = np.sort(scores[valid])[::-1]
    margins = [ranked[t] - ranked[t + 1] if t + 1 < len(ranked) else np.inf
               for t in range(len(picks))]
    logdets = [0.0]
    for t in range(1, len(picks) + 1):
      sign, value = np.linalg.slogdet(similarity[np.ix_(picks[:t], picks[:t])])
      logdets.append(value if sign > 0 else -np.inf)
    increments = [logdets[t + 1] - logdets[t] if np.isfinite(logdets[t]) else -np.inf
                  for t in range(len(picks))]
  else:
    alpha = theta / (2 * (1 - theta))
    shift = scores[valid].max() if valid.any() else 0.0
    relevance = np.where(valid, np.exp(alpha * (np.where(valid, scores, shift) - shift)),
                         0.0)
    if not (relevance[valid] > 0).all():
      raise ValueError("exp(alpha s) underflows: use scores of a smaller range")
    kernel = relevance[:, None] * similarity * relevance[None, :]
    factor = np.zeros((k, num))
    residual = np.diag(kernel).copy()  # d_i^2 of L
    chosen = np.zeros(num, bool)
    for t in range(k):
      spread = residual / np.where(relevance > 0, relevance ** 2, 1.0)  # d_i^2 of S
      eligible = valid & ~chosen & (spread > epsilon)
      if not eligible.any():
        break
      with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(eligible, (1 - theta) * np.log(residual), -np.inf)
      j = int(np.argmax(gain))
      others = np.sort(gain[eligible])
      margins.append(np.inf if len(others) < 2 or (theta == 0 and t == 0)
                     else others[-1] - others[-2])
      picks.append(j)
      increments.append(float(np.log(spread[j])))
      e = (kernel[j] - factor[:t, j] @ factor[:t]) / np.sqrt(residual[j])
      factor[t] = e
      residual = residual - e ** 2
      chosen[j] = True
  pad = k - len(picks)
  return picks + [-1] * pad, list(increments) + [-np.inf] * pad, margins
