"""The baselines (popularity, co-visitation) and the popularity deciles of recall.

The popularity baseline retrieves the corpus from the most to the least
interacted-with item: what a recommender with no notion of the user would. The
co-visitation baseline retrieves first the items most often consumed right before
or after the user's latest item, then the rest by recent popularity: the classic
item-to-item recommender a learned model has to beat. The evaluation scores both
on the same events as the exports, with the same exclusions. Pure numpy and dicts.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

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
  above the target. Targets outside the corpus are MISS. (By id: see
  `popularity_ranks_at` for corpus positions.)

  Args:
    item_ids: corpus ids [n].
    counts: training interactions per corpus item [n].
    targets: target id per event [B].
    seen: per event, ids to leave out (None: leave out nothing).

  Returns:
    int64 [B] ranks (0-based) or MISS.
  """
  position = _positions(item_ids)
  return popularity_ranks_at(counts_order_places(item_ids, counts),
                             _positions_of(position, targets), *_seen_pairs(position, seen))


def popularity_ranks_at(places: np.ndarray, targets: np.ndarray, seen_rows: np.ndarray,
                        seen: np.ndarray) -> np.ndarray:
  """`popularity_ranks` over corpus positions.

  Args:
    places: each corpus item's place in the list [n] (`counts_order_places`).
    targets: corpus position of each event's target [B] (-1 outside the corpus).
    seen_rows, seen: (event, corpus position) of the seen items [P], unique pairs
      (positions -1 are outside the corpus and ignored).
  """
  return _skipping(_take(places, targets), seen_rows, _take(places, seen))


def covisitation_ranks(item_ids: np.ndarray, recent_counts: np.ndarray,
                       covisits: Mapping[bytes, Mapping[bytes, int]], queries: np.ndarray,
                       targets: np.ndarray, seen: Sequence[Iterable[bytes]] | None = None
                       ) -> np.ndarray:
  """Ranks of targets in the co-visitation baseline's list, with seen items skipped.

  For an event whose query item is q, the list is the corpus items co-visited with
  q, most co-visits first, then the rest of the corpus; equal co-visit counts, and
  the rest, go in `popularity_order` of `recent_counts`. A query b"" (no history)
  or one never co-visited gets that popularity list alone. Seen items are skipped
  as in `popularity_ranks`; targets outside the corpus are MISS. (By id: see
  `covisitation_ranks_at` for corpus positions.)

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
  position = _positions(item_ids)
  slots: dict[bytes, int] = {}
  query_slots = np.array([slots.setdefault(q, len(slots)) if q else -1
                          for q in np.asarray(queries).tolist()], np.int64)
  cov = [(slot, position.get(item, -1), count) for query, slot in slots.items()
         for item, count in covisits.get(query, {}).items()]
  cov_slots, cov_items, cov_counts = (np.array(c, np.int64) for c in zip(*cov)) if cov else (
      np.zeros(0, np.int64),) * 3
  return covisitation_ranks_at(
      counts_order_places(item_ids, recent_counts), query_slots, cov_slots, cov_items,
      cov_counts, _positions_of(position, targets), *_seen_pairs(position, seen))


def covisitation_ranks_at(places: np.ndarray, query_slots: np.ndarray,
                          cov_slots: np.ndarray, cov_items: np.ndarray,
                          cov_counts: np.ndarray, targets: np.ndarray,
                          seen_rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
  """`covisitation_ranks` over corpus positions, vectorized over events.

  Args:
    places: each corpus item's place in the fallback list [n] (`counts_order_places`
      of the recent counts).
    query_slots: each event's query item as a slot 0.. [B] (-1: no query).
    cov_slots, cov_items, cov_counts: per slot, its co-visited items (corpus
      positions, -1 outside the corpus: ignored) and their counts [C], one entry
      per (slot, item).
    targets: corpus position of each event's target [B] (-1 outside the corpus).
    seen_rows, seen: (event, corpus position) of the seen items [P], unique pairs.
  """
  n = len(places)
  keep = (cov_counts > 0) & (cov_items >= 0)
  cov_slots, cov_items, cov_counts = cov_slots[keep], cov_items[keep], cov_counts[keep]
  # Within a slot, a co-visited item's key orders the list: more co-visits first, then
  # by place; every key lies in [-top * n, n). The rest follow by place.
  top = int(cov_counts.max(initial=0))
  span = (top + 1) * n
  cov_places = places[cov_items]
  by_key = np.sort(cov_slots * span + top * n - cov_counts * n + cov_places)
  by_place = np.sort(cov_slots * n + cov_places)
  pair_keys = cov_slots * n + cov_items
  pair_order = np.argsort(pair_keys)
  pair_keys, pair_counts = pair_keys[pair_order], cov_counts[pair_order]
  num_covisited = np.bincount(cov_slots, minlength=max(int(query_slots.max(initial=-1)) + 1,
                                                        int(cov_slots.max(initial=-1)) + 1))

  def rank(rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Rank of corpus item `items[j]` in the list of event `rows[j]` (-1 outside)."""
    slot = query_slots[rows]
    place = _take(places, items)
    ranks = place.copy()  # no query, or one never co-visited: the fallback alone
    has = (slot >= 0) & (items >= 0)
    slot, item, place = slot[has], items[has], place[has]
    wanted = slot * n + item
    at = np.minimum(np.searchsorted(pair_keys, wanted), max(len(pair_keys) - 1, 0))
    count = np.where(pair_keys[at] == wanted, pair_counts[at], 0) if len(pair_keys) else (
        np.zeros(len(slot), np.int64))
    covisited = np.searchsorted(by_key, slot * span + top * n - count * n + place) - (
        np.searchsorted(by_key, slot * span))
    rest = (num_covisited[slot] + place
            - (np.searchsorted(by_place, slot * n + place) - np.searchsorted(by_place,
                                                                            slot * n)))
    ranks[has] = np.where(count > 0, covisited, rest)
    return ranks

  every = np.arange(len(targets))
  return _skipping(rank(every, np.asarray(targets, np.int64)), seen_rows,
                   rank(np.asarray(seen_rows, np.int64), np.asarray(seen, np.int64)))


