r"""Latency and throughput of the exported SavedModels: ScaNN vs exact, new vs old, one run.

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

With --old_tree (a tree holding the serving code to compare with, e.g. the
committed one from `git archive HEAD`), a second process saves both variants with
that tree's `serving` package over the same towers, corpus and ScaNN parameters
(everything else from this tree), and every figure is also given for the old
exports and as new / old.

Where the time of one call goes, timed alone and interleaved with the rest:
  * `floor`: a SavedModel signature with the same inputs that does nothing (what
    calling any signature from Python costs);
  * `scann_query_embedding`: the ScaNN export's query_embedding signature (floor,
    request check, query tower);
  * `query_tower`: the query tower in a tf.function, and `raw_scann`: the ScaNN
    index alone on query embeddings (no SavedModel);
  * --op_breakdown: the median time of each op inside one serving_default call
    (a TF1 session's step stats, in a child process), summed by part.
Calls are interleaved request by request, so load from other processes hits
every variant alike; compare the ratios.

  python bench/serving_latency.py                       # 1M x 64
  python bench/serving_latency.py --old_tree=/tmp/OLD --json_out=/tmp/serving.json
  python bench/serving_latency.py --num_items=100000
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The old tree's child process puts its own code first (see `_old_code_root`).
sys.path.insert(0, os.environ.get("SERVING_LATENCY_CODE", _REPO))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import features  # noqa: E402
from models import memory  # noqa: E402
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
_PARTNERS = flags.DEFINE_integer("memory_partners", 100, "Partners of each request's "
                                 "seed in the pair-memory variant's table.")
_NARROW = flags.DEFINE_float("ann_narrow_tolerance", 0.001, "The new code's export is "
                             "also saved narrowed (`scann_narrow`): the leaves searched "
                             "halved while recall stays within this of the setting that "
                             "met the bar (index.tune_scann). Negative: not measured.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here.")
_OUT = flags.DEFINE_string("out_dir", None, "Where to save the SavedModels "
                           "(default: a temporary directory, removed afterwards).")
_OLD_TREE = flags.DEFINE_string("old_tree", None, "A tree whose serving package is the "
                                "old code to compare with (e.g. `git archive HEAD`).")
_OP_BREAKDOWN = flags.DEFINE_bool("op_breakdown", True, "Also time each op of one "
                                  "serving_default call (step stats, child process).")
_SAVE_OLD = flags.DEFINE_string("save_old", None, "Internal: the child process that "
                                "saves the exports of --old_tree's code from these inputs.")
_STEP_STATS = flags.DEFINE_string("step_stats", None, "Internal: the child process that "
                                  "times the ops of this export's serving_default.")

Request = dict[str, tf.Tensor]
VARIANTS = ("scann", "exact")
NARROW = "scann_narrow"
MEMORY = "scann_memory"


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


def memory_table(seeds: np.ndarray, num_items: int, partners: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A pair memory's serving table (models.memory.PairMemory.serving_table's form):
  each of `seeds` has `partners` distinct random corpus rows, bonuses in (0, 6]."""
  rng = np.random.default_rng(seed)
  keys = memory.fingerprints(tf.constant(seeds)).numpy()
  order = np.argsort(keys)
  partners = min(partners, num_items)
  rows = np.stack([rng.choice(num_items, partners, replace=False)
                   for _ in range(len(seeds))]).astype(np.int32)
  bonus = rng.uniform(0.0, 6.0, size=rows.shape).astype(np.float32)
  return keys[order], rows[order], bonus[order]


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


def request_columns(seeds: np.ndarray, history: np.ndarray, rows: int,
                    seed: int) -> dict[str, np.ndarray]:
  """`rows` raw requests as numpy columns: a random user, device, country and time,
  a seed item drawn from `seeds` and 10 history items drawn from `history` (none
  when `history` is empty)."""
  rng = np.random.default_rng(seed)
  return {
      "user_id": np.array([f"user{u}".encode() for u in rng.integers(10**6, size=rows)],
                          object),
      "seed_item_id": seeds[rng.integers(len(seeds), size=rows)],
      "history_item_ids": (history[rng.integers(len(history), size=(rows, 10))]
                           if len(history) else np.full((rows, 1), b"", object)),
      "device": np.array([b"android", b"ios", b"web"], object)[rng.integers(3, size=rows)],
      "country": np.array([b"de", b"us", b"br"], object)[rng.integers(3, size=rows)],
      "timestamp": rng.integers(1_700_000_000, 1_710_000_000, size=rows),
  }


