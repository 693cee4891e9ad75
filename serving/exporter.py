"""Exports a trained model for TF Serving: a ScaNN variant and its exact twin.

The library of the export; its command line is serving/export.py, and the daily
job calls `export_day` after training a day. The candidate tower embeds day D's
corpus (W/data/D/corpus-*.tfrecord.gz); the embeddings are indexed by ScaNN, with
parameters chosen from the corpus size and checked against exact search on
held-out queries (the query tower over day D's events, serving/index.py). Both
variants are then written, each with its warm-up requests and metadata, loaded
back and replayed, and only then published:

  W/exports/retrieval_scann/<version>/   needs ScaNN's ops to load
  W/exports/retrieval_exact/<version>/   stock TensorFlow ops only
    saved_model.pb, variables/, assets.extra/{tf_serving_warmup_requests,
    metadata.json}

`export_day` is `build_export` (compute: embed, tune the index, make the
servables and their metadata) then `write_export` (stage, warm up, verify,
publish). A caller exporting day after day (the daily job) keeps one
`ExportState`: its servables hold the corpus and the ScaNN index in variables
over the trainer's live towers, so each export assigns that day's corpus and
saves the same objects again, with no tracing and no Keras objects built: only
the variables are written, beside the first export's graph (Retriever.save).
The exact version is then verified in the SavedModel loaded the day before (same
graph, checked by digest), its variables restored from the files just written,
instead of loaded again; the ScaNN one is loaded (its searcher is built once per
load). Both variants of one export share the version number, one more than
any existing version of either (and at least `min_version`, a high-water mark
the daily job keeps), and the exact one is published last, so an exact version
implies its ScaNN twin. A failed export (recall below min_ann_recall, bad
corpus, crash before publication) publishes nothing; its staging directories are
removed by the next run. One exporter per workdir at a time (the daily job holds
W/.lock).

An export is labelled with day D only when the model has trained day D to its
end: the trained position (models.trainer.TrainedPosition) is checked against D
and recorded in the metadata ("trained"). `serving.versions.exports_before`
finds the export a day's evaluation may score.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import hashlib
import os
import platform
import time
from typing import Any, Callable, Mapping, Optional
import weakref

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from core import workdir as workdir_lib
from models import data
from models import trainer as trainer_lib
from models.config import ModelConfig
from serving import corpus as corpus_lib
from serving import dpp
from serving import index
from serving import servable
from serving import versions
from serving import warmup

# Published last: an exact version implies its ScaNN twin.
MODELS = (versions.SCANN_MODEL, versions.EXACT_MODEL)
_EMBED_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class ExportSettings:
  """How to export, besides the model and the day.

  Attributes:
    export_k: items returned by serving_default.
    min_ann_recall: required ScaNN recall@10 against exact search.
    corpus_glob: corpus files to index (None: W/data/D/corpus-*.tfrecord.gz).
    scann_params: ScaNN parameters to start tuning from (None: the rule of thumb
      for the corpus size, index.scann_params).
    ann_narrow_tolerance: after the recall bar is met, search fewer leaves while
      the recall stays within this of that setting's (index.tune_scann); None:
      keep the setting that met the bar.
  """
  export_k: int = 100
  min_ann_recall: float = 0.95
  corpus_glob: Optional[str] = None
  scann_params: Optional[index.ScannParams] = None
  ann_narrow_tolerance: Optional[float] = None


class Embedder:
  """Runs towers over numpy features in batches, one tf.function per tower.

  Kept across days by the caller, so that a catch-up traces each tower once, not
  daily; it holds the functions of the `max_towers` towers used last (a model's
  query and candidate towers), by weak reference to the towers.
  """

  def __init__(self, max_towers: int = 2):
    self.max_towers = max_towers
    self._functions: collections.OrderedDict[int, tuple[weakref.ref, Callable]] = (
        collections.OrderedDict())

  def function(self, tower: tf.keras.Model) -> Callable:
    """The tf.function that calls `tower` (inference mode), traced once per tower."""
    held = self._functions.get(id(tower))
    if held is None or held[0]() is not tower:  # an id may be reused after collection
      ref = weakref.ref(tower)  # A strong one would keep the tower alive.
      held = (ref, tf.function(lambda batch: ref()(batch, training=False),
                               reduce_retracing=True))
      self._functions[id(tower)] = held
    self._functions.move_to_end(id(tower))
    while len(self._functions) > self.max_towers:
      self._functions.popitem(last=False)
    return held[1]

  def __call__(self, tower: tf.keras.Model, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [n, d]: `tower` over the n rows of `inputs`."""
    run = self.function(tower)
    num = len(next(iter(inputs.values())))
    out = [run({k: tf.constant(v[i:i + _EMBED_BATCH]) for k, v in inputs.items()}).numpy()
           for i in range(0, num, _EMBED_BATCH)]
    return np.concatenate(out).astype(np.float32)


