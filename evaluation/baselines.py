"""The popularity baseline, and the popularity deciles recall is broken down by.

The baseline retrieves the corpus from the most to the least interacted-with
item: what a recommender with no notion of the user would. The evaluation scores
it on the same events as the exports, with the same exclusions. Pure numpy.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from evaluation.recall import MISS

NUM_DECILES = 10


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
