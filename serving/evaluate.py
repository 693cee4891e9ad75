"""Offline evaluation of exports on a day's events: recall over the full corpus.

  python -m serving.evaluate --workdir=W --date=YYYY-MM-DD \
      [--scann_export=W/exports/retrieval_scann/7 --exact_export=...]

Test-then-train: the exports made before day D (by default both variants of the
newest version labelled with a day before D, serving.export.exports_before) are
scored on day D's events, W/data/D, before any training on them. Each event is a
query (its query features, as served) whose target is its item_id. Through each
export's `retrieve` signature:

  * recall@10/50/100 over all items;
  * recall@10/50/100 with the user's seen items excluded: seen = the event's
    history_item_ids, plus every item of the user's earlier events (all data days
    before D, and earlier events of D). Events whose target was seen already
    (re-consumption) cannot be hits there and are left out of that figure;
  * both by popularity decile of the target: popularity = interactions in the
    training data, the examples of every data day before D; deciles cut the
    corpus into ten equal groups (serving/recall.py);
  * the same for a popularity baseline (most interacted-with corpus items first)
    on the same events, and for the ScaNN and the exact export, whose difference
    is what the ANN loses.

Targets outside the export's corpus count as misses (fresh items the export does
not know). Writes W/eval/D/metrics.json and W/eval/D/recall.png.
"""

from __future__ import annotations

import collections
import datetime
import json
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from typing import Any, Optional, Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import scann  # noqa: E402,F401  (registers ScaNN's TF ops: the ScaNN export needs them)
import tensorflow as tf  # noqa: E402

from models import data  # noqa: E402
from models import features as features_lib  # noqa: E402
from pipeline import app_flags  # noqa: E402
from serving import export as export_lib  # noqa: E402
from serving import plots  # noqa: E402
from serving import recall  # noqa: E402
from serving import records  # noqa: E402
from serving import servable  # noqa: E402

_SCANN_EXPORT = flags.DEFINE_string(
    "scann_export", None, "ScaNN export to score (default: the newest version labelled "
    "with a day before --date).")
_EXACT_EXPORT = flags.DEFINE_string(
    "exact_export", None, "Exact export to score (default: as for --scann_export).")

KS = (10, 50, 100)
METRICS_FILE = "metrics.json"
PLOT_FILE = "recall.png"
_BATCH = 256


def eval_dir(workdir: str, day: datetime.date) -> str:
  return os.path.join(workdir, "eval", day.isoformat())


# (user_id, item_id) lists of a day's example files, keyed by the files' paths,
# sizes and mtimes: a catch-up parses each earlier day once, not once a day after.
_INTERACTIONS: dict[tuple[tuple[str, int, int], ...], tuple[list[bytes], list[bytes]]] = {}


def day_interactions(files: Sequence[str]) -> tuple[list[bytes], list[bytes]]:
  """(user ids, item ids) of every record of a day's example files, cached."""
  key = tuple((path, stat.length, stat.mtime_nsec)
              for path, stat in ((p, tf.io.gfile.stat(p)) for p in files))
  if key not in _INTERACTIONS:
    events = records.read_columns(files, ("user_id", "item_id"))
    _INTERACTIONS[key] = (events["user_id"].tolist(), events["item_id"].tolist())
  return _INTERACTIONS[key]


def training_interactions(workdir: str, day: datetime.date
                          ) -> tuple[collections.Counter, dict[bytes, set[bytes]], list[str]]:
  """Item counts and each user's items over the examples of every data day before D."""
  counts: collections.Counter = collections.Counter()
  seen: dict[bytes, set[bytes]] = collections.defaultdict(set)
  used = []
  for earlier in records.data_days(workdir):
    if earlier >= day:
      break
    users, items = day_interactions(data.example_files(workdir, earlier))
    counts.update(items)
    for user, item in zip(users, items):
      seen[user].add(item)
    used.append(earlier.isoformat())
  return counts, seen, used


def seen_sets(events: dict[str, np.ndarray],
              prior: dict[bytes, set[bytes]]) -> list[frozenset[bytes]]:
  """Per event, the items its user had interacted with before it (module docstring)."""
  today: dict[bytes, set[bytes]] = collections.defaultdict(set)
  out = []
  for user, history, item in zip(events["user_id"].tolist(),
                                 events["history_item_ids"].tolist(),
                                 events["item_id"].tolist()):
    items = set(h for h in history if h) | prior.get(user, set()) | today[user]
    out.append(frozenset(items))
    today[user].add(item)
  return out


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
  for d in range(recall.NUM_DECILES):
    found = recall.recall_at(ranks[deciles == d], ks)
    for k in ks:
      table[str(k)].append(found[k])
  return table


def _write_json(path: str, values: dict[str, Any]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(values, indent=2, sort_keys=True) + "\n")
  tf.io.gfile.rename(tmp, path, overwrite=True)


