"""The exported retrieval model: raw query features in, top-k item ids and scores out.

`ScannRetriever` and `ExactRetriever` are one contract over two searches, so the
two exports are interchangeable for a client. Each SavedModel has the signatures

  serving_default   query features -> item_ids string [B, k], scores float [B, k]
  retrieve          query features, k (int32 scalar), exclude_item_ids string
                    [B, E] -> the best k items not in each row's exclusions
  query_embedding   query features -> query_embedding float [B, d]
  candidate_embedding  candidate features -> candidate_embedding float [B, d]

and the attributes `item_ids` [n] and `item_embeddings` [n, d] (variables), the
corpus it searches, for teams that bring their own ANN. Query features are those
of models/features.py (`query_input_signature`): batched, history a string
matrix padded with "". Scores are <u, v> / temperature, the model's own score.
Where fewer than k items qualify (tiny corpus, everything excluded), the row is
padded with item id "" and score -inf.

Requests are checked in the graph: features whose batch sizes disagree, or a k
outside [1, max_k], fail with an InvalidArgumentError that says so. History wider
than the model's `max_history` is cut to its most recent items, as in training.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import features as features_lib
from serving import index as index_lib

SERVING_DEFAULT = "serving_default"
RETRIEVE = "retrieve"
QUERY_EMBEDDING = "query_embedding"
CANDIDATE_EMBEDDING = "candidate_embedding"
SIGNATURES = (SERVING_DEFAULT, RETRIEVE, QUERY_EMBEDDING, CANDIDATE_EMBEDDING)


def _retrieve_signature() -> dict[str, tf.TensorSpec]:
  return {
      **features_lib.query_input_signature(),
      "k": tf.TensorSpec([], tf.int32, name="k"),
      "exclude_item_ids": tf.TensorSpec([None, None], tf.string, name="exclude_item_ids"),
  }


_TensorOrVariable = Union[tf.Tensor, tf.Variable]


def _variable(value: _TensorOrVariable, name: str) -> tf.Variable:
  """`value` itself if it is a variable, else a new non-trainable one holding it."""
  if isinstance(value, tf.Variable):
    return value
  return tf.Variable(value, trainable=False, name=name)


# Fingerprints live in [0, _KEY_SPACE); -1 pads every exclusion row so that it
# is never empty, and never matches an id.
_KEY_SPACE = (1 << 63) - 1


def excluded(ids: tf.Tensor, exclude: tf.Tensor) -> tf.Tensor:
  """[B, F] bool: whether ids[b, f] is one of exclude[b, :].

  Compares 64-bit fingerprints by binary search in each row's sorted exclusions:
  O(B (F + E) log E) time and O(B (F + E)) memory, where comparing every pair of
  strings (as TFRS's `query_with_exclusions` does) costs B F E. Two different ids
  share a fingerprint with probability about 2^-63 per pair, so a false exclusion
  is not expected in practice.
  """
  keys = tf.sort(tf.strings.to_hash_bucket_fast(exclude, _KEY_SPACE), axis=1)
  keys = tf.pad(keys, [[0, 0], [1, 0]], constant_values=-1)
  # The padding column keeps searchsorted off a [0, 0] tensor (an empty batch).
  wanted = tf.pad(tf.strings.to_hash_bucket_fast(ids, _KEY_SPACE), [[0, 0], [0, 1]])
  at = tf.minimum(tf.searchsorted(keys, wanted), tf.shape(keys)[1] - 1)
  return tf.equal(tf.gather(keys, at, batch_dims=1), wanted)[:, :-1]


def _check_batch(features: Mapping[str, tf.Tensor]) -> list[tf.Operation]:
  """Asserts that every feature has the batch size of the first."""
  names = sorted(features)
  batch = tf.shape(features[names[0]])[0]
  return [
      tf.debugging.assert_equal(
          tf.shape(features[name])[0], batch,
          message=f"request features disagree on the batch size: {name!r} vs "
                  f"{names[0]!r}")
      for name in names[1:]
  ]


def build_tower(tower: tf.keras.Model, names: Sequence[str]) -> None:
  """Calls `tower`, unless built, once on an all-default example of features `names`.

  Keras makes a layer's variables on its first call. A tower never called (a fresh
  model, one whose embeddings come from elsewhere) would make them while `save`
  traces the signatures, after `Retriever` collected the state it tracks: the
  SavedModel would capture variables it does not hold, and refuse to save.
  """
  if not getattr(tower, "built", False):
    tower(features_lib.default_batch(names), training=False)


@dataclasses.dataclass(frozen=True)
class _Untracked:
  """Keras objects held outside the tracked object graph (see Retriever)."""
  query: tf.keras.Model
  candidate: tf.keras.Model
  search: Optional[tf.keras.layers.Layer] = None


def _state(*models: tf.keras.layers.Layer) -> list[object]:
  """The variables and resources (e.g. lookup tables) of `models`, each once."""
  found = {}
  for model in models:
    for obj in tf.train.TrackableView(model).descendants():
      if isinstance(obj, (tf.Variable, tf.saved_model.experimental.TrackableResource)):
        found[id(obj)] = obj
  return list(found.values())


class Retriever(tf.Module):
  """Query tower + a search over the item embeddings; subclasses choose the search.

  The SavedModel tracks the towers' variables and resources, not the Keras models:
  saving a tracked Keras model also traces and writes every layer's Keras call
  functions, seconds per export that no signature uses. Towers never called are
  built first (`build_tower`), so that those variables all exist. `item_ids` and
  `item_embeddings` may be given as variables, so a search layer's own copy
  (ExactRetriever's) is the one saved.

  Attributes:
    query_tower, candidate_tower: the trained towers (Keras models).
    item_ids: string variable [n], the corpus.
    item_embeddings: float32 variable [n, d], the candidate tower's output.
    k: the number of items `serving_default` returns.
    max_k: the most items one request may ask `retrieve` for.
  """

  def __init__(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
               item_ids: _TensorOrVariable, item_embeddings: _TensorOrVariable,
               temperature: float, k: int, max_history: int, max_k: int, name: str,
               search: Optional[tf.keras.layers.Layer] = None):
    super().__init__(name=name)
    if not 1 <= k <= max_k:
      raise ValueError(f"need 1 <= k <= max_k, got k={k}, max_k={max_k}")
    build_tower(query_tower, features_lib.QUERY_FEATURES)
    build_tower(candidate_tower, features_lib.CANDIDATE_FEATURES)
    self._keras = _Untracked(query_tower, candidate_tower, search)
    self.tower_state = _state(query_tower, candidate_tower)
    self.item_ids = _variable(item_ids, "item_ids")
    self.item_embeddings = _variable(item_embeddings, "item_embeddings")
    self.k = k
    self.max_k = max_k
    self._temperature = float(temperature)
    self._max_history = max_history

  @property
  def query_tower(self) -> tf.keras.Model:
    return self._keras.query

  @property
  def candidate_tower(self) -> tf.keras.Model:
    return self._keras.candidate

  @property
  def num_items(self) -> int:
    return int(self.item_ids.shape[0])

  def _fetch_limit(self) -> int:
    """The most neighbours the search can return for one query."""
    raise NotImplementedError

  def _search(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(dot products [B, <=k], item ids [B, <=k]); NaN scores mark missing results."""
    raise NotImplementedError

  def _embed_query(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    with tf.control_dependencies(_check_batch(features)):
      history = features["history_item_ids"][:, :self._max_history]
      query = {name: tf.identity(features[name])
               for name in features_lib.QUERY_FEATURES}
    query["history_item_ids"] = history
    return self.query_tower(query, training=False)

  def _top_k(self, queries: tf.Tensor, k: tf.Tensor,
             exclude: tf.Tensor) -> dict[str, tf.Tensor]:
    """The best k items not excluded, padded to exactly k with ("", -inf).

    Fetches k + E neighbours, then drops the excluded ones by fingerprint
    (`excluded`), so the search itself never sees the exclusions.
    """
    fetch = tf.minimum(k + tf.shape(exclude)[1], self._fetch_limit())
    scores, ids = self._search(queries, fetch)
    valid = tf.logical_not(tf.math.is_nan(scores))
    valid = tf.logical_and(valid, tf.logical_not(excluded(ids, exclude)))
    scores = tf.where(valid, scores / self._temperature, float("-inf"))
    ids = tf.where(valid, ids, "")
    missing = tf.maximum(k - tf.shape(scores)[1], 0)
    scores = tf.pad(scores, [[0, 0], [0, missing]], constant_values=float("-inf"))
    ids = tf.pad(ids, [[0, 0], [0, missing]], constant_values="")
    top = tf.math.top_k(scores, k=k)
    return {"item_ids": tf.gather(ids, top.indices, batch_dims=1), "scores": top.values}

  @tf.function(input_signature=[features_lib.query_input_signature()])
  def serve(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """serving_default: the top `k` items for each query."""
    queries = self._embed_query(features)
    no_exclusions = tf.zeros([tf.shape(queries)[0], 0], tf.string)
    return self._top_k(queries, tf.constant(self.k), no_exclusions)

  @tf.function(input_signature=[_retrieve_signature()])
  def retrieve(self, request: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The top `k` items of each query, leaving out that row's `exclude_item_ids`."""
    k = request["k"]
    checks = [
        tf.debugging.assert_greater_equal(k, 1, message="k must be >= 1"),
        tf.debugging.assert_less_equal(
            k, self.max_k, message=f"k must be <= max_k = {self.max_k}"),
        tf.debugging.assert_equal(
            tf.shape(request["exclude_item_ids"])[0], tf.shape(request["user_id"])[0],
            message="exclude_item_ids must have one row per query"),
    ]
    with tf.control_dependencies(checks):
      k = tf.identity(k)
    queries = self._embed_query({name: request[name]
                                 for name in features_lib.QUERY_FEATURES})
    return self._top_k(queries, k, request["exclude_item_ids"])

  @tf.function(input_signature=[features_lib.query_input_signature()])
  def embed_query(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """query_embedding: the unit query vectors u; scores are <u, v> / temperature."""
    return {"query_embedding": self._embed_query(features)}

  @tf.function(input_signature=[features_lib.candidate_input_signature()])
  def embed_candidates(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """candidate_embedding: the unit item vectors v, e.g. for items not yet indexed."""
    with tf.control_dependencies(_check_batch(features)):
      features = {name: tf.identity(value) for name, value in features.items()}
    return {"candidate_embedding": self.candidate_tower(features, training=False)}

  def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
    return {
        SERVING_DEFAULT: self.serve.get_concrete_function(),
        RETRIEVE: self.retrieve.get_concrete_function(),
        QUERY_EMBEDDING: self.embed_query.get_concrete_function(),
        CANDIDATE_EMBEDDING: self.embed_candidates.get_concrete_function(),
    }

  def save(self, export_dir: str) -> None:
    """Writes the SavedModel (all signatures) to `export_dir`."""
    tf.saved_model.save(self, export_dir, signatures=self.signatures(),
                        options=self.save_options())

  def save_options(self) -> tf.saved_model.SaveOptions:
    return tf.saved_model.SaveOptions()


class ExactRetriever(Retriever):
  """TFRS's BruteForce search, stock ops only (MatMul, TopKV2): stock TF Serving loads it.

  The layer indexes the embeddings with the item ids as identifiers; its two
  variables are the export's `item_embeddings` and `item_ids`. Its own
  `query_with_exclusions` is not used: it needs E known when tracing and compares
  strings pairwise, where `retrieve` takes any E per request (`Retriever._top_k`).
  Scoring a batch builds a [B, n] matrix: 4 * B * n bytes.
  """

  def __init__(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
               item_ids: tf.Tensor, item_embeddings: tf.Tensor, temperature: float,
               k: int, max_history: int, max_k: Optional[int] = None,
               name: str = "retrieval_exact"):
    num_items = int(tf.shape(item_ids)[0])
    search = tfrs.layers.factorized_top_k.BruteForce(k=min(k, num_items)).index(
        tf.convert_to_tensor(item_embeddings, tf.float32),
        tf.convert_to_tensor(item_ids, tf.string))
    # index() creates them as "identifiers" and "candidates".
    held = {w.name.split("/")[-1].split(":")[0]: w for w in search.weights}
    super().__init__(query_tower, candidate_tower, held["identifiers"],
                     held["candidates"], temperature, min(k, num_items), max_history,
                     min(max_k or num_items, num_items), name, search=search)

  def _fetch_limit(self) -> int:
    return self.num_items

  def _search(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return self._keras.search(queries, k=k)


class ScannRetriever(Retriever):
  """ScaNN search (index.ScannIndex); loading needs ScaNN's ops (`import scann`).

  A search returns at most `num_reordering_candidates` neighbours, so max_k is
  that count (or the corpus size). The index searches enough leaves for the
  neighbours fetched, so a request gets k real items for every k up to max_k;
  `retrieve` fetches at most max_k before dropping exclusions, so a row whose
  exclusions crowd its top max_k gets fewer than k items (padded). The index
  keeps its own copy of the embeddings for the reorder, so this export is about
  twice the exact one's size.
  """

  def __init__(self, query_tower: tf.keras.Model, candidate_tower: tf.keras.Model,
               item_ids: tf.Tensor, item_embeddings: tf.Tensor, temperature: float,
               k: int, max_history: int, index: index_lib.ScannIndex,
               num_reordering_candidates: int, name: str = "retrieval_scann"):
    num_items = int(tf.shape(item_ids)[0])
    limit = min(num_items, num_reordering_candidates)
    super().__init__(query_tower, candidate_tower, item_ids, item_embeddings,
                     temperature, min(k, limit), max_history, limit, name)
    self.index = index
    self._limit = limit

  def _fetch_limit(self) -> int:
    return self._limit

  def _search(self, queries: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # NaN scores mark gaps; ScannIndex leaves none while k <= max_k.
    scores, rows = self.index(queries, k=k)
    return scores, tf.gather(self.item_ids, rows)

  def save_options(self) -> tf.saved_model.SaveOptions:
    return tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
