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

Targets outside the export's corpus count as misses (fresh items the export does
not know). `evaluate_day` is `compute_metrics` then `write_metrics`
(W/eval/D/metrics.json and W/eval/D/recall.png).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np
import scann  # noqa: F401  (registers ScaNN's TF ops: the ScaNN export needs them)
import tensorflow as tf

from core import workdir as workdir_lib
from evaluation import baselines
from evaluation import plots
from evaluation import recall
from evaluation import records
from models import features as features_lib
from serving import exporter
from serving import servable
from serving import versions

KS = (10, 50, 100)
PLOT_FILE = "recall.png"
_BATCH = 256

Ranks = dict[str, dict[str, np.ndarray]]  # {mode: {method: ranks}}


@dataclasses.dataclass
class EvaluationState:
  """What evaluations keep from one day to the next, owned by the caller (bounded).

  Attributes:
    exports: the exports loaded last; give it an ExportState's `published` to
      score the export made the day before without loading it again.
    interactions: the running total of the training interactions (item counts,
      seen items, co-visitation counts, the recent days' counts).
  """
  exports: exporter.LoadedExports = dataclasses.field(
      default_factory=exporter.LoadedExports)
  interactions: records.TrainingInteractions = dataclasses.field(
      default_factory=records.TrainingInteractions)


def retrieve_ranks(loaded: tf.Module, events: dict[str, np.ndarray], rows: np.ndarray,
                   k: int, exclusions: Optional[list[frozenset[bytes]]] = None
                   ) -> np.ndarray:
  """Rank of each selected event's target in the export's top k (recall.MISS if absent).

  Args:
    loaded: a loaded export (tf.saved_model.load).
    events: day features (QUERY_FEATURES and item_id), [num_events, ...].
    rows: which events to score.
    k: items to retrieve.
    exclusions: per event (indexed like `events`), ids the export must leave out.
  """
  signature = loaded.signatures[servable.RETRIEVE]
  ranks = np.full(len(rows), recall.MISS, np.int64)
  if exclusions is None:
    exclusions = [frozenset()] * len(events["item_id"])
  for start in range(0, len(rows), _BATCH):
    batch = rows[start:start + _BATCH]
    inputs = {name: tf.constant(events[name][batch])
              for name in features_lib.QUERY_FEATURES}
    excluded = [list(exclusions[i]) for i in batch]
    width = max((len(e) for e in excluded), default=0)
    matrix = np.full((len(batch), width), b"", object)
    for j, items in enumerate(excluded):
      matrix[j, :len(items)] = items
    out = signature(**inputs, k=tf.constant(k, tf.int32),
                    exclude_item_ids=tf.constant(matrix, tf.string, shape=matrix.shape))
    ranks[start:start + len(batch)] = recall.hit_ranks(out["item_ids"].numpy(),
                                                       events["item_id"][batch])
  return ranks


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


def _score(loaded: Mapping[str, tf.Module], events: dict[str, np.ndarray],
           seen: list[frozenset[bytes]], novel_rows: np.ndarray, corpus: np.ndarray,
           corpus_counts: np.ndarray, training: records.TrainingInteractions,
           k: int) -> Ranks:
  """Target ranks of every export and of the baselines, in both modes."""
  targets = events["item_id"]
  ranks: Ranks = {"all": {}, "seen_excluded": {}}
  for name, model in loaded.items():
    ranks["all"][name] = retrieve_ranks(model, events, np.arange(len(targets)), k)
    ranks["seen_excluded"][name] = retrieve_ranks(model, events, novel_rows, k, seen)
  queries = _query_items(events)
  recent_counts = np.array([training.recent.get(i, 0) for i in corpus.tolist()], np.int64)
  baseline_ranks = {  # (event rows, their seen sets or None) -> ranks
      "popularity": lambda rows, excluded: baselines.popularity_ranks(
          corpus, corpus_counts, targets[rows], excluded),
      "covisitation": lambda rows, excluded: baselines.covisitation_ranks(
          corpus, recent_counts, training.covisits, queries[rows], targets[rows],
          excluded),
  }
  for method, rank in baseline_ranks.items():
    ranks["all"][method] = rank(np.arange(len(targets)), None)
    ranks["seen_excluded"][method] = rank(novel_rows, [seen[i] for i in novel_rows])
  return ranks


