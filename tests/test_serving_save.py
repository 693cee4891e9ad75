"""Saving the servables from towers never called, and the serving benches at a tiny size.

A Keras tower makes its variables on its first call. The retrievers must save
(and load in a fresh process) even when nothing called the towers before them,
as in bench/serving_latency.py, whose corpus embeddings are synthetic. The same
fresh process answers retrieve_diverse, checked against the numpy oracle of the
DPP (serving_testlib.dpp_reference) on the exported embeddings.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models.retrieval import TwoTowerModel
from serving import index
from serving import servable
import serving_testlib as tl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ITEMS = 60
K = 7
# retrieve_diverse requests: k of N, each theta, row 0 boosts item7, row 2 lowers
# item3, row 1 boosts nothing ("" matches no item).
DIVERSE_K, DIVERSE_N = 5, 20
THETAS = (0.0, 0.5, 0.9, 1.0)
BOOSTS = {"boost_item_ids": [["item7"], [""], ["item3"]], "boosts": [[3.0], [0.0], [-2.0]]}
# Loads the exact export before ScaNN's ops are registered (it needs none), then
# the ScaNN one; answers every signature (retrieve_diverse at each theta) and
# prints the outputs, and the loaded corpus, as JSON.
_LOAD_AND_ASK = """
import json, sys
import numpy as np
import tensorflow as tf
request = {name: tf.constant(value) for name, value in json.loads(sys.argv[3]).items()}
request["timestamp"] = tf.cast(request["timestamp"], tf.int64)
candidates = {name: tf.constant(value) for name, value in json.loads(sys.argv[4]).items()}
diverse = {name: tf.constant(value) for name, value in json.loads(sys.argv[5]).items()}
out = {}
for name, path in (("exact", sys.argv[1]), ("scann", sys.argv[2])):
  if name == "scann":
    import scann  # noqa: F401  (ScaNN's ops, before loading its export)
  loaded = tf.saved_model.load(path)
  signatures = loaded.signatures
  exclude = tf.constant([["item0"]] * 3)
  answers = {
      "serving_default": signatures["serving_default"](**request),
      "retrieve": signatures["retrieve"](**request, k=tf.constant(4), exclude_item_ids=exclude),
      "query_embedding": signatures["query_embedding"](**request),
      "candidate_embedding": signatures["candidate_embedding"](**candidates),
  }
  for theta in json.loads(sys.argv[6]):
    answers[f"retrieve_diverse {theta}"] = signatures["retrieve_diverse"](
        **request, **diverse, exclude_item_ids=exclude, theta=tf.constant(theta))
  out[name] = {signature: {key: np.asarray(value).tolist() if value.dtype != tf.string
                           else [[v.decode() for v in row] for row in value.numpy()]
                           for key, value in outputs.items()}
               for signature, outputs in answers.items()}
  out[name]["corpus"] = {"item_ids": [i.decode() for i in loaded.item_ids.numpy()],
                         "item_embeddings": loaded.item_embeddings.numpy().tolist()}
