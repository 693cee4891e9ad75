"""The arithmetic of offline evaluation: hit ranks, recall@K, popularity deciles.

Every event has one target item, so recall@K of an event is 1 when the target is
among the K items retrieved for it, else 0; a recall figure is the mean over
events. Pure numpy, so tests can check it against hand computation.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

MISS = -1
NUM_DECILES = 10


def hit_ranks(retrieved: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based position of each row's target in its retrieved ids, MISS if absent.

  Args:
    retrieved: ids [B, K] (bytes), best first; padding "" never matches a target.
    targets: ids [B].

  Returns:
    int64 [B].
  """
  retrieved = np.asarray(retrieved)
  targets = np.asarray(targets)
  found = (retrieved == targets[:, None]) & (retrieved != b"")
  return np.where(found.any(axis=1), found.argmax(axis=1), MISS).astype(np.int64)


def recall_at(ranks: np.ndarray, ks: Iterable[int]) -> dict[int, float | None]:
  """Mean over events of [rank < K] for each K; None when there is no event."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    return {k: None for k in ks}
  hit = ranks != MISS
  return {k: float(np.mean(hit & (ranks < k))) for k in ks}


def recall_curve(ranks: np.ndarray, max_k: int) -> list[float]:
  """Recall@1 .. recall@max_k (empty when there is no event)."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    return []
  hits = np.bincount(ranks[ranks != MISS], minlength=max_k)[:max_k]
  return (np.cumsum(hits) / ranks.size).tolist()


def popularity_order(item_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Corpus positions from most to least popular; equal counts by ascending id."""
  return np.lexsort((np.asarray(item_ids), -np.asarray(counts)))


def popularity_deciles(item_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Decile 0 (least popular tenth of the corpus) .. 9 (most popular) of each item.

  Items are ordered by count, then by descending id, and cut into ten groups of
  equal size, so every decile holds a tenth of the corpus even when many items
  share a count (the never-seen ones); each decile's count range says which.
  """
  num = len(item_ids)
  ascending = popularity_order(item_ids, counts)[::-1]
  deciles = np.empty(num, np.int64)
  deciles[ascending] = (np.arange(num) * NUM_DECILES) // max(num, 1)
  return deciles


def popularity_ranks(item_ids: np.ndarray, counts: np.ndarray, targets: np.ndarray,
                     seen: Sequence[Iterable[bytes]] | None = None) -> np.ndarray:
  """Ranks of targets in the popularity baseline's list, with seen items skipped.

  The baseline recommends the corpus in `popularity_order`. Without `seen` an
  event's rank is its target's place in that order; with `seen`, the list skips
  the event's seen items, so the rank drops by the number of seen items ranked
  above the target. Targets outside the corpus are MISS.

  Args:
    item_ids: corpus ids [n].
    counts: training interactions per corpus item [n].
    targets: target id per event [B].
    seen: per event, ids to leave out (None: leave out nothing).

  Returns:
    int64 [B] ranks (0-based) or MISS.
  """
  order = popularity_order(item_ids, counts)
  place = {item: rank for rank, item in enumerate(np.asarray(item_ids)[order].tolist())}
  ranks = np.full(len(targets), MISS, np.int64)
  for i, target in enumerate(np.asarray(targets).tolist()):
    rank = place.get(target)
    if rank is None:
      continue
    if seen is not None:
      above = {place[s] for s in seen[i] if s in place and place[s] < rank}
      rank -= len(above)
    ranks[i] = rank
  return ranks
