"""The reversed-pair loss on the transition tables (ModelConfig.transition_reverse_weight).

The query tower's seed table S and the candidate tower's item table C give the
factorised score <S[a], C[b]> of "b follows seed a" (models/towers.py), trained
by the main loss on the stream's (seed a_i, item b_i) pairs in their logged
direction only. Co-visitation counts a pair both ways, and on MovieLens its
backward half alone ranks almost as well as its forward half. This term trains
the same tables on each pair reversed, b_i as the seed and a_i as the target,
with an in-batch softmax over the batch's seeds:

  x_ij = <s_i, c_j> / temperature - log p_j,  s_i = S[b_i] / |S[b_i]|,
                                              c_j = C[a_j] / |C[a_j]|
  L_rev = -(1/B) sum_i r_i m_i log softmax_j(x_ij)[i]

with r_i the reward, m_i = 0 for a row without a seed (nothing to reverse), and
columns j != i whose seed equals a_i (accidental hits) or that have no seed
masked out of row i. The vectors are normalised so that the temperature means
what it means in the main loss. p_j is the streaming estimate of a_j's
frequency as an item (read, not updated): a seed is the item logged before, so
it is drawn from about the same distribution, and columns are corrected as in
the main softmax.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs


def reverse_transition_loss(seed_vectors: tf.Tensor, seed_candidate_vectors: tf.Tensor,
                            seed_ids: tf.Tensor, temperature: float,
                            sample_weight: tf.Tensor,
                            probability: Optional[tf.Tensor] = None) -> tf.Tensor:
  """The reversed pairs' softmax loss summed over rows (module docstring).

  Args:
    seed_vectors: [B, d], S[b_i]: the seed table's rows of the batch's items.
    seed_candidate_vectors: [B, d], C[a_j]: the item table's rows of the seeds.
    seed_ids: [B] strings, a_j ("" where a row has no seed).
    temperature: divides the cosine, as in the main loss.
    sample_weight: [B], the rows' rewards.
    probability: [B] sampling probability of each seed as an item, or None (no
      correction); TFRS's correction, which clips it to [1e-6, 1].

  Returns:
    Scalar: the sum over rows (the caller divides by the batch's rows).
  """
  rows = tf.math.l2_normalize(seed_vectors, axis=-1)
  columns = tf.math.l2_normalize(seed_candidate_vectors, axis=-1)
  logits = tf.linalg.matmul(rows, columns, transpose_b=True) / temperature
  if probability is not None:
    logits = tfrs.layers.loss.SamplingProbablityCorrection()(logits, probability)
  index = tf.unique(seed_ids).idx
  present = seed_ids != ""
  same_seed = tf.equal(index[:, tf.newaxis], index[tf.newaxis, :])
  diagonal = tf.eye(tf.shape(logits)[0], dtype=tf.bool)
  masked = tf.logical_or(tf.logical_and(same_seed, tf.logical_not(diagonal)),
                         tf.logical_not(present)[tf.newaxis, :])
  # TFRS's value for a masked logit (RemoveAccidentalHits), as models/distill.py.
  logits = tf.where(masked, tf.constant(tfrs.layers.loss.MIN_FLOAT, logits.dtype), logits)
  log_probs = tf.linalg.diag_part(tf.nn.log_softmax(logits, axis=-1))
  weight = tf.cast(sample_weight, logits.dtype) * tf.cast(present, logits.dtype)
  return -tf.reduce_sum(weight * log_probs)
