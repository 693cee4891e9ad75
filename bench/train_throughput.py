r"""Training throughput of the streaming trainer (issue 4), as ratios within one run.

On a synthetic day of TFRecords (default config: batch 1024, history 50) it
times, in examples/s:
  input       the tf.data input alone: read, gunzip and parse the day in order;
  step        the train step alone on one in-memory batch, --correction=streaming
              and none: their difference is the frequency estimator's cost;
  trainer     `Trainer.train_day` end to end (input, steps, probes, summaries),
              streaming and none;
  reference   a plain TFRS tutorial-style model of the same towers: no
              correction, an in-memory `tf.data` pipeline and `fit`;
  in_memory   the streaming trainer's steps on that same in-memory input: the
              trainer against the reference without the disk input.
A short warm-up day runs first, so tracing is not timed. Every variant is timed
several times, alternating with the others, and keeps its best: the machine may
be shared. Beside wall-clock examples/s it reports the process CPU time per
example, which other processes disturb much less; 2e6 / (CPU us per example) is
what two fully used cores would give.

  python bench/train_throughput.py                  # 200k examples a day
  python bench/train_throughput.py --examples=20480 --json_out=/tmp/t.json
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

from core.workdir import Workdir  # noqa: E402
from models import data  # noqa: E402
from models import features  # noqa: E402
from models import layers  # noqa: E402
from models import trainer as trainer_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.towers import CandidateTower  # noqa: E402
from models.towers import QueryTower  # noqa: E402

_EXAMPLES = flags.DEFINE_integer("examples", 204_800, "Examples in a timed day.")
_HISTORY = flags.DEFINE_integer("history", features.MAX_HISTORY,
                                "History items per example.")
_ITEMS = flags.DEFINE_integer("items", 100_000, "Corpus size (Zipf popularity).")
_USERS = flags.DEFINE_integer("users", 50_000, "Users.")
_FILES = flags.DEFINE_integer("files", 8, "Example files per day.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Timed days (and input passes, epochs) "
                                "per variant; the best counts.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Alternating rounds of step timings.")
_STEPS_PER_ROUND = flags.DEFINE_integer("steps_per_round", 5, "Steps per timed round.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
FIRST_DAY = datetime.date(2024, 1, 1)  # a short warm-up day
CORRECTIONS = ("streaming", "none")


@dataclasses.dataclass
class Best:
  """The best (shortest) wall and CPU seconds seen for `examples` examples."""
  examples: int
  wall_s: float = float("inf")
  cpu_s: float = float("inf")

  def time(self, fn: Callable[[], object]) -> object:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    self.wall_s = min(self.wall_s, time.perf_counter() - wall)
    self.cpu_s = min(self.cpu_s, time.process_time() - cpu)
    return out

  def figures(self, name: str) -> dict[str, float]:
    return {f"{name}_examples_per_s": self.examples / self.wall_s,
            f"{name}_cpu_us_per_example": 1e6 * self.cpu_s / self.examples}


def synthetic_examples(n: int, seed: int) -> list[bytes]:
  """Serialized Examples with Zipf-popular items and full histories, in time order."""
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, _ITEMS.value + 1) ** 1.05
  popularity /= popularity.sum()
  items = rng.choice(_ITEMS.value, size=(n, _HISTORY.value + 1), p=popularity)
  users = rng.integers(_USERS.value, size=n)
  out = []
  for i in range(n):
    item = int(items[i, 0])
    out.append(features.to_example({
        "event_id": f"e{seed}-{i:08d}", "timestamp": 1_704_067_200 + i,
        "user_id": f"u{users[i]}", "device": ("ios", "android", "web")[i % 3],
        "country": ("fr", "us", "de", "br")[users[i] % 4],
        "seed_item_id": f"i{items[i, 1]}",
        "history_item_ids": [f"i{h}" for h in items[i, 1:]],
        "item_id": f"i{item}", "item_channel_id": f"c{item % 5000}",
        "item_topics": [f"t{item % 300}", f"t{item % 7}"],
        "item_topic_weights": [1.0, 0.5], "item_duration_s": float(30 + item % 600),
        "reward": 1.0,
    }).SerializeToString())
  return out


def write_day(workdir: str, day: datetime.date, records: list[bytes]) -> None:
  directory = Workdir(workdir).data_dir(day)
  tf.io.gfile.makedirs(directory)
  options = tf.io.TFRecordOptions(compression_type="GZIP")
  for f, chunk in enumerate(np.array_split(np.arange(len(records)), _FILES.value)):
    with tf.io.TFRecordWriter(os.path.join(directory, f"examples-{f:02d}.tfrecord.gz"),
                              options) as writer:
      for i in chunk:
        writer.write(records[i])


def read_all(files: list[str], config: ModelConfig) -> int:
  """Runs the training input over `files`; returns the example count."""
  return sum(int(batch["item_id"].shape[0]) for batch in data.training_batches(
      files, config.batch_size, max_history=config.max_history))


def time_steps(trainers: dict[str, trainer_lib.Trainer], batch) -> dict[str, Best]:
  """The trainers' step alone on one in-memory batch, in alternating rounds."""
  size = int(batch["item_id"].shape[0])
  best = {name: Best(size * _STEPS_PER_ROUND.value) for name in trainers}

  def run(trainer):
    for _ in range(_STEPS_PER_ROUND.value):
      trainer._train_batch(batch)  # pylint: disable=protected-access
    trainer.global_step  # pylint: disable=pointless-statement  (waits for the steps)

  for trainer in trainers.values():
    run(trainer)
  for _ in range(_ROUNDS.value):
    for name, trainer in trainers.items():
      best[name].time(lambda: run(trainer))  # pylint: disable=cell-var-from-loop
  return best