def requests(seeds: np.ndarray, history: np.ndarray, num: int, size: int,
             seed: int) -> list[Request]:
  """`num` requests of `size` rows (`request_columns`), as tensors."""
  columns = request_columns(seeds, history, num * size, seed)
  return [{name: tf.constant(value[i * size:(i + 1) * size])
           for name, value in columns.items()} for i in range(num)]


def interleaved_ms(calls: Mapping[str, Callable[[Any], Any]],
                   inputs: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
  """Times request i of every call before request i + 1 of any; results forced.

  The calls take turns in a new random order for each request: in a fixed order,
  the call after the exact export's (which streams its whole corpus through the
  caches) paid for it (the same ScaNN graph saved by both trees measured 0.67x
  "old" at 1M, the one after the exact export being the old one).
  """
  times = {name: [] for name in calls}
  names = list(calls)
  rng = np.random.default_rng(0)
  for i in range(min(len(v) for v in inputs.values())):
    for name in rng.permutation(names):
      call = calls[name]
      start = time.perf_counter()
      tf.nest.map_structure(lambda t: t.numpy(), call(inputs[name][i]))
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: np.array(t) for name, t in times.items()}


def recall_at_10(approx: Request, exact: Request) -> float:
  """Share of the ANN's top 10 scoring at least the exact 10th score (tie-aware)."""
  threshold = exact["scores"].numpy()[:, 9:10] - 1e-4
  return float(np.mean(approx["scores"].numpy()[:, :10] >= threshold))


def saved_model_mb(path: str) -> float:
  return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                   for f in fs) / 2**20, 1)


def save_variants(model: TwoTowerModel, config: ModelConfig, item_ids: np.ndarray,
                  embeddings: np.ndarray, params: index.ScannParams, layer: Any,
                  out_dir: str, prefix: str, narrowed: Any = None,
                  table: Any = None) -> dict[str, str]:
  """Saves the two variants with this process's `serving` code; their paths.

  Uses only the constructors both the old and the new code have. `narrowed`: the
  index searching fewer leaves (index.tune_scann's narrowing), saved as a third
  variant, NARROW. `table`: a pair memory's table (`memory_table`), merged by a
  fourth variant, MEMORY: the ScaNN export of a model with a pair memory.
  """
  common = dict(query_tower=model.query_tower, candidate_tower=model.candidate_tower,
                item_ids=item_ids, item_embeddings=embeddings,
                temperature=config.temperature, k=_K.value, max_history=config.max_history)
  retrievers = {
      "scann": servable.ScannRetriever(
          index=layer, num_reordering_candidates=params.num_reordering_candidates,
          **common),
      "exact": servable.ExactRetriever(**common),
  }
  if narrowed is not None:
    retrievers[NARROW] = servable.ScannRetriever(
        index=narrowed, num_reordering_candidates=narrowed.params.num_reordering_candidates,
        **common)
  if table is not None:
    retrievers[MEMORY] = servable.ScannRetriever(
        index=layer, num_reordering_candidates=params.num_reordering_candidates,
        successors=table[1].shape[1], **common)
    retrievers[MEMORY].assign_successors(*table)
  paths = {}
  for name, retriever in retrievers.items():
    paths[name] = os.path.join(out_dir, f"{prefix}_{name}")
    retriever.save(paths[name])
  return paths


def _floor_signature(out_dir: str) -> str:
  """Saves a SavedModel whose serving_default takes the query features and does nothing."""

  class Floor(tf.Module):

    @tf.function(input_signature=[features.query_input_signature()])
    def nothing(self, request: Request) -> dict[str, tf.Tensor]:
      return {"user_id": tf.identity(request["user_id"])}

  module = Floor()
  path = os.path.join(out_dir, "floor")
  tf.saved_model.save(module, path,
                      signatures={"serving_default": module.nothing.get_concrete_function()})
  return path


