"""A count-min sketch of item sightings, normalised by steps: a hashed baseline.

m rows of H int64 counters; each step adds an item's sightings to its bucket in
every row, and p(y) = min_i C_i[h_i(y)] / (steps since the estimator's first step).
Collisions only add counts, so p is never under-estimated relative to the exact
count. Unlike the streaming estimator it averages over the whole history, so it is
exact for a stationary stream but follows a distribution shift only slowly.

Memory is 8 * m * H bytes; the streaming estimator uses 12 * m * H, so equal
memory means 1.5x its buckets (see `equal_memory_buckets`).
"""

from __future__ import annotations

import tensorflow as tf

from estimators import base

_COUNTER_BYTES = tf.int64.size


def equal_memory_buckets(memory_bytes: int, num_hashes: int) -> int:
  """Buckets per row that give a count-min sketch `memory_bytes` of state."""
  return max(1, memory_bytes // (num_hashes * _COUNTER_BYTES))


class CountMinFrequencyEstimator(base.HashedFrequencyEstimator):
  """Count-min sketch estimate of the probability that an item is in a batch.

  State: `counts` (C, int64 [m, H], flat as [m * H]) and the first and last
  global steps. One sighting per bucket per step unless `count_multiplicity`
  (then every occurrence counts and p estimates the expected count per batch). A
  second call at the same step adds its sightings again. Unseen items get
  min_probability.
  """

  def __init__(self,
               num_buckets: int = 1 << 20,
               num_hashes: int = 4,
               count_multiplicity: bool = False,
               hash_seed: int = 0,
               **kwargs):
    """Builds the sketch.

    Args:
      num_buckets: H, buckets per hash row.
      num_hashes: m, independent hash rows.
      count_multiplicity: count every occurrence in a batch (expected count).
      hash_seed: seed of the m hash keys; part of what a checkpoint means.
      **kwargs: min_probability, max_probability, and Layer arguments.
    """
    super().__init__(num_buckets=num_buckets, num_hashes=num_hashes,
                     hash_seed=hash_seed, count_multiplicity=count_multiplicity,
                     **kwargs)
    self.counts = self._cell_variable("counts", tf.int64, 0)

  def _update_and_estimate(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    unique_ids, id_index, increments = self._distinct(item_ids, tf.int64)
    cells = self._cells(unique_ids)
    # scatter_add sums repeated indices (colliding ids), as a sketch must.
    self.counts.scatter_add(tf.IndexedSlices(
        tf.reshape(tf.broadcast_to(increments, tf.shape(cells)), [-1]),
        tf.reshape(cells, [-1])))
    return tf.gather(self._probability(cells, step), id_index)

  def _probability(self, cells: tf.Tensor, now: tf.Tensor) -> tf.Tensor:
    counts = tf.reduce_min(tf.gather(self.counts, cells), axis=0)
    steps = tf.maximum(now - self._origin(), 1)
    return tf.cast(counts, tf.float32) / tf.cast(steps, tf.float32)

  def _estimate(self, item_ids: tf.Tensor) -> tf.Tensor:
    return self._probability(self._cells(item_ids), self.last_step)

  def _occupied(self) -> tf.Tensor:
    return self.counts > 0