def evaluate_day(workdir: str, day: datetime.date, scann_dir: Optional[str],
                 exact_dir: Optional[str]) -> dict[str, Any]:
  """Scores the exports on day D's events; writes W/eval/D/metrics.json and recall.png.

  Args:
    workdir: the workdir.
    day: the day whose events are scored (not yet trained on).
    scann_dir, exact_dir: export version directories; either may be None, not both.

  Returns:
    The metrics written to metrics.json (see the module docstring).

  Raises:
    ValueError: no export given, or no events on day D.
  """
  exports = {name: path for name, path in (("scann", scann_dir), ("exact", exact_dir))
             if path}
  if not exports:
    raise ValueError("evaluate_day needs at least one export directory")
  loaded = {name: export_lib.load_export(path) for name, path in exports.items()}
  meta = {name: export_lib.read_metadata(path) for name, path in exports.items()}
  max_history = next(iter(meta.values()))["config"]["max_history"]
  reference = "exact" if "exact" in loaded else "scann"
  corpus = loaded[reference].item_ids.numpy()
  k = min([max(KS)] + [m["max_k"] for m in meta.values()])
  ks = [c for c in KS if c <= k] or [k]

  events = records.read_columns(data.example_files(workdir, day),
                       features_lib.QUERY_FEATURES + ("item_id",), max_history)
  num_events = len(events["item_id"])
  if num_events == 0:
    raise ValueError(f"{data.day_dir(workdir, day)}: no events to evaluate")
  counts, prior_seen, train_days = training_interactions(workdir, day)
  seen = seen_sets(events, prior_seen)
  targets = events["item_id"]
  novel = np.array([t not in s for t, s in zip(targets.tolist(), seen)])
  all_rows, novel_rows = np.arange(num_events), np.flatnonzero(novel)

  corpus_counts = np.array([counts.get(i, 0) for i in corpus.tolist()], np.int64)
  decile_of = dict(zip(corpus.tolist(), recall.popularity_deciles(corpus, corpus_counts)))
  target_decile = np.array([decile_of.get(t, -1) for t in targets.tolist()])

  ranks = {"all": {}, "seen_excluded": {}}
  for name, model in loaded.items():
    logging.info("scoring %s on %d events of %s", exports[name], num_events, day)
    ranks["all"][name] = retrieve_ranks(model, events, all_rows, k)
    ranks["seen_excluded"][name] = retrieve_ranks(model, events, novel_rows, k, seen)
  ranks["all"]["popularity"] = recall.popularity_ranks(corpus, corpus_counts, targets)
  ranks["seen_excluded"]["popularity"] = recall.popularity_ranks(
      corpus, corpus_counts, targets[novel_rows], [seen[i] for i in novel_rows])

  deciles_of_rows = {"all": target_decile, "seen_excluded": target_decile[novel_rows]}
  corpus_deciles = np.array([decile_of[i] for i in corpus.tolist()])
  metrics = {
      "day": day.isoformat(),
      "num_events": num_events,
      "num_events_seen_excluded": int(novel.sum()),
      "ks": ks,
      "exports": {name: {"dir": path, "version": meta[name]["version"],
                         "exported_from_day": meta[name]["day"],
                         "ann_recall_at_10": meta[name]["ann"]["recall_at_10"]}
                  for name, path in exports.items()},
      "corpus_size": int(len(corpus)),
      "target_in_corpus": float(np.mean(target_decile >= 0)),
      "training_days": train_days,
      "num_training_events": int(sum(counts.values())),
      "recall": {mode: {method: {str(c): v for c, v in recall.recall_at(r, ks).items()}
                        for method, r in by_method.items()}
                 for mode, by_method in ranks.items()},
      "recall_curve": {mode: {method: recall.recall_curve(r, k)
                              for method, r in by_method.items()}
                       for mode, by_method in ranks.items()},
      "by_popularity_decile": {
          "deciles": [{
              "decile": d,
              "num_items": int(np.sum(corpus_deciles == d)),
              "min_count": int(corpus_counts[corpus_deciles == d].min(initial=0)),
              "max_count": int(corpus_counts[corpus_deciles == d].max(initial=0)),
              "num_events": int(np.sum(target_decile == d)),
              "num_events_seen_excluded": int(np.sum(deciles_of_rows["seen_excluded"] == d)),
          } for d in range(recall.NUM_DECILES)],
          **{mode: {method: _decile_table(r, deciles_of_rows[mode], ks)
                    for method, r in by_method.items()}
             for mode, by_method in ranks.items()},
      },
  }
  if "scann" in loaded and "exact" in loaded:
    metrics["ann_loss"] = {
        mode: {str(c): metrics["recall"][mode]["exact"][str(c)] -
               metrics["recall"][mode]["scann"][str(c)]
               for c in ks if metrics["recall"][mode]["exact"][str(c)] is not None}
        for mode in ranks}
  directory = eval_dir(workdir, day)
  tf.io.gfile.makedirs(directory)
  _write_json(os.path.join(directory, METRICS_FILE), metrics)
  plots.plot_recall(metrics, os.path.join(directory, PLOT_FILE))
  logging.info("evaluated %s: %s", day, json.dumps(metrics["recall"]))
  return metrics


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = app_flags.workdir()
  day = app_flags.parse_day(app_flags.DATE.value)
  scann_dir, exact_dir = _SCANN_EXPORT.value, _EXACT_EXPORT.value
  if not scann_dir or not exact_dir:
    default = export_lib.exports_before(workdir, day) or (None, None)
    scann_dir, exact_dir = scann_dir or default[0], exact_dir or default[1]
  if not scann_dir and not exact_dir:
    raise app.UsageError(f"no export from a day before {day} under {workdir}/exports; "
                         "pass --scann_export/--exact_export")
  metrics = evaluate_day(workdir, day, scann_dir, exact_dir)
  print(json.dumps(metrics["recall"], indent=2))


if __name__ == "__main__":
  app.run(main)