def _old_code_root(old_tree: str, out_dir: str) -> str:
  """A directory whose packages are this tree's, but `serving`, which is old_tree's."""
  root = os.path.join(out_dir, "old_code")
  os.makedirs(root, exist_ok=True)
  for name in os.listdir(_REPO):
    if os.path.isfile(os.path.join(_REPO, name, "__init__.py")) and name != "serving":
      os.symlink(os.path.join(_REPO, name), os.path.join(root, name))
  os.symlink(os.path.join(os.path.abspath(old_tree), "serving"),
             os.path.join(root, "serving"))
  return root


def _save_inputs(model: TwoTowerModel, item_ids: np.ndarray, embeddings: np.ndarray,
                 params: index.ScannParams, out_dir: str) -> str:
  """What the old code's process needs to save the same exports."""
  inputs = os.path.join(out_dir, "inputs")
  os.makedirs(inputs, exist_ok=True)
  tf.train.Checkpoint(query=model.query_tower).write(os.path.join(inputs, "towers"))
  np.save(os.path.join(inputs, "item_ids.npy"), item_ids.astype(bytes))
  np.save(os.path.join(inputs, "embeddings.npy"), embeddings)
  with open(os.path.join(inputs, "params.json"), "w") as f:
    json.dump(dataclasses.asdict(params), f)
  return inputs


def save_old(inputs: str, out_dir: str) -> None:
  """The child process of --old_tree: the same exports, saved by the old code."""
  config = ModelConfig(embedding_dim=_DIM.value)
  model = TwoTowerModel(config)
  servable.build_tower(model.query_tower, features.QUERY_FEATURES)
  tf.train.Checkpoint(query=model.query_tower).read(
      os.path.join(inputs, "towers")).assert_existing_objects_matched()
  item_ids = np.load(os.path.join(inputs, "item_ids.npy")).astype(object)
  embeddings = np.load(os.path.join(inputs, "embeddings.npy"))
  with open(os.path.join(inputs, "params.json")) as f:
    params = index.ScannParams(**json.load(f))
  layer = index.build_scann(embeddings, params, k=min(_K.value, len(item_ids)))
  save_variants(model, config, item_ids, embeddings, params, layer, out_dir, "old")


@dataclasses.dataclass
class World:
  """The synthetic world: towers, corpus, requests, and a ScaNN index tuned on it.

  Attributes:
    model, config, tower: the TwoTowerModel, its config, its query tower traced.
    item_ids, embeddings: the corpus.
    make_requests: requests(num, size, seed) like those of the bench.
    held_out: the requests of the tuning and recall check.
    tuned: index.tune_scann's result, without narrowing: the parameters that met
      the bar (both trees' `scann` export).
    narrowed: that index narrowed (--ann_narrow_tolerance), or None.
    memory: a pair memory's serving table in which every request's seed has
      --memory_partners partners (`memory_table`).
    figures: what the world is (sizes, ScaNN parameters, build seconds).
  """
  model: TwoTowerModel
  config: ModelConfig
  tower: Callable[[Request], tf.Tensor]
  item_ids: np.ndarray
  embeddings: np.ndarray
  make_requests: Callable[..., list[Request]]
  held_out: list[Request]
  tuned: index.TunedScann
  narrowed: Any
  memory: Any
  figures: dict[str, Any]


