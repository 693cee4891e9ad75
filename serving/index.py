"""Nearest-neighbour search over the item embeddings: ScaNN, its exact twin, recall.

The ScaNN index (`ScannIndex`) is a ScaNN searcher over the embeddings, built with
ScaNN's TF ops and returning row numbers into the corpus; the servable maps rows
to item ids. Its parameters come from the corpus size (`scann_params`) and are
verified against exact search on held-out queries (`tune_scann`): when recall@10
falls short, the search is widened (leaves searched and candidates reordered are
settings of each search, so the index is built once), and the export fails if
even the widest setting misses the bar. A servable holds the index it serves in
`ScannVariables`, which take each day's index without tracing anything again.

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

import copy
import dataclasses
import math
from typing import Callable, Optional
import uuid

from absl import logging
import numpy as np
from scann.scann_ops.py import scann_ops
import tensorflow as tf
import tensorflow_recommenders as tfrs

RECALL_K = 10
# Widenings tried after the first search before the export gives up.
MAX_RETUNES = 4
# Queries per exact-search block: bounds the [queries, corpus] score matrix.
_EXACT_QUERY_BLOCK = 64
# ScaNN's serialized searcher (scann_ops.ScannState), in the order of ScaNN's
# ScannToTensors outputs.
STATE_TENSORS = ("scann_config", "serialized_partitioner", "datapoint_to_token",
                 "ah_codebook", "hashed_dataset", "int8_dataset", "int8_multipliers",
                 "dp_norms", "dataset")


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

  def narrowed(self) -> "ScannParams":
    """Half the leaves searched (at least 1), the reorder kept."""
    return dataclasses.replace(self,
                               num_leaves_to_search=max(1, self.num_leaves_to_search // 2))

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


def leaves_for(leaf_cover: tf.Tensor, num_leaves_to_search: tf.Tensor,
               k: tf.Tensor) -> tf.Tensor:
  """The leaves to search for k neighbours: int32 scalar.

  At least `num_leaves_to_search`, and enough that any choice of leaves holds k
  points: `leaf_cover` [num_leaves] is the running sum of the leaf sizes, smallest
  first, so entry i is the fewest points any i + 1 leaves hold together.
  """
  k = tf.reshape(tf.cast(k, tf.int64), [1])
  needed = tf.searchsorted(leaf_cover, k, side="left", out_type=tf.int64)[0] + 1
  leaves = tf.clip_by_value(needed, tf.cast(num_leaves_to_search, tf.int64),
                            tf.shape(leaf_cover, out_type=tf.int64)[0])
  return tf.cast(leaves, tf.int32)


def _parallel(queries: tf.Tensor) -> tf.Tensor:
  """Whether ScaNN spreads the search over threads: for all but single queries
  (handing one query to ScaNN's thread pool made it 8-15% slower at 1M x 64;
  its serial search fails on an empty batch, which the parallel one answers)."""
  return tf.not_equal(tf.shape(queries)[0], 1)


class ScannIndex:
  """A ScaNN searcher over embeddings [n, d] (dot product) that returns row numbers.

  Built in this process (the export builds one a day and measures its recall).
  Call it as `index(queries [B, d], k)` -> (scores [B, <=k], rows int32 [B, <=k]);
  k may be a tensor (one value per call). A search covers
  max(num_leaves_to_search, `leaves_for(k)`) leaves and reorders
  `num_reordering_candidates`, both given to each search (`with_search` changes
  them without building again): k real neighbours come back whenever
  k <= num_reordering_candidates and k <= n. `ScannVariables` holds its `tensors`
  for a servable, which searches them the same way.

  Attributes:
    tensors: the searcher as ScaNN's tensors (`STATE_TENSORS`, in that order).
    leaf_cover: int64 tensor [num_leaves] (see `leaves_for`).
    params: the ScannParams it searches with (its tree and hashing were built with
      the same num_leaves, dimensions_per_block and training_iterations).
  """

  def __init__(self, embeddings: tf.Tensor, params: ScannParams, k: int,
               name: str = "scann"):
    database = tf.convert_to_tensor(embeddings, tf.float32)
    builder = (scann_ops.builder(database, num_neighbors=k,
                                 distance_measure="dot_product")
               .tree(num_leaves=params.num_leaves,
                     num_leaves_to_search=params.num_leaves_to_search,
                     training_iterations=params.training_iterations)
               .score_ah(dimensions_per_block=params.dimensions_per_block)
               .reorder(params.num_reordering_candidates))
    # A unique shared name: two indexes in one process must not share a searcher.
    self._searcher = builder.build(shared_name=f"{name}/{uuid.uuid4()}")
    self.tensors = tuple(scann_ops.scann_to_tensors(self._searcher.searcher_handle))
    tokens = self.tensors[STATE_TENSORS.index("datapoint_to_token")].numpy()
    sizes = np.bincount(tokens.astype(np.int64), minlength=params.num_leaves)
    self.leaf_cover = tf.constant(np.cumsum(np.sort(sizes)), tf.int64)
    self.params = params

  def with_search(self, params: ScannParams) -> "ScannIndex":
    """This index searching with `params`' leaves and reorder count (no new build).

    Raises:
      ValueError: `params` differs in what the build fixed.
    """
    built = dataclasses.replace(params, num_leaves_to_search=0,
                                num_reordering_candidates=0)
    if built != dataclasses.replace(self.params, num_leaves_to_search=0,
                                    num_reordering_candidates=0):
      raise ValueError(f"{params} needs a new build of the index built with {self.params}")
    searching = copy.copy(self)
    searching.params = params
    return searching

  def leaves_for(self, k: tf.Tensor) -> tf.Tensor:
    """The leaves to search for k neighbours: int32 scalar."""
    return leaves_for(self.leaf_cover, self.params.num_leaves_to_search, k)

  def __call__(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    k = tf.cast(k, tf.int32)
    queries = tf.convert_to_tensor(queries, tf.float32)
    found = scann_ops.scann_search_batched(
        self._searcher.searcher_handle, queries, k, self.params.num_reordering_candidates,
        self.leaves_for(k), _parallel(queries))
    return found.distances, found.indices


@dataclasses.dataclass(frozen=True)
class _Held:
  """Functions kept off a tf.Module's tracked attributes (SavedModel children)."""
  recreate_handle: Callable[[], tf.Tensor]


