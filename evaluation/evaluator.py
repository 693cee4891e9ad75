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
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence

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
from serving import exporter
from serving import ranker_export
from serving import servable
from serving import versions

KS = (10, 50, 100)
PLOT_FILE = "recall.png"
_BATCH = 256

Ranks = dict[str, dict[str, np.ndarray]]  # {mode: {method: ranks}}
Lists = dict[str, dict[str, np.ndarray]]  # {mode: {export: item ids [events, k]}}


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


class Retrieved(NamedTuple):
  """What an export returned for the selected events.

  Attributes:
    ranks: each event's target rank in its list (recall.MISS if absent) [events].
    heads: the first `keep` item ids of each list, "" padded [events, keep].
  """
  ranks: np.ndarray
  heads: np.ndarray


def retrieve(loaded: tf.Module, events: dict[str, np.ndarray], rows: np.ndarray,
             k: int, exclusions: Optional[records.SeenItems] = None, keep: int = 0,
             diverse: Optional[DiverseRequest] = None) -> Retrieved:
  """Queries the export with the selected events: through `retrieve`, or with
  `diverse` through `retrieve_diverse`.

  Args:
    loaded: a loaded export (tf.saved_model.load).
    events: day features (QUERY_FEATURES and item_id), [num_events, ...].
    rows: which events to score.
    k: items to retrieve.
    exclusions: each event's seen items (indexed like `events`), which the export
      must leave out (None: nothing).
    keep: the leading items of each list to return (0: none; lists are dropped
      batch by batch, so a large k costs no memory).
    diverse: theta and N of retrieve_diverse (None: plain retrieve).
  """
  if not 0 <= keep <= k:
    raise ValueError(f"need 0 <= keep <= k, got keep={keep}, k={k}")
  signature = loaded.signatures[servable.RETRIEVE if diverse is None
                                else servable.RETRIEVE_DIVERSE]
  extra = {} if diverse is None else {
      "num_candidates": tf.constant(diverse.num_candidates, tf.int32),
      "theta": tf.constant(diverse.theta, tf.float32)}
  ranks = np.full(len(rows), recall.MISS, np.int64)
  heads = np.full((len(rows), keep), b"", object)
  for start in range(0, len(rows), _BATCH):
    batch = rows[start:start + _BATCH]
    inputs = {name: tf.constant(events[name][batch])
              for name in features_lib.QUERY_FEATURES}
    matrix = (exclusions.matrix(batch) if exclusions is not None
              else np.zeros((len(batch), 0), object))
    if diverse is not None:
      extra["boost_item_ids"] = tf.zeros([len(batch), 0], tf.string)
      extra["boosts"] = tf.zeros([len(batch), 0], tf.float32)
    out = signature(**inputs, **extra, k=tf.constant(k, tf.int32),
                    exclude_item_ids=tf.constant(matrix, tf.string, shape=matrix.shape))
    items = out["item_ids"].numpy()
    ranks[start:start + len(batch)] = recall.hit_ranks(items, events["item_id"][batch])
    heads[start:start + len(batch)] = items[:, :keep]
  return Retrieved(ranks, heads)


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


