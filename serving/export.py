"""Exports the trained model for TF Serving: a ScaNN variant and its exact twin.

  python -m serving.export --workdir=W --date=YYYY-MM-DD

The candidate tower embeds day D's corpus (W/data/D/corpus-*.tfrecord.gz); the
embeddings are indexed by ScaNN, with parameters chosen from the corpus size and
checked against exact search on held-out queries (the query tower over day D's
events, serving/index.py). Both variants are then written, each with its warm-up
requests and metadata, loaded back and replayed, and only then published:

  W/exports/retrieval_scann/<version>/   needs ScaNN's ops to load
  W/exports/retrieval_exact/<version>/   stock TensorFlow ops only
    saved_model.pb, variables/, assets.extra/{tf_serving_warmup_requests,
    metadata.json}

Both variants of one export share the version number, one more than any existing
version of either (and at least `min_version`, a high-water mark the daily job
keeps), and the exact one is published last, so an exact version implies its
ScaNN twin. A failed export (recall below --min_ann_recall, bad corpus, crash
before publication) publishes nothing; its staging directories are removed by
the next run. One exporter per workdir at a time (the daily job holds W/.lock).

An export is labelled with day D only when the model has trained day D to its
end: the trained position (the trainer's day, examples of it, whether it is
complete, global step) is checked against D and recorded in the metadata
("trained"); the command line reads it from the latest checkpoint in
W/checkpoints. `exports_before(W, D)` finds the newest export labelled before D,
the one that day D's evaluation may score.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
import weakref

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from typing import Any, Optional, Union  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from models import data  # noqa: E402
from models import features as features_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from pipeline import app_flags  # noqa: E402
from serving import index  # noqa: E402
from serving import records  # noqa: E402
from serving import servable  # noqa: E402
from serving import versions  # noqa: E402
from serving import warmup  # noqa: E402

_CORPUS_GLOB = flags.DEFINE_string(
    "corpus_glob", None, "Corpus TFRecords to index (default W/data/D/corpus-*.tfrecord.gz).")
_MIN_ANN_RECALL = flags.DEFINE_float(
    "min_ann_recall", 0.95, "Fail the export when ScaNN's recall@10 against exact search "
    "stays below this after retuning.")
_EXPORT_K = flags.DEFINE_integer("export_k", 100, "Items returned by serving_default.")

SCANN_MODEL = "retrieval_scann"
EXACT_MODEL = "retrieval_exact"
CORPUS_PATTERN = "corpus-*.tfrecord.gz"
METADATA_FILE = "metadata.json"
# Held-out queries for the recall check, drawn evenly from the first this many events.
NUM_RECALL_QUERIES = 1000
_QUERY_POOL = 50_000
_EMBED_BATCH = 4096


def export_base(workdir: str, model_name: str) -> str:
  """W/exports/<model_name>: the base path TF Serving watches."""
  return os.path.join(workdir, "exports", model_name)


def read_corpus(pattern: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """All corpus records matching `pattern`, in file-name then record order.

  Returns:
    (item ids as bytes [n], the CANDIDATE_FEATURES in dense form).

  Raises:
    FileNotFoundError: nothing matches `pattern`, or the files hold no record.
    ValueError: an unreadable file, an empty item_id or a repeated one (naming the
      file and record number).
  """
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no corpus files match {pattern}")
  parts = []
  first_seen: dict[bytes, str] = {}
  for path in files:
    columns = records.read_columns([path], features_lib.CANDIDATE_FEATURES)
    for i, item in enumerate(columns["item_id"].tolist()):
      where = f"{path}: record {i}"
      if not item:
        raise ValueError(f"{where}: empty item_id")
      if item in first_seen:
        raise ValueError(f"{where}: item_id {item[:256]!r} repeats {first_seen[item]}")
      first_seen[item] = where
    parts.append(columns)
  if not first_seen:
    raise FileNotFoundError(f"{pattern}: corpus files hold no record")
  corpus = {name: records.concat_padded([p[name] for p in parts])
            for name in features_lib.CANDIDATE_FEATURES}
  return corpus["item_id"], corpus


# A tf.function per tower, so that a catch-up traces each tower once, not daily.
_EMBEDDERS: weakref.WeakKeyDictionary[tf.keras.Model, tf.types.experimental.GenericFunction] = (
    weakref.WeakKeyDictionary())


def embed(tower: tf.keras.Model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  """Runs a tower over a feature dict in batches; returns float32 [n, d]."""
  run = _EMBEDDERS.get(tower)
  if run is None:
    ref = weakref.ref(tower)  # A strong one would keep the key alive.
    run = tf.function(lambda batch: ref()(batch, training=False), reduce_retracing=True)
    _EMBEDDERS[tower] = run
  num = len(next(iter(inputs.values())))
  out = [run({k: tf.constant(v[i:i + _EMBED_BATCH]) for k, v in inputs.items()}).numpy()
         for i in range(0, num, _EMBED_BATCH)]
  return np.concatenate(out).astype(np.float32)


def read_queries(files: list[str], max_history: int,
                 num: int = NUM_RECALL_QUERIES) -> dict[str, np.ndarray]:
  """Query features of `num` events spread evenly over the day's first _QUERY_POOL."""
  if not files:
    return {}
  pool = data.serialized_examples(files).take(_QUERY_POOL).batch(_QUERY_POOL)
  try:
    serialized = next(iter(pool), None)
  except tf.errors.OpError as e:
    raise ValueError(f"{files}: unreadable examples: {e.message}") from e
  if serialized is None:
    return {}
  parsed = features_lib.parse_examples(serialized, features_lib.QUERY_FEATURES,
                                       max_history=max_history)
  total = int(serialized.shape[0])
  rows = np.unique(np.linspace(0, total - 1, min(num, total)).astype(np.int64))
  return {name: value.numpy()[rows] for name, value in parsed.items()}