class ReferenceModel(tfrs.Model):
  """The TFRS tutorial's retrieval model, on the same towers: no correction."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    item_embedding = layers.HashedEmbedding(config.item_buckets, config.id_embedding_dim)
    self.query_tower = QueryTower(config, item_embedding)
    self.candidate_tower = CandidateTower(config, item_embedding)
    self.task = tfrs.tasks.Retrieval()

  def compute_loss(self, inputs, training=False):
    return self.task(self.query_tower(inputs), self.candidate_tower(inputs))


def reference_epoch(records: list[bytes], config: ModelConfig) -> Callable[[], None]:
  """A function that runs one `fit` epoch of the reference model on the in-memory day."""
  parsed = features.parse_examples(tf.constant(records), features.TRAINING_FEATURES,
                                  max_history=config.max_history)
  dataset = tf.data.Dataset.from_tensor_slices(parsed).batch(config.batch_size).cache()
  model = ReferenceModel(config)
  model.compile(optimizer=tf.keras.optimizers.Adagrad(config.learning_rate))
  return lambda: model.fit(dataset, epochs=1, verbose=0)


def in_memory_pass(trainer: trainer_lib.Trainer, records: list[bytes],
                   config: ModelConfig) -> Callable[[], None]:
  """A function that runs the trainer's steps over the in-memory, parsed day.

  The same input as the reference's, to separate the loop from the disk input.
  It advances the global step and the finished day's example count, which the
  next `train_day` of a new day resets.
  """
  parsed = features.parse_examples(tf.constant(records), features.TRAINING_FEATURES,
                                  max_history=config.max_history)
  dataset = tf.data.Dataset.from_tensor_slices(parsed).batch(config.batch_size).cache()

  def run():
    iterator = iter(trainer.strategy.experimental_distribute_dataset(dataset))
    # pylint: disable-next=protected-access
    trainer._train_steps(iterator, tf.constant(len(records), tf.int64))
    trainer.global_step  # pylint: disable=pointless-statement  (waits for the steps)
  return run


def main(argv: Sequence[str]) -> None:
  del argv
  batch_size = _BATCH_SIZE.value
  base = ModelConfig(batch_size=batch_size, max_history=_HISTORY.value)
  records = synthetic_examples(_EXAMPLES.value, seed=1)
  batch = features.parse_examples(tf.constant(records[:batch_size]),
                                  features.TRAINING_FEATURES, max_history=_HISTORY.value)
  days = [FIRST_DAY + datetime.timedelta(days=d) for d in range(1, _REPEATS.value + 1)]
  results: dict[str, Best] = {}
  with tempfile.TemporaryDirectory() as root:
    data_root = os.path.join(root, "data")
    write_day(data_root, FIRST_DAY, synthetic_examples(4 * batch_size, seed=0))
    write_day(data_root, days[0], records)
    trainers = {}
    for correction in CORRECTIONS:
      workdir = os.path.join(root, correction)
      for day in [FIRST_DAY] + days:
        shutil.copytree(Workdir(data_root).data_dir(min(day, days[0])),
                        Workdir(workdir).data_dir(day))
      trainers[correction] = trainer_lib.Trainer(workdir,
                                                 base.replace(correction=correction))
      trainers[correction].train_day(FIRST_DAY)
      results[f"trainer_{correction}"] = Best(_EXAMPLES.value)
    files = data.example_files(data_root, days[0])
    reference = reference_epoch(records, base)
    in_memory = in_memory_pass(trainers["streaming"], records, base)
    reference()  # traces
    in_memory()  # traces
    for name in ("input", "reference_fit", "in_memory_streaming"):
      results[name] = Best(_EXAMPLES.value)
    for day in days:
      for correction, trainer in trainers.items():
        results[f"trainer_{correction}"].time(
            lambda: trainer.train_day(day))  # pylint: disable=cell-var-from-loop
      results["input"].time(lambda: read_all(files, base))
      results["reference_fit"].time(reference)
      results["in_memory_streaming"].time(in_memory)
    for correction, best in time_steps(trainers, batch).items():
      results[f"step_{correction}"] = best

  figures: dict[str, float] = {"examples": _EXAMPLES.value, "batch_size": batch_size,
                               "history": _HISTORY.value, "cpus": os.cpu_count()}
  for name, best in results.items():
    figures.update(best.figures(name))
  # A share of time: 1 - t(without) / t(with), from the best rounds.
  for what in ("step", "trainer"):
    figures[f"estimator_share_of_{what}_wall"] = 1.0 - (
        results[f"{what}_none"].wall_s / results[f"{what}_streaming"].wall_s)
    figures[f"estimator_share_of_{what}_cpu"] = 1.0 - (
        results[f"{what}_none"].cpu_s / results[f"{what}_streaming"].cpu_s)
  for kind in ("wall_s", "cpu_s"):
    reference = getattr(results["reference_fit"], kind)
    for name in ("trainer_streaming", "in_memory_streaming"):
      figures[f"{name}_speed_over_reference_{kind[:-2]}"] = (
          reference / getattr(results[name], kind))

  print(f"{'measure':48s} {'value':>12s}")
  for name, value in figures.items():
    print(f"{name:48s} {value:12.3f}" if isinstance(value, float) else
          f"{name:48s} {value:12d}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