@dataclasses.dataclass
class _Day:
  """Day D's events against the corpus: positions are corpus positions (-1: outside)."""
  events: dict[str, np.ndarray]
  seen: records.SeenItems
  novel_rows: np.ndarray
  corpus: np.ndarray
  corpus_counts: np.ndarray
  targets: np.ndarray     # corpus position of each event's target
  seen_items: np.ndarray  # corpus position of each of `seen`'s names

  @classmethod
  def of(cls, events: dict[str, np.ndarray], corpus: np.ndarray,
         training: records.TrainingInteractions) -> "_Day":
    seen = records.SeenItems.of(events, training)
    position = {item: j for j, item in enumerate(corpus.tolist())}
    seen_items = np.array([position.get(i, -1) for i in seen.names.tolist()], np.int64)
    return cls(events=events, seen=seen, novel_rows=seen.novel_rows(), corpus=corpus,
               corpus_counts=training.counts_of(corpus.tolist()),
               targets=seen_items[seen.target], seen_items=seen_items)

  def rows(self, mode: str) -> np.ndarray:
    """The events scored in `mode`: all, or those whose target was not seen."""
    return np.arange(len(self.targets)) if mode == "all" else self.novel_rows

  def exclusions(self, mode: str) -> Optional[records.SeenItems]:
    """What an export must leave out in `mode`: nothing, or each event's seen items."""
    return None if mode == "all" else self.seen

  def seen_pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `rows`, corpus position) of the seen items of the events `rows`."""
    at, items = self.seen.pairs(rows)
    return at, self.seen_items[items]


def _score(loaded: Mapping[str, tf.Module], day: _Day,
           training: records.TrainingInteractions, k: int, keep: int = 0
           ) -> tuple[Ranks, Lists]:
  """Target ranks of every export and of the baselines, in both modes; and the
  first `keep` items of every export's lists."""
  events, novel_rows, corpus = day.events, day.novel_rows, day.corpus
  ranks: Ranks = {"all": {}, "seen_excluded": {}}
  lists: Lists = {"all": {}, "seen_excluded": {}}
  for name, model in loaded.items():
    for mode in ranks:
      ranks[mode][name], lists[mode][name] = retrieve(model, events, day.rows(mode), k,
                                                      day.exclusions(mode), keep)
  popular = baselines.counts_order_places(corpus, day.corpus_counts)
  recent = baselines.counts_order_places(corpus, training.recent_of(corpus.tolist()))
  # The co-visited items of each distinct query item, as corpus positions.
  slots: dict[bytes, int] = {}
  query_slots = np.array([slots.setdefault(q, len(slots)) if q else -1
                          for q in _query_items(events).tolist()], np.int64)
  cov_slots, cov_items, cov_counts = training.covisits_of(training.items.get(list(slots)))
  cov_items = day.seen_items[cov_items]  # seen's names start with the training items
  baseline_ranks = {  # event rows -> ranks
      "popularity": lambda rows, seen: baselines.popularity_ranks_at(
          popular, day.targets[rows], *seen),
      "covisitation": lambda rows, seen: baselines.covisitation_ranks_at(
          recent, query_slots[rows], cov_slots, cov_items, cov_counts, day.targets[rows],
          *seen),
  }
  nothing = (np.zeros(0, np.int64), np.zeros(0, np.int64))
  for method, rank in baseline_ranks.items():
    ranks["all"][method] = rank(np.arange(len(day.targets)), nothing)
    ranks["seen_excluded"][method] = rank(novel_rows, day.seen_pairs(novel_rows))
  return ranks, lists


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


