r"""Training throughput of the streaming trainer (issue 4), as ratios within one run.

On a synthetic day of TFRecords (batch 1024, history 50) it times, in examples/s:
  parse       the training parse alone (models.data's traced parser) of the day's
              serialized Examples, in memory, batch by batch;
  input       the tf.data input alone: read, gunzip and parse the day in order;
  step        the train step alone, one call per step, on the day's in-memory
              batches in turn, --correction=streaming and none: their
              difference is the frequency estimator's cost (one batch over and
              over flatters the step by ~10%: its embedding rows and estimator
              buckets stay in the CPU caches);
  trainer     `Trainer.train_day` end to end (input, steps, probes, summaries),
              streaming and none;
  reference   a plain TFRS tutorial-style model of the same towers: no
              correction, an in-memory `tf.data` pipeline and `fit`;
  reference_loop  the reference model's steps on that same input inside one
              tf.function call, as the trainer runs them: `fit`'s per-step
              loop against the trainer's;
  in_memory   the trainer's steps on that same input, streaming and none:
              the trainer against the reference without the disk input.
The differences, in CPU us per example, are reported as: loop_over_fit
(in_memory_streaming - reference_fit, the trainer's steps over `fit`'s),
fit_loop (reference_fit - reference_loop: what `fit` adds per step to the same
model's steps), model_over_reference (in_memory_none - reference_loop: the
trainer's steps without the estimator over the tutorial model's, in the same
kind of loop: the loss's accidental-hit removal, reward weights, counters) and
estimator_in_memory (in_memory_streaming - in_memory_none).
The model is the default config in models.config.ONE_PASS's regime (one pass
over the day, no uniform negatives or transition tables), the regime of the
reference: the default's replay window and epochs would train several days'
examples per day. With --old_features (a models/features.py of another tree,
e.g. from `git archive HEAD | tar -x -C /tmp/OLD`) that tree's parse is timed
too, in the same rounds: parse_old, input_old and trainer_streaming_old (this
trainer, its input parsed by the old parse). A short warm-up day runs first, so
tracing is not timed. Every variant is timed several times, alternating with the
others, and keeps its best: the machine may be shared. Beside wall-clock
examples/s it reports the process CPU time per example, which other processes
disturb much less; 2e6 / (CPU us per example) is what two fully used cores
would give.

  python bench/train_throughput.py                  # 200k examples a day
  python bench/train_throughput.py --examples=20480 --json_out=/tmp/t.json
  python bench/train_throughput.py --examples=102400 \
      --old_features=/tmp/OLD/models/features.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from types import ModuleType
from typing import Callable, Iterator, Optional, Sequence

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
from models.config import ONE_PASS  # noqa: E402
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
_OLD_FEATURES = flags.DEFINE_string(
    "old_features", None, "A models/features.py of another tree whose parse is "
    "timed beside this tree's (parse_old, input_old, trainer_streaming_old).")
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


def load_features(path: str) -> ModuleType:
  """The features module at `path` (it imports only TensorFlow), as "old_features"."""
  spec = importlib.util.spec_from_file_location("old_features", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def traced_parser(module: ModuleType, max_history: int
                  ) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """`module`'s parse of the training features, traced as models.data traces its own."""
  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return module.parse_examples(serialized, features.TRAINING_FEATURES,
                                 max_history=max_history)
  return parse


@contextlib.contextmanager
def parsing_with(parse: Optional[Callable[[tf.Tensor], dict[str, tf.Tensor]]]
                 ) -> Iterator[None]:
  """models.data's batches parsed by `parse` meanwhile (None: by its own parser)."""
  original = data._parser  # pylint: disable=protected-access
  if parse is not None:
    data._parser = lambda max_history: parse  # pylint: disable=protected-access
  try:
    yield
  finally:
    data._parser = original  # pylint: disable=protected-access


def parse_all(parse: Callable[[tf.Tensor], dict[str, tf.Tensor]],
              batches: list[tf.Tensor]) -> int:
  """Parses the in-memory batches of serialized Examples; returns the example count."""
  return sum(int(parse(batch)["item_id"].shape[0]) for batch in batches)