def make_world() -> World:
  """--num_items x --dim items around sqrt(n) topics, the query tower that finds
  them, and the ScaNN index tuned for serving_default's --k."""
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
  narrow = _NARROW.value if _NARROW.value >= 0 else None
  tuned = index.tune_scann(embeddings, queries, k=_K.value,
                           max_fetch=_K.value + config.max_history,
                           min_recall=_MIN_RECALL.value, narrow_tolerance=narrow)
  # The setting that met the bar: the first attempt to reach it.
  met = next(a for a in tuned.attempts if a["recall"]["10"] >= _MIN_RECALL.value)
  narrowed = tuned.layer if narrow is not None else None
  tuned = dataclasses.replace(
      tuned, layer=tuned.layer.with_search(index.ScannParams(**met["params"])),
      params=index.ScannParams(**met["params"]),
      recall={int(c): r for c, r in met["recall"].items()})
  figures = {"num_items": num_items, "dim": _DIM.value, "k": _K.value,
             "cpus": os.cpu_count(), "scann_params": dataclasses.asdict(tuned.params),
             "scann_build_s": round(time.perf_counter() - started, 1),
             "tuning_attempts": len(tuned.attempts),
             "tuning_recall_at_10": round(tuned.recall[10], 4)}
  if narrowed is not None:
    figures["narrowed_scann_params"] = dataclasses.asdict(narrowed.params)
    figures["narrowed_tuning_recall_at_10"] = round(next(
        a["recall"]["10"] for a in tuned.attempts
        if a["params"] == dataclasses.asdict(narrowed.params)), 4)
  table = memory_table(topics, num_items, _PARTNERS.value)
  figures["memory_partners"] = _PARTNERS.value
  return World(model, config, tower, item_ids, embeddings, make_requests, held_out,
               tuned, narrowed, table, figures)