class ScannVariables(tf.Module):
  """A ScaNN searcher kept in variables, reassigned with each day's index (`assign`).

  A servable tracks it, so its SavedModel holds the searcher (loading one needs
  ScaNN's ops), and the same module, traced once, serves every day's corpus: the
  variables take any shape. In a graph, `self(queries, k)` searches as
  `ScannIndex` does. ScaNN keeps a float copy of the corpus for the reorder; when
  it is the corpus embeddings themselves (it is for the dot product), the
  servable's `embeddings` variable is that copy and `state["dataset"]` is empty,
  so a SavedModel holds the floats once. ScaNN's TensorsToScann kernel builds its
  searcher on its first run and keeps it: a process (a loaded SavedModel) searches
  the index it first ran with, so search a saved and loaded copy, never this live
  object after an `assign`.

  Attributes:
    state: ScaNN's tensors by name (STATE_TENSORS), variables of any shape.
    embeddings: the corpus embeddings [n, d] (a variable the caller assigns).
    leaf_cover: int64 variable [num_leaves] (see `leaves_for`).
    search: int32 variable [2]: the fewest leaves a search covers, and the
      candidates it reorders.
  """

  def __init__(self, index: ScannIndex, embeddings: tf.Variable, name: str = "scann"):
    super().__init__(name=name)
    self.embeddings = embeddings
    self.state = {key: tf.Variable(value, trainable=False, shape=tf.TensorShape(None),
                                   name=key)
                  for key, value in zip(STATE_TENSORS, index.tensors)}
    self.leaf_cover = tf.Variable(index.leaf_cover, trainable=False,
                                  shape=tf.TensorShape([None]), name="leaf_cover")
    self.search = tf.Variable([0, 0], trainable=False, dtype=tf.int32, name="search")
    # One function that every signature calls, so a loaded SavedModel builds one
    # searcher; held outside the tracked attributes, so that only the signatures
    # that call it save it.
    self._held = _Held(tf.function(self._recreate_handle, input_signature=[]))
    self.assign(index)

  def assign(self, index: ScannIndex) -> None:
    """Makes `index` the searcher (takes effect in SavedModels written after).

    Assign the corpus embeddings it was built over to `embeddings` first.
    """
    for key, value in zip(STATE_TENSORS, index.tensors):
      if key == "dataset" and _same(value, self.embeddings):
        value = tf.zeros([0], tf.float32)
      self.state[key].assign(value)
    self.leaf_cover.assign(index.leaf_cover)
    self.search.assign([index.params.num_leaves_to_search,
                        index.params.num_reordering_candidates])

  def _recreate_handle(self) -> tf.Tensor:
    """The searcher built from the variables (ScaNN builds it once per kernel)."""
    state = self.state
    dataset = tf.cond(tf.size(state["dataset"]) > 0, state["dataset"].read_value,
                      self.embeddings.read_value)
    return scann_ops.tensors_to_scann(
        dataset, state["scann_config"], state["serialized_partitioner"],
        state["datapoint_to_token"], state["ah_codebook"], state["hashed_dataset"],
        state["int8_dataset"], state["int8_multipliers"], state["dp_norms"])

  def __call__(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    k = tf.cast(k, tf.int32)
    queries = tf.convert_to_tensor(queries, tf.float32)
    found = scann_ops.scann_search_batched(
        self._held.recreate_handle(), queries, k, self.search[1],
        leaves_for(self.leaf_cover, self.search[0], k), _parallel(queries))
    return found.distances, found.indices


def gather_rows(corpus: tf.Variable, rows: tf.Tensor) -> tf.Tensor:
  """corpus[rows], gathered from the variable's value.

  Not `tf.gather(corpus, rows)`: a sparse read of a resource variable
  (ResourceGather) switches it to copy-on-read for good, and every dense read
  after it (the exact search's matmul, ScaNN's searcher input) then copies the
  whole corpus: 256 MB at 1M x 64, 38 -> 112 ms a query measured.
  """
  return tf.gather(tf.convert_to_tensor(corpus), rows)


def _same(tensor: tf.Tensor, variable: tf.Variable) -> bool:
  """Whether `tensor` holds exactly the value of `variable`."""
  value = variable.read_value()
  return (tensor.dtype == value.dtype and tensor.shape == value.shape and
          bool(tf.reduce_all(tf.equal(tensor, value))))


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
               params: Optional[ScannParams] = None,
               narrow_tolerance: Optional[float] = None) -> TunedScann:
  """Builds a ScaNN index whose recall@10 against exact search meets `min_recall`.

  Starts from `scann_params` (or `params`), measures recall@10 and recall@k on
  `queries`, and widens the search (`ScannParams.widened`) until the bar is met or
  the widest setting, at most MAX_RETUNES times. With `narrow_tolerance`, it then
  halves the leaves searched (`ScannParams.narrowed`) while recall@10 and recall@k
  both stay within `narrow_tolerance` of the setting that met the bar (and
  recall@10 above the bar), at most MAX_RETUNES times: a single query's search
  scans about that many fewer points (most of a query's cost at 1M items), at the
  same measured recall.

  Args:
    embeddings: float32 [n, d] corpus embeddings.
    queries: float32 [m, d] held-out query embeddings (not used to build the index).
    k: the servable's default k; recall is also reported at k.
    max_fetch: the most neighbours one query may ask for.
    min_recall: required recall@10.
    params: starting parameters; default from the corpus size.
    narrow_tolerance: the recall a narrower search may lose (None: keep the
      setting that met the bar).

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
  built = build_scann(embeddings, params, k=min(k, num_items))

  def attempt(params: ScannParams) -> tuple[ScannIndex, dict[int, float]]:
    layer = built.with_search(params)
    rows = scann_rows(layer, queries, cutoffs[-1])
    recall = {c: recall_against_exact(rows, queries, embeddings, exact_scores, c)
              for c in cutoffs}
    attempts.append({"params": dataclasses.asdict(params),
                     "recall": {str(c): r for c, r in recall.items()}})
    logging.info("ScaNN %s over %d items: recall %s", params, num_items, recall)
    return layer, recall

  for _ in range(MAX_RETUNES + 1):
    layer, recall = attempt(params)
    if recall[cutoffs[0]] >= min_recall or params.is_widest(num_items):
      break
    params = params.widened(num_items)
  if recall[cutoffs[0]] < min_recall:
    raise ValueError(
        f"ScaNN recall@{cutoffs[0]} stays below --min_ann_recall={min_recall} on "
        f"{len(queries)} held-out queries over {num_items} items; attempts: {attempts}")
  if narrow_tolerance is not None:
    floor = {c: r - narrow_tolerance for c, r in recall.items()}
    for _ in range(MAX_RETUNES):
      narrower = params.narrowed()
      if narrower == params:
        break
      narrow_layer, narrow_recall = attempt(narrower)
      if (narrow_recall[cutoffs[0]] < min_recall or
          any(narrow_recall[c] < floor[c] for c in cutoffs)):
        break
      params, layer, recall = narrower, narrow_layer, narrow_recall
  return TunedScann(layer, params, recall, len(queries), tuple(attempts))
