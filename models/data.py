"""tf.data input for training: a day's stream of examples, in time order, from a position.

The Beam job writes W/data/D/examples-*.tfrecord.gz so that file-name order then
record order is time order. Training day D reads a stream: the examples of the
last `replay_days` data days up to and including D (`replay_window`, D last),
in time order, after `replay_old_days` older days drawn at random
(`old_replay_days`), repeated `epochs` times (ModelConfig.replay_days,
replay_old_days, epochs_per_day).
`stream_batches` is a pure function of those files and its arguments, so "skip
the first n examples of the stream" resumes it exactly where a checkpoint left
it, mid-epoch or mid-day, with or without the optional window shuffle.

One epoch streams the files (bounded memory). More epochs parse the window once
(`parse_window`) and then gather the stream's batches from those tensors, so no
record is read or parsed again: the window is held in memory, parsed.

Under several replicas (models/distribute.py) a worker's stream is its
replicas' shares of each global batch (`ReplicaShare`): the same batches of the
same stream, each split in order, so the position stays a count of the
stream's examples.
"""

from __future__ import annotations

import datetime
import functools
import os
import random
import re
from typing import Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from core import workdir as workdir_lib
from models import distribute
from models import features

EXAMPLES_PATTERN = "examples-*.tfrecord.gz"
CORPUS_PATTERN = "corpus-*.tfrecord.gz"


def _data_dir(workdir: str, day: datetime.date) -> str:
  """W/data/D, which must exist.

  Raises:
    FileNotFoundError: W/data/D does not exist (the day was not converted yet).
  """
  directory = workdir_lib.Workdir(workdir).data_dir(day)
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(f"{directory}: no data for {day.isoformat()}; run "
                            "pipeline.logs_to_tfrecords for that day first")
  return directory


def example_files(workdir: str, day: datetime.date) -> list[str]:
  """Day D's example files in name (= time) order.

  Raises:
    FileNotFoundError: W/data/D does not exist (the day was not converted yet).
  """
  return sorted(tf.io.gfile.glob(os.path.join(_data_dir(workdir, day),
                                              EXAMPLES_PATTERN)))


def replay_window(workdir: str, day: datetime.date, replay_days: int
                  ) -> list[datetime.date]:
  """The last `replay_days` data days up to and including `day`, oldest first.

  A data day is a partition W/data/YYYY-MM-DD that exists: with 30-day
  partitions the window is the last N partitions, not N calendar days. Only
  W/data up to `day` decides it, so data of later days never enters it.

  Raises:
    FileNotFoundError: W/data/D does not exist.
  """
  _data_dir(workdir, day)
  paths = workdir_lib.Workdir(workdir)
  window = [day]
  if replay_days > 1:  # else nothing to list
    for earlier in reversed(workdir_lib.partition_dates(paths.data_root)):
      if len(window) >= replay_days:
        break
      if earlier < day and tf.io.gfile.isdir(paths.data_dir(earlier)):
        window.insert(0, earlier)
  return window


def old_replay_days(workdir: str, day: datetime.date, window: Sequence[datetime.date],
                    count: int, seed: int) -> list[datetime.date]:
  """`count` data days drawn at random from those older than `window`, oldest first.

  The long-memory part of day D's stream (ModelConfig.replay_old_days): a draw
  without replacement, seeded by (seed, D), from the data days before the
  window's first, so resuming D draws the same days and no day after D enters.
  Fewer when fewer exist.
  """
  if count < 1 or not window:
    return []
  paths = workdir_lib.Workdir(workdir)
  older = [d for d in workdir_lib.partition_dates(paths.data_root) if d < window[0]]
  drawn = random.Random(day_seed(seed, day)).sample(older, min(count, len(older)))
  return sorted(drawn)


def day_seed(seed: int, day: datetime.date) -> int:
  """The window-shuffle seed of a day's examples: its own, whichever day trains them."""
  return seed * 100003 + day.toordinal()


class DayFiles(NamedTuple):
  """One day of a training stream: its files in time order, its seed, its directory."""
  files: Sequence[str]
  seed: int = 0
  directory: str = ""  # W/data/D, for errors


