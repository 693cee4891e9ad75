"""The two-stage funnel's offline figures: retrieve k, re-rank them with the teacher.

For each scored event of day D, the retrieval export's top k (k = 100, its
`retrieve` lists, which the evaluation has already asked for, with the user's
seen items excluded in "seen_excluded" mode) are scored by the ranker export's
`rank` signature and sorted by those scores (ties keep the retrieval order;
"" padding stays last). The event's target then has a rank in the retrieval
list and one in the re-ranked list; over the events, per mode:

  recall@K = mean [rank < K]        NDCG@K = mean [rank < K] / log2(rank + 2)

(one relevant item per event, so the ideal DCG is 1), for the retrieval alone
and for the funnel, beside recall@k of the retrieval: the most the funnel can
reach. The teacher is the newest ranker export labelled before D
(serving.ranker_export.ranker_before), trained through D-1 at most, like the
retrieval export (test-then-train). The lists re-ranked are the exact export's
(the ScaNN one's when there is no exact one): one teacher pass per mode.

Pure numpy but for `teacher_scores`, so tests check it against hand computation.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from evaluation import recall
from models import features as features_lib
from serving import ranker_export
from serving import versions

KS = (10,)
_BATCH = 256


def ndcg_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, Optional[float]]:
  """Mean over events of [rank < K] / log2(rank + 2) for each K (0-based ranks,
  recall.MISS for a miss); None when there is no event."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    return {k: None for k in ks}
  gain = np.where(ranks == recall.MISS, 0.0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0))
  return {k: float(np.mean(np.where(ranks < k, gain, 0.0))) for k in ks}


def reranked(lists: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Each row of `lists` [E, k] sorted by `scores` [E, k], best first; ties keep
  the list's order, and "" padding goes last whatever its score."""
  keys = np.where(np.asarray(lists) == b"", -np.inf, np.asarray(scores, np.float64))
  order = np.argsort(-keys, axis=1, kind="stable")
  return np.take_along_axis(np.asarray(lists), order, axis=1)


def teacher_scores(loaded: Any, events: Mapping[str, np.ndarray], rows: np.ndarray,
                   lists: np.ndarray) -> np.ndarray:
  """The `rank` signature's scores [len(rows), k] of each event's list."""
  rank = loaded.signatures[ranker_export.RANK]
  out = np.zeros(lists.shape, np.float32)
  for start in range(0, len(rows), _BATCH):
    batch = rows[start:start + _BATCH]
    inputs = {name: tf.constant(events[name][batch])
              for name in features_lib.QUERY_FEATURES}
    out[start:start + len(batch)] = rank(
        **inputs, candidate_ids=tf.constant(lists[start:start + len(batch)],
                                            tf.string))["scores"].numpy()
  return out


def figures(retrieval_ranks: np.ndarray, funnel_ranks: np.ndarray, k: int,
            ks: Sequence[int] = KS) -> dict[str, Any]:
  """One mode's entry: events, recall and NDCG of the retrieval and of the funnel
  at each of `ks`, and the retrieval's recall@k (the funnel's ceiling)."""
  def of(ranks: np.ndarray) -> dict[str, Any]:
    return {"recall": {str(c): v for c, v in recall.recall_at(ranks, ks).items()},
            "ndcg": {str(c): v for c, v in ndcg_at(ranks, ks).items()}}
  return {"events": int(len(retrieval_ranks)), "retrieval": of(retrieval_ranks),
          "funnel": of(funnel_ranks),
          "retrieval_recall_at_k": recall.recall_at(retrieval_ranks, [k])[k]}


def funnel_metrics(loaded: Any, ranker_dir: str, events: Mapping[str, np.ndarray],
                   rows: Mapping[str, np.ndarray], lists: Mapping[str, np.ndarray],
                   export: str, k: int) -> dict[str, Any]:
  """metrics.json's "funnel": per mode, the retrieval lists `lists[mode]` [E, k] of
  the events `rows[mode]` re-ranked by the ranker export `loaded` (at `ranker_dir`);
  "seconds" is what the re-ranking cost (teacher scoring included)."""
  started = time.perf_counter()
  meta = versions.read_metadata(ranker_dir)
  out: dict[str, Any] = {
      "ranker": {"dir": ranker_dir, "version": meta.get("version"),
                 "exported_from_day": meta.get("day")},
      "retrieval_export": export, "k": k, "ks": list(KS)}
  for mode, listed in lists.items():
    targets = events["item_id"][rows[mode]]
    scores = teacher_scores(loaded, events, rows[mode], listed)
    out[mode] = figures(recall.hit_ranks(listed, targets),
                        recall.hit_ranks(reranked(listed, scores), targets), k)
  out["seconds"] = round(time.perf_counter() - started, 2)  # the re-ranking's cost
  return out


def skipped(day: datetime.date) -> dict[str, Any]:
  """metrics.json's "funnel" of a day no ranker export precedes."""
  return {"skipped": f"no ranker export labelled before {day.isoformat()}"}


def summary(metrics: Mapping[str, Any]) -> Optional[dict[str, Any]]:
  """The headline of metrics.json's "funnel" (None without it): per mode, recall
  and NDCG at the first K of the retrieval and of the funnel."""
  found = metrics.get("funnel")
  if found is None or "skipped" in found:
    return found
  k = str(found["ks"][0])
  return {"cutoff": int(k), "ranker_version": found["ranker"]["version"],
          **{mode: {stage: {"recall": found[mode][stage]["recall"][k],
                            "ndcg": found[mode][stage]["ndcg"][k]}
                    for stage in ("retrieval", "funnel")}
             for mode in ("all", "seen_excluded") if mode in found}}
