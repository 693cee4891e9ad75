"""The exported retrieval model: raw query features in, top-k item ids and scores out.

`ScannRetriever` and `ExactRetriever` are one contract over two searches, so the
two exports are interchangeable for a client. Each SavedModel has the signatures

  serving_default   query features -> item_ids string [B, k], scores float [B, k]
  retrieve          query features, k (int32 scalar), exclude_item_ids string
                    [B, E] -> the best k items not in each row's exclusions
  retrieve_diverse  the inputs of retrieve, plus num_candidates N (int32 scalar,
                    k <= N <= max_k), theta (float32 scalar in [0, 1]),
                    boost_item_ids string [B, M] and boosts float32 [B, M] -> k
                    items of the best N (exclusions dropped) chosen by a DPP's
                    greedy MAP (serving/dpp.py), in the order chosen
  query_embedding   query features -> query_embedding float [B, d]
  candidate_embedding  candidate features -> candidate_embedding float [B, d]

and the attributes `item_ids` [n] and `item_embeddings` [n, d] (variables), the
corpus it searches, for teams that bring their own ANN. Query features are those
of models/features.py (`query_input_signature`): batched, history a string
matrix padded with "". Scores are <u, v> / temperature, the model's own score;
a model with a pair memory (models/memory.py) adds its bonus for the query's
anchor item and each of that item's counted partners, which the SavedModel holds
(`successors`, serving/successors.py) and merges into the search's results.
Where fewer than k items qualify (tiny corpus, everything excluded; for
retrieve_diverse also a row whose DPP stopped early, see serving/dpp.py), the
row is padded with item id "" and score -inf.

Requests are checked in the graph: features whose batch sizes disagree, a k
outside [1, max_k] (retrieve_diverse: not 1 <= k <= num_candidates <= max_k, a
theta outside [0, 1], boosts not finite or not shaped like boost_item_ids), or
per-query inputs without one row per query fail with an InvalidArgumentError
that says so. History wider than the model's `max_history` is cut to its most
recent items, as in training.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.saved_model import fingerprinting_utils  # pylint: disable=g-direct-tensorflow-import

from models import features as features_lib
from models import memory as memory_lib
from serving import dpp
from serving import index as index_lib
from serving import successors as successors_lib

SERVING_DEFAULT = "serving_default"
RETRIEVE = "retrieve"
RETRIEVE_DIVERSE = "retrieve_diverse"
QUERY_EMBEDDING = "query_embedding"
CANDIDATE_EMBEDDING = "candidate_embedding"
SIGNATURES = (SERVING_DEFAULT, RETRIEVE, RETRIEVE_DIVERSE, QUERY_EMBEDDING,
              CANDIDATE_EMBEDDING)


def _retrieve_signature() -> dict[str, tf.TensorSpec]:
  return {
      **features_lib.query_input_signature(),
      "k": tf.TensorSpec([], tf.int32, name="k"),
      "exclude_item_ids": tf.TensorSpec([None, None], tf.string, name="exclude_item_ids"),
  }


def _retrieve_diverse_signature() -> dict[str, tf.TensorSpec]:
  return {
      **_retrieve_signature(),
      "num_candidates": tf.TensorSpec([], tf.int32, name="num_candidates"),
      "theta": tf.TensorSpec([], tf.float32, name="theta"),
      "boost_item_ids": tf.TensorSpec([None, None], tf.string, name="boost_item_ids"),
      "boosts": tf.TensorSpec([None, None], tf.float32, name="boosts"),
  }


def _check_batch(features: Mapping[str, tf.Tensor]) -> tf.Operation:
  """One assertion that every feature has the same batch size (naming them all)."""
  names = sorted(features)
  sizes = tf.stack([tf.shape(features[name], out_type=tf.int32)[0] for name in names])
  return tf.debugging.Assert(
      tf.reduce_all(tf.equal(sizes, sizes[0])),
      [f"request features disagree on the batch size: {', '.join(names)} have", sizes])


def _rows_per_query(request: Mapping[str, tf.Tensor], name: str) -> tf.Operation:
  """An assertion that request[name] has one row per query."""
  rows, queries = tf.shape(request[name])[0], tf.shape(request["user_id"])[0]
  return tf.debugging.Assert(tf.equal(rows, queries), [
      f"{name} must have one row per query; rows:", rows, "queries:", queries])


def _checked(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """`features`, computed only after `_check_batch` passed."""
  with tf.control_dependencies([_check_batch(features)]):
    return {name: tf.identity(value) for name, value in features.items()}


def build_tower(tower: tf.keras.Model, names: Sequence[str]) -> None:
  """Calls `tower`, unless built, once on an all-default example of features `names`.

  Keras makes a layer's variables on its first call. A tower never called (a fresh
  model, one whose embeddings come from elsewhere) would make them while `save`
  traces the signatures, after `Retriever` collected the state it tracks: the
  SavedModel would capture variables it does not hold, and refuse to save.
  """
  if not getattr(tower, "built", False):
    tower(features_lib.default_batch(names), training=False)


@dataclasses.dataclass
class _SavedGraph:
  """The graph of a retriever's first SavedModel (saved_model.pb's bytes), and the
  objects it was written from (their ids, in the order of the object graph)."""
  graph: bytes
  objects: tuple[int, ...]


@dataclasses.dataclass
class _Untracked:
  """Held outside the tracked object graph (see Retriever): the Keras towers, the
  tf.functions of the signatures by signature name, and what `save` reuses."""
  query: tf.keras.Model
  candidate: tf.keras.Model
  functions: dict[str, tf.types.experimental.PolymorphicFunction]
  saved: Optional[_SavedGraph] = None
  checkpoint: Optional[tf.train.Checkpoint] = None


def _state(*models: tf.keras.layers.Layer) -> list[object]:
  """The variables and resources (e.g. lookup tables) of `models`, each once."""
  found = {}
  for model in models:
    for obj in tf.train.TrackableView(model).descendants():
      if isinstance(obj, (tf.Variable, tf.saved_model.experimental.TrackableResource)):
        found[id(obj)] = obj
  return list(found.values())


def _corpus_variable(value: tf.Tensor, name: str) -> tf.Variable:
  """A non-trainable variable of `value`'s rank and any size (a later corpus may
  differ in size). The rank stays known: a MatMul over an operand of unknown rank
  took 25% longer (1 x 64 by 300k x 64)."""
  return tf.Variable(value, trainable=False, shape=tf.TensorShape([None] * value.shape.rank),
                     name=name)


class Retriever(tf.Module):
  """Query tower + a search over a corpus held in variables; subclasses choose the search.

  Made once and kept (serving/exporter.py keeps one per variant across days): the
  signatures are traced once, on the live towers, and each day's corpus is
  assigned to the variables (`update`), so saving again writes that day's
  version without tracing anything. The SavedModel tracks the towers' variables
  and resources, not the Keras models (saving a tracked Keras model also traces
  and writes every layer's Keras call functions, seconds per export that no
  signature uses), and the signatures, not the tf.functions behind them (which
  would be saved a second time, traced again for saving). Towers never called are
  built first (`build_tower`), so that those variables all exist.

  `k` is fixed: serving_default's outputs are [B, k] in the signature. A
  retriever serves a corpus only while min(export k, what the search can
  return) is that k (`serves`); `max_k` and the rest follow each corpus.

  Attributes:
    query_tower, candidate_tower: the towers (Keras models).
    item_ids: string variable [n], the corpus.
    item_embeddings: float32 variable [n, d], the candidate tower's output.
    successors: the pair memory's table (`assign_successors`), or None for a
      model without one.
    k: the number of items `serving_default` returns.
    max_k: the most items one request may ask `retrieve` for (this corpus).
  """

  # Whether a loaded SavedModel of this retriever serves a later corpus once that
  # corpus's variables are restored into it: serving/exporter.py then verifies a
  # new version in the SavedModel it loaded before, instead of loading it again.
  RESTORABLE = True

  def __init__(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
               temperature: float, k: int, max_history: int, name: str,
               successors: int = 0):
    super().__init__(name=name)
    if k < 1:
      raise ValueError(f"need k >= 1, got k={k}")
    build_tower(query_tower, features_lib.QUERY_FEATURES)
    build_tower(candidate_tower, features_lib.CANDIDATE_FEATURES)
    query_signature = [features_lib.query_input_signature()]
    self._keras = _Untracked(query_tower, candidate_tower, {
        SERVING_DEFAULT: tf.function(self._serve, input_signature=query_signature),
        RETRIEVE: tf.function(self._retrieve, input_signature=[_retrieve_signature()]),
        RETRIEVE_DIVERSE: tf.function(self._retrieve_diverse,
                                      input_signature=[_retrieve_diverse_signature()]),
        QUERY_EMBEDDING: tf.function(self._query_embedding,
                                     input_signature=query_signature),
        CANDIDATE_EMBEDDING: tf.function(
            self._candidate_embedding,
            input_signature=[features_lib.candidate_input_signature()]),
    })
    self.tower_state = _state(query_tower, candidate_tower)
    self.item_ids = _corpus_variable(tf.zeros([0], tf.string), "item_ids")
    self.item_embeddings = _corpus_variable(tf.zeros([0, 0], tf.float32),
                                            "item_embeddings")
    # The most items `retrieve` returns, and the most neighbours a search fetches.
    self.limits = tf.Variable([0, 0], trainable=False, dtype=tf.int32, name="limits")
    self.k = k
    self.max_k = 0
    self.temperature = float(temperature)
    self.max_history = max_history
    self.successors = (successors_lib.SuccessorTable(successors) if successors
                       else None)

  @property
  def query_tower(self) -> tf.keras.Model:
    return self._keras.query

  @property
  def candidate_tower(self) -> tf.keras.Model:
    return self._keras.candidate

  @property
  def functions(self) -> dict[str, tf.types.experimental.PolymorphicFunction]:
    """The tf.functions behind the signatures, by signature name."""
    return dict(self._keras.functions)

  def serves(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
             temperature: float, max_history: int, k: int, successors: int = 0) -> bool:
    """Whether this retriever, updated, is the one these arguments would make
    (`k`: serving_default's, the subclass's `serving_k`)."""
    mine = self.successors.successors if self.successors is not None else 0
    return (query_tower is self.query_tower and candidate_tower is self.candidate_tower
            and float(temperature) == self.temperature
            and max_history == self.max_history and k == self.k
            and successors == mine)

  def assign_successors(self, seed_keys: np.ndarray, rows: np.ndarray,
                        bonus: np.ndarray) -> None:
    """Makes the pair memory's table (`PairMemory.serving_table` over this corpus)
    the one merged into searches."""
    if self.successors is None:
      raise ValueError(f"{self.name} was made without a pair memory (successors=0)")
    self.successors.assign(seed_keys, rows, bonus)

  def _assign_corpus(self, item_ids: tf.Tensor, item_embeddings: tf.Tensor, k: int,
                     max_k: int, fetch_limit: int) -> None:
    """Makes `item_ids` [n] and `item_embeddings` [n, d] the corpus."""
    if k != self.k:
      raise ValueError(f"this retriever serves k={self.k}; the corpus of "
                       f"{len(item_ids)} items needs k={k}: make a new one")
    if not 1 <= k <= max_k:
      raise ValueError(f"need 1 <= k <= max_k, got k={k}, max_k={max_k}")
    self.item_ids.assign(tf.convert_to_tensor(item_ids, tf.string))
    self.item_embeddings.assign(tf.convert_to_tensor(item_embeddings, tf.float32))
    self.limits.assign([max_k, fetch_limit])
    self.max_k = max_k

  def _search(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(dot products [B, <=k], corpus rows int32 [B, <=k]), best first; NaN scores
    mark missing results (their rows are any valid row)."""
    raise NotImplementedError

  def _embed_query(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The query tower over checked features, traced into each signature that
    needs it: calling one shared tf.function instead made the SavedModel smaller
    but serving_default 5% slower (a nested call per request)."""
    query = _checked({name: features[name] for name in features_lib.QUERY_FEATURES})
    query["history_item_ids"] = query["history_item_ids"][:, :self.max_history]
    return self.query_tower(query, training=False)

  def _candidates(self, features: Mapping[str, tf.Tensor], count: tf.Tensor
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """`_search`'s (scores, rows) for the query features, merged with the anchor
    item's partners (their bonus added) when the model has a pair memory."""
    queries = self._embed_query(features)
    scores, rows = self._search(queries, count)
    if self.successors is None:
      return scores, rows
    history = features["history_item_ids"][:, :self.max_history]
    return self.successors.merge(
        queries, memory_lib.anchor_ids(features["seed_item_id"], history), history,
        scores, rows, self.item_ids, self.item_embeddings, self.temperature, count)

  def _scores(self, scores: tf.Tensor, ids: tf.Tensor, valid: tf.Tensor
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """Scores / temperature and ids where `valid`, else (-inf, "")."""
    return (tf.where(valid, scores / self.temperature, float("-inf")),
            tf.where(valid, ids, ""))

  def _serve(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """serving_default: the top `k` items for each query.

    A search returns its items best first, so without exclusions they only need
    masking and padding to k.
    """
    scores, rows = self._candidates(features, tf.constant(self.k))
    scores, ids = self._scores(scores, tf.gather(self.item_ids, rows),
                               tf.logical_not(tf.math.is_nan(scores)))
    missing = self.k - tf.shape(scores)[1]
    scores = tf.pad(scores, [[0, 0], [0, missing]], constant_values=float("-inf"))
    ids = tf.pad(ids, [[0, 0], [0, missing]], constant_values="")
    scores.set_shape([None, self.k])
    ids.set_shape([None, self.k])
    return {"item_ids": ids, "scores": scores}

  def _fetch(self, request: Mapping[str, tf.Tensor], count: tf.Tensor
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(scores, item ids, corpus rows) [B, F] of the best `count` items of each query
    not in that row's `exclude_item_ids`, with (-inf, "") where excluded or missing.

    Fetches F = count + E neighbours (at most the search's limit), then drops the
    excluded ones by fingerprint (`excluded`), so the search itself never sees
    the exclusions. Columns are best first, gaps aside.
    """
    exclude = request["exclude_item_ids"]
    fetch = tf.minimum(count + tf.shape(exclude)[1], self.limits[1])
    scores, rows = self._candidates(request, fetch)
    ids = tf.gather(self.item_ids, rows)
    valid = tf.logical_and(tf.logical_not(tf.math.is_nan(scores)),
                           tf.logical_not(memory_lib.excluded(ids, exclude)))
    scores, ids = self._scores(scores, ids, valid)
    return scores, ids, rows

  def _retrieve(self, request: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """retrieve: the top `k` items of each query, leaving out that row's
    `exclude_item_ids`, padded to exactly k with ("", -inf) (`_fetch`)."""
    k, max_k = request["k"], self.limits[0]
    checks = [
        tf.debugging.Assert(k >= 1, ["k must be >= 1, got", k]),
        tf.debugging.Assert(k <= max_k, ["k must be <= max_k =", max_k, ", got", k]),
        _rows_per_query(request, "exclude_item_ids"),
    ]
    with tf.control_dependencies(checks):
      k = tf.identity(k)
    scores, ids, _ = self._fetch(request, k)
    missing = tf.maximum(k - tf.shape(scores)[1], 0)
    scores = tf.pad(scores, [[0, 0], [0, missing]], constant_values=float("-inf"))
    ids = tf.pad(ids, [[0, 0], [0, missing]], constant_values="")
    top = tf.math.top_k(scores, k=k)
    return {"item_ids": tf.gather(ids, top.indices, batch_dims=1), "scores": top.values}

  def _retrieve_diverse(self, request: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """retrieve_diverse: k of each query's best `num_candidates` items (exclusions
    dropped), chosen by the DPP's greedy MAP with trade-off `theta` (serving/dpp.py),
    relevance = the model's scores plus each row's `boosts` of `boost_item_ids`.

    Returns the items in the order chosen, with their model scores (boosts not
    added), padded to k with ("", -inf) where fewer qualify or the DPP stopped.
    """
    k, count, theta = request["k"], request["num_candidates"], request["theta"]
    boost_ids, boosts = request["boost_item_ids"], request["boosts"]
    max_k = self.limits[0]
    checks = [
        tf.debugging.Assert(k >= 1, ["k must be >= 1, got", k]),
        tf.debugging.Assert(k <= count, ["k must be <= num_candidates =", count,
                                         ", got", k]),
        tf.debugging.Assert(count <= max_k, ["num_candidates must be <= max_k =", max_k,
                                             ", got", count]),
        tf.debugging.Assert(tf.logical_and(theta >= 0.0, theta <= 1.0),
                            ["theta must be in [0, 1], got", theta]),
        _rows_per_query(request, "exclude_item_ids"),
        _rows_per_query(request, "boost_item_ids"),
        tf.debugging.Assert(tf.reduce_all(tf.equal(tf.shape(boosts), tf.shape(boost_ids))),
                            ["boosts must have the shape of boost_item_ids; shapes:",
                             tf.shape(boosts), tf.shape(boost_ids)]),
        tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(boosts)),
                            ["boosts must be finite"]),
    ]
    with tf.control_dependencies(checks):
      count = tf.identity(count)
    scores, ids, rows = self._fetch(request, count)
    # The best `count` (exclusions and gaps last), best first.
    top = tf.math.top_k(scores, k=tf.minimum(count, tf.shape(scores)[1]))
    scores, ids, rows = (top.values, tf.gather(ids, top.indices, batch_dims=1),
                         tf.gather(rows, top.indices, batch_dims=1))
    # Column 0 holds the boost of an item not listed: 0.
    column = memory_lib.lookup(ids, boost_ids)[1] + 1
    boost = tf.gather(tf.pad(boosts, [[0, 0], [1, 0]]), column, batch_dims=1)
    chosen = dpp.greedy_map(index_lib.gather_rows(self.item_embeddings, rows), scores, k,
                            theta, boosts=boost)
    picked = chosen.indices >= 0
    at = tf.maximum(chosen.indices, 0)
    return {"item_ids": tf.where(picked, tf.gather(ids, at, batch_dims=1), ""),
            "scores": tf.where(picked, tf.gather(scores, at, batch_dims=1),
                               float("-inf"))}

  def _query_embedding(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """query_embedding: the unit query vectors u; scores are <u, v> / temperature."""
    return {"query_embedding": self._embed_query(features)}

  def _candidate_embedding(self, features: Mapping[str, tf.Tensor]
                           ) -> dict[str, tf.Tensor]:
    """candidate_embedding: the unit item vectors v, e.g. for items not yet indexed."""
    return {"candidate_embedding": self.candidate_tower(_checked(features),
                                                        training=False)}

  def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """The signatures' concrete functions (traced on the first call, then kept)."""
    return {name: function.get_concrete_function()
            for name, function in self._keras.functions.items()}

  def _objects(self) -> tuple[int, ...]:
    """The ids of the objects a SavedModel of this retriever holds."""
    return tuple(id(obj) for obj in tf.train.TrackableView(self).descendants())

  def save(self, export_dir: str) -> None:
    """Writes the SavedModel (all signatures, the corpus assigned last) to `export_dir`.

    The first save is tf.saved_model.save. Later ones write only what changed, the
    variables (tf.train.Checkpoint of this object: the keys and values save
    writes), beside the first save's saved_model.pb: the signatures are traced
    once and the objects are the same, so the graph is too, while saving it again
    cost 3x the time of writing the variables (it re-traces the signature
    wrappers and the checkpoint's functions).
    """
    saved, objects = self._keras.saved, self._objects()
    if saved is None or saved.objects != objects:
      tf.saved_model.save(self, export_dir, signatures=self.signatures(),
                          options=self.save_options())
      with tf.io.gfile.GFile(_graph_path(export_dir), "rb") as f:
        self._keras.saved = _SavedGraph(f.read(), objects)
      return
    if self._keras.checkpoint is None:
      self._keras.checkpoint = tf.train.Checkpoint(root=self)
    write_saved_model(export_dir, saved.graph, self._keras.checkpoint)

  def save_options(self) -> tf.saved_model.SaveOptions:
    return tf.saved_model.SaveOptions()


def _graph_path(export_dir: str) -> str:
  return os.path.join(export_dir, "saved_model.pb")


def write_saved_model(export_dir: str, graph: bytes, checkpoint: tf.train.Checkpoint
                      ) -> None:
  """Writes a SavedModel from its graph (saved_model.pb's bytes) and the checkpoint
  of its root object, in tf.saved_model.save's order: variables, then the graph
  (a complete saved_model.pb marks a complete SavedModel), then its fingerprint."""
  tf.io.gfile.makedirs(os.path.join(export_dir, "assets"))
  checkpoint.write(os.path.join(export_dir, "variables", "variables"))
  with tf.io.gfile.GFile(_graph_path(export_dir), "wb") as f:
    f.write(graph)
  fingerprinting_utils.write_fingerprint(export_dir)


class ExactRetriever(Retriever):
  """Brute-force search, stock ops only (MatMul, TopKV2): stock TF Serving loads it.

  Scores every item, as TFRS's BruteForce layer does; `retrieve` takes any E per
  request (`Retriever._retrieve`). Scoring a batch builds a [B, n] matrix:
  4 * B * n bytes.
  """

  def __init__(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
               item_ids: tf.Tensor, item_embeddings: tf.Tensor, temperature: float,
               k: int, max_history: int, max_k: Optional[int] = None,
               name: str = "retrieval_exact", successors: int = 0):
    super().__init__(query_tower, candidate_tower, temperature,
                     self.serving_k(k, len(item_ids)), max_history, name, successors)
    self.update(item_ids, item_embeddings, k, max_k)

  @staticmethod
  def serving_k(k: int, num_items: int) -> int:
    """serving_default's k for an export k over `num_items` items."""
    return min(k, num_items)

  def update(self, item_ids: tf.Tensor, item_embeddings: tf.Tensor, k: int,
             max_k: Optional[int] = None) -> None:
    """Makes `item_ids`, `item_embeddings` the corpus (k as given to the constructor)."""
    num_items = len(item_ids)
    self._assign_corpus(item_ids, item_embeddings, self.serving_k(k, num_items),
                        min(max_k or num_items, num_items), num_items)

  def _search(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    scores = tf.linalg.matmul(queries, self.item_embeddings, transpose_b=True)
    top = tf.math.top_k(scores, k=k)
    return top.values, top.indices


class ScannRetriever(Retriever):
  """ScaNN search (index.ScannVariables); loading needs ScaNN's ops (`import scann`).

  A search returns at most `num_reordering_candidates` neighbours, so max_k is
  that count (or the corpus size). The index searches enough leaves for the
  neighbours fetched, so a request gets k real items for every k up to max_k;
  `retrieve` fetches at most max_k before dropping exclusions, so a row whose
  exclusions crowd its top max_k gets fewer than k items (padded). ScaNN's float
  copy of the corpus for the reorder is `item_embeddings` itself (index.ScannVariables).
  """

  # No: a loaded SavedModel builds its searcher on its first search and keeps it
  # (index.ScannVariables), so restored variables would not reach the search.
  RESTORABLE = False

  def __init__(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
               item_ids: tf.Tensor, item_embeddings: tf.Tensor, temperature: float,
               k: int, max_history: int, index: index_lib.ScannIndex,
               num_reordering_candidates: int, name: str = "retrieval_scann",
               successors: int = 0):
    super().__init__(query_tower, candidate_tower, temperature,
                     self.serving_k(k, len(item_ids), num_reordering_candidates),
                     max_history, name, successors)
    self._assign(item_ids, item_embeddings, k, num_reordering_candidates)
    self.index = index_lib.ScannVariables(index, self.item_embeddings)

  @staticmethod
  def serving_k(k: int, num_items: int, num_reordering_candidates: int) -> int:
    """serving_default's k for an export k over `num_items` items."""
    return min(k, num_items, num_reordering_candidates)

  def _assign(self, item_ids: tf.Tensor, item_embeddings: tf.Tensor, k: int,
              num_reordering_candidates: int) -> None:
    limit = min(len(item_ids), num_reordering_candidates)
    self._assign_corpus(item_ids, item_embeddings,
                        self.serving_k(k, len(item_ids), num_reordering_candidates),
                        limit, limit)

  def update(self, item_ids: tf.Tensor, item_embeddings: tf.Tensor, k: int,
             index: index_lib.ScannIndex, num_reordering_candidates: int) -> None:
    """Makes `item_ids`, `item_embeddings` and their `index` the corpus."""
    self._assign(item_ids, item_embeddings, k, num_reordering_candidates)
    self.index.assign(index)

  def _search(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # NaN scores mark gaps; the index leaves none while k <= max_k.
    return self.index(queries, k=k)

  def save_options(self) -> tf.saved_model.SaveOptions:
    return tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])

