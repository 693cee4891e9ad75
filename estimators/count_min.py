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

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from typing import Any, Mapping  # noqa: E402

import tensorflow as tf  # noqa: E402

from estimators import base  # noqa: E402
from estimators import hashing  # noqa: E402

_COUNTER_BYTES = 8


def equal_memory_buckets(memory_bytes: int, num_hashes: int) -> int:
  """Buckets per row that give a count-min sketch `memory_bytes` of state."""
  return max(1, memory_bytes // (num_hashes * _COUNTER_BYTES))


class CountMinFrequencyEstimator(base.FrequencyEstimator):
  """Count-min sketch estimate of the probability that an item is in a batch.

  One sighting per bucket per step unless `count_multiplicity` (then every
  occurrence counts and p estimates the expected count per batch). A second call
  at the same step adds its sightings again. Unseen items get min_probability.
  """

  def __init__(self,
               num_buckets: int = 1 << 20,
               num_hashes: int = 4,
               count_multiplicity: bool = False,
               hash_seed: int = 0,
               **kwargs):
    """Builds the sketch (`num_buckets` = H per row, `num_hashes` = m rows)."""
    super().__init__(**kwargs)
    if num_buckets < 1 or num_hashes < 1:
      raise ValueError(f"Need num_buckets, num_hashes >= 1, got {num_buckets}, "
                       f"{num_hashes}")
    self.num_buckets = int(num_buckets)
    self.num_hashes = int(num_hashes)
    self.count_multiplicity = bool(count_multiplicity)
    self.hash_seed = int(hash_seed)
    self._keys = hashing.hash_keys(self.hash_seed, self.num_hashes)
    # [m, H] row-major, stored flat: 1-D scatters are ~4x faster than scatter_nd.
    self.counts = self.add_weight(
        name="counts", shape=(self.num_hashes * self.num_buckets,), dtype=tf.int64,
        trainable=False, initializer="zeros")

  @property
  def memory_bytes(self) -> int:
    return self.num_hashes * self.num_buckets * _COUNTER_BYTES

  def _cells(self, item_ids: tf.Tensor) -> tf.Tensor:
    """The [m, N] indices of string ids [N] into the flat state."""
    return hashing.cells(item_ids, self.num_buckets, self._keys)

  def _update_and_estimate(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    unique_ids, id_index = tf.unique(item_ids, out_idx=tf.int64)
    if self.count_multiplicity:
      increments = tf.math.unsorted_segment_sum(
          tf.ones_like(id_index), id_index, tf.size(unique_ids, out_type=tf.int64))
    else:
      increments = tf.ones_like(unique_ids, tf.int64)
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

  def stats(self) -> Mapping[str, tf.Tensor]:
    """Adds bucket occupancy (fraction of non-zero counters)."""
    occupancy = tf.reduce_mean(tf.cast(self.counts > 0, tf.float32))
    return {**super().stats(), "occupancy": occupancy}

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(num_buckets=self.num_buckets, num_hashes=self.num_hashes,
                  count_multiplicity=self.count_multiplicity,
                  hash_seed=self.hash_seed)
    return config
