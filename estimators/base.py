"""The interface every item-frequency estimator layer shares, and the sketches' base.

An estimator is a stateful `tf.keras.layers.Layer` whose state lives in
non-trainable variables (or lookup tables), so it is saved by `tf.train.Checkpoint`
with the model that owns it. It is driven by the trainer's global step:

  p = estimator(item_ids, step)   # update with the batch at `step`, then estimate
  p = estimator.estimate(item_ids)  # read only

`p` is the estimated probability that an item appears in a batch, float32 with the
shape of `item_ids`, clipped to [min_probability, max_probability] so that the
logQ correction `s - log p` is always finite.

The state must see each step's whole (global) batch once. Under a multi-replica
`tf.distribute` strategy, call the layer inside `strategy.run`, on every replica,
with the ids of the whole global batch (all-gathered, in the same order on every
replica) and the same step, as models/retrieval.py does: the state variables
are mirrored with aggregation NONE, so an update in replica context changes that
replica's own copy only, and every copy then makes the same update and holds the
same state. Called with each replica's own slice instead, the copies drift apart
(each would see B / replicas ids per step). The layer's updates are deterministic
functions of (ids, step), so the copies stay equal bit for bit. State in lookup
tables (estimators/exact.py) is one table per process, which the process's
replicas update in turn: the first update of a step sets it, and a second one
at the same step changes nothing.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, Callable, Mapping

import tensorflow as tf

from estimators import hashing


class FrequencyEstimator(tf.keras.layers.Layer, metaclass=abc.ABCMeta):
  """Base class: `call(item_ids, step)` updates then estimates; `estimate` only reads.

  Subclasses implement `_update_and_estimate(flat_ids, step)` and
  `_estimate(flat_ids)` on rank-1 string tensors; this class handles shapes,
  dtypes, step validation, the clipping of `p`, the reduction of a batch to
  distinct ids (`_distinct`) and `get_config`, which holds every argument of the
  `__init__` of each estimator class, read back from the attribute of that name.

  The global step must be non-negative and should not decrease; a step equal to
  the last one is allowed (see the subclass for what a second update in the same
  step does). The estimator keeps the first and last steps it saw, so that a
  read-only `estimate` knows "now" and counts are normalised by elapsed steps.
  """

  def __init__(self,
               count_multiplicity: bool = False,
               min_probability: float = 1e-6,
               max_probability: float = 1.0,
               **kwargs):
    """Checks the shared arguments and adds the step variables.

    Args:
      count_multiplicity: count every occurrence of an id in a batch, so that p
        estimates the expected count per batch; else one sighting per step.
      min_probability: lower clip of p (> 0), also the p of unseen ids where the
        estimator has no prior.
      max_probability: upper clip of p (>= min_probability); raise it above 1
        for expected counts above 1 to show.
      **kwargs: Layer arguments.
    """
    kwargs.setdefault("trainable", False)
    kwargs.setdefault("dtype", tf.float32)
    super().__init__(**kwargs)
    if not 0.0 < min_probability <= max_probability:
      raise ValueError("Need 0 < min_probability <= max_probability, got "
                       f"{min_probability} and {max_probability}")
    self.count_multiplicity = bool(count_multiplicity)
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

  def _distinct(self, item_ids: tf.Tensor, dtype: tf.DType = tf.float32
               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Reduces a batch of ids [N] to its distinct ids, so each is updated once.

    Returns:
      The distinct ids [U]; the index [N] (int64) of each id among them; and the
      sightings [U] (`dtype`) each distinct id counts for at this step: its
      occurrences in the batch under `count_multiplicity`, else 1.
    """
    unique_ids, id_index = tf.unique(item_ids, out_idx=tf.int64)
    if self.count_multiplicity:
      counts = tf.math.unsorted_segment_sum(
          tf.ones_like(id_index, dtype), id_index, tf.size(unique_ids))
    else:
      counts = tf.ones_like(unique_ids, dtype)
    return unique_ids, id_index, counts

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

  @classmethod
  def arguments(cls) -> tuple[str, ...]:
    """The named `__init__` arguments of this class and its estimator bases.

    These are what the estimator takes beyond the Layer's own (name, dtype, ...).
    """
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
      if issubclass(klass, FrequencyEstimator) and "__init__" in vars(klass):
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
          if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                   parameter.KEYWORD_ONLY):
            names[name] = None
    return tuple(names)

  def get_config(self) -> dict[str, Any]:
    """The Layer's config plus the `__init__` arguments of every estimator class."""
    return {**super().get_config(),
            **{name: getattr(self, name) for name in self.arguments()}}


