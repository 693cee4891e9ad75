"""Distillation of the two-tower (the student) from a ranking teacher (issue 16, part 2).

The two-tower cannot see user x item cross features; a ranking model can. With
`ModelConfig.distill_weight` = w > 0 and a teacher, the training loss becomes

  L = L_true + w * L_distill

where L_true is the logQ-corrected, reward-weighted in-batch softmax of
models/retrieval.py and, over the same B rows and C columns (the batch's
candidates, then the uniform negatives if any), with T = `distill_temperature`,
student logits z_ij = <u_i, v_j> / temperature (what serving ranks by), teacher
logits t_ij = teacher.score_pairs(queries, columns) and p_j the column's
sampling probability (the same p as L_true; none without a correction):

  q_ij = softmax_j(t_ij / T - log p_j)         (the soft targets)
  L_distill = -(T^2 / B) sum_i sum_j q_ij log softmax_j(z_ij / T - log p_j)

Columns j != i with row i's positive id are masked out of both softmaxes, as in
L_true (TFRS's RemoveAccidentalHits), and p is clipped to [1e-6, 1] as there.

Cost: the teacher scores B x C pairs per step. The DCN ranker of
models/ranker.py takes about 3.5 us of CPU per pair, the two-tower's whole step
about 45 us per example (bench/distill_cost.py): all B x B pairs at B = 1024
would make a step about 80 times dearer. With `distill_candidates` = K > 0 the
term covers only the first K columns, B x K pairs: each column is an event of
the stream like any other, so they are a sample of the in-batch distribution
(items drawn with probability p) as the whole is, and the same logQ correction
holds; rows past K do not find their positive among them.

Why both sides are logQ-corrected, after the temperature: the in-batch softmax
is a sampled estimate of a softmax over the whole corpus, its columns drawn with
probability p_j, and exp(x_j / T) / p_j is the importance-weighted estimate of
item j's share of that softmax, for the student's x = z and the teacher's x = t
alike. The term then estimates the cross-entropy between the teacher's and the
student's softmaxes over the corpus, which is what serving's full-corpus top-k
needs; an item that comes k times per batch counts about once, not k times.
Correcting the student alone would be wrong: the loss would be lowest at
z_ij = t_ij + log p_j, putting back into the served score the popularity that
the correction takes out of L_true. Correcting neither has the same optimum as
both (the student agreeing with the teacher), but spends the student's limited
capacity on the head of the batch distribution. The correction follows the
temperature (x / T - log p) because the importance weight 1 / p does not depend
on T.

T^2 (Hinton et al. 2015): the gradient of the softened cross-entropy shrinks as
1 / T^2, so scaling by T^2 keeps w's meaning when T changes.

Rows are not weighted by reward: the reward grades the row's positive, which
the teacher has already learned from (its target is the reward); the teacher's
ranking of the row's candidates is as informative for a row whose positive was
skipped. Each row counts once, divided by the batch's rows like L_true.

The teacher is any object with `score_pairs` (`Teacher`); its scores are
constants of the loss (tf.stop_gradient) and it is not tracked by the model, so
its variables are neither trained nor checkpointed with the student's.

Several replicas (models/distribute.py) are refused: the teacher would need the
candidate features of the whole global batch, which are not gathered.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs


# The one-line refusal under several replicas (module docstring).
REPLICAS_UNSUPPORTED = (
    "distillation (distill_weight > 0) runs on one replica only: under several "
    "replicas the teacher would need the global batch's candidate features, which "
    "are not gathered; train with one worker or distill_weight = 0")


@runtime_checkable
class Teacher(Protocol):
  """A ranking model that scores every query against every candidate."""

  def score_pairs(self, query_features: Mapping[str, tf.Tensor],
                  candidate_features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """Raw logits [B, N] of query i (QUERY_FEATURES, [B, ...]) x candidate j
    (CANDIDATE_FEATURES, [N, ...]), in the dense form of models/features.py."""


def distillation_loss(student_logits: tf.Tensor, teacher_logits: tf.Tensor,
                      positive_ids: tf.Tensor, candidate_ids: tf.Tensor,
                      temperature: float,
                      sampling_probability: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Each row's T^2-scaled soft cross-entropy (module docstring), float32 [B].

  Args:
    student_logits: z [B, C], <u, v> / the model's temperature; column i is
      row i's positive when i < C (with `distill_candidates` the columns are
      the first C of the batch's, and later rows' positives are not among them).
    teacher_logits: t [B, C], the teacher's raw scores; no gradient flows into it.
    positive_ids: [B] ids (any dtype) of the rows' positives, and
    candidate_ids: [C] those of the columns: a column j != i with row i's
      positive id is an accidental hit, masked out of row i.
    temperature: T > 0.
    sampling_probability: p [C], or None for no logQ correction.
  """
  rows, columns = tf.shape(student_logits)[0], tf.shape(student_logits)[1]
  teacher_logits = tf.cast(tf.stop_gradient(teacher_logits), student_logits.dtype)
  tf.debugging.assert_equal(
      tf.shape(teacher_logits), tf.shape(student_logits),
      message="teacher.score_pairs must return [queries, candidates] logits")
  hits = tf.logical_and(tf.equal(positive_ids[:, tf.newaxis], candidate_ids[tf.newaxis]),
                        tf.logical_not(tf.eye(rows, columns, dtype=tf.bool)))

  def softened(logits: tf.Tensor) -> tf.Tensor:
    logits = logits / temperature
    if sampling_probability is not None:
      logits = tfrs.layers.loss.SamplingProbablityCorrection()(logits,
                                                                sampling_probability)
    # TFRS's value for a masked logit (RemoveAccidentalHits): finite, so that a
    # zero target times its log-probability stays 0.
    return tf.where(hits, tf.constant(tfrs.layers.loss.MIN_FLOAT, logits.dtype), logits)

  targets = tf.nn.softmax(softened(teacher_logits))
  return temperature ** 2 * tf.nn.softmax_cross_entropy_with_logits(
      labels=targets, logits=softened(student_logits))


class ItemAffinityTeacher(tf.keras.layers.Layer):
  """A teacher from a fixed seed-item x candidate-item table of logits.

  score_pairs(query i, candidate j) = affinity[seed item of i, item of j]; an id
  outside `items` (or absent) scores 0. A teacher for planted worlds (tests,
  benches) and a cheap one from any item-item table (co-visitation counts, say).
  """

  def __init__(self, items: Sequence[str], affinity: np.ndarray, **kwargs):
    """Args: items, the n ids; affinity, [n, n] logits, row = seed, column = item."""
    super().__init__(**kwargs)
    affinity = np.asarray(affinity, np.float32)
    if affinity.shape != (len(items), len(items)):
      raise ValueError(f"affinity must be [{len(items)}, {len(items)}], got "
                       f"{affinity.shape}")
    self.index = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(items), tf.string),
            tf.range(1, len(items) + 1, dtype=tf.int64)), default_value=0)
    # Row and column 0: ids outside `items`.
    self.affinity = self.add_weight(
        name="affinity", shape=(len(items) + 1, len(items) + 1),
        initializer=tf.constant_initializer(np.pad(affinity, [[1, 0], [1, 0]])))

  def score_pairs(self, query_features: Mapping[str, tf.Tensor],
                  candidate_features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    seeds = self.index.lookup(query_features["seed_item_id"])
    items = self.index.lookup(candidate_features["item_id"])
    return tf.gather(tf.gather(self.affinity, seeds), items, axis=1)