def queries_from_corpus(item_ids: np.ndarray, num: int = 64) -> dict[str, np.ndarray]:
  """Stand-in requests "user on item X, nothing else known" when a day has no events."""
  seeds = item_ids[np.linspace(0, len(item_ids) - 1, min(num, len(item_ids))).astype(int)]
  size = len(seeds)
  return {
      "user_id": np.full(size, b"", object),
      "seed_item_id": seeds,
      "history_item_ids": np.full((size, 1), b"", object),
      "device": np.full(size, b"", object),
      "country": np.full(size, b"", object),
      "timestamp": np.zeros(size, np.int64),
  }


def data_range(workdir: str, day: datetime.date) -> dict[str, Any]:
  """The days with examples under W/data up to `day`: what the model may have seen."""
  days = [d for d in records.data_days(workdir)
          if d <= day and data.example_files(workdir, d)]
  return {"first_day": days[0].isoformat() if days else None,
          "last_day": days[-1].isoformat() if days else None, "num_days": len(days)}


def stack_versions() -> dict[str, str]:
  """Versions of the libraries an export depends on."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  packages = ("tensorflow", "tf-keras", "tensorflow-recommenders", "scann",
              "tensorflow-serving-api", "numpy")
  found = {"python": platform.python_version()}
  for name in packages:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      found[name] = "not installed"
  return found


def _write_metadata(export_dir: str, values: dict[str, Any]) -> None:
  directory = os.path.join(export_dir, "assets.extra")
  tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(os.path.join(directory, METADATA_FILE), "w") as f:
    f.write(json.dumps(values, indent=2, sort_keys=True) + "\n")


def read_metadata(export_dir: str) -> dict[str, Any]:
  """The metadata.json of an export.

  Raises:
    FileNotFoundError: the export has none.
    ValueError: it is not a JSON object (naming the file).
  """
  path = os.path.join(export_dir, "assets.extra", METADATA_FILE)
  try:
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(f"{path}: missing; not an export of serving.export") from e
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: line {e.lineno}: unreadable metadata: {e.msg}") from e
  if not isinstance(values, dict):
    raise ValueError(f"{path}: line 1: metadata must be a JSON object")
  return values


def exports_before(workdir: str, day: datetime.date) -> Optional[tuple[str, str]]:
  """(scann_dir, exact_dir) of the newest export labelled with a day before `day`.

  What day D's test-then-train evaluation scores: an export labelled D or later
  comes from a model that has trained on D (a forced re-run of D, a catch-up
  that ran ahead). Both variants share a version number and the exact one is
  published last, so the exact versions are searched, newest first.

  Returns:
    The two version directories, or None when no export is labelled before `day`.

  Raises:
    FileNotFoundError: an exact version without its ScaNN twin, or without metadata.
    ValueError: unreadable metadata, or a bad "day" in it (naming the file).
    NotADirectoryError: W/exports, or a base under it, is a file.
  """
  scann_base = export_base(workdir, SCANN_MODEL)
  exact_base = export_base(workdir, EXACT_MODEL)
  for version in reversed(versions.list_versions(exact_base)):
    exact_dir = os.path.join(exact_base, str(version))
    label = read_metadata(exact_dir).get("day")
    try:
      labelled = datetime.date.fromisoformat(label)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{os.path.join(exact_dir, 'assets.extra', METADATA_FILE)}: "
                       f"\"day\" is {label!r}, not a YYYY-MM-DD date") from e
    if labelled < day:
      scann_dir = os.path.join(scann_base, str(version))
      if not tf.io.gfile.isdir(scann_dir):
        raise FileNotFoundError(
            f"{scann_dir}: missing, though its exact twin {exact_dir} is published")
      return scann_dir, exact_dir
  return None


@dataclasses.dataclass(frozen=True)
class TrainedPosition:
  """How far a model has trained: the trainer's position, its global step, its source.

  Attributes:
    day: the day being or last trained (None before any).
    examples: examples of that day consumed.
    complete: whether that day was trained to its end.
    global_step: optimizer steps in total (None when unknown).
    checkpoint: the checkpoint it was read from (None: the caller's trainer).
  """
  day: Optional[datetime.date]
  examples: int
  complete: bool
  global_step: Optional[int] = None
  checkpoint: Optional[str] = None

  def to_json(self) -> dict[str, Any]:
    return {"day": self.day.isoformat() if self.day else None, "examples": self.examples,
            "complete": self.complete, "global_step": self.global_step,
            "checkpoint": self.checkpoint}

  def check_label(self, day: datetime.date) -> None:
    """Raises ValueError unless this position is day `day`, trained to its end."""
    if self.day == day and self.complete:
      return
    source = self.checkpoint or "the model given"
    if self.day is None:
      trained = "has not trained any day"
    else:
      step = "" if self.global_step is None else f", global step {self.global_step}"
      trained = (f"has trained {self.examples} examples of {self.day.isoformat()} "
                 f"({'complete' if self.complete else 'incomplete'}{step})")
    label = day.isoformat()
    raise ValueError(f"refusing to label an export {label}: {source} {trained}; "
                     f"export {label} after training that day to its end")


# The trainer's tf.train.Checkpoint (models/trainer.py): its position variables.
_POSITION_KEYS = {name: f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
                  for name in ("day", "day_examples", "day_complete")}
_GLOBAL_STEP_KEY = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


def checkpoint_position(workdir: str, checkpoint: Optional[str] = None) -> TrainedPosition:
  """The trained position stored in a trainer checkpoint.

  Args:
    workdir: the workdir.
    checkpoint: the checkpoint's path prefix; default the latest in W/checkpoints.

  Raises:
    FileNotFoundError: no checkpoint.
    ValueError: the checkpoint is unreadable or lacks the trainer's position.
  """
  from models import trainer  # pylint: disable=g-import-not-at-top  (defines flags)
  directory = os.path.join(workdir, trainer.CHECKPOINT_DIR)
  latest = checkpoint or tf.train.latest_checkpoint(directory)
  if latest is None:
    raise FileNotFoundError(f"{directory}: no checkpoint; train at least one day first")
  try:
    reader = tf.train.load_checkpoint(latest)
  except (tf.errors.OpError, ValueError) as e:
    raise ValueError(f"{latest}: unreadable checkpoint: {e}") from e
  missing = [key for key in _POSITION_KEYS.values() if not reader.has_tensor(key)]
  if missing:
    raise ValueError(f"{latest}: not a trainer checkpoint, it lacks {missing}")
  ordinal = int(reader.get_tensor(_POSITION_KEYS["day"]))
  return TrainedPosition(
      day=datetime.date.fromordinal(ordinal) if ordinal else None,
      examples=int(reader.get_tensor(_POSITION_KEYS["day_examples"])),
      complete=bool(reader.get_tensor(_POSITION_KEYS["day_complete"])),
      global_step=(int(reader.get_tensor(_GLOBAL_STEP_KEY))
                   if reader.has_tensor(_GLOBAL_STEP_KEY) else None),
      checkpoint=latest)


# The newest published exports as `_verify` loaded them, by absolute path: the next
# day's evaluation scores exactly these, so a catch-up does not load them twice.
_LOADED: dict[str, tf.Module] = {}


def load_export(export_dir: str) -> tf.Module:
  """The SavedModel at `export_dir` (tf.saved_model.load; the newest from memory)."""
  loaded = _LOADED.get(os.path.abspath(export_dir))
  return loaded if loaded is not None else tf.saved_model.load(export_dir)


def _verify(export_dir: str, logs: list[prediction_log_pb2.PredictionLog],
            k: int) -> tf.Module:
  """Loads the written SavedModel and replays its warm-up requests; raises if wrong.

  Returns:
    The loaded SavedModel.
  """
  loaded = tf.saved_model.load(export_dir)
  for log, out in zip(logs, warmup.replay(loaded, logs)):
    request = log.predict_log.request
    batch = tf.make_ndarray(request.inputs["user_id"]).shape[0]
    if request.model_spec.signature_name == servable.SERVING_DEFAULT:
      if out["item_ids"].shape != (batch, k) or out["scores"].shape != (batch, k):
        raise RuntimeError(f"{export_dir}: serving_default answered "
                           f"{out['item_ids'].shape} for a batch of {batch}, k={k}")
  return loaded


Position = tuple[Optional[datetime.date], int, bool]  # Trainer.position()


def export_day(model: tf.keras.Model, config: ModelConfig, workdir: str,
               day: datetime.date, corpus_glob: Optional[str] = None,
               min_ann_recall: float = 0.95, k: int = 100,
               scann_params: Optional[index.ScannParams] = None, *,
               trained: Union[Position, TrainedPosition, None] = None,
               global_step: Optional[int] = None,
               min_version: int = 1) -> dict[str, Any]:
  """Indexes day D's corpus and publishes both exports under W/exports.

  Args:
    model: the trained TwoTowerModel (`.query_tower`, `.candidate_tower`).
    config: its ModelConfig (temperature, max_history; stored in the metadata).
    workdir: the workdir.
    day: the day whose corpus is indexed and whose events are the recall queries,
      and the export's label: the model must have trained day D to its end.
    corpus_glob: corpus files (default W/data/D/corpus-*.tfrecord.gz).
    min_ann_recall: required ScaNN recall@10 against exact search.
    k: items returned by serving_default.
    scann_params: ScaNN parameters to start tuning from, instead of the rule of
      thumb for the corpus size (index.scann_params).
    trained: how far `model` has trained: (day, examples of it, complete) as
      `Trainer.position()` returns, or a TrainedPosition; None reads it from the
      latest checkpoint in W/checkpoints (`checkpoint_position`), for a model
      loaded from there.
    global_step: the model's global step, recorded with a `trained` tuple.
    min_version: the least version number to publish (a high-water mark kept by
      the caller): the version is max(next free version, min_version).

  Returns:
    {"version", "scann_dir", "exact_dir", "metadata"} (metadata of the ScaNN one).

  Raises:
    ValueError: the trained position is not day D complete; ScaNN's recall stays
      below `min_ann_recall`; a bad corpus; min_version < 1.
    FileNotFoundError: no corpus; no checkpoint when `trained` is None.
    NotADirectoryError: W/exports, or a base under it, is a file.
  """
  started = time.perf_counter()
  if trained is None:
    position = checkpoint_position(workdir)
  elif isinstance(trained, TrainedPosition):
    position = trained
  else:
    position = TrainedPosition(*trained, global_step=global_step)
  position.check_label(day)
  if min_version < 1:
    raise ValueError(f"min_version must be >= 1, got {min_version}")
  bases = {name: export_base(workdir, name) for name in (SCANN_MODEL, EXACT_MODEL)}
  for base in bases.values():
    versions.require_directory(base)
  pattern = corpus_glob or os.path.join(data.day_dir(workdir, day), CORPUS_PATTERN)
  item_ids, corpus = read_corpus(pattern)
  item_embeddings = embed(model.candidate_tower, corpus)
  num_items = len(item_ids)
  logging.info("embedded %d corpus items from %s", num_items, pattern)

  day_files = (data.example_files(workdir, day)
               if tf.io.gfile.isdir(data.day_dir(workdir, day)) else [])
  queries = read_queries(day_files, config.max_history)
  query_source = f"{len(day_files)} example files of {day.isoformat()}"
  if not queries:
    queries = queries_from_corpus(item_ids, NUM_RECALL_QUERIES)
    query_source = "corpus items as seeds (no events that day)"
  query_embeddings = embed(model.query_tower, queries)

  max_fetch = k + config.max_history
  tuned = index.tune_scann(item_embeddings, query_embeddings, k=k, max_fetch=max_fetch,
                           min_recall=min_ann_recall, params=scann_params)
  common = dict(query_tower=model.query_tower, candidate_tower=model.candidate_tower,
                item_ids=item_ids, item_embeddings=item_embeddings,
                temperature=config.temperature, k=k, max_history=config.max_history)
  retrievers = {
      SCANN_MODEL: servable.ScannRetriever(
          index=tuned.layer,
          num_reordering_candidates=tuned.params.num_reordering_candidates, **common),
      EXACT_MODEL: servable.ExactRetriever(**common),
  }

  for base in bases.values():
    versions.remove_stale_staging(base)
  version = versions.next_version(*bases.values(), min_version=min_version)
  max_k = retrievers[SCANN_MODEL].max_k
  ann = {"recall_at_10": tuned.recall[min(index.RECALL_K, num_items)],
         "recall_at_k": tuned.recall[min(k, num_items)], "k": min(k, num_items),
         "min_recall": min_ann_recall, "num_queries": tuned.num_queries,
         "query_source": query_source, "params": dataclasses.asdict(tuned.params),
         # Searches widen with k so that k real items come back up to max_k.
         "leaves_searched": {str(c): int(tuned.layer.leaves_for(c))
                             for c in sorted({min(k, max_k), max_k})},
         "attempts": list(tuned.attempts)}
  shared = {
      "version": version, "day": day.isoformat(), "trained": position.to_json(),
      "data_range": data_range(workdir, day),
      "corpus": {"size": num_items, "glob": pattern,
                 "embedding_dim": int(item_embeddings.shape[1])},
      "ann": ann, "config": config.to_dict(), "stack": stack_versions(),
      "signatures": list(servable.SIGNATURES),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  requests = {name: value[:max(warmup.BATCH_SIZES)] for name, value in queries.items()}

  staged = {}
  metadata = {}
  loaded = {}
  for name, retriever in retrievers.items():
    tf.io.gfile.makedirs(bases[name])
    staged[name] = versions.staging_dir(bases[name], version)
    retriever.save(staged[name])
    logs = list(warmup.warmup_logs(name, requests))
    warmup.write_warmup(staged[name], logs)
    metadata[name] = {**shared, "model": name, "k": retriever.k, "max_k": retriever.max_k,
                      "search": "scann" if name == SCANN_MODEL else "exact",
                      "needs_scann_ops": name == SCANN_MODEL}
    _write_metadata(staged[name], metadata[name])
    loaded[name] = _verify(staged[name], logs, retriever.k)
  # Exact last: a published exact version means its ScaNN twin is there too.
  published = {name: versions.publish(staged[name], bases[name], version)
               for name in (SCANN_MODEL, EXACT_MODEL)}
  _LOADED.clear()
  _LOADED.update({os.path.abspath(published[name]): loaded[name] for name in published})
  logging.info("published version %d of %s in %.1fs (ANN recall@10 %.4f)", version,
               sorted(published), time.perf_counter() - started, ann["recall_at_10"])
  return {"version": version, "scann_dir": published[SCANN_MODEL],
          "exact_dir": published[EXACT_MODEL], "metadata": metadata[SCANN_MODEL]}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from models import trainer  # pylint: disable=g-import-not-at-top  (the CLI's only user)
  workdir = app_flags.workdir()
  day = app_flags.parse_day(app_flags.DATE.value)
  trained = checkpoint_position(workdir)
  try:  # Before the model is loaded: a wrong --date is a usage error.
    trained.check_label(day)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  model = trainer.load_model(workdir)
  result = export_day(model, model.config, workdir, day, corpus_glob=_CORPUS_GLOB.value,
                      min_ann_recall=_MIN_ANN_RECALL.value, k=_EXPORT_K.value,
                      trained=trained)
  print(json.dumps({key: result[key] for key in ("version", "scann_dir", "exact_dir")}))


if __name__ == "__main__":
  app.run(main)