@dataclasses.dataclass(frozen=True)
class TouchedCells:
  """The cells of the flat state that a batch of distinct ids [U] touches, each once.

  Distinct ids may share a bucket in a row, and a vectorised scatter of several
  writes to one index applies an arbitrary one of them, so the sketches compute
  one new value per distinct cell.

  Attributes:
    item_cells: int64 [m, U], the cell of each id in each row.
    cells: int64 [C], the distinct cells.
    index: int64 [m * U], the position in `cells` of row i, id j at i * U + j.
  """
  item_cells: tf.Tensor
  cells: tf.Tensor
  index: tf.Tensor

  @classmethod
  def of(cls, item_cells: tf.Tensor) -> TouchedCells:
    cells, index = tf.unique(tf.reshape(item_cells, [-1]), out_idx=tf.int64)
    return cls(item_cells, cells, index)

  def reduce(self, segment_op: Callable[..., tf.Tensor],
             item_values: tf.Tensor) -> tf.Tensor:
    """Per-cell `segment_op` (e.g. unsorted_segment_sum) of per-id values [U]: [C]."""
    tiled = tf.tile(item_values, tf.shape(self.item_cells)[:1])
    return segment_op(tiled, self.index, tf.size(self.cells))

  def per_item(self, cell_values: tf.Tensor) -> tf.Tensor:
    """The values [m, U] of each id's cells, from values [C] of `cells`."""
    return tf.reshape(tf.gather(cell_values, self.index), tf.shape(self.item_cells))


class HashedFrequencyEstimator(FrequencyEstimator):
  """Base of the sketches: m hash rows of H buckets, without a vocabulary.

  Each per-bucket state variable is [m, H] row-major, stored flat as [m * H] (row
  i at [i * H, (i + 1) * H)): 1-D scatters are ~4x faster than scatter_nd.
  `_cells` maps ids to their m indices into it under keys derived from
  `hash_seed` (estimators/hashing.py), so a checkpoint is only meaningful to a
  layer built with the same seed. Subclasses add their state with
  `_cell_variable` and say which buckets hold sightings in `_occupied`.
  """

  def __init__(self,
               num_buckets: int = 1 << 20,
               num_hashes: int = 4,
               hash_seed: int = 0,
               **kwargs):
    """Checks the sketch's shape and derives its hash keys.

    Args:
      num_buckets: H, buckets per hash row.
      num_hashes: m, independent hash rows.
      hash_seed: seed of the m hash keys; part of what a checkpoint means.
      **kwargs: count_multiplicity, min_probability, max_probability, and Layer
        arguments.
    """
    super().__init__(**kwargs)
    if num_buckets < 1 or num_hashes < 1:
      raise ValueError(f"Need num_buckets, num_hashes >= 1, got {num_buckets}, "
                       f"{num_hashes}")
    self.num_buckets = int(num_buckets)
    self.num_hashes = int(num_hashes)
    self.hash_seed = int(hash_seed)
    self._keys = hashing.hash_keys(self.hash_seed, self.num_hashes)
    self._bucket_bytes = 0  # grows with each _cell_variable

  def _cell_variable(self, name: str, dtype: tf.DType, initial: float) -> tf.Variable:
    """Adds a non-trainable [m * H] state variable of `dtype`, each cell `initial`."""
    self._bucket_bytes += dtype.size
    return self.add_weight(
        name=name, shape=(self.num_hashes * self.num_buckets,), dtype=dtype,
        trainable=False, initializer=tf.keras.initializers.Constant(initial))

  @property
  def memory_bytes(self) -> int:
    return self.num_hashes * self.num_buckets * self._bucket_bytes

  def buckets(self, item_ids: tf.Tensor) -> tf.Tensor:
    """The [m, N] bucket indices of string ids [N]."""
    return hashing.bucketize(item_ids, self.num_buckets, self._keys)

  def _cells(self, item_ids: tf.Tensor) -> tf.Tensor:
    """The [m, N] indices of string ids [N] into the flat state."""
    return hashing.cells(item_ids, self.num_buckets, self._keys)

  def _touched_cells(self, unique_ids: tf.Tensor) -> TouchedCells:
    """The distinct cells that distinct ids [U] hash to."""
    return TouchedCells.of(self._cells(unique_ids))

  @abc.abstractmethod
  def _occupied(self) -> tf.Tensor:
    """bool [m * H]: the buckets that hold sightings."""

  def stats(self) -> Mapping[str, tf.Tensor]:
    """Adds bucket occupancy, the fraction of the m * H buckets `_occupied`."""
    occupancy = tf.reduce_mean(tf.cast(self._occupied(), tf.float32))
    return {**super().stats(), "occupancy": occupancy}
