"""The paper's frequency-estimation simulation (Yi et al. 2019, section 6.1), in TF.

A stream of batches of `batch_size` item ids is drawn from M items with
q_i proportional to i^power (0-indexed), optionally switching to the mirrored
distribution (M - 1 - i)^power at `switch_step`. Estimator layers are fed the ids
at steps 1, 2, ... through their own `call`, and every `eval_every` steps their
`estimate` of every item is scored against the paper's target p_i = batch_size * q_i
with error = sum_i |p_hat_i - p_i| / (2 * batch_size).

Batches are drawn without replacement by default, as in the paper (Gumbel top-k,
i.e. successive sampling proportional to q); then no item repeats within a batch,
and an item's true inclusion probability is somewhat below batch_size * q_i for
the most popular items, an error floor that the paper's target carries.
`replace=True` draws with replacement, where popular items repeat in a batch.

The whole run is one `tf.function` with a `tf.while_loop` over steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from estimators import base


@dataclasses.dataclass(frozen=True)
class Stream:
  """A synthetic stream: M items with power-law q that may mirror at `switch_step`."""
  num_items: int = 1000
  batch_size: int = 128
  num_steps: int = 20000
  switch_step: int | None = 10000
  power: float = 2.0
  replace: bool = False
  seed: int = 0

  def probabilities(self, switched: bool = False) -> np.ndarray:
    """q over the items before (or after) the switch, float64 [M]."""
    ranks = np.arange(self.num_items, dtype=np.float64)
    if switched:
      ranks = ranks[::-1]
    weights = ranks ** self.power
    return weights / weights.sum()

  def targets(self, switched: bool = False) -> np.ndarray:
    """The paper's target p_i = batch_size * q_i."""
    return self.batch_size * self.probabilities(switched)

  def item_ids(self) -> tf.Tensor:
    return tf.strings.as_string(tf.range(self.num_items), width=5, fill="0")


def l1_error(p_hat: tf.Tensor, p: tf.Tensor, batch_size: int) -> tf.Tensor:
  """The paper's error: sum_i |p_hat_i - p_i| / (2 * batch_size)."""
  return tf.reduce_sum(tf.abs(p_hat - p)) / (2.0 * batch_size)


def _sample(logits: tf.Tensor, batch_size: int, replace: bool,
            seed: tf.Tensor) -> tf.Tensor:
  """Item indices [batch_size] drawn from softmax(logits)."""
  if replace:
    return tf.random.stateless_categorical(
        logits[tf.newaxis], batch_size, seed, dtype=tf.int32)[0]
  uniform = tf.random.stateless_uniform(
      tf.shape(logits), seed, minval=1e-20, maxval=1.0, dtype=tf.float64)
  gumbel = -tf.math.log(-tf.math.log(uniform))
  return tf.math.top_k(logits + gumbel, k=batch_size, sorted=False).indices


def simulate(stream: Stream,
             estimators: Sequence[base.FrequencyEstimator],
             eval_every: int = 1) -> np.ndarray:
  """Feeds `stream` to every estimator; returns errors [E, num_steps // eval_every].

  Column k holds the errors after step (k + 1) * eval_every. Estimators must be
  fresh (never called) and are left holding the final state.
  """
  if stream.batch_size > stream.num_items and not stream.replace:
    raise ValueError("batch_size > num_items needs replace=True")
  with np.errstate(divide="ignore"):
    logits = [tf.constant(np.log(stream.probabilities(s)), tf.float64)
              for s in (False, True)]
  targets = [tf.constant(stream.targets(s), tf.float32) for s in (False, True)]
  ids = stream.item_ids()
  switch = stream.switch_step or stream.num_steps + 1
  num_evals = stream.num_steps // eval_every

  @tf.function
  def run() -> tf.Tensor:
    errors = tf.TensorArray(tf.float32, size=num_evals)
    for step in tf.range(1, stream.num_steps + 1, dtype=tf.int64):
      switched = step >= switch
      batch = _sample(tf.where(switched, logits[1], logits[0]), stream.batch_size,
                      stream.replace, tf.stack([tf.constant(stream.seed, tf.int64),
                                                step]))
      batch_ids = tf.gather(ids, batch)
      for estimator in estimators:
        estimator(batch_ids, step)
      if step % eval_every == 0:
        target = tf.where(switched, targets[1], targets[0])
        errors = errors.write(
            tf.cast(step // eval_every - 1, tf.int32),
            tf.stack([l1_error(e.estimate(ids), target, stream.batch_size)
                      for e in estimators]))
    return tf.transpose(errors.stack())

  return run().numpy()


def run_seeds(stream: Stream,
              make_estimators: Callable[[int], Sequence[base.FrequencyEstimator]],
              seeds: Sequence[int],
              eval_every: int = 1) -> np.ndarray:
  """Runs `simulate` once per seed (stream seed and hash seed); [seeds, E, T']."""
  return np.stack([
      simulate(dataclasses.replace(stream, seed=seed), make_estimators(seed),
               eval_every) for seed in seeds
  ])
