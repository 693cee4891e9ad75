"""tf.data input for training: one day's examples, in time order, from a position.

The Beam job writes W/data/D/examples-*.tfrecord.gz so that file-name order then
record order is time order. `training_batches` reads them in that order and is a
pure function of the files and its arguments, so "skip the first n examples"
resumes a day exactly where a checkpoint left it, with or without the optional
window shuffle.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional, Sequence

import tensorflow as tf

from core import workdir as workdir_lib
from models import features

EXAMPLES_PATTERN = "examples-*.tfrecord.gz"


def example_files(workdir: str, day: datetime.date) -> list[str]:
  """Day D's example files in name (= time) order.

  Raises:
    FileNotFoundError: W/data/D does not exist (the day was not converted yet).
  """
  directory = workdir_lib.Workdir(workdir).data_dir(day)
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(f"{directory}: no data for {day.isoformat()}; run "
                            "pipeline.logs_to_tfrecords for that day first")
  return sorted(tf.io.gfile.glob(os.path.join(directory, EXAMPLES_PATTERN)))


def _window_shuffle(records: tf.data.Dataset, window: int, seed: int) -> tf.data.Dataset:
  """Shuffles within consecutive windows of `window` records, never across them.

  Window k's permutation depends only on (seed, k), so the stream is
  reproducible and skipping into it lands on the same records after a restart.
  """
  def permute(index: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    noise = tf.random.stateless_uniform(tf.shape(batch), seed=tf.stack(
        [tf.constant(seed, tf.int64), index]))
    return tf.gather(batch, tf.argsort(noise))
  return records.batch(window).enumerate().map(permute).unbatch()


def serialized_examples(files: Sequence[str], shuffle_buffer: int = 0,
                        seed: int = 0) -> tf.data.Dataset:
  """Serialized Examples of `files`, in file then record order (time order).

  Args:
    files: example files, already in time order.
    shuffle_buffer: 0 or 1 keeps exact order; n > 1 shuffles within windows of n.
    seed: seed of the window shuffle.
  """
  records = tf.data.TFRecordDataset(list(files), compression_type="GZIP",
                                    buffer_size=1 << 20)
  if shuffle_buffer > 1:
    records = _window_shuffle(records, shuffle_buffer, seed)
  return records


def training_batches(files: Sequence[str], batch_size: int, skip: int = 0,
                     max_history: int = features.MAX_HISTORY, shuffle_buffer: int = 0,
                     seed: int = 0, parallel_parses: Optional[int] = None
                     ) -> tf.data.Dataset:
  """Parsed batches of a day from example `skip` on; the last batch may be short.

  Args:
    files: the day's example files in time order.
    batch_size: examples per batch.
    skip: examples already consumed (restored from a checkpoint).
    max_history: history width cut-off, as in `features.parse_examples`.
    shuffle_buffer: see `serialized_examples`.
    seed: window-shuffle seed.
    parallel_parses: batches parsed at once (tf.data.AUTOTUNE allowed); None
      parses one at a time, behind the prefetch (each parse is multi-threaded
      already). bench/input_parallelism.py compares the two.

  Returns:
    A dataset of dicts of features.TRAINING_FEATURES in the dense form of
    models/features.py.
  """
  records = serialized_examples(files, shuffle_buffer, seed)
  if skip:
    records = records.skip(skip)
  return (records.batch(batch_size)
          .map(lambda s: features.parse_examples(s, features.TRAINING_FEATURES,
                                                 max_history=max_history),
               num_parallel_calls=parallel_parses,
               deterministic=True if parallel_parses else None)
          .prefetch(tf.data.AUTOTUNE))
