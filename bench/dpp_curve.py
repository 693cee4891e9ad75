r"""Recall against diversity of retrieve_diverse, theta from 0 to 1, test-then-train.

For each day D of a daily-job workdir (e.g. `python -m pipeline.demo`'s) that has an
export labelled before D, D's events (up to --max_events, drawn with a fixed seed)
are queries of that export, with each event's item as the target, as the daily
evaluation scores them (all events, nothing excluded). Each query gets what the
exact export's `retrieve_diverse` returns for k = --k of N = --num_candidates at
each theta, computed here from the export itself: its `query_embedding` signature,
its `item_embeddings` and temperature, and serving/dpp.py's greedy_map, so that
exports made before that signature existed can be measured too
(tests/test_serving_save.py checks that the signature returns the same items). Per theta:

  recall@k          share of events whose item is among the k returned;
  pairwise_distance, channels, topics, coverage, list_length
                    the intra-list diversity of evaluation/diversity.py (the daily
                    evaluation's, with --diversity_theta): channels and topics of the
                    corpus of the export's day, W/data/<day>/corpus-* (topics are
                    MovieLens' genres and decade), coverage of the day's queries.

Figures are event-weighted means over the days (coverage: the mean of the days).
theta = 1 is the plain top k, the exact export's `retrieve` (the evaluation's
exact recall@k on the same events).

  python bench/dpp_curve.py --workdir=workdir/demo --json_out=/tmp/dpp_curve.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import workdir as workdir_lib  # noqa: E402
from evaluation import diversity  # noqa: E402
from evaluation import recall  # noqa: E402
from evaluation import records  # noqa: E402
from models import data  # noqa: E402
from models import features  # noqa: E402
from serving import dpp  # noqa: E402
from serving import versions  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "A daily job's workdir.")
_THETAS = flags.DEFINE_list("thetas", ["0", "0.1", "0.2", "0.3", "0.5", "0.7", "0.9", "1"],
                            "The trade-offs measured.")
_K = flags.DEFINE_integer("k", 10, "Items per list (recall@k).")
_N = flags.DEFINE_integer("num_candidates", 200, "N: the exact top N the DPP chooses from.")
_MAX_EVENTS = flags.DEFINE_integer("max_events", 5000, "Events scored per day (at most).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here.")

_BATCH = 256


@tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32),
                              tf.TensorSpec([None, None], tf.float32),
                              tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32)])
def _choose(embeddings: tf.Tensor, scores: tf.Tensor, k: tf.Tensor,
            theta: tf.Tensor) -> tf.Tensor:
  return dpp.greedy_map(embeddings, scores, k, theta).indices


def _lists(loaded: tf.Module, events: dict[str, np.ndarray], temperature: float,
           thetas: Sequence[float]) -> dict[float, np.ndarray]:
  """Corpus rows [events, k] of each theta's lists (-1 pads a row stopped early)."""
  items = loaded.item_embeddings.numpy()
  embed = loaded.signatures["query_embedding"]
  lists = {theta: [] for theta in thetas}
  for start in range(0, len(events["item_id"]), _BATCH):
    queries = embed(**{name: tf.constant(events[name][start:start + _BATCH])
                       for name in features.QUERY_FEATURES})["query_embedding"].numpy()
    dots = queries @ items.T
    count = min(_N.value, items.shape[0])
    top = np.argpartition(-dots, count - 1, axis=1)[:, :count]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(dots, top, 1), 1,
                                             kind="stable"), 1)
    candidates = tf.constant(items[top])
    scores = tf.constant(np.take_along_axis(dots, top, 1) / temperature, tf.float32)
    for theta in thetas:
      chosen = _choose(candidates, scores, tf.constant(_K.value),
                       tf.constant(theta, tf.float32)).numpy()
      lists[theta].append(np.where(chosen >= 0, np.take_along_axis(
          top, np.maximum(chosen, 0), 1), -1))
  return {theta: np.concatenate(parts) for theta, parts in lists.items()}


