"""The pair memory (models/memory.py, serving/successors.py): what it counts, that a
day is counted once, that the loss adds the bonus it serves, and that the exports
merge the seed's partners with that bonus."""

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import memory
from models.config import ModelConfig, ONE_PASS
from models import trainer as trainer_lib
from models.retrieval import TwoTowerModel
from serving import servable
from test_query_tower import parsed
from test_query_tower import request
from trainer_testlib import TINY
from trainer_testlib import world_examples
from trainer_testlib import write_day

D1, D2 = datetime.date(2024, 3, 1), datetime.date(2024, 3, 2)
CONFIG = ModelConfig(
    embedding_dim=8, id_embedding_dim=8, feature_embedding_dim=4, item_buckets=100,
    user_buckets=50, channel_buckets=10, topic_buckets=10, category_buckets=10,
    query_hidden=(16,), candidate_hidden=(16,), temperature=0.5, max_history=4,
    batch_size=8, estimator_buckets=64, estimator_hashes=2, pair_memory_successors=2,
    pair_memory_weight=50.0,
    **ONE_PASS)


def _ids(*ids: str) -> np.ndarray:
  return np.array([i.encode() for i in ids], object)


def _counts(layer: memory.PairMemory, anchors, items, history=None, **kwargs
            ) -> np.ndarray:
  history = tf.constant(history) if history else tf.zeros([len(anchors), 0], tf.string)
  return layer.pair_counts_of(tf.constant(anchors), tf.constant(items), history,
                              **kwargs).numpy()


