"""Exact per-id frequency estimators: the oracles for the hashed sketches.

`ExactFrequencyEstimator` keeps one entry per item id in `MutableHashTable`s (no
hashing, no collisions; memory grows with the number of distinct ids), with two
methods behind the common interface:
  "gap":   the paper's Algorithm 2 per id, the same arithmetic as
           `StreamingFrequencyEstimator` (shared `gap_update`), so without
           collisions the two agree step for step;
  "count": the long-run frequency, sightings / steps elapsed since the first
           step; exact for a stationary stream, slow to follow a shift.
Both count one sighting per id per step unless `count_multiplicity`, as in the
streaming estimator. Unseen ids get 1 / initial_gap ("gap") or min_probability
("count").
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from typing import Any, Mapping  # noqa: E402

import tensorflow as tf  # noqa: E402

from estimators import base  # noqa: E402
from estimators import streaming  # noqa: E402

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
        (used by "gap" only).
      count_multiplicity: count every occurrence of an id in a batch.
      **kwargs: min_probability, max_probability, and Layer arguments.
    """
    super().__init__(**kwargs)
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if init not in streaming.INIT_MODES:
      raise ValueError(f"init must be one of {streaming.INIT_MODES}, got {init!r}")
    if not 0.0 < alpha <= 1.0:
      raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if initial_gap <= 0:
      raise ValueError(f"initial_gap must be > 0, got {initial_gap}")
    self.method = method
    self.alpha = float(alpha)
    self.initial_gap = float(initial_gap)
    self.init = init
    self.count_multiplicity = bool(count_multiplicity)
    self.staleness = float(staleness)
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
    unique_ids, id_index = tf.unique(item_ids, out_idx=tf.int64)
    counts = None
    if self.count_multiplicity:
      counts = tf.math.unsorted_segment_sum(
          tf.ones_like(id_index, tf.float32), id_index, tf.size(unique_ids))
    last_seen = self.last_seen_table.lookup(unique_ids)
    value = self.value_table.lookup(unique_ids)
    if self.method == "gap":
      new_last_seen, new_value = streaming.gap_update(
          last_seen, value, counts, step, self._origin(), alpha=self.alpha,
          init=self.init, initial_gap=self.initial_gap)
      p = 1.0 / new_value
    else:
      fresh = step > last_seen
      increment = tf.ones_like(value) if counts is None else counts
      new_last_seen = tf.where(fresh, tf.fill(tf.shape(last_seen), step), last_seen)
      new_value = value + tf.where(fresh, increment, tf.zeros_like(increment))
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

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(method=self.method, alpha=self.alpha,
                  initial_gap=self.initial_gap, init=self.init,
                  count_multiplicity=self.count_multiplicity,
                  staleness=self.staleness)
    return config