def counts_order_places(item_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Each corpus item's 0-based place in `popularity_order` [n]."""
  order = popularity_order(item_ids, counts)
  places = np.empty(len(order), np.int64)
  places[order] = np.arange(len(order))
  return places


def _positions(item_ids: np.ndarray) -> dict[bytes, int]:
  """{corpus id: its position}."""
  return {item: j for j, item in enumerate(np.asarray(item_ids).tolist())}


def _positions_of(position: Mapping[bytes, int], ids: np.ndarray) -> np.ndarray:
  return np.array([position.get(i, -1) for i in np.asarray(ids).tolist()], np.int64)


def _seen_pairs(position: Mapping[bytes, int], seen: Sequence[Iterable[bytes]] | None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(event, corpus position) of each distinct seen id."""
  pairs = [(row, position.get(item, -1)) for row, items in enumerate(seen or [])
           for item in set(items)]
  return (np.array([r for r, _ in pairs], np.int64),
          np.array([p for _, p in pairs], np.int64))


def _take(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """values[positions], -1 where a position is -1 (outside the corpus)."""
  positions = np.asarray(positions, np.int64)
  if len(values) == 0:
    return np.full(len(positions), -1, np.int64)
  return np.where(positions >= 0, values[np.maximum(positions, 0)], -1)


def _skipping(target_ranks: np.ndarray, seen_rows: np.ndarray, seen_ranks: np.ndarray
              ) -> np.ndarray:
  """The targets' ranks in their lists with the seen items taken out.

  Taking out the seen items moves a target up by the number of them ranked above it
  (ranks -1: outside the corpus). MISS for a target outside the corpus.
  """
  seen_rows = np.asarray(seen_rows, np.int64)
  above = (seen_ranks >= 0) & (seen_ranks < target_ranks[seen_rows])
  ranks = target_ranks - np.bincount(seen_rows[above], minlength=len(target_ranks))
  return np.where(target_ranks >= 0, ranks, MISS).astype(np.int64)