def test_counts_pairs_both_ways_once_a_day_keeping_the_top_partners():
  layer = memory.PairMemory(2, 1.0)
  # a-b twice, a-c once, a-d once; "" and a self-pair are not counted.
  assert layer.absorb(_ids("a", "b", "a", "d", "", "c"), _ids("b", "a", "c", "a", "a", "c"),
                      D1)
  assert not layer.absorb(_ids("a"), _ids("b"), D1)  # D1 again: nothing changes
  assert float(layer.pair_counts.numpy().sum()) == 8.0  # 4 pairs, both ways
  got = _counts(layer, ["a", "b", "c", "", "zz"], ["a", "b", "c", "d", ""])
  # a keeps its 2 most counted partners: b (2), then c before d (equal counts: the
  # smaller fingerprint), whichever that is; b, c and d each have a alone.
  kept_c = memory.fingerprints(tf.constant("c")) < memory.fingerprints(tf.constant("d"))
  np.testing.assert_array_equal(got[0], [0, 2, 1 if kept_c else 0, 0 if kept_c else 1, 0])
  np.testing.assert_array_equal(got[1:3], [[2, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(got[3:], np.zeros([2, 5]))
  # Items in the query's history get none: (a, b) was the user's own step.
  np.testing.assert_array_equal(
      _counts(layer, ["a", "a"], ["b", "c"], history=[["a", "b"], ["a", ""]]),
      [[0, 1 if kept_c else 0], [2, 1 if kept_c else 0]])
  assert layer.absorb(_ids("c"), _ids("a"), D2)  # a later day adds to the counts
  np.testing.assert_array_equal(_counts(layer, ["a"], ["b", "c", "d"]), [[2, 2, 0]])


def test_the_bonus_is_relative_to_the_anchors_most_counted_partner():
  layer = memory.PairMemory(3, 2.0)
  layer.absorb(_ids("a", "a", "a", "a", "a", "x"), _ids("b", "b", "b", "b", "c", "y"), D1)
  got = layer(tf.constant(["a", "b", "x", "z"]), tf.constant(["b", "c", "a", "y"]),
              tf.zeros([4, 0], tf.string)).numpy()
  # a: b 4 times (the top), c once; b: a 4 times; x: y once; z: nothing.
  np.testing.assert_allclose(got, [[2.0, 2.0 * np.log(2) / np.log(5), 0, 0],
                                   [0, 0, 2.0, 0], [0, 0, 0, 2.0], [0, 0, 0, 0]],
                             rtol=1e-6)


def test_top_successors_is_sorted_and_padded():
  pairs = np.array([[5, 9], [5, 7], [5, 8], [3, 1]], np.int64)
  seeds, keys, counts = memory.top_successors(pairs, np.array([1.0, 3.0, 2.0, 4.0]), 2)
  np.testing.assert_array_equal(seeds, [3, 5])
  np.testing.assert_array_equal(keys, [[1, memory.PAD_KEY], [7, 8]])
  np.testing.assert_array_equal(counts, [[4, 0], [3, 2]])


def test_checkpoint_restores_the_counts_and_the_day_absorbed(tmp_path):
  layer = memory.PairMemory(3, 1.0)
  layer.absorb(_ids("a", "b"), _ids("b", "c"), D1)
  path = tf.train.Checkpoint(memory=layer).write(str(tmp_path / "ckpt"))
  fresh = memory.PairMemory(3, 1.0)
  tf.train.Checkpoint(memory=fresh).read(path).assert_consumed()
  assert int(fresh.absorbed_day.numpy()) == D1.toordinal()
  np.testing.assert_array_equal(_counts(fresh, ["b"], ["a", "c"]), [[1, 1]])
  assert not fresh.absorb(_ids("a"), _ids("b"), D1)


def _batch(seeds: list[str], items: list[str]) -> dict[str, tf.Tensor]:
  return parsed([{"user_id": f"u{i}", "seed_item_id": s, "item_id": t,
                  "history_item_ids": [s] if s else []}
                 for i, (s, t) in enumerate(zip(seeds, items))], CONFIG.max_history)


_RETRIEVE = """
import json, sys
import tensorflow as tf
retrieve = tf.saved_model.load(sys.argv[1]).signatures["retrieve"]
values = json.load(open(sys.argv[2]))
inputs = {name: tf.constant(value, tf.int64 if name == "timestamp" else tf.string)
          for name, value in values.items() if name != "history_item_ids"}
inputs["history_item_ids"] = tf.reshape(tf.constant(values["history_item_ids"], tf.string),
                                        [len(values["user_id"]), -1])
out = []
for exclude in ([[""]] * 4, [["p"], [""], [""], [""]]):
  got = retrieve(k=tf.constant(2), exclude_item_ids=tf.constant(exclude), **inputs)
  out.append([got["item_ids"].numpy().astype(str).tolist(), got["scores"].numpy().tolist()])
json.dump(out, open(sys.argv[3], "w"))
"""


def test_the_export_serves_the_models_own_score(tmp_path):
  """A seed's partner far down the search's order comes back first, scored
  <u, v> / temperature plus the model's bonus (what the quality sweep ranks by)."""
  model = TwoTowerModel(CONFIG)
  corpus_ids = [f"i{n}" for n in range(30)] + ["p"]
  corpus = parsed([{"item_id": i} for i in corpus_ids])
  model(_batch(["a"], ["p"]))
  model.memory.absorb(_ids("s", "s", "s"), _ids("p", "p", "p"), D1)
  rows = [{"user_id": "u1", "seed_item_id": "s"},
          {"user_id": "u2", "history_item_ids": ["s"]},  # no seed: the history's s leads
          {"user_id": "u3", "seed_item_id": "t"},  # no partners
          {"user_id": "u4", "history_item_ids": ["s", "p"]}]  # p in the history: none
  embeddings = model.candidate_tower(corpus)
  queries = model.query_tower(parsed(rows))
  dots = queries.numpy() @ embeddings.numpy().T / CONFIG.temperature
  retriever = servable.ExactRetriever(
      model.query_tower, model.candidate_tower, tf.constant(corpus_ids), embeddings,
      CONFIG.temperature, k=2, max_history=CONFIG.max_history, successors=2)
  retriever.assign_successors(*model.memory.serving_table(
      np.array([i.encode() for i in corpus_ids], object)))
  retriever.save(str(tmp_path / "export"))
  (tmp_path / "request.json").write_text(json.dumps(request(rows)))
  subprocess.run([sys.executable, "-c", _RETRIEVE, str(tmp_path / "export"),
                  str(tmp_path / "request.json"), str(tmp_path / "out.json")],
                 check=True, env=dict(os.environ), timeout=600)
  (ids, scores), (excluded_ids, _) = json.loads((tmp_path / "out.json").read_text())
  bonus = float(model.memory(tf.constant(["s"]), tf.constant(["p"]),
                             tf.zeros([1, 0], tf.string))[0, 0])
  assert bonus == CONFIG.pair_memory_weight  # p is s's most counted (only) partner
  best = np.argsort(-dots, axis=1)
  for row in (0, 1):
    assert ids[row][0] == "p"
    np.testing.assert_allclose(scores[row][0], dots[row, 30] + bonus, rtol=1e-4)
    # The second: the search's best, no bonus.
    second = [j for j in best[row] if j != 30][0]
    assert ids[row][1] == corpus_ids[second]
  for row in (2, 3):
    assert ids[row] == [corpus_ids[j] for j in best[row][:2]]
    np.testing.assert_allclose(scores[row], dots[row, best[row][:2]], rtol=1e-4)
  # Excluding the partner leaves the search's order.
  assert "p" not in excluded_ids[0]


def test_the_trainer_counts_each_day_once_whatever_the_replay_and_resume(tmp_path):
  workdir = str(tmp_path)
  config = TINY.replace(replay_days=2, epochs_per_day=2)
  first, second = world_examples(D1, 30, seed=1), world_examples(D2, 20, seed=2)
  write_day(workdir, D1, first)
  write_day(workdir, D2, second)

  def pairs(examples: list[dict]) -> int:
    """Pairs counted, both ways: those with an anchor other than the item."""
    anchors = [e.get("seed_item_id") or (e.get("history_item_ids") or [""])[0]
               for e in examples]
    return 2 * sum(1 for a, e in zip(anchors, examples) if a and a != e["item_id"])

  trainer = trainer_lib.Trainer(workdir, config)
  trainer.train_day(D1)
  total = float(trainer.model.memory.pair_counts.numpy().sum())
  assert total == pairs(first) > 0
  trainer.train_day(D2)
  both = float(trainer.model.memory.pair_counts.numpy().sum())
  assert both == pairs(first) + pairs(second)
  trainer.train_day(D2)  # already trained
  restored = trainer_lib.Trainer(workdir, config)
  assert float(restored.model.memory.pair_counts.numpy().sum()) == both
  assert int(restored.model.memory.absorbed_day.numpy()) == D2.toordinal()
  # The towers train without the memory: the same weights as a model without one.
  plain_dir = str(tmp_path / "plain")
  write_day(plain_dir, D1, first)
  write_day(plain_dir, D2, second)
  plain = trainer_lib.Trainer(plain_dir, config.replace(pair_memory_successors=0))
  plain.train_day(D1)
  plain.train_day(D2)
  for mine, theirs in zip(trainer.model.query_tower.variables,
                          plain.model.query_tower.variables):
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_no_signature_reads_the_corpus_embeddings_sparsely():
  """A ResourceGather on a resource variable switches it to copy-on-read for good:
  every later dense read (the exact search's matmul, ScaNN's searcher input)
  would copy the whole corpus. The signatures gather rows from its value."""
  model = TwoTowerModel(CONFIG)
  corpus_ids = ["a", "b", "c"]
  retriever = servable.ExactRetriever(
      model.query_tower, model.candidate_tower, tf.constant(corpus_ids),
      model.candidate_tower(parsed([{"item_id": i} for i in corpus_ids])),
      CONFIG.temperature, k=2, max_history=CONFIG.max_history, successors=2)
  handle = id(retriever.item_embeddings.handle)
  for name, function in retriever.signatures().items():
    inside = {id(internal) for external, internal in function.graph.captures
              if id(external) == handle}
    sparse = [op.name for op in function.graph.get_operations()
              if op.type == "ResourceGather" and id(op.inputs[0]) in inside]
    assert not sparse, (name, sparse)
