"""The interface every item-frequency estimator layer shares.

An estimator is a stateful `tf.keras.layers.Layer` whose state lives in
non-trainable variables (or lookup tables), so it is saved by `tf.train.Checkpoint`
with the model that owns it. It is driven by the trainer's global step:

  p = estimator(item_ids, step)   # update with the batch at `step`, then estimate
  p = estimator.estimate(item_ids)  # read only

`p` is the estimated probability that an item appears in a batch, float32 with the
shape of `item_ids`, clipped to [min_probability, max_probability] so that the
logQ correction `s - log p` is always finite.

The state must see each step's whole (global) batch once. Under a multi-replica
`tf.distribute` strategy, call the layer in cross-replica context (outside
`strategy.run`) on the gathered global batch: called inside `strategy.run`, each
replica would update its own mirrored copy with its own slice, and the copies
would drift apart.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import abc  # noqa: E402
from typing import Any, Mapping  # noqa: E402

import tensorflow as tf  # noqa: E402


class FrequencyEstimator(tf.keras.layers.Layer, metaclass=abc.ABCMeta):
  """Base class: `call(item_ids, step)` updates then estimates; `estimate` only reads.

  Subclasses implement `_update_and_estimate(flat_ids, step)` and
  `_estimate(flat_ids)` on rank-1 string tensors; this class handles shapes,
  dtypes, step validation and the clipping of `p`.

  The global step must be non-negative and should not decrease; a step equal to
  the last one is allowed (see the subclass for what a second update in the same
  step does). The estimator keeps the first and last steps it saw, so that a
  read-only `estimate` knows "now" and counts are normalised by elapsed steps.
  """

  def __init__(self,
               min_probability: float = 1e-6,
               max_probability: float = 1.0,
               **kwargs):
    kwargs.setdefault("trainable", False)
    kwargs.setdefault("dtype", tf.float32)
    super().__init__(**kwargs)
    if not 0.0 < min_probability <= max_probability:
      raise ValueError("Need 0 < min_probability <= max_probability, got "
                       f"{min_probability} and {max_probability}")
    self.min_probability = float(min_probability)
    self.max_probability = float(max_probability)
    # -1 means "no step seen yet"; steps themselves are >= 0.
    self.first_step = self._scalar_step_variable("first_step")
    self.last_step = self._scalar_step_variable("last_step")

  def _scalar_step_variable(self, name: str) -> tf.Variable:
    return self.add_weight(
        name=name, shape=(), dtype=tf.int64, trainable=False,
        initializer=tf.keras.initializers.Constant(-1))

  # pylint: disable-next=arguments-differ
  def call(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """Updates the state with the batch `item_ids` seen at global `step`; returns p."""
    item_ids = tf.convert_to_tensor(item_ids, dtype=tf.string)
    step = tf.convert_to_tensor(step)
    if not step.dtype.is_integer:
      raise TypeError(f"step must be an integer tensor, got {step.dtype}")
    step = tf.cast(step, tf.int64)
    step.shape.assert_has_rank(0)
    with tf.control_dependencies([
        tf.debugging.assert_non_negative(step, message="step must be >= 0"),
        tf.debugging.assert_greater_equal(
            step, self.last_step, message="step must not decrease"),
    ]):
      step = tf.identity(step)
    self.first_step.assign(
        tf.where(self.first_step < 0, step, self.first_step))
    flat = tf.reshape(item_ids, [-1])
    p = self._update_and_estimate(flat, step)
    with tf.control_dependencies([p]):
      self.last_step.assign(step)
    return tf.reshape(self._clip(p), tf.shape(item_ids))

  def estimate(self, item_ids: tf.Tensor) -> tf.Tensor:
    """Returns p for `item_ids` (any shape) without changing the state."""
    item_ids = tf.convert_to_tensor(item_ids, dtype=tf.string)
    p = self._estimate(tf.reshape(item_ids, [-1]))
    return tf.reshape(self._clip(p), tf.shape(item_ids))

  def _clip(self, p: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(p, self.min_probability, self.max_probability)

  def _origin(self) -> tf.Tensor:
    """The step before the first one seen: steps elapsed at step t are t - origin."""
    return self.first_step - 1

  @abc.abstractmethod
  def _update_and_estimate(self, item_ids: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """Updates with distinct-aware logic for ids [N] at `step`; returns raw p [N]."""

  @abc.abstractmethod
  def _estimate(self, item_ids: tf.Tensor) -> tf.Tensor:
    """Returns raw (unclipped) p [N] for ids [N], read only."""

  @property
  @abc.abstractmethod
  def memory_bytes(self) -> int:
    """Bytes of estimator state, for comparisons at equal memory."""

  def stats(self) -> Mapping[str, tf.Tensor]:
    """Scalar summaries of the state, e.g. for TensorBoard (cost O(state size))."""
    steps_seen = tf.where(self.first_step < 0, tf.constant(0, tf.int64),
                          self.last_step - self._origin())
    return {"last_step": self.last_step, "steps_seen": steps_seen}

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(min_probability=self.min_probability,
                  max_probability=self.max_probability)
    return config
