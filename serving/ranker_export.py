"""Exports the ranking teacher (models/ranker.py) with a `rank` signature, stock ops only.

  W/exports/ranker/<version>/   saved_model.pb, variables/, assets.extra/metadata.json

beside W/exports/retrieval_{scann,exact}/, with versions of its own (integers
that only grow, written in a staging directory and renamed into place,
serving/versions.py). Signatures (`serving_default` is the same function):

  rank   query features (as the retrieval exports' `query`: user_id,
         seed_item_id, device, country string [B], timestamp int64 [B],
         history_item_ids string [B, W]) and candidate_ids string [B, N]
         -> scores float [B, N], the teacher's logits; -inf where a candidate
         id is "" (padding)

The candidates' features come from day D's corpus, baked into the SavedModel
(ranker.CorpusTable); an id the corpus lacks is scored with absent features.
An export is labelled D only when the ranker has trained day D to its end
(serving.exporter.check_label). The daily job keeps one `RankExportState`, so
each day assigns its corpus to the same servable and saves it again without
tracing. `ranker_before` finds the export a day's funnel evaluation may use,
and `export_retriever` turns a retrieval export into the negatives' source of
the ranker's training (models/ranker_trainer.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from core import workdir as workdir_lib
from models import data
from models import features as features_lib
from models import ranker as ranker_lib
from models import ranker_trainer
from models import trainer as trainer_lib
from serving import corpus as corpus_lib
from serving import exporter
from serving import servable
from serving import versions

RANKER_MODEL = "ranker"
RANK = "rank"
SIGNATURES = (RANK, servable.SERVING_DEFAULT)
_VERIFY_QUERIES = 8


def rank_input_signature() -> dict[str, tf.TensorSpec]:
  return {**features_lib.query_input_signature(),
          "candidate_ids": tf.TensorSpec([None, None], tf.string, name="candidate_ids")}


@dataclasses.dataclass(frozen=True)
class _Untracked:
  """Held outside the tracked object graph: the Keras ranker and the signature's
  tf.function (a tracked Keras model would also save every layer's call)."""
  ranker: ranker_lib.Ranker
  function: Any


class RankServable(tf.Module):
  """The ranker's variables and a corpus table behind the `rank` signature.

  Attributes:
    ranker_variables: the ranker's variables (what the SavedModel holds of it).
    table: the corpus the candidates' features come from (`set_corpus`).
  """

  def __init__(self, ranker: ranker_lib.Ranker, name: str = "ranker_export"):
    super().__init__(name=name)
    # No autograph: nothing to convert, and converting Keras' calls cost seconds.
    self._held = _Untracked(ranker, tf.function(
        self._rank, input_signature=[rank_input_signature()], autograph=False))
    self.ranker_variables = list(ranker.variables)
    self.table = ranker_lib.CorpusTable()

  @property
  def ranker(self) -> ranker_lib.Ranker:
    return self._held.ranker

  def _rank(self, request: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """rank: the teacher's logits of each row's candidates, -inf for "" padding."""
    ids = request["candidate_ids"]
    rows = tf.stack([tf.shape(request[name])[0]
                     for name in (*features_lib.QUERY_FEATURES, "candidate_ids")])
    check = tf.debugging.Assert(tf.reduce_all(tf.equal(rows, rows[0])), [
        "rank: the query features and candidate_ids disagree on the batch size: "
        f"{', '.join((*features_lib.QUERY_FEATURES, 'candidate_ids'))} have", rows])
    with tf.control_dependencies([check]):
      ids = tf.identity(ids)
    query = {name: request[name] for name in features_lib.QUERY_FEATURES}
    scores = self.ranker.score_lists(query, self.table.lookup(ids))
    return {"scores": tf.where(ids == "", float("-inf"), scores)}

  def rank(self, **request: tf.Tensor) -> dict[str, tf.Tensor]:
    """The signature's function, in this process."""
    return self._held.function(request)

  def save(self, export_dir: str) -> None:
    concrete = self._held.function.get_concrete_function()
    tf.saved_model.save(self, export_dir,
                        signatures={RANK: concrete, servable.SERVING_DEFAULT: concrete})


@dataclasses.dataclass
class RankExportState:
  """What ranker exports keep from one day to the next: the servable (traced once)."""
  servable: Optional[RankServable] = None

  def servable_of(self, ranker: ranker_lib.Ranker) -> RankServable:
    if self.servable is None or self.servable.ranker is not ranker:
      self.servable = RankServable(ranker)
    return self.servable


def base_dir(workdir: str) -> str:
  """W/exports/ranker."""
  return workdir_lib.Workdir(workdir).exports_base(RANKER_MODEL)


def _labelled(workdir: str) -> list[tuple[datetime.date, str]]:
  """(label, version dir) of every ranker version, newest first.

  Raises:
    FileNotFoundError, ValueError: a version without readable metadata or day.
  """
  base = base_dir(workdir)
  found = []
  for version in reversed(versions.list_versions(base)):
    path = os.path.join(base, str(version))
    label = versions.read_metadata(path).get("day")
    try:
      found.append((datetime.date.fromisoformat(label), path))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{versions.metadata_path(path)}: \"day\" is {label!r}, not a "
                       "YYYY-MM-DD date") from e
  return found


def ranker_before(workdir: str, day: datetime.date) -> Optional[str]:
  """The newest ranker export labelled with a day before `day`, or None: the teacher
  day D's funnel may use (trained through D-1 at most: test-then-train)."""
  return next((path for label, path in _labelled(workdir) if label < day), None)


def ranker_of(workdir: str, day: datetime.date) -> Optional[str]:
  """The ranker export labelled `day`, or None."""
  return next((path for label, path in _labelled(workdir) if label == day), None)


def export_retriever(loaded: tf.Module, k: int) -> ranker_trainer.Retrieve:
  """A retrieval export's `retrieve` as the ranker trainer's negatives source:
  the top k of each query, its exclusions left out."""
  retrieve = loaded.signatures[servable.RETRIEVE]

  def top_k(query: Mapping[str, tf.Tensor], exclude: tf.Tensor) -> tf.Tensor:
    return retrieve(**query, k=tf.constant(k, tf.int32),
                    exclude_item_ids=exclude)["item_ids"]
  return top_k


def _verify(export_dir: str, built: RankServable, corpus_ids: np.ndarray,
            queries: Mapping[str, np.ndarray]) -> None:
  """Loads the written SavedModel and checks that `rank` answers as `built` does."""
  size = len(next(iter(queries.values())))
  if size == 0:
    return
  rows = np.arange(size) % len(corpus_ids)
  candidates = np.stack([corpus_ids[(rows + j) % len(corpus_ids)] for j in range(4)]
                        + [np.full(size, b"not-in-the-corpus", object)], axis=1)
  request = {**{name: tf.constant(value) for name, value in queries.items()},
             "candidate_ids": tf.constant(candidates)}
  want = built.rank(**request)["scores"].numpy()
  got = tf.saved_model.load(export_dir).signatures[RANK](**request)["scores"].numpy()
  if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
    raise RuntimeError(f"{export_dir}: the loaded rank signature answers "
                       f"{got.shape} scores unlike the ranker's {want.shape}")


def export_day(ranker: ranker_lib.Ranker, workdir: str, day: datetime.date,
               trained: trainer_lib.TrainedPosition, min_version: int = 1,
               state: Optional[RankExportState] = None) -> dict[str, Any]:
  """Publishes the ranker with day D's corpus as W/exports/ranker/<version>.

  Args:
    ranker: the trained ranker.
    workdir: the workdir.
    day: the label; the ranker must have trained day D to its end (`trained`).
    trained: how far it has trained (RankerTrainer.trained_position(), load_ranker).
    min_version: the least version to publish (a high-water mark kept elsewhere).
    state: what the caller keeps between days (None: a fresh one).

  Returns:
    {"version", "dir", "corpus_size", "seconds"}.

  Raises:
    ValueError: `trained` is not day D complete; a bad corpus.
    FileNotFoundError: no corpus of day D.
    RuntimeError: the written export does not answer as the ranker does.
  """
  started = datetime.datetime.now(datetime.timezone.utc)
  exporter.check_label(trained, day)
  paths = workdir_lib.Workdir(workdir)
  pattern = os.path.join(paths.data_dir(day), corpus_lib.CORPUS_PATTERN)
  corpus_ids, corpus = corpus_lib.read_corpus(pattern)
  built = (state or RankExportState()).servable_of(ranker)
  built.table.set_corpus(corpus)
  has_day = tf.io.gfile.isdir(paths.data_dir(day))
  queries = corpus_lib.read_queries(data.example_files(workdir, day) if has_day else [],
                                    ranker.config.max_history, _VERIFY_QUERIES)
  if not queries:
    queries = corpus_lib.queries_from_corpus(corpus_ids, _VERIFY_QUERIES)
  base = base_dir(workdir)
  versions.require_directory(base)
  versions.remove_stale_staging(base)
  version = versions.next_version(base, min_version=min_version)
  tf.io.gfile.makedirs(base)
  staged = versions.staging_dir(base, version)
  built.save(staged)
  versions.write_metadata(staged, {
      "model": RANKER_MODEL, "version": version, "day": day.isoformat(),
      "trained": trained.to_json(), "corpus": {"size": len(corpus_ids), "glob": pattern},
      "config": ranker.config.to_dict(), "signatures": list(SIGNATURES),
      "needs_scann_ops": False, "stack": exporter.stack_versions(),
      "created_utc": started.isoformat()})
  _verify(staged, built, corpus_ids, queries)
  target = versions.publish(staged, base, version)
  seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
  logging.info("published ranker version %d of %s in %.1fs", version, day, seconds)
  return {"version": version, "dir": target, "corpus_size": len(corpus_ids),
          "seconds": round(seconds, 2)}