class LoadedExports:
  """Loaded SavedModels by path: the `capacity` used last.

  `write_export` puts the versions it just verified here, so the next day's
  evaluation, given the same object, scores them without loading them again.
  Each loaded object is held under one path: put under a new one (a later
  version restored into it, `write_export`), it leaves the old one.
  """

  def __init__(self, capacity: int = 2):
    self.capacity = capacity
    self._loaded: collections.OrderedDict[str, tf.Module] = collections.OrderedDict()
    # The digest of the saved_model.pb each object was loaded from, by path, where
    # known (`put` with a graph).
    self._graphs: dict[str, str] = {}

  @staticmethod
  def _key(export_dir: str) -> str:
    return export_dir if "://" in export_dir else os.path.abspath(export_dir)

  def put(self, export_dir: str, loaded: tf.Module, graph: Optional[str] = None) -> None:
    """Holds `loaded` under `export_dir` (and no other path); `graph`: the digest of
    the saved_model.pb it runs (`graph_digest`), if known."""
    self.discard(loaded)
    key = self._key(export_dir)
    self._loaded[key] = loaded
    self._loaded.move_to_end(key)
    if graph is not None:
      self._graphs[key] = graph
    else:
      self._graphs.pop(key, None)
    while len(self._loaded) > self.capacity:
      old, _ = self._loaded.popitem(last=False)
      self._graphs.pop(old, None)

  def discard(self, loaded: tf.Module) -> None:
    """Forgets `loaded` under every path."""
    for key in [key for key, held in self._loaded.items() if held is loaded]:
      del self._loaded[key]
      self._graphs.pop(key, None)

  def running(self, graph: str) -> Optional[tf.Module]:
    """A held SavedModel loaded from a saved_model.pb of digest `graph`, or None."""
    for key, digest in self._graphs.items():
      if digest == graph:
        return self._loaded[key]
    return None

  def load(self, export_dir: str) -> tf.Module:
    """The SavedModel at `export_dir`: from memory, else tf.saved_model.load."""
    key = self._key(export_dir)
    loaded = self._loaded.get(key)
    if loaded is None:
      loaded = tf.saved_model.load(export_dir)
      self.put(export_dir, loaded)
    else:
      self._loaded.move_to_end(key)
    return loaded


@dataclasses.dataclass
class ExportState:
  """What exports keep from one day to the next, owned by the caller (bounded).

  Attributes:
    embedder: the towers' traced functions.
    published: the versions published last, loaded (share it with the evaluation).
    retrievers: the servables of the last export, by model name: the next export
      of the same towers assigns its corpus to them and saves them again, tracing
      nothing (`_retrievers`). They hold that corpus (ids, embeddings, ScaNN
      index) between exports.
  """
  embedder: Embedder = dataclasses.field(default_factory=Embedder)
  published: LoadedExports = dataclasses.field(default_factory=LoadedExports)
  retrievers: dict[str, servable.Retriever] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BuiltExport:
  """Both servables of an export, computed but not written.

  Attributes:
    retrievers: by model name (MODELS); those of an ExportState, which the next
      build_export with that state reassigns: write them before.
    metadata: by model name, each version's metadata.json but its "version".
    requests: the query features of the warm-up requests.
    started: time.perf_counter() when the export began.
  """
  retrievers: dict[str, servable.Retriever]
  metadata: dict[str, dict[str, Any]]
  requests: dict[str, np.ndarray]
  started: float


def check_label(position: trainer_lib.TrainedPosition, day: datetime.date) -> None:
  """Raises ValueError unless `position` is day `day`, trained to its end."""
  if position.day == day and position.complete:
    return
  source = position.checkpoint or "the model given"
  if position.day is None:
    trained = "has not trained any day"
  else:
    trained = (f"has trained {position.examples} examples of {position.day.isoformat()} "
               f"({'complete' if position.complete else 'incomplete'}, global step "
               f"{position.global_step})")
  label = day.isoformat()
  raise ValueError(f"refusing to label an export {label}: {source} {trained}; "
                   f"export {label} after training that day to its end")


