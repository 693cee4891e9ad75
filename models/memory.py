"""A pair memory: counted seed -> item transitions, and a bonus on their scores.

The towers factorise every score into <u, v>; a pair seen once or twice barely
moves it, while a count table (co-visitation) ranks such pairs first and wins
wherever the log repeats them (README, issue 13). `PairMemory` memorises them
without factorising: it counts the consecutive pairs of the stream, both ways,
as co-visitation does, and keeps for each seed item its `successors` most
counted partners. The score of (query i, item j) gains

  bonus_ij = weight * log(1 + c_ij) / log(1 + max_k c_ik)

where c_ij counts the pair (anchor of i, item j), the anchor being the seed item,
else the most recent history item (`anchor_ids`), and the max runs over the
anchor's partners: the anchor's most counted partner gains `weight`, the others
less, by their log-counts. Relative, so that its scale does not grow with the
log: weight * log(1 + count), best on MovieLens (counts of 1 to 5), gave the
synthetic world's counts (tens to hundreds) bonuses of 15 to 28, and its R@10
fell from 0.55 to 0.38 (README, issue 13). Only the top `successors` partners of a seed
are known, here as in the exports. Items in the query's own history get no
bonus: the pair (anchor, the item before it) was counted from the user's own
previous event, so it says nothing about what comes next.

`weight` (ModelConfig.pair_memory_weight) is a hyperparameter chosen on
validation partitions. Fitting a log-count weight (with a presence term) by the
softmax likelihood over the corpus, on each day before that day was counted and
with the towers frozen, learned negative weights on MovieLens and lowered
recall: the likelihood is dominated by the events whose target is no counted
partner, recall@K by lifting the few counted targets into the top K.

Counts are absorbed a day at a time (`absorb`), before that day trains, once per
day whatever the replay window and epochs (`absorbed_day` makes it idempotent,
and is checkpointed with the counts). The towers do not train with the bonus.

Pairs live in variables of any length (`pair_keys`, `pair_counts`), so a
checkpoint holds them; items are keyed by a 63-bit fingerprint, so two ids
collide with probability about 2^-63 per pair. The memory grows with the
distinct pairs of the log (16 bytes each in the checkpoint, plus the seeds'
[S, successors] tables).
"""

from __future__ import annotations

import datetime
from typing import Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-direct-tensorflow-import

# Fingerprints lie in [0, KEY_SPACE); PAD_KEY sorts after every one of them.
KEY_SPACE = (1 << 63) - 1
PAD_KEY = np.iinfo(np.int64).max


def fingerprints(ids: tf.Tensor) -> tf.Tensor:
  """int64 key of each string id (same shape)."""
  return tf.strings.to_hash_bucket_fast(ids, KEY_SPACE)


