"""The baselines (popularity, co-visitation) and the popularity deciles of recall.

The popularity baseline retrieves the corpus from the most to the least
interacted-with item: what a recommender with no notion of the user would. The
co-visitation baseline retrieves first the items most often consumed right before
or after the user's latest item, then the rest by recent popularity: the classic
item-to-item recommender a learned model has to beat. The evaluation scores both
on the same events as the exports, with the same exclusions. Pure numpy and dicts.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, Mapping, Optional, Sequence

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
  place = _places(item_ids, counts)
  return np.array([_rank_skipping(place.get, target, None if seen is None else seen[i])
                   for i, target in enumerate(np.asarray(targets).tolist())], np.int64)


def covisitation_ranks(item_ids: np.ndarray, recent_counts: np.ndarray,
                       covisits: Mapping[bytes, Mapping[bytes, int]], queries: np.ndarray,
                       targets: np.ndarray, seen: Sequence[Iterable[bytes]] | None = None
                       ) -> np.ndarray:
  """Ranks of targets in the co-visitation baseline's list, with seen items skipped.

  For an event whose query item is q, the list is the corpus items co-visited with
  q, most co-visits first, then the rest of the corpus; equal co-visit counts, and
  the rest, go in `popularity_order` of `recent_counts`. A query b"" (no history)
  or one never co-visited gets that popularity list alone. Seen items are skipped
  as in `popularity_ranks`; targets outside the corpus are MISS.

  Args:
    item_ids: corpus ids [n].
    recent_counts: recent interactions per corpus item [n] (the fallback order).
    covisits: {item: {co-visited item: count}}; items outside the corpus are ignored.
    queries: the query item per event [B] (b"" for none).
    targets: target id per event [B].
    seen: per event, ids to leave out (None: leave out nothing).

  Returns:
    int64 [B] ranks (0-based) or MISS.
  """
  place = _places(item_ids, recent_counts)
  lists: dict[bytes, _CovisitationList] = {}  # one per distinct query item
  ranks = []
  for i, (query, target) in enumerate(zip(np.asarray(queries).tolist(),
                                          np.asarray(targets).tolist())):
    if query not in lists:
      lists[query] = _CovisitationList(covisits.get(query, {}) if query else {}, place)
    ranks.append(_rank_skipping(lists[query].rank, target,
                                None if seen is None else seen[i]))
  return np.array(ranks, np.int64)


class _CovisitationList:
  """The co-visitation list of one query item, as a rank for any corpus item."""

  def __init__(self, counts: Mapping[bytes, int], place: Mapping[bytes, int]):
    """`counts`: the query's co-visited items; `place`: the fallback order."""
    self.place = place
    self.counts = {item: c for item, c in counts.items() if c > 0 and item in place}
    # One sortable key per co-visited item: more co-visits first, then by place.
    self.keys = sorted(self._key(item, c) for item, c in self.counts.items())
    self.places = sorted(place[item] for item in self.counts)

  def _key(self, item: bytes, count: int) -> int:
    return -count * len(self.place) + self.place[item]

  def rank(self, item: bytes) -> Optional[int]:
    """0-based rank of `item` in the list; None outside the corpus."""
    place = self.place.get(item)
    if place is None:
      return None
    count = self.counts.get(item)
    if count:
      return bisect.bisect_left(self.keys, self._key(item, count))
    # After every co-visited item; among the rest, by place.
    return len(self.counts) + place - bisect.bisect_left(self.places, place)


def _places(item_ids: np.ndarray, counts: np.ndarray) -> dict[bytes, int]:
  """{corpus id: its 0-based place in `popularity_order`}."""
  order = popularity_order(item_ids, counts)
  return {item: rank for rank, item in enumerate(np.asarray(item_ids)[order].tolist())}


def _rank_skipping(rank_of: Callable[[bytes], Optional[int]], target: bytes,
                   seen: Iterable[bytes] | None) -> int:
  """The target's rank in a list of the corpus with the `seen` items taken out.

  `rank_of` gives each corpus id's rank in the full list (None outside the
  corpus), so taking out the seen items moves the target up by the number of
  them ranked above it. MISS for a target outside the corpus.
  """
  rank = rank_of(target)
  if rank is None:
    return MISS
  if seen is not None:
    rank -= sum(1 for r in map(rank_of, set(seen)) if r is not None and r < rank)
  return rank
