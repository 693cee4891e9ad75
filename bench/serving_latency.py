r"""Latency and throughput of the exported SavedModels: ScaNN vs exact, one run.

A synthetic corpus of --num_items unit vectors (--dim) is indexed behind the query
tower of a default-config TwoTowerModel with random weights. Items cluster around
sqrt(n) topic directions, each the tower's output for "user on the topic's seed
item", so that queries (a topic seed plus random history) land near their items
as with a trained model; see `strengthen_item_ids` and `item_embeddings`. Then
both variants are saved and loaded back with tf.saved_model.load, and each is
timed through its `serving_default` signature, query tower included:

  * single-query latency, p50 and p99 over --single_queries requests;
  * queries/s at --batch_size;
  * the ANN's recall@10 against the exact export on the same requests.

Also timed, to show where the time goes: the query tower alone and the raw ScaNN
layer alone (no SavedModel). Calls are interleaved request by request, so load
from other processes hits every variant alike; compare the ratios.
Issue 5's goal: ScaNN p50 <= 2 ms at recall@10 >= 0.95.

  python bench/serving_latency.py                       # 1M x 64
  python bench/serving_latency.py --num_items=100000 --json_out=/tmp/serving.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import features  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.retrieval import TwoTowerModel  # noqa: E402
from serving import index  # noqa: E402
from serving import servable  # noqa: E402

_NUM_ITEMS = flags.DEFINE_integer("num_items", 1_000_000, "Corpus size.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding width.")
_K = flags.DEFINE_integer("k", 100, "Items serving_default returns.")
_SINGLE = flags.DEFINE_integer("single_queries", 1000, "Single-query requests timed.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch of the throughput test.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches of the throughput test.")
_RECALL_QUERIES = flags.DEFINE_integer("recall_queries", 1000,
                                       "Held-out queries of the tuning and recall check (in hundreds).")
_MIN_RECALL = flags.DEFINE_float("min_ann_recall", 0.95, "Recall bar of the tuning.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here.")
_OUT = flags.DEFINE_string("out_dir", None, "Where to save the SavedModels "
                           "(default: a temporary directory, removed afterwards).")

Request = dict[str, tf.Tensor]


def strengthen_item_ids(model: TwoTowerModel, seed: int = 0) -> None:
  """Gives the untrained item-id table unit-scale random rows.

  At their initial scale (uniform +-0.05) every request maps to nearly the same
  direction (mean cosine 0.98) and all queries would hit one corner of the corpus.
  With larger item-id rows, as training gives them, the seed item and the history
  steer the query, as in a trained recommender. Builds the query tower first: a
  fresh model has no table yet (Keras makes it on the first call). The candidate
  tower is left unbuilt: the servable builds it.

  Raises:
    ValueError: the query tower has no item-id table to strengthen.
  """
  servable.build_tower(model.query_tower, features.QUERY_FEATURES)
  tf.random.set_seed(seed)
  tables = [variable for variable in model.query_tower.trainable_variables
            if "item_id_embedding" in variable.name]
  if not tables:
    raise ValueError("the query tower has no item_id_embedding variable to strengthen")
  for variable in tables:
    variable.assign(tf.random.normal(variable.shape))


def item_embeddings(centres: np.ndarray, num: int, noise: float = 0.6,
                    seed: int = 0) -> np.ndarray:
  """`num` unit vectors, each a random centre plus Gaussian noise of relative size
  `noise`, normalised; built in chunks to bound memory."""
  rng = np.random.default_rng(seed)
  num_centres, dim = centres.shape
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, 1 << 17):
    size = min(1 << 17, num - start)
    points = centres[rng.integers(num_centres, size=size)]
    points = points + noise / np.sqrt(dim) * rng.normal(size=(size, dim)).astype(np.float32)
    out[start:start + size] = points / np.linalg.norm(points, axis=1, keepdims=True)
  return out


def requests(seeds: np.ndarray, history: np.ndarray, num: int, size: int,
             seed: int) -> list[Request]:
  """`num` raw requests of `size` rows: a random user, device, country and time, a
  seed item drawn from `seeds` and 10 history items drawn from `history` (none
  when `history` is empty)."""
  rng = np.random.default_rng(seed)
  rows = num * size
  columns = {
      "user_id": np.array([f"user{u}".encode() for u in rng.integers(10**6, size=rows)],
                          object),
      "seed_item_id": seeds[rng.integers(len(seeds), size=rows)],
      "history_item_ids": (history[rng.integers(len(history), size=(rows, 10))]
                           if len(history) else np.full((rows, 1), b"", object)),
      "device": np.array([b"android", b"ios", b"web"], object)[rng.integers(3, size=rows)],
      "country": np.array([b"de", b"us", b"br"], object)[rng.integers(3, size=rows)],
      "timestamp": rng.integers(1_700_000_000, 1_710_000_000, size=rows),
  }
  return [{name: tf.constant(value[i * size:(i + 1) * size])
           for name, value in columns.items()} for i in range(num)]


def interleaved_ms(calls: Mapping[str, Callable[[Any], Any]],
                   inputs: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
  """Times request i of every call before request i + 1 of any; results forced."""
  times = {name: [] for name in calls}
  for i in range(min(len(v) for v in inputs.values())):
    for name, call in calls.items():
      start = time.perf_counter()
      tf.nest.map_structure(lambda t: t.numpy(), call(inputs[name][i]))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: np.array(t) for name, t in times.items()}


def recall_at_10(approx: Request, exact: Request) -> float:
  """Share of the ANN's top 10 scoring at least the exact 10th score (tie-aware)."""
  threshold = exact["scores"].numpy()[:, 9:10] - 1e-4
  return float(np.mean(approx["scores"].numpy()[:, :10] >= threshold))