def _diversity(workdir: str, loaded: Mapping[str, tf.Module],
               meta: Mapping[str, dict[str, Any]], day: _Day, ranks: Ranks, plain: Lists,
               settings: EvaluationSettings, k: int) -> dict[str, Any]:
  """The "diversity" entry: recall and diversity of each export's diverse lists and
  of its plain ones (`ranks` and `plain`: its retrieve lists' target ranks and first
  items)."""
  count = min([settings.diversity_candidates] + [m["max_k"] for m in meta.values()])
  size = min(settings.diversity_k, count, k)
  ks = sorted({c for c in KS if c <= size} | {size})
  diverse = DiverseRequest(float(settings.diversity_theta), count)
  found: dict[str, dict[str, Any]] = {"all": {}, "seen_excluded": {}}
  lists: dict[str, dict[str, Any]] = {"all": {}, "seen_excluded": {}}
  for name, model in loaded.items():
    items = diversity.CorpusItems.of(model.item_ids.numpy(), model.item_embeddings.numpy(),
                                     diversity.corpus_pattern(workdir, meta[name]))
    for mode in found:
      chosen = retrieve(model, day.events, day.rows(mode), size, day.exclusions(mode),
                        size, diverse)
      found[mode][name] = {
          kind: {str(c): v for c, v in recall.recall_at(r, ks).items()}
          for kind, r in (("plain", ranks[mode][name]), ("diverse", chosen.ranks))}
      lists[mode][name] = {
          kind: items.figures(items.rows_of(heads))
          for kind, heads in (("plain", plain[mode][name][:, :size]),
                              ("diverse", chosen.heads))}
  return {"theta": diverse.theta, "num_candidates": count, "k": size, "ks": ks,
          "recall": found, "lists": lists}


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
                    settings: EvaluationSettings = EvaluationSettings()) -> dict[str, Any]:
  """Scores the exports {"scann"/"exact": version dir} on day D's events.

  Returns:
    The metrics of metrics.json (see the module docstring).

  Raises:
    ValueError: no events on day D; with diversity, an export item the corpus of
      its day lacks.
    FileNotFoundError: with diversity, no corpus of the export's day
      (diversity.corpus_pattern).
  """
  loaded = {name: state.exports.load(path) for name, path in exports.items()}
  meta = {name: versions.read_metadata(path) for name, path in exports.items()}
  corpus = loaded["exact" if "exact" in loaded else "scann"].item_ids.numpy()
  k = min([max(KS)] + [m["max_k"] for m in meta.values()])
  ks = [c for c in KS if c <= k] or [k]
  training = state.interactions.before(workdir, day)
  events = records.read_events(workdir, day,
                               next(iter(meta.values()))["config"]["max_history"])
  training.remember(day, events)
  if len(events["item_id"]) == 0:
    raise ValueError(f"{workdir_lib.Workdir(workdir).data_dir(day)}: no events to evaluate")
  logging.info("scoring %s on %d events of %s", sorted(exports.values()),
               len(events["item_id"]), day)
  scored = _Day.of(events, corpus, training)
  diverse = settings.diversity_theta is not None
  # The funnel re-ranks the whole lists; the diversity compares their heads.
  keep = max(min(settings.diversity_k, k) if diverse else 0, k if settings.funnel else 0)
  ranks, plain = _score(loaded, scored, training, k, keep)
  metrics = {
      "day": day.isoformat(),
      "num_events": len(scored.targets),
      "num_events_seen_excluded": len(scored.novel_rows),
      "ks": ks,
      "exports": {name: {"dir": path, "version": meta[name]["version"],
                         "exported_from_day": meta[name]["day"],
                         "ann_recall_at_10": meta[name]["ann"]["recall_at_10"]}
                  for name, path in exports.items()},
      "corpus_size": int(len(corpus)),
      "target_in_corpus": float(np.mean(scored.targets >= 0)),
      "training_days": training.day_names,
      "num_training_events": training.num_events,
      "recent_days": training.recent_day_names,
      **_recall_figures(ranks, ks, k),
      "by_popularity_decile": _by_decile(ranks, scored, ks),
  }
  if diverse:
    metrics["diversity"] = _diversity(workdir, loaded, meta, scored, ranks, plain,
                                      settings, k)
  if settings.funnel:
    metrics["funnel"] = _funnel(workdir, day, state, scored, plain, k)
  return metrics


def _funnel(workdir: str, day: datetime.date, state: EvaluationState, scored: _Day,
            lists: Lists, k: int) -> dict[str, Any]:
  """The "funnel" entry: the exact export's lists `lists` (else ScaNN's) re-ranked
  by the newest ranker export labelled before `day`, or why there is none."""
  path = ranker_export.ranker_before(workdir, day)
  if path is None:
    return funnel.skipped(day)
  export = "exact" if "exact" in lists["all"] else "scann"
  return funnel.funnel_metrics(state.rankers.load(path), path, scored.events,
                               {mode: scored.rows(mode) for mode in lists},
                               {mode: lists[mode][export] for mode in lists}, export, k)


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
