"""Cost of a frequency estimator step next to a plain embedding lookup.

Times `estimator(item_ids, step)` (update, then estimate the batch) at batch 1024
with H = 2^20 and m = 4 against hashing the same ids and gathering their rows
from an embedding table, the first op of the candidate tower. Both run
`--steps_per_call` steps inside one `tf.function` loop over pre-drawn Zipf
batches (so Python dispatch is not timed), interleaved `--repeats` times; the
table reports the median time per step and the ratio, measured in one run.

  python -m bench.estimator_overhead [--json=bench/out/estimator_overhead.json]
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import core  # noqa: F401  (first: sets the environment before TensorFlow loads)
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from core import workdir
import estimators

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 1024, "Ids per batch.")
flags.DEFINE_integer("num_buckets", 1 << 20, "H of the hashed estimators.")
flags.DEFINE_integer("num_hashes", 4, "m of the hashed estimators.")
flags.DEFINE_integer("num_items", 1_000_000, "Distinct ids in the Zipf stream.")
flags.DEFINE_float("zipf_exponent", 1.0, "Skew of the stream (repeats in a batch).")
flags.DEFINE_integer("embedding_rows", 1 << 20, "Rows of the embedding table.")
flags.DEFINE_integer("embedding_dim", 64, "Width of the embedding table.")
flags.DEFINE_integer("num_batches", 64, "Pre-drawn batches, cycled.")
flags.DEFINE_integer("steps_per_call", 200, "Steps per timed tf.function call.")
flags.DEFINE_integer("repeats", 7, "Timed calls per variant (median reported).")
flags.DEFINE_string("json", None, "Optional path for the results as JSON.")


def _batches() -> tf.Tensor:
  """[num_batches, batch_size] string ids drawn from a Zipf law."""
  rng = np.random.default_rng(0)
  q = (np.arange(FLAGS.num_items) + 1.0) ** -FLAGS.zipf_exponent
  draws = rng.choice(FLAGS.num_items, (FLAGS.num_batches, FLAGS.batch_size),
                     p=q / q.sum())
  return tf.strings.as_string(tf.constant(draws, tf.int64))


def _looped(body: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
            batches: tf.Tensor) -> Callable[[tf.Tensor], tf.Tensor]:
  """A tf.function running `body(ids, step)` for steps [start, start + n)."""

  @tf.function
  def run(start: tf.Tensor) -> tf.Tensor:
    total = tf.constant(0.0)
    for step in tf.range(start, start + FLAGS.steps_per_call):
      ids = batches[step % FLAGS.num_batches]
      total += tf.reduce_sum(body(ids, step))
    return total

  return run


def _variants(batches: tf.Tensor) -> dict[str, Callable[[tf.Tensor], tf.Tensor]]:
  table = tf.Variable(tf.random.normal([FLAGS.embedding_rows, FLAGS.embedding_dim],
                                       stddev=0.05), name="embedding")

  def lookup(ids, step):
    del step
    rows = tf.strings.to_hash_bucket_fast(ids, FLAGS.embedding_rows)
    return tf.nn.embedding_lookup(table, rows)

  hashed = dict(num_buckets=FLAGS.num_buckets, num_hashes=FLAGS.num_hashes)
  layers = {
      "streaming (paper)": estimators.StreamingFrequencyEstimator(**hashed),
      "streaming, multiplicity + staleness": estimators.StreamingFrequencyEstimator(
          count_multiplicity=True, staleness=0.2, **hashed),
      "decayed_count (CU)": estimators.DecayedCountFrequencyEstimator(**hashed),
      "count_min": estimators.CountMinFrequencyEstimator(**hashed),
      "exact (hash table, count)": estimators.ExactFrequencyEstimator(),
  }
  variants = {"embedding lookup": _looped(lookup, batches)}
  for name, layer in layers.items():
    variants[name] = _looped(lambda ids, step, layer=layer: layer(ids, step),
                             batches)
  return variants


def main(argv: Sequence[str]) -> None:
  del argv
  tf.get_logger().setLevel("ERROR")  # one tf.function per variant: no retrace noise
  batches = _batches()
  variants = _variants(batches)
  next_step = {name: 0 for name in variants}
  times = {name: [] for name in variants}

  def call(name: str) -> float:
    start = time.perf_counter()
    variants[name](tf.constant(next_step[name], tf.int64)).numpy()
    next_step[name] += FLAGS.steps_per_call
    return (time.perf_counter() - start) / FLAGS.steps_per_call

  for name in variants:  # trace, build, and touch the state once
    call(name)
  for _ in range(FLAGS.repeats):
    for name in variants:
      times[name].append(call(name))

  base = float(np.median(times["embedding lookup"]))
  print(f"\nbatch {FLAGS.batch_size}, H = {FLAGS.num_buckets}, m = "
        f"{FLAGS.num_hashes}, embedding [{FLAGS.embedding_rows}, "
        f"{FLAGS.embedding_dim}], {FLAGS.steps_per_call} steps x "
        f"{FLAGS.repeats} repeats, median per step")
  print(f"{'variant':40s}{'ms/step':>10s}{'x lookup':>10s}")
  rows = []
  for name, samples in times.items():
    median = float(np.median(samples))
    rows.append({"variant": name, "ms_per_step": median * 1e3,
                 "ratio_to_lookup": median / base,
                 "samples_ms": [s * 1e3 for s in samples]})
    print(f"{name:40s}{median * 1e3:10.3f}{median / base:10.2f}")
  if FLAGS.json:
    names = ("batch_size", "num_buckets", "num_hashes", "num_items", "zipf_exponent",
             "embedding_rows", "embedding_dim", "steps_per_call", "repeats")
    workdir.write_json(FLAGS.json, {
        "flags": {name: FLAGS[name].value for name in names}, "rows": rows})
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