def _figures(rows: np.ndarray, targets: np.ndarray, items: diversity.CorpusItems
             ) -> dict[str, float]:
  """One day's figures of one theta (see the module docstring)."""
  ids = np.where(rows >= 0, items.ids[np.maximum(rows, 0)], b"")
  hits = recall.hit_ranks(ids, targets) != recall.MISS
  return {"recall": float(np.mean(hits)), **items.figures(rows)}


def measure(workdir: str, thetas: Sequence[float]) -> dict[str, Any]:
  """Per-day and overall figures of every theta over the days with an export before."""
  days = sorted(workdir_lib.partition_files(workdir_lib.Workdir(workdir).data_root,
                                            data.EXAMPLES_PATTERN))
  rng = np.random.default_rng(0)
  per_day = {}
  for day in days:
    found = versions.exports_before(workdir, day)
    if found is None:
      continue
    exact_dir = found[1]
    loaded = tf.saved_model.load(exact_dir)
    meta = versions.read_metadata(exact_dir)
    items = diversity.CorpusItems.of(loaded.item_ids.numpy(),
                                     loaded.item_embeddings.numpy(),
                                     diversity.corpus_pattern(workdir, meta))
    events = records.read_events(workdir, day, meta["config"]["max_history"])
    num = len(events["item_id"])
    picked = np.sort(rng.choice(num, size=min(num, _MAX_EVENTS.value), replace=False))
    events = {name: value[picked] for name, value in events.items()}
    started = time.perf_counter()
    lists = _lists(loaded, events, meta["config"]["temperature"], thetas)
    per_day[day.isoformat()] = {
        "events": len(picked), "export_day": meta["day"], "corpus": len(items.ids),
        "seconds": round(time.perf_counter() - started, 1),
        "thetas": {str(theta): _figures(lists[theta], events["item_id"], items)
                   for theta in thetas}}
    print(f"{day} scored {len(picked)} events with the export of {meta['day']} "
          f"in {per_day[day.isoformat()]['seconds']} s", flush=True)
  if not per_day:
    raise SystemExit(f"{workdir}: no day has an export labelled before it")
  weights = np.array([d["events"] for d in per_day.values()], np.float64)
  overall = {}
  for theta in thetas:
    rows = [d["thetas"][str(theta)] for d in per_day.values()]
    overall[str(theta)] = {name: round(float(np.average([r[name] for r in rows],
                                                        weights=weights)), 4)
                           for name in rows[0] if name != "coverage"}
    overall[str(theta)]["coverage"] = round(float(np.mean([r["coverage"] for r in rows])), 4)
  return {"workdir": workdir, "k": _K.value, "num_candidates": _N.value,
          "events": int(weights.sum()), "days": len(per_day), "overall": overall,
          "per_day": per_day}


def report(figures: dict[str, Any]) -> None:
  print(f"\nretrieve_diverse, k={figures['k']} of N={figures['num_candidates']}, "
        f"{figures['events']} events over {figures['days']} days of {figures['workdir']}")
  print(f"{'theta':>6}{'R@' + str(figures['k']):>8}{'distance':>10}{'channels':>10}"
        f"{'topics':>8}{'coverage':>10}{'length':>8}")
  for theta, row in figures["overall"].items():
    print(f"{theta:>6}{row['recall']:>8.4f}{row['pairwise_distance']:>10.4f}"
          f"{row['channels']:>10.2f}{row['topics']:>8.2f}{row['coverage']:>10.4f}"
          f"{row['list_length']:>8.2f}")


def main(argv: Sequence[str]) -> None:
  del argv
  started = time.perf_counter()
  figures = measure(_WORKDIR.value, [float(t) for t in _THETAS.value])
  figures["total_s"] = round(time.perf_counter() - started, 1)
  report(figures)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
