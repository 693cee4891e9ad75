"""Exact per-id frequency estimators: the oracles for the hashed sketches.

`ExactFrequencyEstimator` keeps one entry per item id in `MutableHashTable`s (no
hashing, no collisions; memory grows with the number of distinct ids), with two
methods behind the common interface:
  "gap":   the paper's Algorithm 2 per id, the same arithmetic as
           `StreamingFrequencyEstimator` (shared `gap_update` and option
           checks), so without collisions the two agree step for step;
  "count": the long-run frequency, sightings / steps elapsed since the first
           step; exact for a stationary stream, slow to follow a shift.
Both count one sighting per id per step unless `count_multiplicity`, as in the
streaming estimator. Unseen ids get 1 / initial_gap ("gap") or min_probability
("count").
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from estimators import base
from estimators import streaming

METHODS = ("gap", "count")
# Rough per-entry cost of a hash-table entry for `memory_bytes` (key + values).
_ENTRY_BYTES = 48


class ExactFrequencyEstimator(base.FrequencyEstimator):
  """Per-id oracle for the probability that an item appears in a batch."""

  def __init__(self,
               method: str = "count",
               alpha: float = 0.01,
               initial_gap: float = 100.0,
               init: str = "paper",
               count_multiplicity: bool = False,
               staleness: float = 0.0,
               **kwargs):
    """Builds the estimator.

    Args:
      method: "gap" (Algorithm 2 per id) or "count" (sightings / steps).
      alpha, initial_gap, init, staleness: as in StreamingFrequencyEstimator
        (used by "gap" only; "count" refuses an init other than "paper" and a
        staleness, which it could not honour).
      count_multiplicity: count every occurrence of an id in a batch.
      **kwargs: min_probability, max_probability, and Layer arguments.
    """
    super().__init__(count_multiplicity=count_multiplicity, **kwargs)
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    self.method = method
    self.alpha, self.initial_gap, self.init, self.staleness = (
        streaming.check_gap_options(alpha, initial_gap, init, staleness))
    if method == "count" and (self.init != "paper" or self.staleness > 0):
      # alpha and initial_gap have defaults that callers pass on; these two are
      # only ever asked for, and would be ignored.
      raise ValueError(f"init={init!r} and staleness={staleness} apply to method "
                       "'gap' only; method 'count' has neither")
    self.last_seen_table = tf.lookup.experimental.MutableHashTable(
        tf.string, tf.int64, default_value=-1, name="last_seen")
    if method == "gap":
      self.value_table = tf.lookup.experimental.MutableHashTable(
          tf.string, tf.float32, default_value=self.initial_gap, name="gap")
    else:
      self.value_table = tf.lookup.experimental.MutableHashTable(
          tf.string, tf.float32, default_value=0.0, name="count")

  @property
  def memory_bytes(self) -> int:
    """Approximate bytes held (grows with distinct ids); eager only."""
    return int(self.last_seen_table.size()) * _ENTRY_BYTES

  def _update_and_estimate(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    unique_ids, id_index, counts = self._distinct(item_ids)
    last_seen = self.last_seen_table.lookup(unique_ids)
    value = self.value_table.lookup(unique_ids)
    if self.method == "gap":
      new_last_seen, new_value = streaming.gap_update(
          last_seen, value, counts if self.count_multiplicity else None, step,
          self._origin(), alpha=self.alpha, init=self.init,
          initial_gap=self.initial_gap)
      p = 1.0 / new_value
    else:
      fresh = step > last_seen
      new_last_seen = tf.where(fresh, tf.fill(tf.shape(last_seen), step), last_seen)
      new_value = value + tf.where(fresh, counts, tf.zeros_like(counts))
      p = new_value / tf.cast(step - self._origin(), tf.float32)
    self.last_seen_table.insert(unique_ids, new_last_seen)
    self.value_table.insert(unique_ids, new_value)
    return tf.gather(p, id_index)

  def _estimate(self, item_ids: tf.Tensor) -> tf.Tensor:
    value = self.value_table.lookup(item_ids)
    if self.method == "gap":
      return streaming.gap_probability(
          self.last_seen_table.lookup(item_ids), value, self.last_step,
          staleness=self.staleness)
    steps = tf.cast(tf.maximum(self.last_step - self._origin(), 1), tf.float32)
    return value / steps

  def stats(self) -> Mapping[str, tf.Tensor]:
    """Adds the number of distinct ids seen."""
    return {**super().stats(), "distinct_ids": self.last_seen_table.size()}
