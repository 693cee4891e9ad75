"""An exponentially decayed count-min sketch with conservative update.

Our alternative to the paper's gap estimator, at the same memory (per bucket an
int64 step and a float32 value, 12 bytes). Each bucket holds R, the sightings of
its items discounted by (1 - decay) per step, updated lazily from the step A it
was last touched:

  R <- R * (1 - decay)^(t - A) + c,   A <- t

and p(y) = min_i R_i[h_i(y)] * (1 - decay)^(now - A_i) / W(n), where
W(n) = sum_{k<n} (1 - decay)^k is the total weight of the n steps seen so far.
So p is a weighted average of the item's count per batch over recent steps:
exactly the running average while n << 1 / decay (no initial value to choose, no
warm-up bias), an exponential moving average with time constant 1 / decay steps
afterwards. Compared with the gap estimator:
  * an item that stops appearing decays at once (no stale estimate);
  * it is linear in the counts, so no 1/B Jensen bias, and `count_multiplicity`
    gives the expected count per batch;
  * collisions only ever add to R, at every step, so p never falls below the
    collision-free value; with `conservative=True` (count-min's conservative
    update) an item raises each of its buckets only to min_i R_i + c, which
    removes most of that excess when m > 1.
The time constant is the same for every item, where the gap estimator's is
1 / (alpha * p) steps: choose `decay` for the slowest drift to be followed.
Unseen items get min_probability. Buckets are updated once per step per batch
as in the streaming estimator; a second call in the same step adds its counts.
"""

from __future__ import annotations

import tensorflow as tf

from estimators import base


class DecayedCountFrequencyEstimator(base.HashedFrequencyEstimator):
  """Decayed count-min sketch of the probability (or count) of an item per batch.

  State: `last_update` (A, int64 [m, H]) and `decayed_count` (R, float32
  [m, H]), each flat as [m * H], and the first and last global steps. Memory is
  12 * m * H bytes, as the streaming estimator's.
  """

  def __init__(self,
               num_buckets: int = 1 << 20,
               num_hashes: int = 4,
               decay: float = 0.001,
               conservative: bool = True,
               count_multiplicity: bool = False,
               hash_seed: int = 0,
               **kwargs):
    """Builds the sketch.

    Args:
      num_buckets: H, buckets per hash row.
      num_hashes: m, independent hash rows.
      decay: per-step discount in (0, 1); the estimate averages ~1 / decay steps.
      conservative: conservative update (raise buckets only to min + count).
      count_multiplicity: count every occurrence in a batch (expected count).
      hash_seed: seed of the m hash keys; part of what a checkpoint means.
      **kwargs: min_probability, max_probability, and Layer arguments.
    """
    super().__init__(num_buckets=num_buckets, num_hashes=num_hashes,
                     hash_seed=hash_seed, count_multiplicity=count_multiplicity,
                     **kwargs)
    if not 0.0 < decay < 1.0:
      raise ValueError(f"decay must be in (0, 1), got {decay}")
    self.decay = float(decay)
    self.conservative = bool(conservative)
    self.last_update = self._cell_variable("last_update", tf.int64, 0)
    self.decayed_count = self._cell_variable("decayed_count", tf.float32, 0.0)

  def _discount(self, steps: tf.Tensor) -> tf.Tensor:
    """(1 - decay)^steps, float32."""
    return tf.exp(tf.cast(steps, tf.float32) * tf.math.log1p(-self.decay))

  def _decayed(self, cells: tf.Tensor, now: tf.Tensor) -> tf.Tensor:
    """R of `cells`, discounted to step `now`."""
    return (tf.gather(self.decayed_count, cells) *
            self._discount(now - tf.gather(self.last_update, cells)))

  def _normalise(self, counts: tf.Tensor, now: tf.Tensor) -> tf.Tensor:
    """Divides decayed counts by the total weight W(n) of the n steps seen."""
    steps = tf.cast(tf.maximum(now - self._origin(), 1), tf.float32)
    weight = -tf.math.expm1(steps * tf.math.log1p(-self.decay)) / self.decay
    return counts / weight

  def _update_and_estimate(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    unique_ids, id_index, counts = self._distinct(item_ids)
    touched = self._touched_cells(unique_ids)
    current = self._decayed(touched.cells, step)
    if self.conservative:
      # Each item lifts its buckets to (its current estimate + its count).
      item_min = tf.reduce_min(touched.per_item(current), axis=0)
      new = tf.maximum(current, touched.reduce(tf.math.unsorted_segment_max,
                                               item_min + counts))
    else:
      new = current + touched.reduce(tf.math.unsorted_segment_sum, counts)
    self.last_update.scatter_update(
        tf.IndexedSlices(tf.fill(tf.shape(touched.cells), step), touched.cells))
    self.decayed_count.scatter_update(tf.IndexedSlices(new, touched.cells))
    item_counts = tf.reduce_min(touched.per_item(new), axis=0)
    return tf.gather(self._normalise(item_counts, step), id_index)

  def _estimate(self, item_ids: tf.Tensor) -> tf.Tensor:
    counts = tf.reduce_min(self._decayed(self._cells(item_ids), self.last_step),
                           axis=0)
    return self._normalise(counts, self.last_step)

  def _occupied(self) -> tf.Tensor:
    return self.decayed_count > 0
