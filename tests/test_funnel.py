"""The funnel's figures (evaluation/funnel.py) on planted lists and teachers."""

import math
import types

import numpy as np
import pytest
import tensorflow as tf

from evaluation import funnel
from evaluation import recall


def _lists(rng, events, corpus, k):
  """Each event's retrieval list: k distinct items of the corpus, best first."""
  return np.array([[f"i{j}".encode() for j in rng.permutation(corpus)[:k]]
                   for _ in range(events)], object)


def test_ndcg_against_a_hand_computation():
  ranks = np.array([0, 1, 3, recall.MISS, 12, 9])
  want = (1 + 1 / math.log2(3) + 1 / math.log2(5) + 0 + 0 + 1 / math.log2(11)) / 6
  assert funnel.ndcg_at(ranks, [10])[10] == pytest.approx(want, rel=1e-12)
  assert funnel.ndcg_at(ranks, [1])[1] == pytest.approx(1 / 6, rel=1e-12)
  assert funnel.ndcg_at(np.zeros(0, np.int64), [10]) == {10: None}


def test_a_teacher_that_puts_the_target_first_reaches_the_retrievals_recall_at_k():
  """Funnel recall@10 = the retrieval's recall@100 (its hit rate), and NDCG@10 = the
  same (every hit at rank 0), while the retrieval alone is far below."""
  rng = np.random.default_rng(0)
  lists = _lists(rng, 500, 300, 100)
  targets = np.array([f"i{j}".encode() for j in rng.integers(0, 300, 500)], object)
  perfect = (lists == targets[:, None]).astype(np.float32)
  before = recall.hit_ranks(lists, targets)
  after = recall.hit_ranks(funnel.reranked(lists, perfect), targets)
  found = funnel.figures(before, after, 100)
  assert found["events"] == 500
  assert found["funnel"]["recall"]["10"] == found["retrieval_recall_at_k"]
  assert found["funnel"]["ndcg"]["10"] == found["retrieval_recall_at_k"]
  assert 0.2 < found["retrieval_recall_at_k"] < 0.5
  assert found["retrieval"]["recall"]["10"] < found["retrieval_recall_at_k"] / 3
  assert found["retrieval"]["recall"]["10"] == recall.recall_at(before, [10])[10]


def test_rerank_sorts_by_score_ties_keep_the_list_order_padding_last():
  lists = np.array([[b"a", b"b", b"c", b"d", b""], [b"a", b"b", b"c", b"", b""]], object)
  scores = np.array([[0.0, 2.0, 0.0, 1.0, 9.0], [1.0, 1.0, 1.0, 5.0, 5.0]], np.float32)
  assert funnel.reranked(lists, scores).tolist() == [[b"b", b"d", b"a", b"c", b""],
                                                     [b"a", b"b", b"c", b"", b""]]
  # A teacher that reverses the list moves a hit at 0 to the last real place
  # (padding stays last even where it scores highest).
  reverse = np.arange(5, dtype=np.float32)[None].repeat(2, 0)
  assert recall.hit_ranks(funnel.reranked(lists, reverse),
                          np.array([b"a", b"a"], object)).tolist() == [3, 2]


def test_teacher_scores_asks_rank_in_batches_with_each_events_features():
  """A planted `rank` signature: score = position of the candidate in the user id's
  digits, so the answer shows which event's row and list went where."""
  calls = []

  def rank(user_id, candidate_ids, **query):
    calls.append(int(user_id.shape[0]))
    assert set(query) == {"seed_item_id", "history_item_ids", "device", "country",
                          "timestamp"}
    user = tf.strings.to_number(user_id, tf.float32)[:, None]
    item = tf.strings.to_number(tf.strings.substr(candidate_ids, 1, 5), tf.float32)
    return {"scores": user * 1000 + item}

  loaded = types.SimpleNamespace(signatures={"rank": rank})
  n = 600
  events = {"user_id": np.array([str(i).encode() for i in range(n)], object),
            "seed_item_id": np.full(n, b"", object),
            "history_item_ids": np.full((n, 2), b"", object),
            "device": np.full(n, b"", object), "country": np.full(n, b"", object),
            "timestamp": np.zeros(n, np.int64)}
  rows = np.arange(0, n, 2)  # every other event
  lists = np.array([[f"i{j}".encode() for j in (3, 1, 2)]] * len(rows), object)
  scores = funnel.teacher_scores(loaded, events, rows, lists)
  assert calls == [256, len(rows) - 256]
  np.testing.assert_array_equal(scores, rows[:, None] * 1000.0 + [3, 1, 2])