def time_steps(trainers: dict[str, trainer_lib.Trainer], batches: list
               ) -> dict[str, Best]:
  """The trainers' step alone, one call each, in alternating rounds.

  Each round trains the next `steps_per_round` of the full in-memory `batches`
  (cycling), the same ones for every trainer.
  """
  size = int(batches[0]["item_id"].shape[0])
  best = {name: Best(size * _STEPS_PER_ROUND.value) for name in trainers}

  def run(trainer, first):
    for i in range(first, first + _STEPS_PER_ROUND.value):
      trainer._train_batch(batches[i % len(batches)])  # pylint: disable=protected-access
    trainer.global_step  # pylint: disable=pointless-statement  (waits for the steps)

  for trainer in trainers.values():
    run(trainer, 0)
  for r in range(_ROUNDS.value):
    for name, trainer in trainers.items():
      # pylint: disable-next=cell-var-from-loop
      best[name].time(lambda: run(trainer, r * _STEPS_PER_ROUND.value))
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


def in_memory_batches(records: list[bytes], config: ModelConfig) -> tf.data.Dataset:
  """The day parsed once, as a cached in-memory dataset of batches: the
  reference's input, and the in-memory variants'."""
  parsed = features.parse_examples(tf.constant(records), features.TRAINING_FEATURES,
                                  max_history=config.max_history)
  return tf.data.Dataset.from_tensor_slices(parsed).batch(config.batch_size).cache()


def reference_epoch(dataset: tf.data.Dataset, config: ModelConfig) -> Callable[[], None]:
  """A function that runs one `fit` epoch of the reference model on the in-memory day."""
  model = ReferenceModel(config)
  model.compile(optimizer=tf.keras.optimizers.Adagrad(config.learning_rate))
  return lambda: model.fit(dataset, epochs=1, verbose=0)


def reference_loop(dataset: tf.data.Dataset, config: ModelConfig) -> Callable[[], None]:
  """A function that runs the reference model's steps over the in-memory day in
  one tf.function call, the loop of the trainer's `_distributed_steps`."""
  model = ReferenceModel(config)
  optimizer = tf.keras.optimizers.Adagrad(config.learning_rate)

  @tf.function
  def steps(iterator) -> tf.Tensor:
    done = tf.constant(0, tf.int64)
    for _ in tf.range(tf.int64.max):
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        break
      with tf.GradientTape() as tape:
        loss = model.compute_loss(batch.get_value(), training=True)
      variables = model.trainable_variables
      optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
      done += 1
    return done
  return lambda: int(steps(iter(dataset)))


def in_memory_pass(trainer: trainer_lib.Trainer, dataset: tf.data.Dataset,
                   examples: int) -> Callable[[], None]:
  """A function that runs the trainer's steps over the in-memory, parsed day.

  The same input as the reference's, to separate the loop from the disk input.
  It advances the global step and the finished day's example count, which the
  next `train_day` of a new day resets.
  """
  def run():
    iterator = iter(trainer.strategy.experimental_distribute_dataset(dataset))
    # pylint: disable-next=protected-access
    trainer._train_steps(iterator, tf.constant(examples, tf.int64))
    trainer.global_step  # pylint: disable=pointless-statement  (waits for the steps)
  return run