def data_range(workdir: str, day: datetime.date) -> dict[str, Any]:
  """The days with examples under W/data up to `day`: what the model may have seen.

  One glob over W/data (not one per day: a catch-up's 200th day would list 200
  directories one by one).
  """
  found = workdir_lib.partition_files(workdir_lib.Workdir(workdir).data_root,
                                      data.EXAMPLES_PATTERN)
  days = [d for d in found if d <= day]
  return {"first_day": days[0].isoformat() if days else None,
          "last_day": days[-1].isoformat() if days else None, "num_days": len(days)}


@functools.lru_cache(maxsize=1)
def _stack_versions() -> tuple[tuple[str, str], ...]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  packages = ("tensorflow", "tf-keras", "tensorflow-recommenders", "scann",
              "tensorflow-serving-api", "numpy")
  found = {"python": platform.python_version()}
  for name in packages:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      found[name] = "not installed"
  return tuple(found.items())


def stack_versions() -> dict[str, str]:
  """Versions of the libraries an export depends on (looked up once a process)."""
  return dict(_stack_versions())


def _day_queries(workdir: str, day: datetime.date, item_ids: np.ndarray,
                 max_history: int) -> tuple[dict[str, np.ndarray], str]:
  """(query features, where they came from): day D's events, else corpus seeds."""
  has_day = tf.io.gfile.isdir(workdir_lib.Workdir(workdir).data_dir(day))
  day_files = data.example_files(workdir, day) if has_day else []
  queries = corpus_lib.read_queries(day_files, max_history)
  if queries:
    return queries, f"{len(day_files)} example files of {day.isoformat()}"
  return (corpus_lib.queries_from_corpus(item_ids, corpus_lib.NUM_RECALL_QUERIES),
          "corpus items as seeds (no events that day)")


def _ann_metadata(tuned: index.TunedScann, k: int, max_k: int, num_items: int,
                  min_recall: float, query_source: str) -> dict[str, Any]:
  """The "ann" entry of the metadata: measured recall, parameters, tuning attempts."""
  return {"recall_at_10": tuned.recall[min(index.RECALL_K, num_items)],
          "recall_at_k": tuned.recall[min(k, num_items)], "k": min(k, num_items),
          "min_recall": min_recall, "num_queries": tuned.num_queries,
          "query_source": query_source, "params": dataclasses.asdict(tuned.params),
          # Searches widen with k so that k real items come back up to max_k.
          "leaves_searched": {str(c): int(tuned.layer.leaves_for(c))
                              for c in sorted({min(k, max_k), max_k})},
          "attempts": list(tuned.attempts)}


def _retrievers(model: tf.keras.Model, config: ModelConfig, item_ids: np.ndarray,
                item_embeddings: np.ndarray, tuned: index.TunedScann, k: int,
                kept: dict[str, servable.Retriever]) -> dict[str, servable.Retriever]:
  """The two servables over one corpus, by model name.

  Those in `kept` that serve the same towers, temperature, history and
  serving_default k take the new corpus (updated in place: nothing is traced
  again); the others are made anew and kept.
  """
  kinds = {versions.SCANN_MODEL: servable.ScannRetriever,
           versions.EXACT_MODEL: servable.ExactRetriever}
  limits = {versions.SCANN_MODEL: {
                "num_reordering_candidates": tuned.params.num_reordering_candidates},
            versions.EXACT_MODEL: {}}
  search = {versions.SCANN_MODEL: {"index": tuned.layer, **limits[versions.SCANN_MODEL]},
            versions.EXACT_MODEL: {}}
  memory = getattr(model, "memory", None)
  successors = config.pair_memory_successors if memory is not None else 0
  table = memory.serving_table(item_ids) if memory is not None else None
  for name, kind in kinds.items():
    held = kept.get(name)
    if held is not None and held.serves(
        model.query_tower, model.candidate_tower, config.temperature,
        config.max_history, kind.serving_k(k, len(item_ids), **limits[name]),
        successors):
      held.update(item_ids, item_embeddings, k, **search[name])
    else:
      kept[name] = kind(query_tower=model.query_tower,
                        candidate_tower=model.candidate_tower, item_ids=item_ids,
                        item_embeddings=item_embeddings, temperature=config.temperature,
                        k=k, max_history=config.max_history, successors=successors,
                        **search[name])
    if table is not None:
      kept[name].assign_successors(*table)
  return {name: kept[name] for name in kinds}