def build(out_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Builds, tunes, saves and loads both variants (and the old ones); (calls, figures)."""
  world = make_world()
  model, config, item_ids, embeddings, tuned = (world.model, world.config, world.item_ids,
                                                world.embeddings, world.tuned)
  tower, make_requests, held_out, figures = (world.tower, world.make_requests,
                                             world.held_out, world.figures)
  paths = save_variants(model, config, item_ids, embeddings, tuned.params, tuned.layer,
                        out_dir, "new", narrowed=world.narrowed, table=world.memory)
  if _OLD_TREE.value:
    inputs = _save_inputs(model, item_ids, embeddings, tuned.params, out_dir)
    env = {**os.environ, "SERVING_LATENCY_CODE": _old_code_root(_OLD_TREE.value, out_dir)}
    subprocess.run([sys.executable, os.path.abspath(__file__), f"--save_old={inputs}",
                    f"--out_dir={out_dir}", f"--dim={_DIM.value}", f"--k={_K.value}"],
                   env=env, check=True)
    paths.update({f"old_{name}": os.path.join(out_dir, f"old_{name}")
                  for name in VARIANTS})
  calls, loaded = {}, {}
  for name, path in paths.items():
    figures[f"{name}_saved_model_mb"] = saved_model_mb(path)
    loaded[name] = tf.saved_model.load(path)
    signature = loaded[name].signatures["serving_default"]
    calls[name] = lambda request, signature=signature: signature(**request)
  floor = tf.saved_model.load(_floor_signature(out_dir)).signatures["serving_default"]
  calls["floor"] = lambda request: floor(**request)
  query = loaded["scann"].signatures["query_embedding"]
  calls["scann_query_embedding"] = lambda request: query(**request)
  calls["query_tower"] = tower
  calls["raw_scann"] = tf.function(lambda q: tuned.layer(q, k=_K.value))
  return {"calls": calls, "requests": make_requests, "held_out": held_out,
          "tower": tower, "paths": paths}, figures


def measure(built: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
  """Latency, throughput and recall of the loaded variants; new / old ratios."""
  calls, make_requests = built["calls"], built["requests"]
  singles = make_requests(_SINGLE.value, 1, seed=2)
  embedded = [built["tower"](r) for r in singles]
  inputs = {name: embedded if name == "raw_scann" else singles for name in calls}
  interleaved_ms(calls, {n: v[:20] for n, v in inputs.items()})  # warm-up
  single = interleaved_ms(calls, inputs)
  for name, times in single.items():
    figures[f"{name}_p50_ms"] = round(float(np.percentile(times, 50)), 3)
    figures[f"{name}_p99_ms"] = round(float(np.percentile(times, 99)), 3)

  batches = make_requests(_BATCHES.value, _BATCH.value, seed=3)
  variants = {name: calls[name] for name in built["paths"]}
  for call in variants.values():
    call(batches[0])
  batch = interleaved_ms(variants, {name: batches for name in variants})
  for name, times in batch.items():
    figures[f"{name}_qps"] = round(_BATCH.value * len(times) / (times.sum() / 1e3), 1)

  pairs = {"": ("scann", "exact"), "old_": ("old_scann", "old_exact"),
           NARROW + "_": (NARROW, "exact")}
  for prefix, (approx, exact) in pairs.items():
    if approx in calls:
      figures[f"{prefix}ann_recall_at_10"] = round(float(np.mean([
          recall_at_10(calls[approx](r), calls[exact](r)) for r in built["held_out"]])), 4)
  figures["exact_over_scann_p50"] = round(figures["exact_p50_ms"] /
                                          figures["scann_p50_ms"], 1)
  figures["scann_over_exact_qps"] = round(figures["scann_qps"] / figures["exact_qps"], 1)
  if "old_scann" in calls:
    for name in VARIANTS:
      for stat in ("p50_ms", "p99_ms", "qps"):
        figures[f"{name}_new_over_old_{stat}"] = round(
            figures[f"{name}_{stat}"] / figures[f"old_{name}_{stat}"], 3)
  if MEMORY in calls:
    for stat in ("p50_ms", "p99_ms", "qps"):
      figures[f"{MEMORY}_over_scann_{stat}"] = round(
          figures[f"{MEMORY}_{stat}"] / figures[f"scann_{stat}"], 3)
  for old in ("scann", "old_scann"):
    if NARROW in calls and old in calls:
      for stat in ("p50_ms", "p99_ms", "qps"):
        figures[f"{NARROW}_over_{old}_{stat}"] = round(
            figures[f"{NARROW}_{stat}"] / figures[f"{old}_{stat}"], 3)
  return figures


def op_times(export_dir: str, runs: int = 200) -> dict[str, Any]:
  """Median microseconds of each op of one single-query serving_default call.

  Runs in a TF1 session (graph mode for the whole process, so in a child process):
  its step stats time each op of the call, nested functions inlined.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  tf.compat.v1.disable_eager_execution()
  request = request_columns(np.array([b"topic0"], object),
                            np.array([f"item{i}".encode() for i in range(100)], object),
                            1, seed=4)
  with tf.compat.v1.Session(graph=tf.Graph()) as session:
    signature = tf.compat.v1.saved_model.load(session, ["serve"], export_dir
                                              ).signature_def["serving_default"]
    feeds = {spec.name: request[name] for name, spec in signature.inputs.items()}
    fetches = {name: spec.name for name, spec in signature.outputs.items()}
    for _ in range(20):
      session.run(fetches, feeds)
    took = collections.defaultdict(list)
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    for _ in range(runs):
      metadata = tf.compat.v1.RunMetadata()
      session.run(fetches, feeds, options=options, run_metadata=metadata)
      for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
          op = node.timeline_label.split("(")[0].split(" = ")[-1] or node.node_name
          took[(node.node_name, op)].append(node.all_end_rel_micros)
  median = {key: float(np.median(values)) for key, values in took.items()}
  parts = collections.Counter()
  for (name, op), micros in median.items():
    if op.startswith("Scann>"):
      parts["scann_ops"] += micros
    elif "query_tower/" in name:
      parts["query_tower"] += micros
    else:
      parts["other"] += micros
  top = sorted(((m, op) for (_, op), m in median.items()), reverse=True)[:8]
  return {"ops": len(median), "median_us_by_part": {k: round(v, 1) for k, v in parts.items()},
          "top_ops_us": [[op, round(m, 1)] for m, op in top]}


def _op_breakdown(paths: Mapping[str, str]) -> dict[str, Any]:
  """op_times of each ScaNN export, each in a child process."""
  found = {}
  for name in ("scann", "old_scann", NARROW):
    if name in paths:
      out = os.path.join(os.path.dirname(paths[name]), f"{name}_ops.json")
      subprocess.run([sys.executable, os.path.abspath(__file__),
                      f"--step_stats={paths[name]}", f"--json_out={out}"], check=True)
      with open(out) as f:
        found[name] = json.load(f)
  return found


def report(figures: dict[str, Any]) -> None:
  """Prints the table."""
  print(f"\nserving_default over {figures['num_items']:,} x {figures['dim']}, "
        f"k={figures['k']}, {figures['cpus']} CPUs")
  print(f"{'':<28}{'p50 ms':>9}{'p99 ms':>9}{'qps@' + str(_BATCH.value):>11}{'MB':>8}")
  for name in ("scann", "old_scann", NARROW, MEMORY, "exact", "old_exact"):
    if f"{name}_p50_ms" in figures:
      print(f"{name + ' SavedModel':<28}{figures[name + '_p50_ms']:>9.3f}"
            f"{figures[name + '_p99_ms']:>9.3f}{figures[name + '_qps']:>11.1f}"
            f"{figures[name + '_saved_model_mb']:>8.1f}")
  for name in ("floor", "scann_query_embedding", "query_tower", "raw_scann"):
    print(f"{name + ' alone':<28}{figures[name + '_p50_ms']:>9.3f}"
          f"{figures[name + '_p99_ms']:>9.3f}")
  for name in VARIANTS:
    if f"{name}_new_over_old_p50_ms" in figures:
      print(f"{name} new / old: p50 {figures[name + '_new_over_old_p50_ms']}, p99 "
            f"{figures[name + '_new_over_old_p99_ms']}, qps "
            f"{figures[name + '_new_over_old_qps']}")
  for name, found in figures.get("op_breakdown", {}).items():
    print(f"{name} serving_default, {found['ops']} ops, median us by part: "
          f"{found['median_us_by_part']}; top: {found['top_ops_us'][:4]}")
  for old in ("scann", "old_scann"):
    if f"{NARROW}_over_{old}_p50_ms" in figures:
      print(f"{NARROW} / {old}: p50 {figures[f'{NARROW}_over_{old}_p50_ms']}, p99 "
            f"{figures[f'{NARROW}_over_{old}_p99_ms']}, qps "
            f"{figures[f'{NARROW}_over_{old}_qps']}")
  if f"{MEMORY}_over_scann_p50_ms" in figures:
    print(f"{MEMORY} / scann ({figures['memory_partners']} partners merged per query): "
          f"p50 {figures[f'{MEMORY}_over_scann_p50_ms']}, p99 "
          f"{figures[f'{MEMORY}_over_scann_p99_ms']}, qps "
          f"{figures[f'{MEMORY}_over_scann_qps']}")
  if NARROW + "_ann_recall_at_10" in figures:
    print(f"{NARROW}: ScaNN {figures['narrowed_scann_params']}, ANN recall@10 vs exact "
          f"{figures[NARROW + '_ann_recall_at_10']:.4f}")
  print(f"ANN recall@10 vs exact: {figures['ann_recall_at_10']:.4f}; exact/ScaNN p50 "
        f"{figures['exact_over_scann_p50']}x; ScaNN/exact qps "
        f"{figures['scann_over_exact_qps']}x")
  print(f"ScaNN {figures['scann_params']}, tuned in {figures['tuning_attempts']} "
        f"attempt(s), {figures['scann_build_s']} s; run {figures['total_s']} s")


def run_and_report(run: Callable[[str], dict[str, Any]],
                   show: Callable[[dict[str, Any]], None], prefix: str) -> None:
  """figures = run(out_dir) in --out_dir (else a temporary directory, removed
  after), plus total_s; shown, and written to --json_out."""
  started = time.perf_counter()
  out_dir = _OUT.value or tempfile.mkdtemp(prefix=prefix)
  try:
    figures = run(out_dir)
  finally:
    if not _OUT.value:
      shutil.rmtree(out_dir, ignore_errors=True)
  figures["total_s"] = round(time.perf_counter() - started, 1)
  show(figures)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


def main(argv: Sequence[str]) -> None:
  del argv
  if _SAVE_OLD.value:
    save_old(_SAVE_OLD.value, _OUT.value)
    return
  if _STEP_STATS.value:
    with open(_JSON.value, "w") as f:
      json.dump(op_times(_STEP_STATS.value), f)
    return

  def run(out_dir: str) -> dict[str, Any]:
    built, figures = build(out_dir)
    figures = measure(built, figures)
    if _OP_BREAKDOWN.value:
      figures["op_breakdown"] = _op_breakdown(built["paths"])
    return figures

  run_and_report(run, report, "serving_latency-")


if __name__ == "__main__":
  app.run(main)