def day_files(workdir: str, day: datetime.date, seed: int) -> DayFiles:
  """Day D as a day of a stream: its example files, its shuffle seed, W/data/D."""
  return DayFiles(example_files(workdir, day), day_seed(seed, day),
                  workdir_lib.Workdir(workdir).data_dir(day))


def input_error(where: str, after: int, error: tf.errors.OpError) -> RuntimeError:
  """The one-line error of input that cannot be read or parsed, naming `where`.

  A failed check of the input (models/features.py) is "bad examples", quoted from
  its assertion; anything else (a damaged file) is "cannot read examples".
  """
  if isinstance(error, tf.errors.InvalidArgumentError):
    failed = re.search(r"assertion failed: \[(.*?)\]", error.message)
    return RuntimeError(f"{where}: bad examples after example {after}: "
                        f"{failed.group(1) if failed else error.message}")
  return RuntimeError(f"{where}: cannot read examples after example {after}: "
                      f"{error.message}")


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


def _window_records(days: Sequence[DayFiles], shuffle_buffer: int) -> tf.data.Dataset:
  """The days' serialized Examples one after the other, each day shuffled on its own."""
  if shuffle_buffer <= 1:  # one reader over every file: the same order, one dataset
    return serialized_examples([f for d in days for f in d.files])
  records = serialized_examples(days[0].files, shuffle_buffer, days[0].seed)
  for d in days[1:]:
    records = records.concatenate(serialized_examples(d.files, shuffle_buffer, d.seed))
  return records


@functools.lru_cache(maxsize=None)
def _parser(max_history: int) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """Parses a batch of serialized Examples into the training features.

  A tf.function traced once per process, not once per dataset: a tf.data map of
  a plain function traces it anew for every day's dataset, which costs more than
  parsing a small day.
  """
  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return features.parse_examples(serialized, features.TRAINING_FEATURES,
                                   max_history=max_history)
  return parse


class ReplicaShare(NamedTuple):
  """The replicas of one worker: global replicas [first, first + local) of `total`.

  With a share, a stream yields, for every global batch of `batch_size`, the
  rows of each of these replicas in turn (`distribute.replica_rows`), so that
  the replicas of all workers together see each global batch once, in order.
  Every worker reads the whole stream but parses only its replicas' rows.
  """
  first: int
  local: int
  total: int


# A serialized Example without features: parsed, every feature's absent value.
_NO_FEATURES = tf.train.Example().SerializeToString()


