"""The paper's streaming frequency estimator (Yi et al. 2019, Algorithms 2 and 3).

For each of m hash rows i there are two arrays of H buckets: A_i (the last global
step the bucket was seen) and B_i (an exponential moving average of the number of
steps between two sightings). On the batch at global step t, every bucket touched
by the batch is updated once:

  B <- (1 - alpha) * B + alpha * (t - A),   A <- t

and an item's probability of appearing in a batch is p(y) = 1 / max_i B_i[h_i(y)].
A hash collision adds another item's sightings to a bucket, which shortens its
gaps, so collisions bias p upwards (over time: just after an item's last
sighting, a collider's long gap can briefly lengthen B); the max over rows picks
the least-collided row. estimators/decayed_count.py is our lower-error
alternative at the same memory (see bench/frequency_simulation.py).

Duplicates. The batch is first reduced to distinct ids (`tf.unique`), then, per
row, to distinct buckets, so a bucket is updated exactly once per step even when
several occurrences (of one item, or of distinct items that collide in that row)
land in it. Feeding every occurrence to a vectorised scatter instead would apply
some arbitrary one of the conflicting writes. A second call at the same step (or
an older one) leaves already-updated buckets alone: a gap of 0 would otherwise
shrink B. Pass each step's whole batch in one call.

Multiplicity (`count_multiplicity=True`). The paper's estimate saturates at 1: an
item in every batch has B = 1 whether it appears once or 40 times per batch
(TFRS issue #635), while the logQ correction of an in-batch softmax needs the
expected count. With this option the c occurrences of a bucket at step t are read
as c sightings spread evenly over the elapsed (t - A] steps, i.e. c EMA updates
with gap (t - A) / c:

  B <- (1 - alpha)^c * B + (1 - (1 - alpha)^c) * (t - A) / c

which is the paper's update for c = 1 and makes 1 / B estimate the expected
count per batch. `max_probability` must then be raised above 1 for counts above 1
to show; by default p is clipped to (0, 1] as the design requires.

Initialisation (`init`). A starts at "never seen" and B at `initial_gap` (the
paper's B = 100), so an item never seen gets p = 1 / initial_gap. At the first
sighting of a bucket the elapsed gap is unknown; the options are
  "paper":     the gap is counted from the estimator's first step (the paper's
               A = 0), then the usual EMA update;
  "first_gap": B is set to that gap outright ("B = t at first sight"), which is an
               unbiased one-sample estimate for an item present from the start;
  "prior":     the gap is taken to be `initial_gap`, so only the clock starts.
For items that enter a long stream late, "paper" and "first_gap" see a huge
first gap and start with a tiny p; "prior" does not.

Staleness (`staleness > 0`). B only changes when a bucket is seen, so an item that
stops appearing keeps its old p. Optionally the estimate uses
max(B, staleness * (now - A)): a gap already longer than B / staleness is evidence
of a lower rate. 0 (the default) is the paper's estimate.
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from estimators import base

INIT_MODES = ("paper", "first_gap", "prior")
_NEVER = -1  # value of A for a bucket never seen


def check_gap_options(alpha: float, initial_gap: float, init: str,
                      staleness: float) -> tuple[float, float, str, float]:
  """Checks the options of Algorithms 2 and 3; returns them as (floats, init)."""
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"alpha must be in (0, 1], got {alpha}")
  if initial_gap <= 0:
    raise ValueError(f"initial_gap must be > 0, got {initial_gap}")
  if init not in INIT_MODES:
    raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
  if staleness < 0:
    raise ValueError(f"staleness must be >= 0, got {staleness}")
  return float(alpha), float(initial_gap), init, float(staleness)


def gap_update(last_seen: tf.Tensor, gap: tf.Tensor, counts: tf.Tensor | None,
               step: tf.Tensor, origin: tf.Tensor, *, alpha: float,
               init: str, initial_gap: float) -> tuple[tf.Tensor, tf.Tensor]:
  """One step of Algorithm 2 for distinct buckets (or ids); returns new (A, B).

  Args:
    last_seen: int64 [...], A of the touched buckets (_NEVER when unseen).
    gap: float32 [...], B of the touched buckets.
    counts: float32 [...], occurrences of each bucket in the batch (>= 1), to
      count them all (multiplicity); None for one sighting per step.
    step: int64 scalar, the global step t.
    origin: int64 scalar, the step before the estimator's first step.
    alpha: EMA rate.
    init: one of INIT_MODES, the treatment of a bucket's first sighting.
    initial_gap: B of an unseen bucket.

  Returns:
    The new A and B. Buckets already updated at `step` (A >= t) keep their values.
  """
  seen = last_seen != _NEVER
  elapsed = tf.cast(step - tf.where(seen, last_seen, origin), gap.dtype)
  if init == "prior":
    elapsed = tf.where(seen, elapsed, tf.cast(initial_gap, gap.dtype))
  if counts is not None:
    keep = tf.pow(1.0 - alpha, counts)
    sample = elapsed / counts
  else:
    keep = tf.fill(tf.shape(gap), tf.cast(1.0 - alpha, gap.dtype))
    sample = elapsed
  if init == "first_gap":
    keep = tf.where(seen, keep, tf.zeros_like(keep))
  new_gap = keep * gap + (1.0 - keep) * sample
  fresh = step > last_seen
  return (tf.where(fresh, tf.fill(tf.shape(last_seen), step), last_seen),
          tf.where(fresh, new_gap, gap))


def gap_probability(last_seen: tf.Tensor, gap: tf.Tensor, now: tf.Tensor, *,
                    staleness: float) -> tf.Tensor:
  """Algorithm 3 for one row: p = 1 / B, optionally discounted by staleness."""
  if staleness > 0:
    since = tf.cast(now - last_seen, gap.dtype)
    gap = tf.where(last_seen != _NEVER, tf.maximum(gap, staleness * since), gap)
  return 1.0 / gap


class StreamingFrequencyEstimator(base.HashedFrequencyEstimator):
  """Hashed streaming estimate of the probability that an item is in a batch.

  State: `last_seen` (A, int64 [m, H]) and `gap` (B, float32 [m, H]), each
  stored flat as [m * H] (row i at [i * H, (i + 1) * H)), plus the first and
  last global steps: non-trainable variables, saved in checkpoints.
  See the module docstring for the update, duplicates, multiplicity,
  initialisation and staleness. Memory is 12 * m * H bytes: 48 MiB at the
  defaults m = 4, H = 2^20.
  """

  def __init__(self,
               num_buckets: int = 1 << 20,
               num_hashes: int = 4,
               alpha: float = 0.01,
               initial_gap: float = 100.0,
               init: str = "paper",
               count_multiplicity: bool = False,
               staleness: float = 0.0,
               hash_seed: int = 0,
               **kwargs):
    """Builds the estimator.

    Args:
      num_buckets: H, buckets per hash row.
      num_hashes: m, independent hash rows.
      alpha: EMA rate in (0, 1]; smaller is smoother but adapts more slowly.
      initial_gap: B of an unseen bucket (> 0); unseen items get 1 / initial_gap.
      init: first-sighting treatment, one of INIT_MODES.
      count_multiplicity: count every occurrence in a batch (expected count).
      staleness: >= 0; if > 0, estimates use max(B, staleness * steps since seen).
      hash_seed: seed of the m hash keys; part of what a checkpoint means.
      **kwargs: min_probability, max_probability, and Layer arguments.
    """
    super().__init__(num_buckets=num_buckets, num_hashes=num_hashes,
                     hash_seed=hash_seed, count_multiplicity=count_multiplicity,
                     **kwargs)
    self.alpha, self.initial_gap, self.init, self.staleness = check_gap_options(
        alpha, initial_gap, init, staleness)
    self.last_seen = self._cell_variable("last_seen", tf.int64, _NEVER)
    self.gap = self._cell_variable("gap", tf.float32, self.initial_gap)

  def _update_and_estimate(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    unique_ids, id_index, id_counts = self._distinct(item_ids)
    touched = self._touched_cells(unique_ids)
    cell_counts = None
    if self.count_multiplicity:
      cell_counts = touched.reduce(tf.math.unsorted_segment_sum, id_counts)
    new_last_seen, new_gap = gap_update(
        tf.gather(self.last_seen, touched.cells),
        tf.gather(self.gap, touched.cells), cell_counts, step, self._origin(),
        alpha=self.alpha, init=self.init, initial_gap=self.initial_gap)
    self.last_seen.scatter_update(tf.IndexedSlices(new_last_seen, touched.cells))
    self.gap.scatter_update(tf.IndexedSlices(new_gap, touched.cells))
    # Every touched cell was just seen at `step`, so staleness does not apply.
    item_gap = touched.per_item(new_gap)
    return tf.gather(1.0 / tf.reduce_max(item_gap, axis=0), id_index)

  def _estimate(self, item_ids: tf.Tensor) -> tf.Tensor:
    cells = self._cells(item_ids)
    p = gap_probability(tf.gather(self.last_seen, cells),
                        tf.gather(self.gap, cells), self.last_step,
                        staleness=self.staleness)
    return tf.reduce_min(p, axis=0)

  def _occupied(self) -> tf.Tensor:
    return self.last_seen != _NEVER

  def stats(self) -> Mapping[str, tf.Tensor]:
    """Adds the mean B of the buckets ever seen."""
    seen = self._occupied()
    mean_gap = tf.math.divide_no_nan(
        tf.reduce_sum(tf.where(seen, self.gap, 0.0)),
        tf.reduce_sum(tf.cast(seen, tf.float32)))
    return {**super().stats(), "mean_gap": mean_gap}
