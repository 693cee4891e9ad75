"""Diverse top-k by a determinantal point process: fast greedy MAP inference in TF ops.

Chen, Zhang and Zhou, "Fast Greedy MAP Inference for Determinantal Point Process
to Improve Recommendation Diversity" (NeurIPS 2018), Algorithm 1, batched over
queries, in stock TensorFlow ops (a While loop of elementwise ops, Sum, Gather
and ArgMax: a SavedModel that uses it loads in stock TF Serving).

The kernel. For the N candidates of one query, with model scores s_i (the
retriever's <u, v_i> / temperature, plus any boost b_i) and L2-normalised item
embeddings v_i, similarity S_ij = <v_i, v_j> and relevance r_i = exp(alpha s_i),

  L = diag(r) S diag(r),   alpha = theta / (2 (1 - theta)),   theta in [0, 1],

Chen et al.'s trade-off (their section 4.1): log det L_Y = (theta sum_Y s_i +
(1 - theta) log det S_Y) / (1 - theta), so the greedy MAP of L maximises

  f(Y) = theta * sum_{i in Y} s_i + (1 - theta) * log det S_Y.

This module maximises f directly: the incremental Cholesky factor is that of S,
which does not depend on the scores, and the gain of adding item i to Y is
theta s_i + (1 - theta) log d_i^2, where d_i^2 = det S_{Y+i} / det S_Y is the
squared distance of v_i from the span of the items chosen. Same choices as
Algorithm 1 on L for every theta < 1, with no exp(alpha s) to overflow.
At theta = 0.5, L_ii = exp(s_i): the kernel's quality is the model's
(unnormalised) softmax probability of the item.

The extremes, exactly:
  theta = 1: f is the sum of scores; the result is the k best-scored candidates,
    best first (ties: the earlier column), duplicates included: the plain top k.
  theta = 0: f is log det S_Y; scores and boosts are ignored (but for making a
    non-finite one invalid), except that every candidate ties at the first step
    and a tie goes to the earlier column, so the first item is the first valid
    column (the retriever's best).

Stopping early. For theta < 1 an item whose d_i^2 <= epsilon (its embedding lies
within sqrt(epsilon) of the span of those chosen: det S_{Y+i} is numerically 0,
f would be -inf) cannot be chosen; when no candidate can, the row stops and the
rest of its k slots are padded with index -1 (and log-det increment -inf). With
more than d (the embedding width) items asked, every row stops at d at most,
since S has rank d. theta = 1 stops only when the valid candidates run out.
(Chen et al. stop when d^2 of L falls below epsilon; on S the rule is the same
for every theta and every scale of scores.)

Cost: O(k N (d + k)) per query: each of the k steps computes one row of S
(N x d) and updates the Cholesky factor (N x k), as Algorithm 1's O(k^2 N) plus
the kernel rows it is given.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import tensorflow as tf

# Residual d_i^2 at or below which a candidate adds nothing (float32 residuals after
# tens of steps carry errors near 1e-6; an item within 0.01 of the span is a duplicate).
DEFAULT_EPSILON = 1e-4


class Selection(NamedTuple):
  """What `greedy_map` chose, per query row.

  Attributes:
    indices: int32 [B, k], columns of the candidates in the order chosen; -1 pads
      a row that stopped early (or ran out of valid candidates).
    log_det_increments: float32 [B, k], log d^2 = log det S_{Y_t} - log det
      S_{Y_t-1} of each choice (their running sum is log det S of the prefix);
      -inf where padded (and for a theta = 1 pick that duplicates earlier ones).
  """
  indices: tf.Tensor
  log_det_increments: tf.Tensor


def greedy_map(embeddings: tf.Tensor, scores: tf.Tensor, k: tf.Tensor, theta: tf.Tensor,
               valid: Optional[tf.Tensor] = None, boosts: Optional[tf.Tensor] = None,
               epsilon: float = DEFAULT_EPSILON) -> Selection:
  """Greedy MAP of the DPP above, for each row of a batch of candidate lists.

  Args:
    embeddings: float [B, N, d], the candidates' item embeddings (normalised here;
      an all-zero row spans nothing and is never chosen for theta < 1).
    scores: float [B, N], the model's scores of the candidates (relevance).
    k: int scalar >= 0, the items to choose per row.
    theta: float scalar in [0, 1], the trade-off (0: diversity only, 1: relevance
      only; see the module docstring). Not checked here; callers check requests.
    valid: bool [B, N], candidates that may be chosen (None: all). Candidates with
      a non-finite score (after boosts) are never chosen.
    boosts: float [B, N], added to the scores (None: none): a boost b multiplies
      the item's relevance r_i by exp(alpha b) (its L_ii by exp(2 alpha b)).
    epsilon: the d^2 at or below which a candidate adds nothing (> 0).

  Returns:
    The Selection, [B, k] each.
  """
  if not epsilon > 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}")
  scores = tf.convert_to_tensor(scores, tf.float32)
  if boosts is not None:
    scores = scores + tf.convert_to_tensor(boosts, tf.float32)
  embeddings = tf.convert_to_tensor(embeddings, tf.float32)
  k = tf.convert_to_tensor(k, tf.int32)
  theta = tf.convert_to_tensor(theta, tf.float32)
  valid = tf.math.is_finite(scores) if valid is None else tf.logical_and(
      tf.convert_to_tensor(valid, tf.bool), tf.math.is_finite(scores))
  # One more column, never valid, so that a row of no candidates has an argmax.
  scores = tf.pad(scores, [[0, 0], [0, 1]])
  valid = tf.pad(valid, [[0, 0], [0, 1]], constant_values=False)
  embeddings = tf.pad(embeddings, [[0, 0], [0, 1], [0, 0]])
  batch, width = tf.shape(scores)[0], tf.shape(scores)[1]
  units = tf.math.l2_normalize(embeddings, axis=-1)
  # d_i^2 before any choice is S_ii: exactly 1 (so every candidate ties), 0 for a
  # zero embedding.
  residual = tf.cast(tf.reduce_any(tf.not_equal(embeddings, 0.0), axis=-1), tf.float32)
  # theta s_i while i may be chosen, -inf once chosen or if invalid.
  relevance = tf.where(valid, theta * scores, float("-inf"))
  spread = 1.0 - theta
  # log d_i^2 of a candidate that spans nothing new: -inf (never chosen) for
  # theta < 1; 0 at theta = 1, where spread * log d_i^2 vanishes.
  floor = tf.where(theta >= 1.0, 0.0, float("-inf"))

  def step(t: tf.Tensor, residual: tf.Tensor, relevance: tf.Tensor, factor: tf.Tensor,
           indices: tf.TensorArray, increments: tf.TensorArray) -> tuple:
    """Choice t: the best gain, then one Cholesky column (factor: [B, t, N])."""
    spans = residual > epsilon
    gain = relevance + spread * tf.where(spans, tf.math.log(tf.maximum(residual, epsilon)),
                                         floor)
    best = tf.argmax(gain, axis=1, output_type=tf.int32)
    live = tf.gather(gain, best, batch_dims=1) > float("-inf")
    best_residual = tf.gather(residual, best, batch_dims=1)
    indices = indices.write(t, tf.where(live, best, -1))
    increments = increments.write(
        t, tf.where(live, tf.math.log(tf.maximum(best_residual, 0.0)), float("-inf")))
    relevance = tf.where(tf.one_hot(best, width, on_value=True, off_value=False),
                         float("-inf"), relevance)
    # Algorithm 1: e_i = (S_ji - <c_j, c_i>) / d_j; c_i gets e_i; d_i^2 -= e_i^2.
    # A pick that spans nothing new (theta = 1 only) leaves them as they are.
    similarity = tf.reduce_sum(
        units * tf.gather(units, best, batch_dims=1)[:, tf.newaxis, :], axis=2)
    projected = tf.reduce_sum(
        factor * tf.gather(factor, best, axis=2, batch_dims=1)[:, :, tf.newaxis], axis=1)
    scale = tf.where(best_residual > epsilon, tf.math.rsqrt(best_residual), 0.0)
    row = (similarity - projected) * scale[:, tf.newaxis]
    return (t + 1, residual - tf.square(row), relevance,
            tf.concat([factor, row[:, tf.newaxis, :]], axis=1), indices, increments)

  # One slot more, written now, so that stacking never meets an empty list (k = 0).
  start = (tf.constant(0), residual, relevance, tf.zeros([batch, 0, width]),
           tf.TensorArray(tf.int32, size=k + 1, element_shape=[None]).write(
               k, tf.fill([batch], -1)),
           tf.TensorArray(tf.float32, size=k + 1, element_shape=[None]).write(
               k, tf.fill([batch], float("-inf"))))
  invariants = (tf.TensorShape([]), tf.TensorShape([None, None]),
                tf.TensorShape([None, None]), tf.TensorShape([None, None, None]),
                tf.TensorShape(None), tf.TensorShape(None))
  _, _, _, _, indices, increments = tf.while_loop(
      lambda t, *_: t < k, step, start, shape_invariants=invariants)
  return Selection(*(tf.transpose(found.stack()[:k]) for found in (indices, increments)))
