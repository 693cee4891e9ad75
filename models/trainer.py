"""Trains the two-tower model one day at a time, in time order, resumably.

  python -m models.trainer --workdir=W --date=YYYY-MM-DD
  python -m models.trainer --workdir=W --start_date=YYYY-MM-DD --end_date=YYYY-MM-DD

A day is one pass over W/data/D in file-then-record (time) order. The checkpoint
(W/checkpoints, tf.train.CheckpointManager) holds everything a restart needs: the
model, the frequency estimator's state (a layer of the model), the optimizer
(whose `iterations` is the global step t fed to the estimator, 1-based per
batch), the day being trained, how many of its examples were consumed, and
whether the day is complete. A process killed mid-day restarts from the last
checkpoint and skips exactly the examples it had consumed: nothing is trained
twice or skipped. Checkpoints are written every `checkpoint_every_steps` global
steps and at the end of the day.

The config is written to W/config.json on the first day; a later config that
differs in an architecture field fails with the list of differing fields.
A NaN or infinite loss stops the day before the optimizer applies that step, and
no checkpoint is written past the last good one.

Steps run in chunks inside one tf.function (up to the next log or checkpoint
boundary), so the per-step cost is the graph's alone. Every `log_every_steps`
steps, TensorBoard (W/tensorboard) gets the loss, examples/s, the estimator's
statistics and the in-batch recall@{1,10} of the next batch, measured before
training on it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from typing import Any, Iterator, Optional  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import data  # noqa: E402
from models import features  # noqa: E402
from models.config import CORRECTIONS  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.config import read_config  # noqa: E402
from models.config import write_config  # noqa: E402
from models.retrieval import in_batch_recall  # noqa: E402
from models.retrieval import TwoTowerModel  # noqa: E402
from pipeline import app_flags  # noqa: E402

# --workdir, --date and --start_date/--end_date are pipeline.app_flags'.
_CORRECTION = flags.DEFINE_enum("correction", None, list(CORRECTIONS),
                                "logQ correction; default: W/config.json, else streaming.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Softmax temperature.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Examples per step.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Optimizer learning rate.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every_steps", None,
                                         "Global steps between checkpoints.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", None,
                                       "Window of the optional in-order shuffle (0: off).")
_CONFIG_OVERRIDES = flags.DEFINE_string(
    "config_overrides", None, 'JSON object of other ModelConfig fields, e.g. '
    '\'{"embedding_dim": 32}\'.')

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
_LOSS_CHECK = "training loss is not finite"


class DivergenceError(FloatingPointError):
  """A training step produced a NaN or infinite loss."""


def _dummy_batch() -> dict[str, tf.Tensor]:
  """One all-default example: builds every tower variable before a restore."""
  return features.parse_examples(tf.constant([features.to_example({}).SerializeToString()]),
                                 features.TRAINING_FEATURES)


def resolve_config(workdir: str, config: Optional[ModelConfig]) -> ModelConfig:
  """The config to train with: `config`, checked against W/config.json if present.

  Raises:
    ValueError: `config` differs from the saved one in an architecture field.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return config or ModelConfig()
  saved = read_config(path)
  if config is None:
    return saved
  diffs = saved.incompatibilities(config)
  if diffs:
    raise ValueError(
        f"{path}: this workdir's model was trained with a different config; "
        "incompatible fields (saved != requested): " + "; ".join(diffs) +
        ". Use a new workdir, or the saved values.")
  return config


def make_optimizer(config: ModelConfig) -> tf.keras.optimizers.Optimizer:
  # jit_compile=False: XLA would densify the sparse embedding updates on CPU.
  if config.optimizer == "adagrad":
    return tf.keras.optimizers.Adagrad(config.learning_rate, jit_compile=False)
  if config.optimizer == "adam":
    return tf.keras.optimizers.Adam(config.learning_rate, jit_compile=False)
  return tf.keras.optimizers.SGD(config.learning_rate, jit_compile=False)