def lookup(ids: tf.Tensor, table: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """([B, F] bool, [B, F] int32): whether ids[b, f] is one of table[b, :], and
  its column there (the first, if listed twice; -1 where not found).

  Compares fingerprints by binary search in each row's sorted table:
  O(B (F + E) log E) time and O(B (F + E)) memory, where comparing every pair of
  strings (as TFRS's `query_with_exclusions` does) costs B F E. Two different ids
  share a fingerprint with probability about 2^-63 per pair, so a false match
  is not expected in practice.
  """
  return lookup_keys(fingerprints(ids), fingerprints(table))


def lookup_keys(wanted: tf.Tensor, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """`lookup` over fingerprints: wanted [B, F] and keys [B, E] int64."""
  order = tf.argsort(keys, axis=1, stable=True)
  # -1 pads every row so that it is never empty, and never matches an id.
  keys = tf.pad(tf.gather(keys, order, batch_dims=1), [[0, 0], [1, 0]],
                constant_values=-1)
  # The padding column keeps searchsorted off a [0, 0] tensor (an empty batch).
  wanted = tf.pad(wanted, [[0, 0], [0, 1]])
  at = tf.minimum(tf.searchsorted(keys, wanted), tf.shape(keys)[1] - 1)
  found = tf.equal(tf.gather(keys, at, batch_dims=1), wanted)[:, :-1]
  column = tf.gather(tf.pad(order, [[0, 0], [1, 0]]), at, batch_dims=1)[:, :-1]
  return found, tf.where(found, column, -1)


def excluded(ids: tf.Tensor, exclude: tf.Tensor) -> tf.Tensor:
  """[B, F] bool: whether ids[b, f] is one of exclude[b, :] (`lookup`)."""
  return lookup(ids, exclude)[0]


def anchor_ids(seed_ids: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
  """[B]: the seed item id, else the most recent history item, else "".

  The item a query continues from; the Beam job fills an absent seed the same way.
  """
  most_recent = tf.concat([history, tf.fill([tf.shape(history)[0], 1], "")], 1)[:, 0]
  return tf.where(seed_ids != "", seed_ids, most_recent)


def _local(value: np.ndarray, name: str) -> tf.Variable:
  """A non-trainable variable of `value`'s rank and any length, local to this process.

  Made directly, not through tf.Variable, so that a tf.distribute strategy's scope
  does not make it a distributed variable: each worker counts the same days into
  its own copy, and a variable of unknown length cannot be broadcast to the
  workers (the collective aborts).
  """
  return resource_variable_ops.ResourceVariable(
      value, trainable=False, name=name, shape=tf.TensorShape([None] * value.ndim))


def top_successors(pairs: np.ndarray, counts: np.ndarray, successors: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each seed's `successors` most counted partners (ties: the smaller key).

  Args:
    pairs: int64 [P, 2], distinct (seed key, item key) pairs.
    counts: [P] their counts.
    successors: M, the partners kept per seed.

  Returns:
    (seed keys [S] ascending, partner keys [S, M] ascending in each row and
    padded with PAD_KEY, their counts [S, M] float32, 0 where padded).
  """
  order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
  seeds, items, counts = pairs[order, 0], pairs[order, 1], counts[order]
  seed_keys, first = np.unique(seeds, return_index=True)
  row = np.searchsorted(seed_keys, seeds)
  rank = np.arange(len(seeds)) - first[row]
  keep = rank < successors
  row, rank, items, counts = row[keep], rank[keep], items[keep], counts[keep]
  # Within a row, partners in ascending key order (searchsorted needs it).
  by_key = np.lexsort((items, row))
  row, items, counts = row[by_key], items[by_key], counts[by_key]
  column = np.arange(len(row)) - np.searchsorted(row, row)
  keys = np.full((len(seed_keys), successors), PAD_KEY, np.int64)
  values = np.zeros((len(seed_keys), successors), np.float32)
  keys[row, column] = items
  values[row, column] = counts
  return seed_keys, keys, values


def _positions(keys: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
  """The index in `columns` [U] (distinct fingerprints) of each of `keys` (any
  shape), -1 where absent."""
  order = tf.argsort(columns)
  # PAD_KEY after the sorted columns: never a fingerprint, and U may be 0.
  ordered = tf.concat([tf.gather(columns, order), [PAD_KEY]], 0)
  flat = tf.reshape(keys, [-1])
  at = tf.searchsorted(ordered, flat)
  hit = tf.logical_and(tf.equal(tf.gather(ordered, at), flat), flat != PAD_KEY)
  return tf.reshape(tf.where(hit, tf.gather(tf.concat([order, [-1]], 0), at), -1),
                    tf.shape(keys))


def _scatter(columns: tf.Tensor, values: tf.Tensor, rows: tf.Tensor,
             width: tf.Tensor) -> tf.Tensor:
  """[rows, width]: values[i, k] summed at (i, columns[i, k]) where columns >= 0."""
  valid = columns >= 0
  row = tf.broadcast_to(tf.range(rows)[:, tf.newaxis], tf.shape(columns))
  at = tf.stack([tf.boolean_mask(row, valid), tf.boolean_mask(columns, valid)], 1)
  return tf.scatter_nd(at, tf.boolean_mask(values, valid), tf.stack([rows, width]))


class PairMemory(tf.keras.layers.Layer):
  """Counted (anchor, item) pairs and the learned bonus of their logits (module doc).

  Attributes:
    successors: M, the partners kept per seed.
    weight: the bonus of an anchor's most counted partner.
    absorbed_day: int64 variable, the ordinal of the last day absorbed (0: none).
    pair_keys, pair_counts: every distinct pair [P, 2] (seed key, item key) and
      its count [P] (float32 variables).
    seed_keys, successor_keys, successor_counts: `top_successors` of them.
  """

  def __init__(self, successors: int, weight: float, **kwargs):
    super().__init__(**kwargs)
    if successors < 1:
      raise ValueError(f"need successors >= 1, got {successors}")
    self.successors = successors
    self.weight = float(weight)
    self.absorbed_day = resource_variable_ops.ResourceVariable(
        0, dtype=tf.int64, trainable=False, name="absorbed_day")
    self.pair_keys = _local(np.zeros([0, 2], np.int64), "pair_keys")
    self.pair_counts = _local(np.zeros([0], np.float32), "pair_counts")
    self.seed_keys = _local(np.zeros([0], np.int64), "seed_keys")
    self.successor_keys = _local(np.zeros([0, successors], np.int64), "successor_keys")
    self.successor_counts = _local(np.zeros([0, successors], np.float32),
                                     "successor_counts")

  def absorb(self, seed_ids: np.ndarray, item_ids: np.ndarray,
             day: datetime.date) -> bool:
    """Counts day D's (seed, item) pairs, both ways; False if D was absorbed already.

    Pairs with an empty id, or a seed equal to its item, are not counted.
    Eager only: the trainer calls it once per day before training the day.
    """
    if day.toordinal() <= int(self.absorbed_day.numpy()):
      return False
    seeds = fingerprints(tf.constant(seed_ids, tf.string)).numpy()
    items = fingerprints(tf.constant(item_ids, tf.string)).numpy()
    keep = (np.asarray(seed_ids) != b"") & (np.asarray(item_ids) != b"") & (seeds != items)
    seeds, items = seeds[keep], items[keep]
    new = np.concatenate([np.stack([seeds, items], 1), np.stack([items, seeds], 1)])
    pairs = np.concatenate([self.pair_keys.numpy(), new])
    counts = np.concatenate([self.pair_counts.numpy(), np.ones(len(new), np.float32)])
    pairs, index = np.unique(pairs, axis=0, return_inverse=True)
    counts = np.bincount(index.reshape(-1), weights=counts,
                         minlength=len(pairs)).astype(np.float32)
    self.pair_keys.assign(pairs)
    self.pair_counts.assign(counts)
    for variable, value in zip((self.seed_keys, self.successor_keys,
                                self.successor_counts),
                               top_successors(pairs, counts, self.successors)):
      variable.assign(value)
    self.absorbed_day.assign(day.toordinal())
    return True

  def _rows(self, anchors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(row of each anchor in the seed tables, whether it has one) [B]."""
    keys = fingerprints(anchors)
    size = tf.shape(self.seed_keys)[0]
    at = tf.minimum(tf.searchsorted(self.seed_keys, keys), tf.maximum(size - 1, 0))
    found = tf.logical_and(size > 0, tf.equal(
        tf.gather(tf.pad(self.seed_keys, [[0, 1]]), at), keys))
    return at, tf.logical_and(found, anchors != "")

  def pair_counts_of(self, anchors: tf.Tensor, item_ids: tf.Tensor,
                     history: tf.Tensor) -> tf.Tensor:
    """[B, C] counts of (anchors[i], item_ids[j]) among the anchors' partners kept,
    0 where item j is in row i's `history` [B, W]."""
    at, found = self._rows(anchors)
    at = tf.where(found, at, tf.shape(self.seed_keys)[0])  # else the padding row
    partners = tf.gather(tf.concat([self.successor_keys, tf.fill(
        [1, self.successors], tf.constant(PAD_KEY, tf.int64))], 0), at)
    counts = tf.gather(tf.pad(self.successor_counts, [[0, 1], [0, 0]]), at)
    # Sparse: each row's M partners (and W history items) are placed among the
    # batch's U distinct items, not the B x C pairs searched.
    items = tf.unique(item_ids)
    rows, distinct = tf.shape(anchors)[0], tf.shape(items.y)[0]
    partner_columns = _positions(partners, fingerprints(items.y))
    history_columns = _positions(fingerprints(history), fingerprints(items.y))
    dense = _scatter(partner_columns, counts, rows, distinct)
    seen = _scatter(history_columns, tf.ones_like(history_columns, tf.float32), rows,
                    distinct)
    dense = tf.where(tf.logical_or(seen > 0, items.y[tf.newaxis, :] == ""), 0.0, dense)
    count = tf.gather(dense, items.idx, axis=1)
    return count

  def bonus(self, counts: tf.Tensor, top: tf.Tensor) -> tf.Tensor:
    """The score bonus of pairs counted `counts` [B, C] times whose anchors' most
    counted partners have `top` [B, 1] (0 for a count of 0)."""
    return self.weight * tf.math.log1p(tf.cast(counts, tf.float32)) / tf.math.log1p(
        tf.maximum(tf.cast(top, tf.float32), 1.0))

  def top_counts(self, anchors: tf.Tensor) -> tf.Tensor:
    """[B, 1] the count of each anchor's most counted partner (0 for none)."""
    at, found = self._rows(anchors)
    counts = tf.gather(tf.pad(self.successor_counts, [[0, 1], [0, 0]]),
                       tf.where(found, at, tf.shape(self.seed_keys)[0]))
    return tf.reduce_max(counts, axis=1, keepdims=True)

  def call(self, anchors: tf.Tensor, item_ids: tf.Tensor, history: tf.Tensor
           ) -> tf.Tensor:
    """[B, C] score bonus of each (anchor, item) pair (`pair_counts_of`, `bonus`)."""
    return self.bonus(self.pair_counts_of(anchors, item_ids, history),
                      self.top_counts(anchors))

  def serving_table(self, corpus_ids: Sequence[bytes]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a retriever over `corpus_ids` needs: (seed keys [S], their partners'
    corpus rows int32 [S, M] (-1: padding, or not in the corpus), their bonus [S, M]
    float32 (0 there))."""
    corpus_keys = fingerprints(tf.constant(np.asarray(corpus_ids, object),
                                           tf.string)).numpy()
    order = np.argsort(corpus_keys)
    sorted_keys = corpus_keys[order]
    partners = self.successor_keys.numpy()
    at = np.minimum(np.searchsorted(sorted_keys, partners), max(len(sorted_keys) - 1, 0))
    present = (sorted_keys[at] == partners) if len(sorted_keys) else np.zeros(
        partners.shape, bool)
    rows = np.where(present, order[at] if len(order) else 0, -1).astype(np.int32)
    counts = self.successor_counts.numpy()
    bonus = np.where(present, self.bonus(counts, counts.max(axis=1, keepdims=True,
                                                            initial=0)).numpy(), 0.0)
    return self.seed_keys.numpy(), rows, bonus.astype(np.float32)
