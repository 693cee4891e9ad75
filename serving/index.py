"""Nearest-neighbour search over the item embeddings: ScaNN, its exact twin, recall.

The ScaNN index (`ScannIndex`) is a ScaNN searcher over the embeddings, built with
ScaNN's TF ops and returning row numbers into the corpus; the servable maps rows
to item ids. Its parameters come from the corpus size (`scann_params`) and are
verified against exact search on held-out queries (`tune_scann`): when recall@10
falls short, the search is widened and the index rebuilt, and the export fails if
even the widest setting misses the bar.

Two properties of the ScaNN op shape the parameters here:
  * with reordering, a search returns at most `num_reordering_candidates`
    neighbours, whatever `k` asks for, so that count is kept above the most
    neighbours a servable will ever fetch (`max_fetch`);
  * a search returns only points of the leaves it searched. `ScannIndex`
    therefore searches, for a request of k, at least as many leaves as it takes
    for any choice of leaves to hold k points, so k real neighbours come back
    for every k up to `num_reordering_candidates` (and the corpus size). Wider
    requests are narrower than k and padded with NaN scores (and row 0), which
    callers must mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional
import uuid

from absl import logging
import numpy as np
from scann.scann_ops.py import scann_ops
import tensorflow as tf
import tensorflow_recommenders as tfrs

RECALL_K = 10
# Rebuilds tried after the first index before the export gives up.
MAX_RETUNES = 4
# Queries per exact-search block: bounds the [queries, corpus] score matrix.
_EXACT_QUERY_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class ScannParams:
  """The knobs of a ScaNN tree + asymmetric hashing searcher: speed vs recall.

  The hashing is plain product quantization (`score_ah` without an anisotropic
  threshold): with the exact reorder of hundreds of candidates that follows it,
  ScaNN's anisotropic loss (threshold 0.2) left recall@10 unchanged (1.0 on 20k x 64)
  and cost about 20% more build time.
  """
  num_leaves: int
  num_leaves_to_search: int
  num_reordering_candidates: int
  dimensions_per_block: int = 2
  training_iterations: int = 12

  def widened(self, num_items: int) -> "ScannParams":
    """Twice the leaves searched and twice the candidates reordered (capped).

    Missed neighbours sit in leaves not searched or are lost to the hashed
    scores before the exact reorder; widening both fixes either cause.
    """
    return dataclasses.replace(
        self,
        num_leaves_to_search=min(self.num_leaves, 2 * self.num_leaves_to_search),
        num_reordering_candidates=min(num_items, 2 * self.num_reordering_candidates))

  def is_widest(self, num_items: int) -> bool:
    return (self.num_leaves_to_search >= self.num_leaves and
            self.num_reordering_candidates >= num_items)


def scann_params(num_items: int, max_fetch: int) -> ScannParams:
  """ScaNN's rules of thumb, sized to the corpus.

  About sqrt(n) leaves (ScaNN's recommendation for tree partitioning), a tenth of
  them and at least 10 searched (small corpora are searched almost whole), and
  asymmetric hashing (product quantization) with two dimensions per block followed
  by an exact float reorder of the best max(250, 4 * max_fetch) candidates.

  Args:
    num_items: corpus size.
    max_fetch: the most neighbours one query will ask for (k plus exclusions).

  Returns:
    The starting parameters; `tune_scann` checks and widens them.
  """
  if num_items < 1:
    raise ValueError(f"cannot index an empty corpus (num_items={num_items})")
  num_leaves = max(1, min(num_items, int(round(math.sqrt(num_items)))))
  to_search = min(num_leaves, max(10, math.ceil(0.1 * num_leaves)))
  reorder = min(num_items, max(250, 4 * max_fetch))
  return ScannParams(num_leaves, to_search, reorder)


class ScannIndex(tf.Module):
  """A ScaNN searcher over embeddings [n, d] (dot product) that returns row numbers.

  Call it as `index(queries [B, d], k)` -> (scores [B, <=k], rows int32 [B, <=k]);
  k may be a tensor (one value per call). A search covers
  max(num_leaves_to_search, `leaves_for(k)`) leaves: enough that k real
  neighbours come back whenever k <= num_reordering_candidates and k <= n. The
  searcher is kept as ScaNN's tensors (`state`), so a SavedModel that tracks this
  module restores it; loading one needs ScaNN's ops.

  Attributes:
    state: scann_ops.ScannState, the searcher's tensors.
    leaf_cover: int64 variable [num_leaves]: entry i is the fewest points any i + 1
      leaves hold together (the running sum of the leaf sizes, smallest first).
    params: the ScannParams it was built with.
  """

  def __init__(self, embeddings: tf.Tensor, params: ScannParams, k: int,
               name: str = "scann"):
    super().__init__(name=name)
    database = tf.convert_to_tensor(embeddings, tf.float32)
    builder = (scann_ops.builder(database, num_neighbors=k,
                                 distance_measure="dot_product")
               .tree(num_leaves=params.num_leaves,
                     num_leaves_to_search=params.num_leaves_to_search,
                     training_iterations=params.training_iterations)
               .score_ah(dimensions_per_block=params.dimensions_per_block)
               .reorder(params.num_reordering_candidates))
    # A unique shared name: two indexes in one process must not share a searcher.
    self.state = builder.build(shared_name=f"{name}/{uuid.uuid4()}").serialize_to_module()
    tokens = self.state.datapoint_to_token.numpy().astype(np.int64)
    sizes = np.bincount(tokens, minlength=params.num_leaves)
    self.leaf_cover = tf.Variable(np.cumsum(np.sort(sizes)), trainable=False,
                                  name="leaf_cover")
    self.params = params

  def leaves_for(self, k: tf.Tensor) -> tf.Tensor:
    """The leaves to search for k neighbours: int32 scalar."""
    k = tf.reshape(tf.cast(k, tf.int64), [1])
    needed = tf.searchsorted(self.leaf_cover, k, side="left", out_type=tf.int64)[0] + 1
    leaves = tf.clip_by_value(needed, self.params.num_leaves_to_search,
                              tf.shape(self.leaf_cover, out_type=tf.int64)[0])
    return tf.cast(leaves, tf.int32)

  def __call__(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    k = tf.cast(k, tf.int32)
    searcher = scann_ops.searcher_from_module(self.state)
    found = searcher.search_batched_parallel(
        tf.convert_to_tensor(queries, tf.float32), final_num_neighbors=k,
        leaves_to_search=self.leaves_for(k))
    return found.distances, found.indices


def build_scann(embeddings: tf.Tensor, params: ScannParams, k: int) -> ScannIndex:
  """A ScannIndex over `embeddings` [n, d] (dot product) whose default k is `k`.

  Call it as `index(query_embeddings, k=...)` -> (scores, rows); see the module
  docstring for the NaN padding of results wider than the index can answer.
  """
  return ScannIndex(embeddings, params, k)


def exact_top_k_numpy(queries: np.ndarray, embeddings: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact dot-product top k (TFRS BruteForce): (scores [B, k], rows int32 [B, k]).

  Queries go in blocks, so a large corpus never needs a [B, n] score matrix.
  """
  search = tfrs.layers.factorized_top_k.BruteForce(k=k).index(
      tf.constant(embeddings, tf.float32))
  scores, rows = [], []
  for start in range(0, len(queries), _EXACT_QUERY_BLOCK):
    s, r = search(tf.constant(queries[start:start + _EXACT_QUERY_BLOCK], tf.float32))
    scores.append(s.numpy())
    rows.append(r.numpy())
  return np.concatenate(scores), np.concatenate(rows)


def recall_against_exact(approx_rows: np.ndarray, queries: np.ndarray,
                         embeddings: np.ndarray, exact_scores: np.ndarray,
                         k: int) -> float:
  """Recall@k of an approximate top k, tie-aware.

  A returned row counts as a true neighbour when its exact score reaches the k-th
  exact score (less 1e-5 for float error), so items with tied scores (hash
  collisions, duplicate features) are interchangeable. Padding rows (< 0) miss.

  Args:
    approx_rows: int [B, >=k] rows returned by the approximate search.
    queries: [B, d] query embeddings.
    embeddings: [n, d] corpus embeddings.
    exact_scores: [B, >=k] exact top scores, descending.
    k: the cut-off.

  Returns:
    Mean over queries of |true neighbours among the first k returned| / k.
  """
  rows = approx_rows[:, :k]
  valid = rows >= 0
  true_scores = np.einsum("bd,bkd->bk", queries, embeddings[np.where(valid, rows, 0)])
  threshold = exact_scores[:, k - 1:k] - 1e-5
  hits = np.logical_and(valid, true_scores >= threshold)
  return float(hits.sum(axis=1).mean() / k)


def scann_rows(layer: ScannIndex, queries: np.ndarray, k: int) -> np.ndarray:
  """Rows [B, k] found by a ScaNN index, -1 where it found fewer than k."""
  scores, rows = layer(tf.constant(queries, tf.float32), k=k)
  rows = np.where(np.isnan(scores.numpy()), -1, rows.numpy())
  return np.pad(rows, [(0, 0), (0, k - rows.shape[1])], constant_values=-1)


@dataclasses.dataclass(frozen=True)
class TunedScann:
  """A ScaNN index whose recall was measured, with the history of the tuning."""
  layer: ScannIndex
  params: ScannParams
  recall: dict[int, float]
  num_queries: int
  attempts: tuple[dict, ...]


def tune_scann(embeddings: np.ndarray, queries: np.ndarray, k: int, max_fetch: int,
               min_recall: float = 0.95,
               params: Optional[ScannParams] = None) -> TunedScann:
  """Builds a ScaNN index whose recall@10 against exact search meets `min_recall`.

  Starts from `scann_params` (or `params`), measures recall@10 and recall@k on
  `queries`, and widens the search (`ScannParams.widened`) until the bar is met or
  the widest setting, at most MAX_RETUNES times.

  Args:
    embeddings: float32 [n, d] corpus embeddings.
    queries: float32 [m, d] held-out query embeddings (not used to build the index).
    k: the servable's default k; recall is also reported at k.
    max_fetch: the most neighbours one query may ask for.
    min_recall: required recall@10.
    params: starting parameters; default from the corpus size.

  Returns:
    The index and its measured recall ({10: r10, k: rk}).

  Raises:
    ValueError: no queries, or the recall bar is out of reach; the message holds
      every attempt's parameters and recall.
  """
  embeddings = np.asarray(embeddings, np.float32)
  queries = np.asarray(queries, np.float32)
  if len(queries) == 0:
    raise ValueError("measuring the ANN's recall needs at least one held-out query")
  num_items = len(embeddings)
  params = params or scann_params(num_items, max_fetch)
  cutoffs = sorted({min(RECALL_K, num_items), min(k, num_items)})
  exact_scores, _ = exact_top_k_numpy(queries, embeddings, cutoffs[-1])
  attempts = []
  for _ in range(MAX_RETUNES + 1):
    layer = build_scann(embeddings, params, k=min(k, num_items))
    rows = scann_rows(layer, queries, cutoffs[-1])
    recall = {c: recall_against_exact(rows, queries, embeddings, exact_scores, c)
              for c in cutoffs}
    attempts.append({"params": dataclasses.asdict(params),
                     "recall": {str(c): r for c, r in recall.items()}})
    logging.info("ScaNN %s over %d items: recall %s", params, num_items, recall)
    if recall[cutoffs[0]] >= min_recall:
      return TunedScann(layer, params, recall, len(queries), tuple(attempts))
    if params.is_widest(num_items):
      break
    params = params.widened(num_items)
  raise ValueError(
      f"ScaNN recall@{cutoffs[0]} stays below --min_ann_recall={min_recall} on "
      f"{len(queries)} held-out queries over {num_items} items; attempts: {attempts}")