print(json.dumps(out))
"""


def _request():
  """Three queries; history wider than max_history (5), as serving may send."""
  return {
      "user_id": ["u1", "u2", ""],
      "seed_item_id": ["item3", "", "item9"],
      "history_item_ids": [[f"item{i}" for i in range(7)], [""] * 7,
                           ["item1", "item2"] + [""] * 5],
      "device": ["web", "ios", ""],
      "country": ["de", "", "us"],
      "timestamp": [1_709_600_000, 0, 1_709_700_000],
  }


def _candidates():
  """Two items: one with two weighted topics, one unseen with every feature absent."""
  return {"item_id": ["item1", "new"], "item_channel_id": ["c1", ""],
          "item_topics": [["t1", "t2"], ["", ""]],
          "item_topic_weights": [[1.0, 0.5], [0.0, 0.0]],
          "item_duration_s": [60.0, 0.0]}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
  """Both variants over towers never called, saved, then asked in a fresh process."""
  tmp_path = tmp_path_factory.mktemp("saved")
  tf.keras.utils.set_random_seed(0)
  config = tl.tiny_config()
  model = TwoTowerModel(config)
  assert not model.query_tower.built and not model.candidate_tower.built
  item_ids = np.array([f"item{i}".encode() for i in range(NUM_ITEMS)], object)
  # Seed 3: every DPP choice below wins by at least 6e-4 (asserted where used).
  rng = np.random.default_rng(3)
  embeddings = rng.normal(size=(NUM_ITEMS, config.embedding_dim)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  params = index.scann_params(NUM_ITEMS, max_fetch=K + config.max_history)
  common = dict(query_tower=model.query_tower, candidate_tower=model.candidate_tower,
                item_ids=item_ids, item_embeddings=embeddings,
                temperature=config.temperature, k=K, max_history=config.max_history)
  paths = {"exact": str(tmp_path / "exact"), "scann": str(tmp_path / "scann")}
  servable.ExactRetriever(**common).save(paths["exact"])
  servable.ScannRetriever(index=index.build_scann(embeddings, params, k=K),
                          num_reordering_candidates=params.num_reordering_candidates,
                          **common).save(paths["scann"])
  diverse = {"k": DIVERSE_K, "num_candidates": DIVERSE_N, **BOOSTS}
  result = subprocess.run(
      [sys.executable, "-c", _LOAD_AND_ASK, paths["exact"], paths["scann"],
       json.dumps(_request()), json.dumps(_candidates()), json.dumps(diverse),
       json.dumps(THETAS)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return {"answers": json.loads(result.stdout.strip().splitlines()[-1]), "model": model,
          "config": config, "item_ids": item_ids, "embeddings": embeddings}


def test_retrievers_of_never_called_towers_save_and_load_in_a_fresh_process(fresh):
  answers, model, config = fresh["answers"], fresh["model"], fresh["config"]
  request = {name: tf.constant(value) for name, value in _request().items()}
  request["timestamp"] = tf.cast(request["timestamp"], tf.int64)
  # The exports hold the towers' own variables: they embed as the towers do here.
  queries = model.query_tower(
      {**request, "history_item_ids": request["history_item_ids"][:, :config.max_history]},
      training=False).numpy()
  items = model.candidate_tower({name: tf.constant(value)
                                 for name, value in _candidates().items()},
                                training=False).numpy()
  corpus = {i.decode() for i in fresh["item_ids"]}
  for name in ("exact", "scann"):
    got = answers[name]
    assert np.array(got["serving_default"]["scores"]).shape == (3, K), name
    assert np.array(got["serving_default"]["item_ids"]).shape == (3, K), name
    assert np.array(got["retrieve"]["scores"]).shape == (3, 4), name
    returned = {i for row in got["retrieve"]["item_ids"] for i in row}
    assert returned <= corpus - {"item0"}, name
    query_embedding = np.array(got["query_embedding"]["query_embedding"])
    candidate_embedding = np.array(got["candidate_embedding"]["candidate_embedding"])
    assert query_embedding.shape == (3, config.embedding_dim), name
    assert candidate_embedding.shape == (2, config.embedding_dim), name
    np.testing.assert_allclose(query_embedding, queries, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(candidate_embedding, items, atol=1e-5, err_msg=name)


def test_retrieve_diverse_in_a_fresh_process_is_the_numpy_oracle(fresh):
  """Each variant's retrieve_diverse, loaded in a fresh process, returns the items
  and scores of the oracle run on its own exported embeddings: the N best by
  <u, v> without the excluded item, scores <u, v> / temperature plus the boosts."""
  temperature = fresh["config"].temperature
  for name in ("exact", "scann"):
    got = fresh["answers"][name]
    ids = got["corpus"]["item_ids"]
    embeddings = np.array(got["corpus"]["item_embeddings"])
    np.testing.assert_allclose(embeddings, fresh["embeddings"], atol=1e-6)
    queries = np.array(got["query_embedding"]["query_embedding"])
    dots = queries @ embeddings.T
    dots[:, ids.index("item0")] = -np.inf  # excluded
    for theta in THETAS:
      out = got[f"retrieve_diverse {theta}"]
      for row in range(3):
        order = np.argsort(-dots[row], kind="stable")
        gaps = -np.diff(dots[row, order[:DIVERSE_N + 1]])
        assert gaps.min() > 1e-5, (name, theta, row)  # the N best are unambiguous
        top = order[:DIVERSE_N]
        scores = dots[row, top] / temperature
        boost = dict(zip(BOOSTS["boost_item_ids"][row], BOOSTS["boosts"][row]))
        boosted = scores + np.array([boost.get(ids[j], 0.0) for j in top])
        want, _, margins = tl.dpp_reference(embeddings[top], boosted, DIVERSE_K, theta)
        assert min(margins) > 1e-4, (name, theta, row, margins)
        assert out["item_ids"][row] == [ids[top[j]] for j in want], (name, theta, row)
        np.testing.assert_allclose(out["scores"][row], scores[want], rtol=1e-4)
    # theta = 1 is retrieve's order, boosts aside: row 1 boosts nothing.
    assert got["retrieve_diverse 1.0"]["item_ids"][1][:4] == got["retrieve"]["item_ids"][1]


def test_serving_latency_bench_runs_at_a_tiny_size(tmp_path):
  """The bench's smallest run (no timing or quality checked: --min_ann_recall=0),
  comparing this tree with itself as the "old" one, op breakdown and the narrowed
  ScaNN export included."""
  out = tmp_path / "serving.json"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "serving_latency.py"),
       "--num_items=500", "--dim=16", "--k=10", "--single_queries=3", "--batch_size=4",
       "--batches=2", "--recall_queries=100", "--min_ann_recall=0",
       f"--old_tree={REPO}", f"--json_out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(out.read_text())
  variants = ("scann", "exact", "old_scann", "old_exact")
  expected = {"num_items", "dim", "k", "scann_params", "tuning_attempts",
              "ann_recall_at_10", "old_ann_recall_at_10", "total_s"} | {
                  f"{name}_{what}" for name in variants
                  for what in ("saved_model_mb", "qps", "p50_ms", "p99_ms")} | {
                  f"{name}_{stat}_ms" for name in ("floor", "scann_query_embedding",
                                                   "query_tower", "raw_scann")
                  for stat in ("p50", "p99")} | {
                  f"{name}_new_over_old_{stat}" for name in ("scann", "exact")
                  for stat in ("p50_ms", "p99_ms", "qps")}
  assert expected <= set(figures)
  assert (figures["num_items"], figures["dim"], figures["k"]) == (500, 16, 10)
  assert 0.0 <= figures["ann_recall_at_10"] <= 1.0
  # The new code's export narrowed (index.tune_scann): never more leaves searched.
  assert {f"scann_narrow_{what}" for what in ("saved_model_mb", "qps", "p50_ms",
                                              "p99_ms", "ann_recall_at_10")} <= set(figures)
  assert (figures["narrowed_scann_params"]["num_leaves_to_search"] <=
          figures["scann_params"]["num_leaves_to_search"])
  # The ScaNN export of a model with a pair memory (every seed has partners).
  assert {f"scann_memory_{what}" for what in ("saved_model_mb", "qps", "p50_ms")} | {
      f"scann_memory_over_scann_{stat}" for stat in ("p50_ms", "p99_ms", "qps")
  } <= set(figures)
  for name in ("scann", "old_scann", "scann_narrow"):
    breakdown = figures["op_breakdown"][name]
    assert breakdown["ops"] > 0 and "scann_ops" in breakdown["median_us_by_part"]


def test_dpp_latency_bench_runs_at_a_tiny_size(tmp_path):
  """The DPP bench's smallest run (no timing checked, only that every figure is there)."""
  out = tmp_path / "dpp.json"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "dpp_latency.py"), "--num_items=500",
       "--dim=16", "--k=10", "--num_candidates=30", "--diverse_k=5", "--single_queries=3",
       "--batch_size=4", "--batches=2", "--recall_queries=100", "--min_ann_recall=0",
       f"--json_out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(out.read_text())
  calls = [f"{variant}_{call}" for variant in ("scann", "exact")
           for call in ("retrieve", "retrieve_n", "diverse")] + ["dpp_alone"]
  expected = {f"{call}_{stat}_ms" for call in calls for stat in ("p50", "p99")} | {
      f"{variant}_{what}" for variant in ("scann", "exact")
      for what in ("added_p50_ms", "diverse_over_retrieve_p50",
                   "added_over_retrieve_n_p50_ms", "added_batch_ms_per_query",
                   "retrieve_batch_ms_per_query", "diverse_batch_ms_per_query")}
  assert expected <= set(figures)
  assert (figures["num_items"], figures["num_candidates"], figures["diverse_k"]) == (
      500, 30, 5)