def main(argv: Sequence[str]) -> None:
  del argv
  batch_size = _BATCH_SIZE.value
  base = ModelConfig(batch_size=batch_size, max_history=_HISTORY.value, **ONE_PASS)
  records = synthetic_examples(_EXAMPLES.value, seed=1)
  serialized = [tf.constant(records[i:i + batch_size])
                for i in range(0, len(records), batch_size)]
  # name suffix -> the parse of models.data's batches (None: its own).
  parsers = {"": None}
  if _OLD_FEATURES.value:
    parsers["_old"] = traced_parser(load_features(_OLD_FEATURES.value), _HISTORY.value)
  days = [FIRST_DAY + datetime.timedelta(days=d) for d in range(1, _REPEATS.value + 1)]
  results: dict[str, Best] = {}
  with tempfile.TemporaryDirectory() as root:
    data_root = os.path.join(root, "data")
    write_day(data_root, FIRST_DAY, synthetic_examples(4 * batch_size, seed=0))
    write_day(data_root, days[0], records)
    trainers = {}
    # name -> (correction, parse suffix): the streaming trainer with each parse.
    variants = {correction: (correction, "") for correction in CORRECTIONS}
    variants.update({f"streaming{suffix}": ("streaming", suffix)
                     for suffix in parsers if suffix})
    for name, (correction, suffix) in variants.items():
      workdir = os.path.join(root, name)
      for day in [FIRST_DAY] + days:
        shutil.copytree(Workdir(data_root).data_dir(min(day, days[0])),
                        Workdir(workdir).data_dir(day))
      trainers[name] = trainer_lib.Trainer(workdir, base.replace(correction=correction))
      with parsing_with(parsers[suffix]):
        trainers[name].train_day(FIRST_DAY)
      results[f"trainer_{name}"] = Best(_EXAMPLES.value)
    files = data.example_files(data_root, days[0])
    dataset = in_memory_batches(records, base)
    # name -> one pass over the in-memory day.
    in_memory = {"reference_fit": reference_epoch(dataset, base),
                 "reference_loop": reference_loop(dataset, base)}
    in_memory.update({f"in_memory_{correction}": in_memory_pass(
        trainers[correction], dataset, len(records)) for correction in CORRECTIONS})
    for run in in_memory.values():
      run()  # traces
    own_parse = data._parser(_HISTORY.value)  # pylint: disable=protected-access
    for suffix, parse in parsers.items():
      parse_all(parse or own_parse, serialized[:1])  # traces
      for name in ("parse", "input"):
        results[name + suffix] = Best(_EXAMPLES.value)
    for name in in_memory:
      results[name] = Best(_EXAMPLES.value)
    for day in days:
      for name, trainer in trainers.items():
        with parsing_with(parsers[variants[name][1]]):
          results[f"trainer_{name}"].time(
              lambda: trainer.train_day(day))  # pylint: disable=cell-var-from-loop
      for suffix, parse in parsers.items():
        # pylint: disable=cell-var-from-loop
        results["parse" + suffix].time(lambda: parse_all(parse or own_parse, serialized))
        with parsing_with(parse):
          results["input" + suffix].time(lambda: read_all(files, base))
      for name, run in in_memory.items():
        results[name].time(run)
    steps = {correction: trainers[correction] for correction in CORRECTIONS}
    for correction, best in time_steps(steps, list(dataset)).items():
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
  # CPU us per example that one variant spends over another (module docstring).
  for name, (more, less) in {
      "loop_over_fit": ("in_memory_streaming", "reference_fit"),
      "fit_loop": ("reference_fit", "reference_loop"),
      "model_over_reference": ("in_memory_none", "reference_loop"),
      "estimator_in_memory": ("in_memory_streaming", "in_memory_none")}.items():
    figures[f"{name}_cpu_us_per_example"] = (
        1e6 * (results[more].cpu_s - results[less].cpu_s) / _EXAMPLES.value)
  for kind in ("wall_s", "cpu_s"):
    reference = getattr(results["reference_fit"], kind)
    for name in ["trainer_streaming", "in_memory_streaming"] + [
        f"trainer_streaming{suffix}" for suffix in parsers if suffix]:
      figures[f"{name}_speed_over_reference_{kind[:-2]}"] = (
          reference / getattr(results[name], kind))
    figures[f"in_memory_streaming_speed_over_reference_loop_{kind[:-2]}"] = (
        getattr(results["reference_loop"], kind)
        / getattr(results["in_memory_streaming"], kind))
    for name in ("parse", "input", "trainer_streaming"):
      for suffix in parsers:
        if suffix:  # new over old, in speed
          figures[f"{name}_speed_over{suffix}_{kind[:-2]}"] = (
              getattr(results[name + suffix], kind) / getattr(results[name], kind))

  print(f"{'measure':48s} {'value':>12s}")
  for name, value in figures.items():
    print(f"{name:48s} {value:12.3f}" if isinstance(value, float) else
          f"{name:48s} {value:12d}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