def _parse_share(max_history: int) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """The parser of a replica's slice, which may be empty (a global batch shorter
  than the replicas): an empty slice parses as the features of no example."""
  parse = _parser(max_history)

  def parse_or_none(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.cond(tf.size(serialized) > 0, lambda: parse(serialized), lambda: {
        name: value[:0] for name, value in parse(tf.constant([_NO_FEATURES])).items()})
  return parse_or_none


def _split(batches: tf.data.Dataset, share: Optional[ReplicaShare]) -> tf.data.Dataset:
  """Each global batch of `batches` (a dataset of tensors [n, ...]) as the
  `share.local` slices of this worker's replicas, in replica order."""
  if share is None or share.total == 1:
    return batches

  def slices(batch: tf.Tensor) -> tf.data.Dataset:
    def replica_slice(replica: tf.Tensor) -> tf.Tensor:
      start, end = distribute.replica_rows(tf.shape(batch, tf.int64)[0], replica,
                                           share.total)
      return batch[start:end]
    return tf.data.Dataset.range(share.first, share.first + share.local).map(
        replica_slice)
  return batches.flat_map(slices)


def training_batches(files: Sequence[str], batch_size: int, skip: int = 0,
                     max_history: int = features.MAX_HISTORY, shuffle_buffer: int = 0,
                     seed: int = 0, parallel_parses: Optional[int] = None
                     ) -> tf.data.Dataset:
  """Parsed batches of one day (one epoch) from example `skip` on (`stream_batches`)."""
  return stream_batches([DayFiles(files, seed)], batch_size, skip=skip,
                        max_history=max_history, shuffle_buffer=shuffle_buffer,
                        parallel_parses=parallel_parses)


def stream_batches(days: Sequence[DayFiles], batch_size: int, skip: int = 0,
                   epochs: int = 1, max_history: int = features.MAX_HISTORY,
                   shuffle_buffer: int = 0, parallel_parses: Optional[int] = None,
                   share: Optional[ReplicaShare] = None) -> tf.data.Dataset:
  """Parsed batches of the stream: `days` in order, `epochs` times, from example `skip`.

  Batches run across day and epoch boundaries; only the stream's last batch may
  be short.

  Args:
    days: the window's days, oldest first (`replay_window`, `day_files`).
    batch_size: examples per batch.
    skip: examples of the stream already consumed (restored from a checkpoint).
    epochs: passes over the window. Above 1, the window is parsed once, eagerly
      (`parse_window`, which raises its errors now), and held in memory.
    max_history: history width cut-off, as in `features.parse_examples`.
    shuffle_buffer: see `serialized_examples`; each day is shuffled with its seed.
    parallel_parses: batches parsed at once (tf.data.AUTOTUNE allowed); None
      parses one at a time, behind the prefetch (each parse is multi-threaded
      already). bench/input_parallelism.py compares the two.
    share: this worker's replicas (multi-worker training): each global batch
      of `batch_size` becomes their slices, one per replica (`ReplicaShare`);
      `skip` still counts examples of the whole stream.

  Returns:
    A dataset of dicts of features.TRAINING_FEATURES in the dense form of
    models/features.py.

  Raises:
    RuntimeError: (epochs > 1) a day cannot be read or parsed, naming it; or
      `skip` lies past the end of the stream.
  """
  if epochs == 1:
    records = _window_records(days, shuffle_buffer)
    if skip:
      records = records.skip(skip)
    parse = _parser(max_history) if share is None else _parse_share(max_history)
    return (_split(records.batch(batch_size), share)
            .map(parse, num_parallel_calls=parallel_parses,
                 deterministic=True if parallel_parses else None)
            .prefetch(tf.data.AUTOTUNE))
  window, size = parse_window(days, batch_size, max_history, shuffle_buffer)
  if skip > epochs * size:
    window_dirs = ", ".join(d.directory for d in days)
    raise RuntimeError(
        f"{days[-1].directory}: the checkpoint consumed {skip} examples of a stream of "
        f"{epochs} x {size}: W/data of its window ({window_dirs}) changed since")

  def gather(index: tf.Tensor) -> dict[str, tf.Tensor]:
    return {name: tf.gather(value, index % size) for name, value in window.items()}
  return (_split(tf.data.Dataset.range(skip, epochs * size).batch(batch_size), share)
          .map(gather).prefetch(tf.data.AUTOTUNE))


def _pad_to(value: tf.Tensor, width: int, name: str) -> tf.Tensor:
  """A [batch, w] feature padded with its absent value to [batch, width]."""
  if value.shape[1] == width:
    return value
  return tf.pad(value, [[0, 0], [0, width - value.shape[1]]],
                constant_values=features.FEATURES[name][2])


def parse_window(days: Sequence[DayFiles], chunk: int,
                 max_history: int = features.MAX_HISTORY, shuffle_buffer: int = 0
                 ) -> tuple[dict[str, tf.Tensor], int]:
  """The days' examples parsed once, in stream order: (dense features, examples).

  Read `chunk` examples at a time, day by day, and parsed by one function traced
  once per process; multi-valued features are padded to the window's widest (with
  their absent value, as the dense form pads).

  Raises:
    RuntimeError: a day cannot be read or parsed, naming its directory and the
      examples of it parsed before.
  """
  parse = _parser(max_history)
  parts = []
  for d in days:
    parsed = 0
    try:
      for serialized in serialized_examples(d.files, shuffle_buffer, d.seed).batch(
          chunk).prefetch(1):
        parts.append(parse(serialized))
        parsed += int(serialized.shape[0])
    except tf.errors.OpError as e:
      raise input_error(d.directory, parsed, e) from e
  if not parts:
    parts.append(parse(tf.zeros([0], tf.string)))
  window = {}
  for name in parts[0]:
    values = [part[name] for part in parts]
    if values[0].shape.rank == 2:
      width = max(value.shape[1] for value in values)
      values = [_pad_to(value, width, name) for value in values]
    window[name] = tf.concat(values, axis=0)
  return window, int(window["item_id"].shape[0])
