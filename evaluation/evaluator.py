"""Offline evaluation of exports on a day's events: recall over the full corpus.

The library of the evaluation; its command line is evaluation/evaluate.py, and
the daily job calls `evaluate_day` before training a day. Test-then-train: the
exports made before day D (the newest version labelled with a day before D,
serving.versions.exports_before) are scored on day D's events, W/data/D, before
any training on them. Each event is a query (its query features, as served)
whose target is its item_id. Through each export's `retrieve` signature:

  * recall@10/50/100 over all items;
  * recall@10/50/100 with the user's seen items excluded: seen = the event's
    history_item_ids, plus every item of the user's earlier events (all data days
    before D, and earlier events of D). Events whose target was seen already
    (re-consumption) cannot be hits there and are left out of that figure;
  * both by popularity decile of the target: popularity = interactions in the
    training data, the examples of every data day before D; deciles cut the
    corpus into ten equal groups (evaluation/baselines.py);
  * the same for two baselines on the same events: popularity (most
    interacted-with corpus items first) and co-visitation (the corpus items most
    often consumed right before or after the event's latest history item,
    history_item_ids[0], over every data day before D; ties, and the rest of the
    corpus, by popularity over the RECENT_DAYS days before D; evaluation/records.py
    and evaluation/baselines.py);
  * the same for the ScaNN and the exact export, whose difference is what the
    ANN loses.

With EvaluationSettings.diversity_theta set, each export is also queried through
its `retrieve_diverse` signature (DPP re-ranking, serving/dpp.py) at that theta,
k = diversity_k of N = diversity_candidates (both capped at the exports' max_k and
the largest K scored), for the same events in both modes. metrics.json then gains
"diversity": the recall@K (K <= k) of the diverse lists, beside "recall"'s figures
of the plain top k, and per mode and export the intra-list diversity
(evaluation/diversity.py) of the plain top k and of the diverse k. At theta = 1 the
diverse list is the plain top k (of the exact export exactly; ScaNN's searches
widen with the neighbours fetched, N here). Without the setting metrics.json is as
before.

With EvaluationSettings.funnel, metrics.json gains "funnel": the exact export's
top k of every event (both modes) re-ranked by the newest ranker export
labelled before D (the teacher, serving/ranker_export.py), with recall@10 and
NDCG@10 of the funnel beside the retrieval's (evaluation/funnel.py). A day no
ranker export precedes records why it was skipped.

Targets outside the export's corpus count as misses (fresh items the export does
not know). `evaluate_day` is `compute_metrics` then `write_metrics`
(W/eval/D/metrics.json and, unless told not to, W/eval/D/recall.png; `plot_day`
draws the plot later from metrics.json).

What the days before D contribute (counts, seen items, co-visitation) is a running
total that each day extends, persisted in W/state/evaluation and rebuilt from
W/data when it does not match it (records.TrainingInteractions): a day's
evaluation costs the same on day 200 as on day 2, in a new process too.

Day D itself is read and scored CHUNK_EVENTS events at a time (records.iter_events,
records.DaySeen): what is held is one chunk's events and, of every event, its ranks
(with diversity, its lists' corpus rows), so the memory and the cost per event do not
grow with the day. The exports get the batches of _BATCH events they would get from
the whole day at once, so the figures are the same whatever the chunk size.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import time
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import numpy as np
import scann  # noqa: F401  (registers ScaNN's TF ops: the ScaNN export needs them)
import tensorflow as tf

from core import workdir as workdir_lib
from evaluation import baselines
from evaluation import diversity
from evaluation import funnel
from evaluation import plots
from evaluation import recall
from evaluation import records
from models import features as features_lib
from serving import corpus as corpus_lib
from serving import exporter
from serving import ranker_export
from serving import servable
from serving import versions

KS = (10, 50, 100)
PLOT_FILE = "recall.png"
_BATCH = 256
MODES = ("all", "seen_excluded")
# Events read and scored at a time: the evaluation holds one chunk's events, not the
# day's (about 2 KB an event with 50 history items).
CHUNK_EVENTS = 1 << 14
# The columns the training interactions keep of the day (records.TrainingInteractions
# .remember), kept whole.
_REMEMBERED = ("user_id", "item_id", "timestamp")

Ranks = dict[str, dict[str, np.ndarray]]  # {mode: {method: ranks}}


@dataclasses.dataclass
class EvaluationState:
  """What evaluations keep from one day to the next, owned by the caller (bounded).

  Attributes:
    exports: the exports loaded last; give it an ExportState's `published` to
      score the export made the day before without loading it again.
    interactions: the running total of the training interactions (item counts,
      seen items, co-visitation counts, the recent days' counts), also persisted in
      the workdir, so a fresh one resumes from there.
    rankers: the ranker export loaded last (the funnel's teacher).
  """
  exports: exporter.LoadedExports = dataclasses.field(
      default_factory=exporter.LoadedExports)
  interactions: records.TrainingInteractions = dataclasses.field(
      default_factory=records.TrainingInteractions)
  rankers: exporter.LoadedExports = dataclasses.field(
      default_factory=lambda: exporter.LoadedExports(capacity=1))


def _setting(default: Any, help_text: str) -> Any:
  """An EvaluationSettings field with its flag help (`flag_args`)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
  """What the daily evaluation scores beyond recall; checked when made. The apps
  (evaluate.py, the daily job's) declare their flags from each field's help
  (`flag_args`).

  Attributes:
    diversity_theta: None: nothing more. Else each export is also queried through
      `retrieve_diverse` at this trade-off and metrics.json gains "diversity"
      (module docstring).
    diversity_candidates: N, the top N the DPP chooses from (at most the exports'
      max_k are used).
    diversity_k: items per diverse list, and per plain list whose diversity is
      compared (at most N and the largest K scored are used).
    funnel: also re-rank each event's retrieval list with the newest ranker
      export made before the day; metrics.json gains "funnel" (module docstring).
  """
  diversity_theta: Optional[float] = _setting(
      None, "Also score each export's retrieve_diverse (DPP re-ranking) at this "
      "trade-off in [0, 1] (0: diversity only, 1: the plain top k): recall and "
      "intra-list diversity beside the plain top k, in metrics.json (default: not).")
  diversity_candidates: int = _setting(
      200, "With --diversity_theta: N, the top N the DPP chooses from.")
  diversity_k: int = _setting(
      10, "With --diversity_theta: items per list compared (recall@k, diversity).")
  funnel: bool = _setting(
      False, "Also score the two-stage funnel: each event's top 100 of the exact "
      "export re-ranked by the newest ranker export made before the day; recall@10 "
      "and NDCG@10 beside the retrieval's, in metrics.json (default: not).")

  def __post_init__(self) -> None:
    theta = self.diversity_theta
    if theta is not None and not 0.0 <= theta <= 1.0:
      raise ValueError(f"diversity_theta must be in [0, 1], got {theta}")
    if not 1 <= self.diversity_k <= self.diversity_candidates:
      raise ValueError(f"need 1 <= diversity_k <= diversity_candidates, got "
                       f"diversity_k={self.diversity_k}, "
                       f"diversity_candidates={self.diversity_candidates}")


def flag_args(name: str) -> dict[str, Any]:
  """default and help of an EvaluationSettings field, for an app's flag:

    _THETA = flags.DEFINE_float("diversity_theta", **evaluator.flag_args("diversity_theta"))
  """
  field = next(f for f in dataclasses.fields(EvaluationSettings) if f.name == name)
  return {"default": field.default, "help": field.metadata["help"]}


@dataclasses.dataclass(frozen=True)
class DiverseRequest:
  """The retrieve_diverse inputs beyond retrieve's: theta and N (no boosts)."""
  theta: float
  num_candidates: int


def _query(loaded: tf.Module, inputs: Mapping[str, tf.Tensor], exclude: tf.Tensor,
           k: int, diverse: Optional[DiverseRequest] = None) -> np.ndarray:
  """One batch's lists [B, k] (item ids, "" padded) from the export (a loaded
  SavedModel): through `retrieve`, or with `diverse` through `retrieve_diverse`.

  Args:
    inputs: the query features of the batch's events (QUERY_FEATURES).
    exclude: each event's ids the export must leave out, "" padded [B, W] (W >= 0).
  """
  signature = loaded.signatures[servable.RETRIEVE if diverse is None
                                else servable.RETRIEVE_DIVERSE]
  extra = {} if diverse is None else {
      "num_candidates": tf.constant(diverse.num_candidates, tf.int32),
      "theta": tf.constant(diverse.theta, tf.float32),
      "boost_item_ids": tf.zeros([exclude.shape[0], 0], tf.string),
      "boosts": tf.zeros([exclude.shape[0], 0], tf.float32)}
  return signature(**inputs, **extra, k=tf.constant(k, tf.int32),
                   exclude_item_ids=exclude)["item_ids"].numpy()


def _decile_table(ranks: np.ndarray, deciles: np.ndarray, ks: Sequence[int]
                  ) -> dict[str, list[Optional[float]]]:
  """recall@k per decile: {str(k): [decile 0 .. 9]} over events with a known decile."""
  table = {str(k): [] for k in ks}
  for d in range(baselines.NUM_DECILES):
    found = recall.recall_at(ranks[deciles == d], ks)
    for k in ks:
      table[str(k)].append(found[k])
  return table


def _query_items(events: dict[str, np.ndarray]) -> np.ndarray:
  """Each event's latest history item (history_item_ids[0]), b"" when it has none."""
  history = events["history_item_ids"]
  if history.ndim < 2 or history.shape[1] == 0:
    return np.full(len(events["item_id"]), b"", object)
  return history[:, 0]


def _padded(events: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
  """`events` with history_item_ids padded with "" to `width` columns.

  Parsing makes a chunk's history as wide as its widest; padded to the width parsing
  cuts at (max_history), every batch sent to an export is equally wide whichever
  chunks its events came from, so the figures do not depend on the chunk size.
  """
  history = events["history_item_ids"]
  if history.ndim < 2 or history.shape[1] >= width:
    return events
  return {**events, "history_item_ids": np.pad(
      history, [(0, 0), (0, width - history.shape[1])], constant_values=b"")}


@dataclasses.dataclass
class _Chunk:
  """Consecutive events of day D (rows are the chunk's) against the corpus."""
  events: dict[str, np.ndarray]
  seen: records.SeenItems
  novel_rows: np.ndarray
  targets: np.ndarray     # corpus position of each event's target (-1: outside)
  seen_items: np.ndarray  # corpus position of each of `seen`'s names

  def rows(self, mode: str) -> np.ndarray:
    """The events scored in `mode`: all, or those whose target was not seen."""
    return np.arange(len(self.targets)) if mode == "all" else self.novel_rows

  def seen_pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `rows`, corpus position) of the seen items of the events `rows`."""
    at, items = self.seen.pairs(rows)
    return at, self.seen_items[items]


class _Day:
  """Day D's events against the corpus, read chunk after chunk (`add`).

  Of each event it keeps only its target's corpus position and whether it is novel
  (its target not seen before), a few bytes an event; the seen items carry from
  one chunk to the next (records.DaySeen).
  """

  def __init__(self, corpus: np.ndarray, training: records.TrainingInteractions):
    self.corpus = corpus
    self.corpus_counts = training.counts_of(corpus.tolist())
    self._training = training
    self._seen = records.DaySeen(training.items)
    self._position = {item: j for j, item in enumerate(corpus.tolist())}
    self._seen_items = np.zeros(0, np.int64)  # corpus position of each DaySeen name
    self._targets: list[np.ndarray] = []
    self._novel_rows: list[np.ndarray] = []
    self.num_events = 0

  def add(self, events: dict[str, np.ndarray]) -> _Chunk:
    """The next chunk of events (its rows follow the earlier chunks')."""
    seen = self._seen.add(events, *self._training.prior_items(events["user_id"].tolist()))
    known = len(self._seen_items)
    if len(seen.names) > known:  # the names only grow: look up the new ones
      self._seen_items = np.concatenate([self._seen_items, np.array(
          [self._position.get(i, -1) for i in seen.names[known:].tolist()], np.int64)])
    chunk = _Chunk(events=events, seen=seen, novel_rows=seen.novel_rows(),
                   targets=self._seen_items[seen.target], seen_items=self._seen_items)
    self._targets.append(chunk.targets)
    self._novel_rows.append(chunk.novel_rows + self.num_events)
    self.num_events += len(chunk.targets)
    return chunk

  @property
  def targets(self) -> np.ndarray:
    """Corpus position of each event's target, over the chunks added."""
    return _joined(self._targets, np.zeros(0, np.int64))

  @property
  def novel_rows(self) -> np.ndarray:
    """The events (rows of the day) whose target was not seen before."""
    return _joined(self._novel_rows, np.zeros(0, np.int64))


def _joined(parts: Sequence[np.ndarray], empty: np.ndarray) -> np.ndarray:
  """The parts concatenated, `empty` when there are none."""
  return np.concatenate(parts) if parts else empty


class _Batch(NamedTuple):
  """Up to _BATCH consecutive events of a mode, from one chunk or more."""
  inputs: dict[str, np.ndarray]  # their query features
  exclude: np.ndarray            # what the exports must leave out, "" padded [B, W]
  targets: np.ndarray            # their target ids [B]


class _Batcher:
  """A mode's events in batches of _BATCH, whatever chunks they come in: each batch
  holds the events that scoring the whole day's rows at once would give it (an
  export's lists can depend on its batch, e.g. on the exclusions' width)."""

  def __init__(self, exclude: bool):
    self._exclude = exclude
    self._pending: collections.deque[tuple[_Chunk, np.ndarray]] = collections.deque()
    self._count = 0

  def add(self, chunk: _Chunk, rows: np.ndarray) -> Iterator[_Batch]:
    """Queues the events `rows` of `chunk`; yields the batches now full."""
    if len(rows):  # a chunk with none is not held
      self._pending.append((chunk, rows))
      self._count += len(rows)
    while self._count >= _BATCH:
      yield self._take(_BATCH)

  def flush(self) -> Iterator[_Batch]:
    """The last batch, of the events still queued (none when there are none)."""
    if self._count:
      yield self._take(self._count)

  def _take(self, size: int) -> _Batch:
    pieces: list[tuple[_Chunk, np.ndarray]] = []
    while size > sum(len(rows) for _, rows in pieces):
      chunk, rows = self._pending.popleft()
      wanted = size - sum(len(r) for _, r in pieces)
      if len(rows) > wanted:
        self._pending.appendleft((chunk, rows[wanted:]))
      pieces.append((chunk, rows[:wanted]))
    self._count -= size
    exclude = (corpus_lib.concat_padded([c.seen.matrix(r) for c, r in pieces])
               if self._exclude else np.zeros((size, 0), object))
    return _Batch({name: corpus_lib.concat_padded([c.events[name][r] for c, r in pieces])
                   for name in features_lib.QUERY_FEATURES}, exclude,
                  np.concatenate([c.events["item_id"][r] for c, r in pieces]))


@dataclasses.dataclass
class _Extras:
  """What is scored beyond recall: diversity (`request`, `size`, each export's
  corpus) and the funnel (the ranker, and the export whose lists it re-ranks)."""
  request: Optional[DiverseRequest] = None
  size: int = 0
  corpora: Optional[dict[str, diversity.CorpusItems]] = None
  ranker: Optional[tf.Module] = None
  funnel_export: Optional[str] = None


class _Scores:
  """Per mode, each method's target rank of every event scored, batch after batch
  and chunk after chunk, in the order of the day's rows; with diversity, the
  diverse lists' ranks and both lists' corpus rows; with the funnel, the re-ranked
  lists' ranks and what re-ranking cost."""

  def __init__(self, loaded: Mapping[str, tf.Module], k: int, extras: _Extras):
    self._loaded, self._k, self._extras = loaded, k, extras
    methods = list(loaded) + ["popularity", "covisitation"]
    self._ranks = {mode: {m: [] for m in methods} for mode in MODES}
    self._diverse = {mode: {name: {"ranks": [], "plain": [], "diverse": []}
                            for name in loaded} for mode in MODES}
    self._reranked: dict[str, list[np.ndarray]] = {mode: [] for mode in MODES}
    self.funnel_seconds = 0.0

  def batch(self, mode: str, batch: _Batch) -> None:
    """Scores the exports on a batch of `mode`'s events."""
    extras = self._extras
    # Made once for every export and signature.
    inputs = {name: tf.constant(value) for name, value in batch.inputs.items()}
    exclude = tf.constant(batch.exclude, tf.string, shape=batch.exclude.shape)
    for name, model in self._loaded.items():
      items = _query(model, inputs, exclude, self._k)
      self._ranks[mode][name].append(recall.hit_ranks(items, batch.targets))
      if extras.request is not None:
        chosen = _query(model, inputs, exclude, extras.size, extras.request)
        found = self._diverse[mode][name]
        found["ranks"].append(recall.hit_ranks(chosen, batch.targets))
        for kind, heads in (("plain", items[:, :extras.size]), ("diverse", chosen)):
          found[kind].append(extras.corpora[name].rows_of(heads).astype(np.int32))
      if extras.ranker is not None and name == extras.funnel_export:
        started = time.perf_counter()
        scores = funnel.teacher_scores(extras.ranker, batch.inputs,
                                       np.arange(len(items)), items)
        self._reranked[mode].append(
            recall.hit_ranks(funnel.reranked(items, scores), batch.targets))
        self.funnel_seconds += time.perf_counter() - started

  def baselines(self, chunk: _Chunk, popular: np.ndarray, recent: np.ndarray,
                training: records.TrainingInteractions) -> None:
    """Ranks the chunk's events in both baselines' lists (places: each corpus item's
    place in the popularity order of all counts and of the recent ones)."""
    # The co-visited items of each distinct query item, as corpus positions.
    slots: dict[bytes, int] = {}
    query_slots = np.array([slots.setdefault(q, len(slots)) if q else -1
                            for q in _query_items(chunk.events).tolist()], np.int64)
    cov_slots, cov_items, cov_counts = training.covisits_of(training.items.get(list(slots)))
    cov_items = chunk.seen_items[cov_items]  # seen's names start with the training items
    rank = {  # event rows -> ranks
        "popularity": lambda rows, seen: baselines.popularity_ranks_at(
            popular, chunk.targets[rows], *seen),
        "covisitation": lambda rows, seen: baselines.covisitation_ranks_at(
            recent, query_slots[rows], cov_slots, cov_items, cov_counts,
            chunk.targets[rows], *seen),
    }
    nothing = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for method, of in rank.items():
      self._ranks["all"][method].append(of(chunk.rows("all"), nothing))
      self._ranks["seen_excluded"][method].append(
          of(chunk.novel_rows, chunk.seen_pairs(chunk.novel_rows)))

  def ranks(self) -> Ranks:
    """Every method's target ranks, per mode, in the order of the day's rows."""
    return {mode: {m: _joined(r, np.zeros(0, np.int64)) for m, r in by_method.items()}
            for mode, by_method in self._ranks.items()}

  def diversity(self, ranks: Ranks) -> dict[str, Any]:
    """The "diversity" entry: recall and diversity of each export's diverse lists and
    of its plain ones (`ranks`: its retrieve lists' target ranks)."""
    extras = self._extras
    size = extras.size
    ks = sorted({c for c in KS if c <= size} | {size})
    empty = np.zeros((0, size), np.int32)
    return {"theta": extras.request.theta, "num_candidates": extras.request.num_candidates,
            "k": size, "ks": ks,
            "recall": {mode: {name: {
                kind: {str(c): v for c, v in recall.recall_at(r, ks).items()}
                for kind, r in (("plain", ranks[mode][name]),
                                ("diverse", _joined(found["ranks"], empty[:, 0])))}
                              for name, found in by_export.items()}
                       for mode, by_export in self._diverse.items()},
            "lists": {mode: {name: {
                kind: extras.corpora[name].figures(_joined(found[kind], empty))
                for kind in ("plain", "diverse")}
                             for name, found in by_export.items()}
                      for mode, by_export in self._diverse.items()}}

  def funnel(self, ranker_dir: str, ranks: Ranks) -> dict[str, Any]:
    """The "funnel" entry: the lists of the funnel's export re-ranked by the ranker
    export at `ranker_dir`."""
    export, k = self._extras.funnel_export, self._k
    # With no lists, funnel_metrics gives the entry's header alone.
    entry = funnel.funnel_metrics(self._extras.ranker, ranker_dir, {}, {}, {}, export, k)
    del entry["seconds"]
    for mode, reranked in self._reranked.items():
      entry[mode] = funnel.figures(ranks[mode][export],
                                   _joined(reranked, np.zeros(0, np.int64)), k)
    entry["seconds"] = round(self.funnel_seconds, 2)  # the re-ranking's cost
    return entry


def _by_decile(ranks: Ranks, day: _Day, ks: Sequence[int]) -> dict[str, Any]:
  """The "by_popularity_decile" entry: each decile's items and events, and recall."""
  corpus_counts = day.corpus_counts
  corpus_deciles = baselines.popularity_deciles(day.corpus, corpus_counts)
  target_decile = np.where(day.targets >= 0, corpus_deciles[np.maximum(day.targets, 0)]
                           if len(corpus_deciles) else -1, -1)
  of_rows = {"all": target_decile, "seen_excluded": target_decile[day.novel_rows]}
  return {
      "deciles": [{
          "decile": d,
          "num_items": int(np.sum(corpus_deciles == d)),
          "min_count": int(corpus_counts[corpus_deciles == d].min(initial=0)),
          "max_count": int(corpus_counts[corpus_deciles == d].max(initial=0)),
          "num_events": int(np.sum(target_decile == d)),
          "num_events_seen_excluded": int(np.sum(of_rows["seen_excluded"] == d)),
      } for d in range(baselines.NUM_DECILES)],
      **{mode: {method: _decile_table(r, of_rows[mode], ks)
                for method, r in by_method.items()}
         for mode, by_method in ranks.items()},
  }


def _recall_figures(ranks: Ranks, ks: Sequence[int], k: int) -> dict[str, Any]:
  """recall@ks and the recall curve to k of every method; with both exports, the
  recall the ANN loses (exact - ScaNN)."""
  figures: dict[str, Any] = {
      "recall": {mode: {method: {str(c): v for c, v in recall.recall_at(r, ks).items()}
                        for method, r in by_method.items()}
                 for mode, by_method in ranks.items()},
      "recall_curve": {mode: {method: recall.recall_curve(r, k)
                              for method, r in by_method.items()}
                       for mode, by_method in ranks.items()},
  }
  found = figures["recall"]
  if all("scann" in by_method and "exact" in by_method for by_method in found.values()):
    figures["ann_loss"] = {
        mode: {str(c): found[mode]["exact"][str(c)] - found[mode]["scann"][str(c)]
               for c in ks if found[mode]["exact"][str(c)] is not None}
        for mode in ranks}
  return figures


def diversity_summary(metrics: Mapping[str, Any]) -> Optional[dict[str, Any]]:
  """The headline of metrics.json's "diversity" (None without it): per mode and
  export, recall@k and mean pairwise distance of the plain and the diverse lists."""
  found = metrics.get("diversity")
  if found is None:
    return None
  k = str(found["k"])
  return {"theta": found["theta"], "k": found["k"],
          "num_candidates": found["num_candidates"],
          **{mode: {name: {
              "recall": {kind: figures[k] for kind, figures in by_kind.items()},
              "pairwise_distance": {kind: figures["pairwise_distance"] for kind, figures
                                    in found["lists"][mode][name].items()}}
                    for name, by_kind in by_export.items()}
             for mode, by_export in found["recall"].items()}}


def compute_metrics(workdir: str, day: datetime.date, exports: Mapping[str, str],
                    state: EvaluationState,
                    settings: EvaluationSettings = EvaluationSettings(),
                    chunk_events: int = CHUNK_EVENTS) -> dict[str, Any]:
  """Scores the exports {"scann"/"exact": version dir} on day D's events.

  The day is read and scored `chunk_events` events at a time: what is held is one
  chunk's events, and of every event its ranks (and with diversity its lists' corpus
  rows), whatever the day's size. The figures do not depend on `chunk_events`.

  Returns:
    The metrics of metrics.json (see the module docstring).

  Raises:
    ValueError: no events on day D, or one that cannot be read; with diversity, an
      export item the corpus of its day lacks.
    FileNotFoundError: with diversity, no corpus of the export's day
      (diversity.corpus_pattern).
  """
  loaded = {name: state.exports.load(path) for name, path in exports.items()}
  meta = {name: versions.read_metadata(path) for name, path in exports.items()}
  corpus = loaded["exact" if "exact" in loaded else "scann"].item_ids.numpy()
  k = min([max(KS)] + [m["max_k"] for m in meta.values()])
  ks = [c for c in KS if c <= k] or [k]
  max_history = next(iter(meta.values()))["config"]["max_history"]
  training = state.interactions.before(workdir, day)
  extras = _Extras()
  if settings.diversity_theta is not None:
    count = min([settings.diversity_candidates] + [m["max_k"] for m in meta.values()])
    extras.request = DiverseRequest(float(settings.diversity_theta), count)
    extras.size = min(settings.diversity_k, count, k)
    extras.corpora = {name: diversity.CorpusItems.of(
        model.item_ids.numpy(), model.item_embeddings.numpy(),
        diversity.corpus_pattern(workdir, meta[name])) for name, model in loaded.items()}
  ranker_dir = ranker_export.ranker_before(workdir, day) if settings.funnel else None
  if ranker_dir is not None:
    extras.ranker = state.rankers.load(ranker_dir)
    extras.funnel_export = "exact" if "exact" in loaded else "scann"
  logging.info("scoring %s on the events of %s", sorted(exports.values()), day)
  scored = _Day(corpus, training)
  scores = _Scores(loaded, k, extras)
  popular = baselines.counts_order_places(corpus, scored.corpus_counts)
  recent = baselines.counts_order_places(corpus, training.recent_of(corpus.tolist()))
  batchers = {mode: _Batcher(exclude=mode != "all") for mode in MODES}
  kept: dict[str, list[np.ndarray]] = {name: [] for name in _REMEMBERED}
  for events in records.iter_events(workdir, day, max_history, chunk_events):
    for name, parts in kept.items():
      parts.append(events[name])
    chunk = scored.add(_padded(events, max_history))
    scores.baselines(chunk, popular, recent, training)
    for mode, batcher in batchers.items():
      for batch in batcher.add(chunk, chunk.rows(mode)):
        scores.batch(mode, batch)
  for mode, batcher in batchers.items():
    for batch in batcher.flush():
      scores.batch(mode, batch)
  training.remember(day, {name: _joined(parts, corpus_lib.empty_column(name))
                          for name, parts in kept.items()})
  if scored.num_events == 0:
    raise ValueError(f"{workdir_lib.Workdir(workdir).data_dir(day)}: no events to evaluate")
  logging.info("scored %d events of %s", scored.num_events, day)
  ranks = scores.ranks()
  targets = scored.targets
  metrics = {
      "day": day.isoformat(),
      "num_events": len(targets),
      "num_events_seen_excluded": len(scored.novel_rows),
      "ks": ks,
      "exports": {name: {"dir": path, "version": meta[name]["version"],
                         "exported_from_day": meta[name]["day"],
                         "ann_recall_at_10": meta[name]["ann"]["recall_at_10"]}
                  for name, path in exports.items()},
      "corpus_size": int(len(corpus)),
      "target_in_corpus": float(np.mean(targets >= 0)),
      "training_days": training.day_names,
      "num_training_events": training.num_events,
      "recent_days": training.recent_day_names,
      **_recall_figures(ranks, ks, k),
      "by_popularity_decile": _by_decile(ranks, scored, ks),
  }
  if extras.request is not None:
    metrics["diversity"] = scores.diversity(ranks)
  if settings.funnel:
    metrics["funnel"] = (scores.funnel(ranker_dir, ranks) if ranker_dir is not None
                         else funnel.skipped(day))
  return metrics


def write_metrics(workdir: str, day: datetime.date, metrics: Mapping[str, Any],
                  plot: bool = True) -> tuple[str, Optional[str]]:
  """Writes W/eval/D/metrics.json and, with `plot`, W/eval/D/recall.png (atomically).

  Returns:
    (the metrics path, the plot path or None).
  """
  directory = workdir_lib.Workdir(workdir).eval_dir(day)
  path = workdir_lib.write_json(os.path.join(directory, workdir_lib.METRICS), metrics,
                                indent=2, sort_keys=True)
  return path, plots.plot_recall(metrics, os.path.join(directory, PLOT_FILE)) if plot else None


def plot_day(workdir: str, day: datetime.date) -> str:
  """Draws W/eval/D/recall.png from W/eval/D/metrics.json (a day evaluated without
  its plot); returns its path.

  Raises:
    FileNotFoundError: day D has no metrics.json.
  """
  directory = workdir_lib.Workdir(workdir).eval_dir(day)
  path = os.path.join(directory, workdir_lib.METRICS)
  if not workdir_lib.exists(path):
    raise FileNotFoundError(f"{path}: no metrics: {day} was not evaluated")
  return plots.plot_recall(workdir_lib.read_json(path), os.path.join(directory, PLOT_FILE))


def evaluate_day(workdir: str, day: datetime.date, scann_dir: Optional[str],
                 exact_dir: Optional[str], state: Optional[EvaluationState] = None,
                 plot: bool = True,
                 settings: EvaluationSettings = EvaluationSettings()) -> dict[str, Any]:
  """Scores the exports on day D's events; writes W/eval/D/metrics.json and recall.png.

  Args:
    workdir: the workdir.
    day: the day whose events are scored (not yet trained on).
    scann_dir, exact_dir: export version directories; either may be None, not both.
    state: what the caller keeps between days (None: a fresh one; the training
      interactions persist in the workdir either way).
    plot: draw W/eval/D/recall.png. It costs more than the rest of the evaluation
      (matplotlib), and `plot_day` draws it later from metrics.json.
    settings: what is scored beyond recall (EvaluationSettings).

  Returns:
    The metrics written to metrics.json (see the module docstring).

  Raises:
    ValueError: no export given, or no events on day D.
  """
  exports = {name: path for name, path in (("scann", scann_dir), ("exact", exact_dir))
             if path}
  if not exports:
    raise ValueError("evaluate_day needs at least one export directory")
  metrics = compute_metrics(workdir, day, exports, state or EvaluationState(), settings)
  write_metrics(workdir, day, metrics, plot=plot)
  logging.info("evaluated %s: %s", day, json.dumps(metrics["recall"]))
  return metrics