def _by_decile(ranks: Ranks, corpus: np.ndarray, corpus_counts: np.ndarray,
               targets: np.ndarray, novel_rows: np.ndarray, ks: Sequence[int]
               ) -> dict[str, Any]:
  """The "by_popularity_decile" entry: each decile's items and events, and recall."""
  corpus_deciles = baselines.popularity_deciles(corpus, corpus_counts)
  decile_of = dict(zip(corpus.tolist(), corpus_deciles))
  target_decile = np.array([decile_of.get(t, -1) for t in targets.tolist()])
  of_rows = {"all": target_decile, "seen_excluded": target_decile[novel_rows]}
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


def compute_metrics(workdir: str, day: datetime.date, exports: Mapping[str, str],
                    state: EvaluationState) -> dict[str, Any]:
  """Scores the exports {"scann"/"exact": version dir} on day D's events.

  Returns:
    The metrics of metrics.json (see the module docstring).

  Raises:
    ValueError: no events on day D.
  """
  loaded = {name: state.exports.load(path) for name, path in exports.items()}
  meta = {name: versions.read_metadata(path) for name, path in exports.items()}
  corpus = loaded["exact" if "exact" in loaded else "scann"].item_ids.numpy()
  k = min([max(KS)] + [m["max_k"] for m in meta.values()])
  ks = [c for c in KS if c <= k] or [k]
  events = records.read_events(workdir, day,
                               next(iter(meta.values()))["config"]["max_history"])
  if len(events["item_id"]) == 0:
    raise ValueError(f"{workdir_lib.Workdir(workdir).data_dir(day)}: no events to evaluate")
  logging.info("scoring %s on %d events of %s", sorted(exports.values()),
               len(events["item_id"]), day)
  training = state.interactions.before(workdir, day)
  seen = records.seen_sets(events, training.seen)
  targets = events["item_id"]
  novel_rows = np.flatnonzero([t not in s for t, s in zip(targets.tolist(), seen)])
  corpus_counts = np.array([training.counts.get(i, 0) for i in corpus.tolist()], np.int64)
  ranks = _score(loaded, events, seen, novel_rows, corpus, corpus_counts, training, k)
  in_corpus = set(corpus.tolist())
  metrics = {
      "day": day.isoformat(),
      "num_events": len(targets),
      "num_events_seen_excluded": len(novel_rows),
      "ks": ks,
      "exports": {name: {"dir": path, "version": meta[name]["version"],
                         "exported_from_day": meta[name]["day"],
                         "ann_recall_at_10": meta[name]["ann"]["recall_at_10"]}
                  for name, path in exports.items()},
      "corpus_size": int(len(corpus)),
      "target_in_corpus": float(np.mean([t in in_corpus for t in targets.tolist()])),
      "training_days": training.day_names,
      "num_training_events": int(sum(training.counts.values())),
      "recent_days": training.recent_day_names,
      **_recall_figures(ranks, ks, k),
      "by_popularity_decile": _by_decile(ranks, corpus, corpus_counts, targets,
                                         novel_rows, ks),
  }
  return metrics


def write_metrics(workdir: str, day: datetime.date, metrics: Mapping[str, Any]
                  ) -> tuple[str, str]:
  """Writes W/eval/D/metrics.json and W/eval/D/recall.png (each atomically).

  Returns:
    (the metrics path, the plot path).
  """
  directory = workdir_lib.Workdir(workdir).eval_dir(day)
  path = workdir_lib.write_json(os.path.join(directory, workdir_lib.METRICS), metrics,
                                indent=2, sort_keys=True)
  return path, plots.plot_recall(metrics, os.path.join(directory, PLOT_FILE))


def evaluate_day(workdir: str, day: datetime.date, scann_dir: Optional[str],
                 exact_dir: Optional[str], state: Optional[EvaluationState] = None
                 ) -> dict[str, Any]:
  """Scores the exports on day D's events; writes W/eval/D/metrics.json and recall.png.

  Args:
    workdir: the workdir.
    day: the day whose events are scored (not yet trained on).
    scann_dir, exact_dir: export version directories; either may be None, not both.
    state: what the caller keeps between days (None: a fresh one).

  Returns:
    The metrics written to metrics.json (see the module docstring).

  Raises:
    ValueError: no export given, or no events on day D.
  """
  exports = {name: path for name, path in (("scann", scann_dir), ("exact", exact_dir))
             if path}
  if not exports:
    raise ValueError("evaluate_day needs at least one export directory")
  metrics = compute_metrics(workdir, day, exports, state or EvaluationState())
  write_metrics(workdir, day, metrics)
  logging.info("evaluated %s: %s", day, json.dumps(metrics["recall"]))
  return metrics
