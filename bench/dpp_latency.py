r"""What DPP diversity adds per query: retrieve_diverse against plain retrieve, one run.

The corpus, towers and requests are bench/serving_latency.py's (its flags:
--num_items, --dim, --single_queries, --batch_size, --batches, ...; --k is the
exports' serving_default k, which sets ScaNN's reorder count, hence max_k). Both
variants are saved and loaded back; then, request by request and interleaved (so
load from other processes hits every call alike), single queries go through

  * `retrieve` at k = --diverse_k: what a client calls without diversity;
  * `retrieve` at k = --num_candidates: the search retrieve_diverse runs first;
  * `retrieve_diverse`, k = --diverse_k of N = --num_candidates, at --theta, one
    boosted item per request;
  * `dpp_alone`: serving/dpp.py's greedy_map on one query's N x dim candidates,
    in a tf.function (no SavedModel, no search);

and batches of --batch_size through `retrieve` and `retrieve_diverse` for the cost
per query in throughput. The figures: p50/p99 ms, the added ms (retrieve_diverse
minus retrieve at k, both p50) and the ratio, per variant.

  python bench/dpp_latency.py --num_items=100000 --json_out=/tmp/dpp_latency.json
  python bench/dpp_latency.py            # 1M x 64, as bench/serving_latency.py
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH))
sys.path.insert(0, _BENCH)
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from serving import dpp  # noqa: E402
import serving_latency as sl  # noqa: E402  (its flags are this bench's too)

_N = flags.DEFINE_integer("num_candidates", 200, "N: candidates the DPP chooses from.")
_DIVERSE_K = flags.DEFINE_integer("diverse_k", 20, "k: items retrieve_diverse returns.")
_THETA = flags.DEFINE_float("theta", 0.5, "The DPP's relevance/diversity trade-off.")

FLAGS = flags.FLAGS


def _with(request: sl.Request, **extra: Any) -> sl.Request:
  """`request` plus scalar or per-row inputs."""
  return {**request, **{name: tf.constant(value) for name, value in extra.items()}}


def build(out_dir: str) -> tuple[dict[str, Any], dict[str, Any], Callable[..., list]]:
  """Saves and loads both variants; (the timed calls, figures, make_requests(num,
  size, seed) for requests like serving_latency's)."""
  world = sl.make_world()
  paths = sl.save_variants(world.model, world.config, world.item_ids, world.embeddings,
                           world.tuned.params, world.tuned.layer, out_dir, "new")
  figures = {**world.figures, "num_candidates": _N.value, "diverse_k": _DIVERSE_K.value,
             "theta": _THETA.value}
  calls = {}
  for name, path in paths.items():
    signatures = tf.saved_model.load(path).signatures
    for call, signature in (("retrieve", "retrieve"), ("retrieve_n", "retrieve"),
                            ("diverse", "retrieve_diverse")):
      calls[f"{name}_{call}"] = (lambda request, s=signatures[signature]: s(**request))
  rng = np.random.default_rng(5)
  candidates = tf.constant(rng.normal(size=(1, _N.value, FLAGS.dim)), tf.float32)
  scores = tf.constant(rng.normal(size=(1, _N.value)), tf.float32)
  alone = tf.function(lambda: dpp.greedy_map(candidates, scores, _DIVERSE_K.value,
                                              _THETA.value).indices)
  calls["dpp_alone"] = lambda request: alone()
  return calls, figures, world.make_requests


def _inputs(call: str, singles: Sequence[sl.Request]) -> list[sl.Request]:
  """The requests of one call: each signature's extra inputs added."""
  def plain(request: sl.Request, k: int) -> sl.Request:
    rows = int(request["user_id"].shape[0])
    return _with(request, k=k, exclude_item_ids=np.full((rows, 0), b""))

  if call.endswith("_retrieve"):
    return [plain(r, _DIVERSE_K.value) for r in singles]
  if call.endswith("_retrieve_n"):
    return [plain(r, _N.value) for r in singles]
  if call.endswith("_diverse"):
    return [diverse_request(r) for r in singles]
  return list(singles)


def diverse_request(request: sl.Request) -> sl.Request:
  """retrieve_diverse's inputs for `request`: its seed item boosted by 1."""
  rows = int(request["user_id"].shape[0])
  return _with(request, k=_DIVERSE_K.value, num_candidates=_N.value,
               theta=np.float32(_THETA.value), exclude_item_ids=np.full((rows, 0), b""),
               boost_item_ids=request["seed_item_id"].numpy()[:, np.newaxis],
               boosts=np.ones((rows, 1), np.float32))


def measure(calls: dict[str, Any], figures: dict[str, Any],
            make_requests: Callable[..., list]) -> dict[str, Any]:
  """p50/p99 of single queries, per-query ms in batches, added ms and ratios."""
  singles = make_requests(FLAGS.single_queries, 1, seed=2)
  inputs = {name: _inputs(name, singles) for name in calls}
  sl.interleaved_ms(calls, {n: v[:20] for n, v in inputs.items()})  # warm-up
  single = sl.interleaved_ms(calls, inputs)
  for name, times in single.items():
    figures[f"{name}_p50_ms"] = round(float(np.percentile(times, 50)), 3)
    figures[f"{name}_p99_ms"] = round(float(np.percentile(times, 99)), 3)
  batches = make_requests(FLAGS.batches, FLAGS.batch_size, seed=3)
  batched = {f"{variant}_{call}": calls[f"{variant}_{call}"]
             for variant in sl.VARIANTS for call in ("retrieve", "diverse")}
  batch_inputs = {name: _inputs(name, batches) for name in batched}
  for name, call in batched.items():
    call(batch_inputs[name][0])
  batch = sl.interleaved_ms(batched, batch_inputs)
  for name, times in batch.items():
    figures[f"{name}_batch_ms_per_query"] = round(float(np.median(times)) /
                                                  FLAGS.batch_size, 4)
  for variant in sl.VARIANTS:
    plain, diverse = figures[f"{variant}_retrieve_p50_ms"], figures[f"{variant}_diverse_p50_ms"]
    figures[f"{variant}_added_p50_ms"] = round(diverse - plain, 3)
    figures[f"{variant}_diverse_over_retrieve_p50"] = round(diverse / plain, 2)
    figures[f"{variant}_added_over_retrieve_n_p50_ms"] = round(
        diverse - figures[f"{variant}_retrieve_n_p50_ms"], 3)
    figures[f"{variant}_added_batch_ms_per_query"] = round(
        figures[f"{variant}_diverse_batch_ms_per_query"] -
        figures[f"{variant}_retrieve_batch_ms_per_query"], 4)
  return figures


def report(figures: dict[str, Any]) -> None:
  print(f"\nretrieve_diverse (k={figures['diverse_k']} of N={figures['num_candidates']}, "
        f"theta={figures['theta']}) over {figures['num_items']:,} x {figures['dim']}, "
        f"{figures['cpus']} CPUs")
  print(f"{'single query':<28}{'p50 ms':>9}{'p99 ms':>9}")
  for variant in sl.VARIANTS:
    for call, label in (("retrieve", f"retrieve k={figures['diverse_k']}"),
                        ("retrieve_n", f"retrieve k={figures['num_candidates']}"),
                        ("diverse", "retrieve_diverse")):
      name = f"{variant}_{call}"
      print(f"{variant + ' ' + label:<28}{figures[name + '_p50_ms']:>9.3f}"
            f"{figures[name + '_p99_ms']:>9.3f}")
  print(f"{'dpp_alone (tf.function)':<28}{figures['dpp_alone_p50_ms']:>9.3f}"
        f"{figures['dpp_alone_p99_ms']:>9.3f}")
  for variant in sl.VARIANTS:
    print(f"{variant}: +{figures[variant + '_added_p50_ms']} ms per single query "
          f"(x{figures[variant + '_diverse_over_retrieve_p50']}; "
          f"+{figures[variant + '_added_over_retrieve_n_p50_ms']} ms over retrieve at N); "
          f"batch {FLAGS.batch_size}: "
          f"{figures[variant + '_retrieve_batch_ms_per_query']} -> "
          f"{figures[variant + '_diverse_batch_ms_per_query']} ms per query")
  print(f"run {figures['total_s']} s")


def main(argv: Sequence[str]) -> None:
  del argv

  def run(out_dir: str) -> dict[str, Any]:
    calls, figures, make_requests = build(out_dir)
    return measure(calls, figures, make_requests)

  sl.run_and_report(run, report, "dpp_latency-")


if __name__ == "__main__":
  app.run(main)
