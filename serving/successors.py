"""The pair memory inside a retrieval SavedModel: each seed's counted partners, merged
into a search's results with the bonus the model learned (models/memory.py).

A search over <u, v> alone cannot see the memory's bonus, but only the seed's
partners have one: the best k items by <u, v> / temperature + bonus are among
the search's best k and those partners. `SuccessorTable.merge` scores the
partners, adds the bonus to those the search also found, and keeps the best k
of the union, so a retriever stays exact over what its search returns.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from models import memory as memory_lib
from serving import index as index_lib


class SuccessorTable(tf.Module):
  """Seed key -> its partners' corpus rows and bonuses, in variables reassigned daily.

  Attributes:
    seed_keys: int64 [S], ascending fingerprints of the seeds (models.memory).
    rows: int32 [S, M], each seed's partners as corpus rows (-1: none).
    bonus: float32 [S, M], their logit bonus (0 where none).
  """

  def __init__(self, successors: int, name: str = "successors"):
    super().__init__(name=name)
    self.successors = successors
    self.seed_keys = tf.Variable(np.zeros([0], np.int64), trainable=False,
                                 shape=tf.TensorShape([None]), name="seed_keys")
    self.rows = tf.Variable(np.zeros([0, successors], np.int32), trainable=False,
                            shape=tf.TensorShape([None, None]), name="rows")
    self.bonus = tf.Variable(np.zeros([0, successors], np.float32), trainable=False,
                             shape=tf.TensorShape([None, None]), name="bonus")

  def assign(self, seed_keys: np.ndarray, rows: np.ndarray, bonus: np.ndarray) -> None:
    """Makes `PairMemory.serving_table`'s arrays the table."""
    if rows.shape != bonus.shape or rows.shape != (len(seed_keys), self.successors):
      raise ValueError(f"successor table shapes disagree: {len(seed_keys)} seeds, rows "
                       f"{rows.shape}, bonus {bonus.shape}, {self.successors} per seed")
    self.seed_keys.assign(seed_keys)
    self.rows.assign(rows)
    self.bonus.assign(bonus)

  def partners(self, anchors: tf.Tensor, history: tf.Tensor, item_ids: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """(corpus rows int32 [B, M], -1 for none; bonus [B, M]) of each anchor id,
    leaving out the partners in that row's `history` (as training does; corpus
    `item_ids` name the rows)."""
    keys = memory_lib.fingerprints(anchors)
    size = tf.shape(self.seed_keys)[0]
    at = tf.minimum(tf.searchsorted(self.seed_keys, keys), tf.maximum(size - 1, 0))
    found = tf.logical_and(size > 0, anchors != "")
    found = tf.logical_and(found, tf.equal(tf.gather(tf.pad(self.seed_keys, [[0, 1]]), at),
                                           keys))
    at = tf.where(found, at, size)  # the padding row below
    rows = tf.gather(tf.pad(self.rows, [[0, 1], [0, 0]], constant_values=-1), at)
    bonus = tf.gather(tf.pad(self.bonus, [[0, 1], [0, 0]]), at)
    seen = memory_lib.excluded(tf.gather(item_ids, tf.maximum(rows, 0)), history)
    return tf.where(seen, -1, rows), bonus

  def merge(self, queries: tf.Tensor, anchors: tf.Tensor, history: tf.Tensor,
            scores: tf.Tensor, rows: tf.Tensor, item_ids: tf.Tensor,
            item_embeddings: tf.Tensor, temperature: float, count: tf.Tensor
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """The best `count` of a search's results and the anchors' partners.

    Args:
      queries: [B, d] query embeddings.
      anchors: [B] the queries' anchor ids (models.memory.anchor_ids).
      history: [B, W] the queries' history ids (their partners get no bonus).
      scores, rows: a search's dot products and corpus rows [B, F], NaN for gaps.
      item_ids, item_embeddings: [n] and [n, d], the corpus.
      temperature: what scores are divided by; the bonus is in logit units.
      count: how many to return.

    Returns:
      (scores [B, <=count] in dot-product units, bonus times temperature added;
      corpus rows int32), best first, NaN scores marking gaps.
    """
    partner_rows, bonus = self.partners(anchors, history, item_ids)
    bonus = bonus * temperature
    gap = tf.math.is_nan(scores)
    # [B, F, M]: a gap's row is any row, and must not stand for a partner.
    same = tf.logical_and(tf.equal(rows[:, :, tf.newaxis], partner_rows[:, tf.newaxis, :]),
                          tf.logical_not(gap)[:, :, tf.newaxis])
    found = tf.where(gap, float("-inf"), scores)
    found += tf.reduce_sum(tf.where(same, bonus[:, tf.newaxis, :], 0.0), axis=2)
    extra = tf.logical_and(partner_rows >= 0,
                           tf.logical_not(tf.reduce_any(same, axis=1)))
    at = tf.maximum(partner_rows, 0)
    extra_scores = tf.einsum("bd,bmd->bm", queries,
                             index_lib.gather_rows(item_embeddings, at))
    extra_scores = tf.where(extra, extra_scores + bonus, float("-inf"))
    merged = tf.concat([found, extra_scores], 1)
    merged_rows = tf.concat([rows, at], 1)
    top = tf.math.top_k(merged, k=tf.minimum(count, tf.shape(merged)[1]))
    best = tf.where(tf.math.is_inf(top.values), float("nan"), top.values)
    return best, tf.gather(merged_rows, top.indices, batch_dims=1)