def build(out_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Builds, tunes, saves and loads both variants; returns (calls, figures)."""
  config = ModelConfig(embedding_dim=_DIM.value)
  model = TwoTowerModel(config)
  strengthen_item_ids(model)
  tower = tf.function(lambda request: model.query_tower(request, training=False))
  num_items = _NUM_ITEMS.value
  item_ids = np.array([f"item{i}".encode() for i in range(num_items)], object)
  # sqrt(n) topics: a topic's centre is the query "user on the topic's seed item".
  topics = np.array([f"topic{i}".encode() for i in range(int(np.sqrt(num_items)))],
                    object)
  base = requests(topics, np.array([], object), 1, len(topics), seed=0)[0]
  centres = tower({**base, "seed_item_id": tf.constant(topics)}).numpy()
  embeddings = item_embeddings(centres, num_items)
  # Requests: a seed topic plus 10 random items of history (which moves the query
  # far off its centre: mean cosine to it about 0.4).
  make_requests = functools.partial(requests, topics, item_ids)
  held_out = make_requests(max(1, _RECALL_QUERIES.value // 100), 100, seed=1)
  queries = np.concatenate([tower(r).numpy() for r in held_out])

  started = time.perf_counter()
  tuned = index.tune_scann(embeddings, queries, k=_K.value,
                           max_fetch=_K.value + config.max_history,
                           min_recall=_MIN_RECALL.value)
  figures = {"num_items": num_items, "dim": _DIM.value, "k": _K.value,
             "cpus": os.cpu_count(), "scann_params": dataclasses.asdict(tuned.params),
             "scann_build_s": round(time.perf_counter() - started, 1),
             "tuning_attempts": len(tuned.attempts),
             "tuning_recall_at_10": round(tuned.recall[10], 4)}
  common = dict(query_tower=model.query_tower, candidate_tower=model.candidate_tower,
                item_ids=item_ids, item_embeddings=embeddings,
                temperature=config.temperature, k=_K.value, max_history=config.max_history)
  retrievers = {
      "scann": servable.ScannRetriever(
          index=tuned.layer,
          num_reordering_candidates=tuned.params.num_reordering_candidates, **common),
      "exact": servable.ExactRetriever(**common),
  }
  calls = {}
  for name, retriever in retrievers.items():
    path = os.path.join(out_dir, name)
    retriever.save(path)
    figures[f"{name}_saved_model_mb"] = round(sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
                                              / 2**20, 1)
    signature = tf.saved_model.load(path).signatures["serving_default"]
    calls[name] = lambda request, signature=signature: signature(**request)
  calls["query_tower"] = tower
  raw = tf.function(lambda q: tuned.layer(q, k=_K.value))
  calls["raw_scann"] = raw
  return {"calls": calls, "requests": make_requests, "held_out": held_out,
          "tower": tower}, figures


def measure(built: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
  """Latency, throughput and recall of the loaded variants."""
  calls, make_requests = built["calls"], built["requests"]
  singles = make_requests(_SINGLE.value, 1, seed=2)
  embedded = [built["tower"](r) for r in singles]
  inputs = {"scann": singles, "exact": singles, "query_tower": singles,
            "raw_scann": embedded}
  interleaved_ms(calls, {n: v[:20] for n, v in inputs.items()})  # warm-up
  single = interleaved_ms(calls, inputs)
  for name, times in single.items():
    figures[f"{name}_p50_ms"] = round(float(np.percentile(times, 50)), 3)
    figures[f"{name}_p99_ms"] = round(float(np.percentile(times, 99)), 3)

  batches = make_requests(_BATCHES.value, _BATCH.value, seed=3)
  variants = {name: calls[name] for name in ("scann", "exact")}
  batch = interleaved_ms(variants, {name: batches for name in variants})
  for name, times in batch.items():
    figures[f"{name}_qps"] = round(_BATCH.value * len(times) / (times.sum() / 1e3), 1)

  figures["ann_recall_at_10"] = round(float(np.mean([
      recall_at_10(calls["scann"](r), calls["exact"](r)) for r in built["held_out"]])), 4)
  figures["exact_over_scann_p50"] = round(figures["exact_p50_ms"] /
                                          figures["scann_p50_ms"], 1)
  figures["scann_over_exact_qps"] = round(figures["scann_qps"] / figures["exact_qps"], 1)
  return figures


def report(figures: dict[str, Any]) -> None:
  """Prints the table."""
  print(f"\nserving_default over {figures['num_items']:,} x {figures['dim']}, "
        f"k={figures['k']}, {figures['cpus']} CPUs")
  print(f"{'':<22}{'p50 ms':>9}{'p99 ms':>9}{'qps@' + str(_BATCH.value):>11}{'MB':>8}")
  for name in ("scann", "exact"):
    print(f"{name + ' SavedModel':<22}{figures[name + '_p50_ms']:>9.3f}"
          f"{figures[name + '_p99_ms']:>9.3f}{figures[name + '_qps']:>11.1f}"
          f"{figures[name + '_saved_model_mb']:>8.1f}")
  for name in ("query_tower", "raw_scann"):
    print(f"{name + ' alone':<22}{figures[name + '_p50_ms']:>9.3f}"
          f"{figures[name + '_p99_ms']:>9.3f}")
  print(f"ANN recall@10 vs exact: {figures['ann_recall_at_10']:.4f}; exact/ScaNN p50 "
        f"{figures['exact_over_scann_p50']}x; ScaNN/exact qps "
        f"{figures['scann_over_exact_qps']}x")
  print(f"ScaNN {figures['scann_params']}, tuned in {figures['tuning_attempts']} "
        f"attempt(s), {figures['scann_build_s']} s; run {figures['total_s']} s")


def main(argv: Sequence[str]) -> None:
  del argv
  started = time.perf_counter()
  out_dir = _OUT.value or tempfile.mkdtemp(prefix="serving_latency-")
  try:
    built, figures = build(out_dir)
    figures = measure(built, figures)
  finally:
    if not _OUT.value:
      shutil.rmtree(out_dir, ignore_errors=True)
  figures["total_s"] = round(time.perf_counter() - started, 1)
  report(figures)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
