"""The arithmetic of offline evaluation: hit ranks and recall@K.

Every event has one target item, so recall@K of an event is 1 when the target is
among the K items retrieved for it, else 0; a recall figure is the mean over
events. Pure numpy, so tests can check it against hand computation.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

MISS = -1


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