def load_model(workdir: str) -> TwoTowerModel:
  """The TwoTowerModel of W/config.json with the latest checkpoint's weights.

  Raises:
    FileNotFoundError: no config or no checkpoint in `workdir`.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path}: missing; train at least one day first")
  model = TwoTowerModel(read_config(path))
  model(_dummy_batch())
  latest = tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIR))
  if latest is None:
    raise FileNotFoundError(f"{os.path.join(workdir, CHECKPOINT_DIR)}: no checkpoint")
  tf.train.Checkpoint(model=model).restore(latest).expect_partial(
  ).assert_existing_objects_matched()
  return model


class Trainer:
  """Owns the model, optimizer and checkpoint of a workdir; trains day by day.

  Keep one Trainer for a range of days: the model and estimator stay in memory
  between `train_day` calls, and each day ends with a checkpoint.

  Attributes:
    workdir: the workdir.
    config: the ModelConfig in use.
    strategy: the tf.distribute strategy (default: the default strategy).
    model: the TwoTowerModel.
  """

  def __init__(self, workdir: str, config: Optional[ModelConfig] = None,
               strategy: Optional[tf.distribute.Strategy] = None):
    self.workdir = workdir
    self.config = resolve_config(workdir, config)
    self.strategy = strategy or tf.distribute.get_strategy()
    self._writer = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))
    self._build()

  def _build(self) -> None:
    """Creates model, optimizer and state, and restores the latest checkpoint."""
    with self.strategy.scope():
      self.model = TwoTowerModel(self.config)
      self.optimizer = make_optimizer(self.config)
      self._day = tf.Variable(0, dtype=tf.int64, trainable=False, name="day_ordinal")
      self._day_examples = tf.Variable(0, dtype=tf.int64, trainable=False,
                                       name="day_examples")
      self._day_complete = tf.Variable(False, trainable=False, name="day_complete")
      # Loss summed over the steps since the last read: no per-step host sync.
      self._loss_sum = tf.Variable(0.0, trainable=False, name="loss_sum")
      self._loss_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="loss_steps")
      self.model(_dummy_batch())
      # Slots now, so that a restore fills them at once and is checked whole.
      self.optimizer.build(self.model.trainable_variables)
    checkpoint = tf.train.Checkpoint(
        model=self.model, optimizer=self.optimizer, day=self._day,
        day_examples=self._day_examples, day_complete=self._day_complete)
    self._manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(self.workdir, CHECKPOINT_DIR),
        max_to_keep=self.config.max_checkpoints, step_counter=self.optimizer.iterations)
    if self._manager.latest_checkpoint:
      if not tf.io.gfile.exists(os.path.join(self.workdir, CONFIG_FILE)):
        raise ValueError(f"{self.workdir}: checkpoints without {CONFIG_FILE}; cannot tell "
                         "which model they belong to")
      checkpoint.restore(self._manager.latest_checkpoint).assert_existing_objects_matched()
      logging.info("restored %s", self._manager.latest_checkpoint)
    # learning_rate is a run-time field: the config wins over the checkpoint.
    self.optimizer.learning_rate.assign(self.config.learning_rate)
    self._train_batch = tf.function(self._distributed_step, reduce_retracing=True)
    self._train_steps = tf.function(self._distributed_steps, reduce_retracing=True)
    self._probe = tf.function(self._distributed_probe, reduce_retracing=True)
    self._stale = False

  @property
  def global_step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def position(self) -> tuple[Optional[datetime.date], int, bool]:
    """(day being or last trained, examples of it consumed, whether it is complete)."""
    ordinal = int(self._day.numpy())
    day = datetime.date.fromordinal(ordinal) if ordinal else None
    return day, int(self._day_examples.numpy()), bool(self._day_complete.numpy())

  def _replica_step(self, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    with tf.GradientTape() as tape:
      loss = self.model.compute_loss(batch, training=True,
                                     step=self.optimizer.iterations + 1)
    variables = self.model.trainable_variables
    gradients = tape.gradient(loss, variables)
    loss = tf.debugging.check_numerics(loss, _LOSS_CHECK)
    with tf.control_dependencies([loss]):
      self.optimizer.apply_gradients(zip(gradients, variables))
      size = tf.shape(batch["item_id"], out_type=tf.int64)[0]
    return loss, size

  def _distributed_step(self, batch) -> None:
    loss, size = self.strategy.run(self._replica_step, args=(batch,))
    self._day_examples.assign_add(
        self.strategy.reduce(tf.distribute.ReduceOp.SUM, size, axis=None))
    self._loss_sum.assign_add(self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss,
                                                   axis=None))
    self._loss_steps.assign_add(1)

  def _distributed_steps(self, iterator, max_steps: tf.Tensor) -> tf.Tensor:
    """Trains up to `max_steps` batches of `iterator` in one call; returns how many.

    Fewer than `max_steps` means the day's data is exhausted. One call per chunk
    keeps Python dispatch out of the per-step cost.
    """
    done = tf.constant(0, tf.int64)
    for _ in tf.range(max_steps):
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        break
      self._distributed_step(batch.get_value())
      done += 1
    return done

  def _take_mean_loss(self) -> tuple[float, int]:
    """(sum of losses, steps) since the last call, and resets them."""
    total, steps = float(self._loss_sum.numpy()), int(self._loss_steps.numpy())
    self._loss_sum.assign(0.0)
    self._loss_steps.assign(0)
    return total, steps

  def _replica_probe(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """In-batch recall and estimator statistics of a batch, before training on it."""
    query, candidate = self.model(batch, training=False)
    ids = batch["item_id"]
    stats = {f"in_batch_recall@{k}": in_batch_recall(query, candidate, ids, k)
             for k in (1, 10)}
    estimator = self.model.estimator
    if estimator is not None:
      p = estimator.estimate(ids)
      stats.update({"estimator/p_mean": tf.reduce_mean(p),
                    "estimator/p_min": tf.reduce_min(p),
                    "estimator/p_max": tf.reduce_max(p),
                    "estimator/minus_log_p_mean": -tf.reduce_mean(tf.math.log(p))})
      stats.update({f"estimator/{name}": tf.cast(value, tf.float32)
                    for name, value in estimator.stats().items()})
    return stats

  def _distributed_probe(self, batch) -> dict[str, tf.Tensor]:
    stats = self.strategy.run(self._replica_probe, args=(batch,))
    return {name: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for name, value in stats.items()}

  @contextlib.contextmanager
  def _errors_as(self, day: datetime.date) -> Iterator[None]:
    """Turns a failed step into DivergenceError and a bad input into RuntimeError."""
    try:
      yield
    except tf.errors.InvalidArgumentError as e:
      if _LOSS_CHECK not in e.message:
        raise RuntimeError(f"{data.day_dir(self.workdir, day)}: bad examples after "
                           f"example {self._day_examples.numpy()}: {e.message}") from e
      self._stale = True
      raise DivergenceError(
          f"day {day}: loss is NaN or infinite at global step {self.global_step + 1} "
          f"(examples {self._day_examples.numpy()}.. of the day); stopped, last "
          f"checkpoint {self._manager.latest_checkpoint} is untouched") from e
    except tf.errors.OpError as e:
      raise RuntimeError(f"{data.day_dir(self.workdir, day)}: cannot read examples after "
                         f"example {self._day_examples.numpy()}: {e.message}") from e

  def _save(self, step: int) -> str:
    try:
      return self._manager.save(checkpoint_number=step)
    except tf.errors.OpError as e:  # not to be mistaken for a bad input
      raise IOError(f"{self._manager.directory}: cannot write checkpoint {step}: "
                    f"{e.message}") from e

  def _log_interval(self, day: datetime.date, interval: tuple[float, int],
                    probe: dict[str, float]) -> float:
    """Writes loss and examples/s since `interval` (time, examples); returns loss sum."""
    (since, since_examples), step = interval, self.global_step
    total, steps = self._take_mean_loss()
    consumed = int(self._day_examples.numpy())
    rate = (consumed - since_examples) / max(time.perf_counter() - since, 1e-9)
    tf.summary.scalar("loss", total / max(steps, 1), step=step)
    tf.summary.scalar("examples_per_s", rate, step=step)
    logging.info("day %s step %d: %d examples, loss %.4f, %.0f examples/s, in-batch "
                 "recall@10 %.3f", day, step, consumed, total / max(steps, 1), rate,
                 probe.get("in_batch_recall@10", float("nan")))
    return total

  def _save_config(self) -> None:
    path = os.path.join(self.workdir, CONFIG_FILE)
    if not tf.io.gfile.exists(path) or read_config(path) != self.config:
      tf.io.gfile.makedirs(self.workdir)
      write_config(self.config, path)

  def _start_day(self, day: datetime.date) -> Optional[int]:
    """Moves the state to `day`; returns examples to skip, None if already trained."""
    last, consumed, complete = self.position()
    if last is not None and (last > day or (last == day and complete)):
      return None
    if last == day:
      return consumed
    if last is not None and not complete:
      raise RuntimeError(
          f"{self.workdir}: day {last} stopped after {consumed} examples; train it to "
          f"the end before {day} (days are trained in order)")
    self._day.assign(day.toordinal())
    self._day_examples.assign(0)
    self._day_complete.assign(False)
    return 0

  def train_day(self, day: datetime.date) -> dict[str, Any]:
    """Trains one pass over W/data/D in time order, resuming mid-day if needed.

    Returns:
      Stats: day, status ("trained", "resumed" or "already_trained"), examples
      (consumed of the day in total), examples_this_run, steps_this_run,
      global_step, mean_loss (this run), examples_per_s, the last probe's
      in-batch recall and estimator stats, and the final checkpoint path.

    Raises:
      DivergenceError: a NaN or infinite loss; the model is reloaded from the last
        checkpoint before the next `train_day`.
      FileNotFoundError: no W/data/D.
      RuntimeError: an earlier day is unfinished, or D's data cannot be read.
    """
    if self._stale:
      self._build()
    skip = self._start_day(day)
    if skip is None:
      _, consumed, _ = self.position()
      return {"day": day.isoformat(), "status": "already_trained",
              "global_step": self.global_step, "examples": consumed}
    self._save_config()
    files = data.example_files(self.workdir, day)
    batches = data.training_batches(
        files, self.config.batch_size, skip=skip, max_history=self.config.max_history,
        shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed * 100003 +
        day.toordinal())
    iterator = iter(self.strategy.experimental_distribute_dataset(batches))
    logging.info("day %s: %d files, starting at example %d, global step %d", day,
                 len(files), skip, self.global_step)

    started = time.perf_counter()
    start_step = self.global_step
    loss_total, probe = 0.0, {}
    self._take_mean_loss()
    interval = (started, skip)
    with self._writer.as_default(), self._errors_as(day):
      exhausted = False
      while not exhausted:
        # The first step after each log boundary runs from Python: its batch is
        # probed (in-batch recall, estimator stats) before being trained on.
        batch = next(iterator, None)
        if batch is None:
          break
        probe = {k: float(v) for k, v in self._probe(batch).items()}
        for name, value in probe.items():
          tf.summary.scalar(name, value, step=self.global_step + 1)
        self._train_batch(batch)
        while True:
          step = self.global_step
          if step % self.config.checkpoint_every_steps == 0:
            self._save(step)
          if step % self.config.log_every_steps == 0:
            loss_total += self._log_interval(day, interval, probe)
            interval = (time.perf_counter(), int(self._day_examples.numpy()))
            break
          chunk = min(self.config.log_every_steps - step % self.config.log_every_steps,
                      self.config.checkpoint_every_steps -
                      step % self.config.checkpoint_every_steps)
          if int(self._train_steps(iterator, tf.constant(chunk, tf.int64))) < chunk:
            exhausted = True
            break
    loss_total += self._take_mean_loss()[0]
    step = self.global_step
    steps = step - start_step
    elapsed = time.perf_counter() - started
    self._day_complete.assign(True)
    path = self._save(step)
    self._writer.flush()
    consumed = int(self._day_examples.numpy())
    stats = {
        "day": day.isoformat(),
        "status": "resumed" if skip else "trained",
        "examples": consumed,
        "examples_this_run": consumed - skip,
        "steps_this_run": steps,
        "global_step": step,
        "mean_loss": loss_total / steps if steps else None,
        "examples_per_s": (consumed - skip) / elapsed if elapsed > 0 else None,
        "checkpoint": path,
        **probe,
    }
    logging.info("day %s done: %s", day, json.dumps(stats))
    return stats


def config_from_flags(workdir: str) -> Optional[ModelConfig]:
  """The saved (or default) config with the flags' overrides; None if no flag set."""
  overrides = json.loads(_CONFIG_OVERRIDES.value) if _CONFIG_OVERRIDES.value else {}
  for name, flag in (("correction", _CORRECTION), ("temperature", _TEMPERATURE),
                     ("batch_size", _BATCH_SIZE), ("learning_rate", _LEARNING_RATE),
                     ("checkpoint_every_steps", _CHECKPOINT_EVERY),
                     ("shuffle_buffer", _SHUFFLE_BUFFER)):
    if flag.value is not None:
      overrides[name] = flag.value
  if not overrides:
    return None
  path = os.path.join(workdir, CONFIG_FILE)
  base = read_config(path) if tf.io.gfile.exists(path) else ModelConfig()
  return ModelConfig.from_dict({**base.to_dict(), **overrides})


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if app_flags.DATE.value:
    first = last = app_flags.parse_day(app_flags.DATE.value)
  elif not app_flags.START_DATE.value:
    raise app.UsageError("--date=YYYY-MM-DD or --start_date/--end_date is required")
  else:
    first = app_flags.parse_day(app_flags.START_DATE.value, "start_date")
    last = app_flags.parse_day(app_flags.END_DATE.value, "end_date")
  workdir = app_flags.WORKDIR.value
  trainer = Trainer(workdir, config_from_flags(workdir))
  day = first
  while day <= last:
    print(json.dumps(trainer.train_day(day)))
    day += datetime.timedelta(days=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