def build_export(model: tf.keras.Model, config: ModelConfig, workdir: str,
                 day: datetime.date, settings: ExportSettings,
                 position: trainer_lib.TrainedPosition,
                 state: Optional[ExportState] = None) -> BuiltExport:
  """Embeds and indexes day D's corpus; the two servables and their metadata.

  The servables are those of `state` when they fit (reassigned: an export made
  from them holds this corpus); `state` keeps the ones made here.
  """
  started = time.perf_counter()
  state = state or ExportState()
  embedder = state.embedder
  pattern = settings.corpus_glob or os.path.join(
      workdir_lib.Workdir(workdir).data_dir(day), corpus_lib.CORPUS_PATTERN)
  item_ids, corpus = corpus_lib.read_corpus(pattern)
  item_embeddings = embedder(model.candidate_tower, corpus)
  logging.info("embedded %d corpus items from %s", len(item_ids), pattern)
  queries, query_source = _day_queries(workdir, day, item_ids, config.max_history)
  k = settings.export_k
  tuned = index.tune_scann(item_embeddings, embedder(model.query_tower, queries), k=k,
                           max_fetch=k + config.max_history,
                           min_recall=settings.min_ann_recall, params=settings.scann_params,
                           narrow_tolerance=settings.ann_narrow_tolerance)
  retrievers = _retrievers(model, config, item_ids, item_embeddings, tuned, k,
                           state.retrievers)
  shared = {
      "day": day.isoformat(), "trained": position.to_json(),
      "data_range": data_range(workdir, day),
      "corpus": {"size": len(item_ids), "glob": pattern,
                 "embedding_dim": int(item_embeddings.shape[1])},
      "ann": _ann_metadata(tuned, k, retrievers[versions.SCANN_MODEL].max_k,
                           len(item_ids), settings.min_ann_recall, query_source),
      "config": config.to_dict(), "stack": stack_versions(),
      "signatures": list(servable.SIGNATURES),
      # retrieve_diverse: a candidate within sqrt(epsilon) of the span chosen stops a row.
      "dpp_epsilon": dpp.DEFAULT_EPSILON,
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  metadata = {name: {**shared, "model": name, "k": retriever.k, "max_k": retriever.max_k,
                     "search": "scann" if name == versions.SCANN_MODEL else "exact",
                     "needs_scann_ops": name == versions.SCANN_MODEL}
              for name, retriever in retrievers.items()}
  requests = {name: value[:max(warmup.BATCH_SIZES)] for name, value in queries.items()}
  return BuiltExport(retrievers, metadata, requests, started)


def graph_digest(export_dir: str) -> str:
  """The SHA-256 of a SavedModel's saved_model.pb (its graph and signatures)."""
  with tf.io.gfile.GFile(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _restored(export_dir: str, loaded: tf.Module) -> tf.Module:
  """`loaded` with every variable read from `export_dir`'s checkpoint.

  Raises:
    RuntimeError: the checkpoint is unreadable or misses a variable.
  """
  try:
    tf.train.Checkpoint(root=loaded).read(os.path.join(
        export_dir, "variables", "variables")).assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, IndexError, ValueError) as e:
    raise RuntimeError(f"{export_dir}: its variables do not restore into the "
                       f"SavedModel of the same graph: {e}") from e
  return loaded


def _verify(export_dir: str, logs: list[prediction_log_pb2.PredictionLog], k: int,
            published: Optional[LoadedExports] = None) -> tuple[tf.Module, str]:
  """Loads the written SavedModel and replays its warm-up requests; raises if wrong.

  With `published` (a retriever whose loaded SavedModels serve a later corpus once
  its variables are restored, `Retriever.RESTORABLE`), a held SavedModel loaded
  from the same saved_model.pb (same digest: the same graph, checked when it was
  loaded) takes the variables written here instead of a new load, which costs
  10x more (the functions deserialized and instantiated again). It leaves
  `published` first: if anything fails it is half restored. Either way the
  files written are what is read and replayed.

  Returns:
    (the loaded SavedModel, the digest of its saved_model.pb).
  """
  graph = graph_digest(export_dir)
  held = published.running(graph) if published is not None else None
  if held is not None:
    published.discard(held)
    loaded = _restored(export_dir, held)
  else:
    loaded = tf.saved_model.load(export_dir)
  for log, out in zip(logs, warmup.replay(loaded, logs)):
    request = log.predict_log.request
    name = request.model_spec.signature_name
    batch = tf.make_ndarray(request.inputs["user_id"]).shape[0]
    if name not in (servable.SERVING_DEFAULT, servable.RETRIEVE_DIVERSE):
      continue
    want = k if name == servable.SERVING_DEFAULT else int(
        tf.make_ndarray(request.inputs["k"]))
    if out["item_ids"].shape != (batch, want) or out["scores"].shape != (batch, want):
      raise RuntimeError(f"{export_dir}: {name} answered {out['item_ids'].shape} for "
                         f"a batch of {batch}, k={want}")
  return loaded, graph


def _stage(name: str, retriever: servable.Retriever, base: str, version: int,
           metadata: dict[str, Any], requests: Mapping[str, np.ndarray],
           published: Optional[LoadedExports]) -> tuple[str, tuple[tf.Module, str]]:
  """Writes one variant into a staging directory beside `base`/`version`, verified
  (`_verify`; `published` offers a loaded SavedModel to restore into).

  Returns:
    (the staging directory, (the SavedModel loaded back from it, its graph digest)).
  """
  tf.io.gfile.makedirs(base)
  staged = versions.staging_dir(base, version)
  retriever.save(staged)
  logs = list(warmup.warmup_logs(name, requests, retriever.max_k))
  warmup.write_warmup(staged, logs)
  versions.write_metadata(staged, metadata)
  return staged, _verify(staged, logs, retriever.k,
                         published if retriever.RESTORABLE else None)


def write_export(built: BuiltExport, workdir: str, min_version: int = 1,
                 published: Optional[LoadedExports] = None) -> dict[str, Any]:
  """Stages, warms up, verifies and publishes both variants of `built`.

  Returns:
    {"version", "scann_dir", "exact_dir", "metadata"} (metadata of the ScaNN one).
  """
  bases = {name: workdir_lib.Workdir(workdir).exports_base(name) for name in MODELS}
  for base in bases.values():
    versions.remove_stale_staging(base)
  version = versions.next_version(*bases.values(), min_version=min_version)
  metadata = {name: {**built.metadata[name], "version": version} for name in MODELS}
  staged = {name: _stage(name, built.retrievers[name], bases[name], version,
                         metadata[name], built.requests, published) for name in MODELS}
  directories = {name: versions.publish(staged[name][0], bases[name], version)
                 for name in MODELS}
  if published is not None:
    for name in MODELS:
      published.put(directories[name], *staged[name][1])
  logging.info("published version %d of %s in %.1fs (ANN recall@10 %.4f)", version,
               list(MODELS), time.perf_counter() - built.started,
               metadata[versions.SCANN_MODEL]["ann"]["recall_at_10"])
  return {"version": version, "scann_dir": directories[versions.SCANN_MODEL],
          "exact_dir": directories[versions.EXACT_MODEL],
          "metadata": metadata[versions.SCANN_MODEL]}


def export_day(model: tf.keras.Model, config: ModelConfig, workdir: str,
               day: datetime.date, settings: ExportSettings = ExportSettings(), *,
               trained: Optional[trainer_lib.TrainedPosition] = None,
               min_version: int = 1, state: Optional[ExportState] = None
               ) -> dict[str, Any]:
  """Indexes day D's corpus and publishes both exports under W/exports.

  Args:
    model: the trained TwoTowerModel (`.query_tower`, `.candidate_tower`).
    config: its ModelConfig (temperature, max_history; stored in the metadata).
    workdir: the workdir.
    day: the day whose corpus is indexed and whose events are the recall queries,
      and the export's label: the model must have trained day D to its end.
    settings: k, the recall bar, the corpus, the starting ScaNN parameters.
    trained: how far `model` has trained (`Trainer.trained_position()`, or the
      position `load_model` returns); None reads it from the latest checkpoint
      in W/checkpoints, for a model loaded from there.
    min_version: the least version number to publish (a high-water mark kept by
      the caller): the version is max(next free version, min_version).
    state: what the caller keeps between days (None: a fresh one).

  Returns:
    {"version", "scann_dir", "exact_dir", "metadata"} (metadata of the ScaNN one).

  Raises:
    ValueError: the trained position is not day D complete; ScaNN's recall stays
      below `min_ann_recall`; a bad corpus; min_version < 1.
    FileNotFoundError: no corpus; no checkpoint when `trained` is None.
    NotADirectoryError: W/exports, or a base under it, is a file.
  """
  position = trained if trained is not None else trainer_lib.checkpoint_position(workdir)
  check_label(position, day)
  if min_version < 1:
    raise ValueError(f"min_version must be >= 1, got {min_version}")
  for name in MODELS:
    versions.require_directory(workdir_lib.Workdir(workdir).exports_base(name))
  state = state or ExportState()
  built = build_export(model, config, workdir, day, settings, position, state)
  return write_export(built, workdir, min_version, state.published)
