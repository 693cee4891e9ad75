"""Trains the two-tower model one day at a time, in time order, resumably.

The library of the trainer; its command line is models/train.py. Training day D
streams the last `replay_days` data days up to and including D (D last; days
with a W/data partition, so 30-day partitions count as one each), in
file-then-record (time) order, `epochs_per_day` times (models/data.py); by
default that is one pass over W/data/D. Only data up to D is read, so the daily
job's test-then-train holds: D is scored by an export made before D was trained
on. Every batch is a global step. The checkpoint (W/checkpoints,
tf.train.CheckpointManager) holds everything a restart needs: the model, the
frequency estimator's state (a layer of the model), the optimizer (whose
`iterations` is the global step t fed to the estimator, 1-based per batch), the
day being trained, how many examples of its stream were consumed, and whether
the day is complete (`checkpoint_position` reads these). The stream is a pure
function of W/data up to D and the config (whose replay fields cannot change in
a workdir), so a process killed mid-stream (mid-epoch, mid-replayed day)
restarts from the last checkpoint and skips exactly the examples it had
consumed: nothing is trained twice or skipped. Checkpoints are written every
`checkpoint_every_steps` global steps and at the end of the day.

The config is written to W/config.json on the first day; a later config that
differs in an architecture field fails with the list of differing fields.
A NaN or infinite loss stops the day before the optimizer applies that step, and
no checkpoint is written past the last good one.

With `distill_weight` > 0 every step's loss adds the distillation term from a
ranking teacher that the caller passes (`Trainer(teacher=...)`, models/distill.py);
the teacher is not trained or checkpointed here, and it runs on one replica only.

A checkpoint that cannot be restored (a truncated file, say) is named in a
warning and the previous one the CheckpointManager keeps is restored instead;
its position in the day is restored with it, so the day resumes from there and
no example is skipped or trained twice. If none can be restored, the error names
the checkpoint directory. `load_model` (serving) falls back the same way.

Steps run in chunks inside one tf.function (up to the next log or checkpoint
boundary), so the per-step cost is the graph's alone. Every `log_every_steps`
steps, TensorBoard (W/tensorboard) gets the loss, examples/s, the estimator's
statistics and the in-batch recall@{1,10} of the next batch, measured before
training on it. A day's loss sum and step count are checkpointed too, so a
resumed day still reports the mean loss of its whole stream.

Several workers (a MultiWorkerMirroredStrategy from TF_CONFIG, see
models/distribute.py) train as one process would: every step is one global batch
of `batch_size`, split in order across the replicas (each worker reads the
stream and parses its replicas' rows), scored against the whole batch's
candidates, with one estimator; the position in the day counts global examples,
so all workers resume from the chief's checkpoint at the same example, whatever
their number. Only the chief writes checkpoints, summaries and the config (the
others save into temporary directories, as TF's multi-worker recipe has it).
Each step is its own call there (`_run_steps` says why). A worker that dies
stops the others (their step fails once the cluster misses it, naming the
chief's last checkpoint); restarting them all resumes exactly.

Fault injection, for tests only: with the environment variable
TOWERSTREAM_KILL_AFTER_STEP=N, the training process kills itself with SIGKILL
right after global step N has been trained and, if N is a checkpoint step,
saved. N is a chunk boundary, so exactly N steps run: a deterministic stand-in
for a crash at a known point (no polling, no timing).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import tensorflow as tf

from core import workdir as workdir_lib
from models import data
from models import distill
from models import distribute
from models import features
from models.config import ModelConfig
from models.config import saved_config
from models.config import write_config
from models.retrieval import in_batch_recall
from models.retrieval import TwoTowerModel

_LOSS_CHECK = "training loss is not finite"
# What a worker's step raises when another worker died: its collectives are
# aborted once the cluster's coordination service misses that worker.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.CancelledError)
# Test-only fault injection (module docstring): SIGKILL after this global step.
KILL_AFTER_STEP_ENV = "TOWERSTREAM_KILL_AFTER_STEP"
# The keys of the trainer's tf.train.Checkpoint that say how far it trained, and
# the checkpoint's name of the optimizer's step counter (the global step).
POSITION_KEYS = ("day", "day_examples", "day_complete")
_GLOBAL_STEP_KEY = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


class DivergenceError(FloatingPointError):
  """A training step produced a NaN or infinite loss."""


def resolve_config(workdir: str, config: Optional[ModelConfig]) -> ModelConfig:
  """The config to train with: `config`, checked against W/config.json if present.

  Raises:
    ValueError: `config` differs from the saved one in an architecture field.
  """
  saved = saved_config(workdir)
  if saved is None:
    return config or ModelConfig()
  if config is None:
    return saved
  diffs = saved.incompatibilities(config)
  if diffs:
    raise ValueError(
        f"{workdir_lib.Workdir(workdir).config_path}: this workdir's model was trained "
        "with a different config; incompatible fields (saved != requested): "
        + "; ".join(diffs) + ". Use a new workdir, or the saved values.")
  return config


def make_optimizer(config: ModelConfig) -> tf.keras.optimizers.Optimizer:
  # jit_compile=False: XLA would densify the sparse embedding updates on CPU.
  if config.optimizer == "adagrad":
    return tf.keras.optimizers.Adagrad(config.learning_rate, jit_compile=False)
  if config.optimizer == "adam":
    return tf.keras.optimizers.Adam(config.learning_rate, jit_compile=False)
  return tf.keras.optimizers.SGD(config.learning_rate, jit_compile=False)


def kill_after_step(env_name: str = KILL_AFTER_STEP_ENV) -> Optional[int]:
  """N of the `env_name` variable (test-only fault injection), or None."""
  value = os.environ.get(env_name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{env_name}={value!r}: not an integer global step") from None


def kill_self() -> None:
  """The injected crash: SIGKILL, so nothing (no finally, no atexit) runs after."""
  os.kill(os.getpid(), signal.SIGKILL)


# What a checkpoint that cannot be read raises: a truncated .data file gives
# IndexError ("Read less bytes than requested"), a damaged one an OpError, a
# checkpoint of another model an AssertionError or ValueError.
_RESTORE_ERRORS = (tf.errors.OpError, IndexError, ValueError, AssertionError, OSError)


def restore_checkpoint(objects: Mapping[str, Any], directory: str, partial: bool = False,
                       optional: Sequence[str] = ()) -> Optional[str]:
  """Restores the newest checkpoint of `directory` that reads; returns its path.

  A checkpoint that fails to restore is named in a warning and the previous one
  (the CheckpointManager keeps `max_checkpoints`) is tried: every object is
  restored from one checkpoint, so the model, optimizer and position in the day
  stay consistent.

  Args:
    objects: the tf.train.Checkpoint keys and objects to restore.
    directory: a CheckpointManager directory.
    partial: the checkpoints hold more than `objects` (e.g. load the model only).
    optional: keys of `objects`, all variables, that checkpoints written before
      they existed lack; those are then set to zero.

  Returns:
    The restored checkpoint's path, or None if `directory` has no checkpoint.

  Raises:
    RuntimeError: no checkpoint of `directory` could be restored.
  """
  state = tf.train.get_checkpoint_state(directory)
  if state is None or not state.model_checkpoint_path:
    return None
  paths = list(reversed(state.all_model_checkpoint_paths))  # newest first
  if state.model_checkpoint_path not in paths:
    paths.insert(0, state.model_checkpoint_path)
  failures = []
  for path in paths:
    try:
      saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
      absent = [key for key in optional if key not in saved]
      status = tf.train.Checkpoint(
          **{k: v for k, v in objects.items() if k not in absent}).restore(path)
      if partial:
        status.expect_partial()
      status.assert_existing_objects_matched()
    except _RESTORE_ERRORS as e:
      reason = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"
      failures.append(f"{path}: {reason}")
      logging.warning("checkpoint %s (its .index and .data-* files) cannot be restored "
                      "(%s); falling back to the previous checkpoint", path, reason)
      continue
    for key in absent:
      objects[key].assign(tf.zeros_like(objects[key]))
    if failures:
      logging.warning("restored %s instead of %s", path, paths[0])
    return path
  raise RuntimeError(f"{directory}: none of its {len(paths)} checkpoints can be "
                     "restored: " + "; ".join(failures))


def day_start(workdir: str, position: tuple[Optional[datetime.date], int, bool],
              day: datetime.date, what: str = "") -> tuple[Optional[int], bool]:
  """Where training `day` starts, from a (last day, examples consumed, complete)
  position: (examples of `day` to skip, None if it is already trained; whether
  `day` is a new day, whose per-day state the caller resets).

  Raises:
    RuntimeError: the last day stopped mid-stream (days are trained in order).
  """
  last, consumed, complete = position
  if last is not None and (last > day or (last == day and complete)):
    return None, False
  if last == day:
    return consumed, False
  if last is not None and not complete:
    raise RuntimeError(
        f"{workdir}: {what}day {last} stopped after {consumed} examples; train it "
        f"to the end before {day} (days are trained in order)")
  return 0, True


class TrainedPosition(NamedTuple):
  """How far a model has trained, as a checkpoint (or a Trainer) holds it.

  Attributes:
    day: the day being or last trained (None before any).
    examples: examples of that day's stream consumed (`Trainer.train_day`).
    complete: whether that day was trained to its end.
    global_step: optimizer steps in total.
    checkpoint: the checkpoint holding exactly this position (None: a trainer's
      state not saved since it last trained).
  """
  day: Optional[datetime.date]
  examples: int
  complete: bool
  global_step: int
  checkpoint: Optional[str]

  def to_json(self) -> dict[str, Any]:
    return {"day": self.day.isoformat() if self.day else None, "examples": self.examples,
            "complete": self.complete, "global_step": self.global_step,
            "checkpoint": self.checkpoint}


def _day_of(ordinal: int) -> Optional[datetime.date]:
  """The date of a checkpointed day ordinal (0: no day yet)."""
  return datetime.date.fromordinal(ordinal) if ordinal else None


def checkpoint_position(workdir: str, checkpoint: Optional[str] = None) -> TrainedPosition:
  """The trained position stored in a trainer checkpoint, read without a model.

  Args:
    workdir: the workdir.
    checkpoint: the checkpoint's path prefix; default the latest in W/checkpoints.

  Raises:
    FileNotFoundError: no checkpoint.
    ValueError: the checkpoint is unreadable or lacks the trainer's position.
  """
  directory = workdir_lib.Workdir(workdir).checkpoints_dir
  path = checkpoint or tf.train.latest_checkpoint(directory)
  if path is None:
    raise FileNotFoundError(f"{directory}: no checkpoint; train at least one day first")
  try:
    reader = tf.train.load_checkpoint(path)
  except (tf.errors.OpError, ValueError) as e:
    raise ValueError(f"{path}: unreadable checkpoint: {e}") from e
  keys = {name: f"{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in POSITION_KEYS}
  keys["global_step"] = _GLOBAL_STEP_KEY
  missing = [key for key in keys.values() if not reader.has_tensor(key)]
  if missing:
    raise ValueError(f"{path}: not a trainer checkpoint, it lacks {missing}")
  value = {name: reader.get_tensor(key) for name, key in keys.items()}
  return TrainedPosition(day=_day_of(int(value["day"])),
                         examples=int(value["day_examples"]),
                         complete=bool(value["day_complete"]),
                         global_step=int(value["global_step"]), checkpoint=path)


def load_model(workdir: str) -> tuple[TwoTowerModel, TrainedPosition]:
  """The TwoTowerModel of W/config.json with the latest readable checkpoint's weights.

  Returns:
    The model and the position of the checkpoint restored (an older one when the
    newest cannot be read, see `restore_checkpoint`).

  Raises:
    FileNotFoundError: no config or no checkpoint in `workdir`.
    RuntimeError: no checkpoint can be restored (see `restore_checkpoint`).
    ValueError: the restored checkpoint lacks the trainer's position.
  """
  paths = workdir_lib.Workdir(workdir)
  config = saved_config(workdir)
  if config is None:
    raise FileNotFoundError(f"{paths.config_path}: missing; train at least one day first")
  model = TwoTowerModel(config)
  model(features.default_batch())
  restored = restore_checkpoint({"model": model}, paths.checkpoints_dir, partial=True)
  if restored is None:
    raise FileNotFoundError(f"{paths.checkpoints_dir}: no checkpoint")
  return model, checkpoint_position(workdir, restored)


class _Pass(NamedTuple):
  """What one training pass over (the rest of) a day's stream did."""
  skip: int  # examples of the stream consumed before the pass
  steps: int
  seconds: float
  probe: dict[str, float]  # the last probe's in-batch recall and estimator stats
  window: list[datetime.date]  # the replay window, oldest first (D last)


class Trainer:
  """Owns the model, optimizer and checkpoint of a workdir; trains day by day.

  Keep one Trainer for a range of days: the model and estimator stay in memory
  between `train_day` calls, and each day ends with a checkpoint.

  Attributes:
    workdir: the workdir.
    config: the ModelConfig in use.
    strategy: the tf.distribute strategy (default: the default strategy); a
      MultiWorkerMirroredStrategy trains on global batches across its workers
      (models/distribute.py).
    is_chief: whether this process writes checkpoints, summaries and the config
      (always, but for a multi-worker strategy's other workers).
    model: the TwoTowerModel.
    restored: the checkpoint restored at construction (or at the reload after a
      divergence), None if there was none.
    teacher: the ranking teacher the model is distilled from (models/distill.py),
      None when `distill_weight` is 0. Not part of the checkpoint: the caller
      restores it (and trains it) itself.
  """

  def __init__(self, workdir: str, config: Optional[ModelConfig] = None,
               strategy: Optional[tf.distribute.Strategy] = None,
               teacher: Optional[distill.Teacher] = None):
    """Raises ValueError: an incompatible config (`resolve_config`), a
    `distill_weight` > 0 without a teacher or with several replicas."""
    self.workdir = workdir
    self._paths = workdir_lib.Workdir(workdir)
    self.config = resolve_config(workdir, config)
    self.strategy = strategy or tf.distribute.get_strategy()
    if self.config.distill_weight > 0:
      if self.strategy.num_replicas_in_sync > 1:
        raise ValueError(distill.REPLICAS_UNSUPPORTED)
      if teacher is None:
        raise ValueError(f"{workdir}: distill_weight = {self.config.distill_weight} "
                         "needs a ranking teacher to distil from; pass one, or set "
                         "distill_weight = 0")
    self.teacher = teacher if self.config.distill_weight > 0 else None
    # Only the chief writes what the job keeps (models/distribute.py).
    self.is_chief = distribute.is_chief(self.strategy)
    self._workers = distribute.num_workers(self.strategy)
    self._writer = (tf.summary.create_file_writer(self._paths.tensorboard_dir)
                    if self.is_chief else tf.summary.create_noop_writer())
    logging.info("trainer strategy: %s", distribute.describe(self.strategy))
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
      # The day's loss sum and steps, summed in the graph (no per-step host sync)
      # and checkpointed, so that a resumed day reports the whole day's mean.
      self._day_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                       name="day_loss_sum")
      self._day_loss_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                         name="day_loss_steps")
      self.model(features.default_batch())
      # Slots now, so that a restore fills them at once and is checked whole.
      self.optimizer.build(self.model.trainable_variables)
    # POSITION_KEYS (day, day_examples, day_complete) are what checkpoint_position reads.
    objects = dict(zip(POSITION_KEYS, (self._day, self._day_examples, self._day_complete)),
                   model=self.model, optimizer=self.optimizer,
                   day_loss_sum=self._day_loss_sum, day_loss_steps=self._day_loss_steps)
    # Every worker restores from, and names, the chief's checkpoints; only the
    # chief's manager writes there (`_save`).
    self._checkpoint = tf.train.Checkpoint(**objects)
    self._manager = tf.train.CheckpointManager(
        self._checkpoint, self._paths.checkpoints_dir,
        max_to_keep=self.config.max_checkpoints, step_counter=self.optimizer.iterations)
    if self._manager.latest_checkpoint:
      if not workdir_lib.exists(self._paths.config_path):
        raise ValueError(f"{self._paths.checkpoints_dir}: checkpoints without "
                         f"{self._paths.config_path}; cannot tell which model they "
                         "belong to")
      # Checkpoints from before the day's loss was kept: a resumed day's mean
      # loss then covers the resumed part only.
      self.restored = restore_checkpoint(objects, self._manager.directory,
                                         optional=("day_loss_sum", "day_loss_steps"))
      logging.info("restored %s", self.restored)
    else:
      self.restored = None
    # The position the last checkpoint saved or restored holds (trained_position).
    self._held = self._position_now(self.restored) if self.restored else None
    # learning_rate is a run-time field: the config wins over the checkpoint.
    self.optimizer.learning_rate.assign(self.config.learning_rate)
    self._train_batch = tf.function(self._distributed_step, reduce_retracing=True)
    self._train_steps = tf.function(self._distributed_steps, reduce_retracing=True)
    self._probe = tf.function(self._distributed_probe, reduce_retracing=True)
    self._announce_fn = tf.function(self._distributed_announce)
    self._stale = False

  @property
  def global_step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def position(self) -> tuple[Optional[datetime.date], int, bool]:
    """(day being or last trained, examples of its stream consumed, whether complete)."""
    return (_day_of(int(self._day.numpy())), int(self._day_examples.numpy()),
            bool(self._day_complete.numpy()))

  def _position_now(self, checkpoint: Optional[str]) -> TrainedPosition:
    return TrainedPosition(*self.position(), global_step=self.global_step,
                           checkpoint=checkpoint)

  def trained_position(self) -> TrainedPosition:
    """`position()`, the global step, and the checkpoint holding exactly them.

    The checkpoint is None when the state in memory has moved on since the last
    checkpoint saved or restored (e.g. a day stopped between checkpoints).
    """
    now = self._position_now(None)
    held = self._held
    return held if held is not None and held._replace(checkpoint=None) == now else now

  def _replica_step(self, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    with tf.GradientTape() as tape:
      loss = self.model.compute_loss(batch, training=True,
                                     step=self.optimizer.iterations + 1,
                                     teacher=self.teacher)
    variables = self.model.trainable_variables
    gradients = tape.gradient(loss, variables)
    # Several replicas check the global batch's loss: all of them stop, or none.
    total = (loss if self.strategy.num_replicas_in_sync == 1
             else distribute.GlobalBatch.sum(loss))
    with tf.control_dependencies([tf.debugging.check_numerics(total, _LOSS_CHECK)]):
      self.optimizer.apply_gradients(zip(gradients, variables))
      size = tf.shape(batch["item_id"], out_type=tf.int64)[0]
    return loss, size

  def _distributed_step(self, batch) -> None:
    loss, size = self.strategy.run(self._replica_step, args=(batch,))
    self._day_examples.assign_add(
        self.strategy.reduce(tf.distribute.ReduceOp.SUM, size, axis=None))
    self._day_loss_sum.assign_add(tf.cast(
        self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None), tf.float64))
    self._day_loss_steps.assign_add(1)

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

  def _run_steps(self, iterator: Iterator[Any], steps: int) -> int:
    """Trains up to `steps` batches of `iterator`; returns how many (fewer: it ended).

    One process runs them in one call (`_distributed_steps`). Several replicas
    run one call per step: TensorFlow keys a tf.function's collectives per call,
    so every iteration of a loop inside one call reuses the same keys, and the
    collective runtime keeps the shapes it saw first under a key; a gather whose
    shape changes between steps (the sparse embedding gradients, a short last
    batch) then fails with "Shape mismatch in the collective instance".
    """
    if self.strategy.num_replicas_in_sync == 1:
      return int(self._train_steps(iterator, tf.constant(steps, tf.int64)))
    for done in range(steps):
      batch = next(iterator, None)
      if batch is None:
        return done
      self._train_batch(batch)
    return steps

  def _day_loss(self) -> tuple[float, int]:
    """(sum of losses, steps) of the day so far, resumed parts included."""
    return float(self._day_loss_sum.numpy()), int(self._day_loss_steps.numpy())

  def _replica_probe(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """In-batch recall and estimator statistics of a batch, before training on it.

    Under several replicas, of the global batch: every replica ranks its queries'
    positives among all the batch's candidates, and its recall is weighted by its
    rows; the estimator's statistics are those of the global ids, the same on
    every replica.
    """
    query, candidate = self.model(batch, training=False)
    ids = batch["item_id"]
    shared = distribute.GlobalBatch.of(tf.shape(query)[0])
    if shared is None:
      stats = {f"in_batch_recall@{k}": in_batch_recall(query, candidate, ids, k)
               for k in (1, 10)}
    else:
      ids = shared.gather_strings(ids)
      candidate = shared.own_first(shared.gather(candidate))
      # Recall x rows x replicas / global rows: the replicas' mean (below) is
      # the global batch's recall, a replica without rows counting for nothing.
      weight = (tf.cast(tf.shape(query)[0] * self.strategy.num_replicas_in_sync,
                        tf.float32) / tf.cast(shared.rows, tf.float32))
      stats = {f"in_batch_recall@{k}": tf.math.multiply_no_nan(
          in_batch_recall(query, candidate, shared.own_first(ids), k), weight)
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
  def _errors_as(self, day: datetime.date, where: str) -> Iterator[None]:
    """Turns a failed step into DivergenceError and a bad input into RuntimeError.

    `where` names the input in the error: W/data/D, or D's replay window.
    """
    try:
      yield
    except tf.errors.InvalidArgumentError as e:
      if _LOSS_CHECK not in e.message:
        raise data.input_error(where, int(self._day_examples.numpy()), e) from e
      self._stale = True
      raise DivergenceError(
          f"day {day}: loss is NaN or infinite at global step {self.global_step + 1} "
          f"(examples {self._day_examples.numpy()}.. of the day's stream); stopped, "
          f"last checkpoint {self._manager.latest_checkpoint} is untouched") from e
    except _PEER_ERRORS as e:
      if self._workers == 1:
        raise data.input_error(where, int(self._day_examples.numpy()), e) from e
      raise RuntimeError(
          f"day {day}: the cluster lost a worker after global step {self.global_step} "
          f"({type(e).__name__}: {e.message.splitlines()[0]}); restart every worker: "
          "they resume from the chief's last checkpoint, "
          f"{tf.train.latest_checkpoint(self._manager.directory)}") from e
    except tf.errors.OpError as e:
      raise data.input_error(where, int(self._day_examples.numpy()), e) from e

  def _save(self, step: int) -> str:
    """Checkpoints the state at global `step`; returns the chief's checkpoint path.

    Every worker saves (TF's multi-worker recipe: a save may run collectives);
    the others into a temporary directory, deleted at once
    (distribute.write_directory), so the chief's checkpoint is the only one.
    """
    try:
      with distribute.write_directory(self._manager.directory, self.is_chief) as target:
        manager = self._manager if self.is_chief else tf.train.CheckpointManager(
            self._checkpoint, target, max_to_keep=1)
        saved = manager.save(checkpoint_number=step)
      path = (saved if self.is_chief
              else os.path.join(self._manager.directory, os.path.basename(saved)))
    except tf.errors.OpError as e:  # not to be mistaken for a bad input
      raise IOError(f"{self._manager.directory}: cannot write checkpoint {step}: "
                    f"{e.message}") from e
    self._held = self._position_now(path)
    return path

  def _log_interval(self, day: datetime.date, since: tuple[float, int, float, int],
                    probe: dict[str, float]) -> tuple[float, int, float, int]:
    """Writes loss and examples/s since `since`; returns the new `since`.

    `since` is (time, day examples, day loss sum, day loss steps) at the last log.
    """
    step, now = self.global_step, time.perf_counter()
    consumed = int(self._day_examples.numpy())
    total, steps = self._day_loss()
    loss = (total - since[2]) / max(steps - since[3], 1)
    rate = (consumed - since[1]) / max(now - since[0], 1e-9)
    tf.summary.scalar("loss", loss, step=step)
    tf.summary.scalar("examples_per_s", rate, step=step)
    logging.info("day %s step %d: %d examples, loss %.4f, %.0f examples/s, in-batch "
                 "recall@10 %.3f", day, step, consumed, loss, rate,
                 probe.get("in_batch_recall@10", float("nan")))
    return now, consumed, total, steps

  def _save_config(self) -> None:
    if self.is_chief and saved_config(self.workdir) != self.config:
      write_config(self.config, self._paths.config_path)

  def _start_day(self, day: datetime.date) -> Optional[int]:
    """Moves the state to `day`; returns examples to skip, None if already trained."""
    skip, new = day_start(self.workdir, self.position(), day)
    if new:
      self._day.assign(day.toordinal())
      self._day_examples.assign(0)
      self._day_complete.assign(False)
      self._day_loss_sum.assign(0.0)
      self._day_loss_steps.assign(0)
    return skip

  def train_day(self, day: datetime.date) -> dict[str, Any]:
    """Trains day D's stream in time order, resuming mid-stream if needed.

    The stream is `replay_old_days` older data days drawn at random, then the
    last `replay_days` data days up to and including D (D last), all
    `epochs_per_day` times (models/data.py). Every batch is a global step.

    Returns:
      Stats: day, status ("trained", "resumed" or "already_trained"), examples
      (of the stream consumed in total), examples_this_run, steps_this_run,
      global_step, mean_loss (of the whole stream, resumed runs included),
      examples_per_s (this run, reading and parsing included), window_days (the
      replay window, oldest first), epochs, window_examples (examples in the
      window, once), the last probe's in-batch recall and estimator stats, and
      the final checkpoint path.

    Under a multi-worker strategy, every worker calls it with the same day, in
    the same order (checked), or the chief does and the others `follow()`.

    Raises:
      DivergenceError: a NaN or infinite loss; the model is reloaded from the last
        checkpoint before the next `train_day`.
      FileNotFoundError: no W/data/D.
      RuntimeError: an earlier day is unfinished, the stream cannot be read, or
        the chief trains another day than this worker was asked to.
    """
    if self._workers > 1:
      chiefs = self._announce(day.toordinal() if self.is_chief else 0)
      if chiefs != day.toordinal():
        raise RuntimeError(f"{self.workdir}: this worker was asked to train {day}, the "
                           f"chief trains {_day_of(chiefs) or 'nothing more'}: every "
                           "worker must train the same days in the same order")
    return self._train_day(day)

  def follow(self, on_day: Optional[Callable[[dict[str, Any]], None]] = None
             ) -> list[dict[str, Any]]:
    """A non-chief worker's part in a job whose chief alone decides what to train.

    Trains each day the chief's `train_day` trains, in step with it, until the
    chief calls `release_workers`. The daily job runs this on every worker but
    the chief: the chief alone runs the other steps, and the workers need not
    know which days it trains (e.g. again after a lost checkpoint).

    Args:
      on_day: called with each day's stats.

    Returns:
      The stats of each day trained, in order.

    Raises:
      RuntimeError: this is the chief, or a single-process strategy.
    """
    if self.is_chief or self._workers == 1:
      raise RuntimeError("follow() is for the non-chief workers of a multi-worker "
                         "strategy; the chief calls train_day()")
    done = []
    while True:
      ordinal = self._announce(0)
      if ordinal == 0:
        return done
      done.append(self._train_day(_day_of(ordinal)))
      if on_day is not None:
        on_day(done[-1])

  def release_workers(self) -> None:
    """The chief's end of a job: returns the workers' `follow()`; a no-op but for
    the chief of a multi-worker strategy."""
    if self._workers > 1 and self.is_chief:
      self._announce(0)

  def _announce(self, ordinal: int) -> int:
    """The chief's `ordinal` (a day's, or 0: no more days), on every worker.

    A collective: every worker must call it, the others with 0.
    """
    return int(self._announce_fn(tf.constant(ordinal, tf.int64)))

  def _distributed_announce(self, ordinal: tf.Tensor) -> tf.Tensor:
    local = self.strategy.num_replicas_in_sync // self._workers

    def replica_sum() -> tf.Tensor:
      first = tf.distribute.get_replica_context().replica_id_in_sync_group % local == 0
      return distribute.GlobalBatch.sum(tf.where(first, ordinal, tf.zeros_like(ordinal)))
    return self.strategy.experimental_local_results(self.strategy.run(replica_sum))[0]

  def _train_day(self, day: datetime.date) -> dict[str, Any]:
    """`train_day` on this worker, once the workers agree on the day."""
    if self._stale:
      self._build()
    skip = self._start_day(day)
    if skip is None:
      _, consumed, _ = self.position()
      return {"day": day.isoformat(), "status": "already_trained",
              "global_step": self.global_step, "examples": consumed}
    self._save_config()
    return self._finish_day(day, self._train_pass(day, skip))

  def _window_where(self, day: datetime.date, window: Sequence[datetime.date]) -> str:
    """How errors name the input of day D's stream: W/data/D, or its replay window."""
    where = self._paths.data_dir(day)
    if len(window) > 1 or self.config.epochs_per_day > 1:
      where += (f" (the replay stream of {day}: {', '.join(map(str, window))}, "
                f"{self.config.epochs_per_day} epochs)")
    return where

  def _stream(self, day: datetime.date, skip: int
              ) -> tuple[Iterator[Any], list[datetime.date]]:
    """The distributed iterator over day D's stream from example `skip` on, and
    the replay window it streams."""
    config = self.config
    window = data.replay_window(self.workdir, day, config.replay_days)
    window = data.old_replay_days(self.workdir, day, window, config.replay_old_days,
                                  config.seed) + window
    days = [data.day_files(self.workdir, d, config.seed) for d in window]

    def batches(share: Optional[data.ReplicaShare] = None) -> tf.data.Dataset:
      return data.stream_batches(
          days, config.batch_size, skip=skip, epochs=config.epochs_per_day,
          max_history=config.max_history, shuffle_buffer=config.shuffle_buffer,
          share=share)
    logging.info("day %s: window %s (%d files), %d epochs, starting at example %d, "
                 "global step %d", day, [d.isoformat() for d in window],
                 sum(len(d.files) for d in days), config.epochs_per_day, skip,
                 self.global_step)
    if self.strategy.num_replicas_in_sync == 1:
      return iter(self.strategy.experimental_distribute_dataset(batches())), window

    def worker_batches(context: tf.distribute.InputContext) -> tf.data.Dataset:
      # Each global batch, split in order: this worker parses its replicas' rows.
      local = context.num_replicas_in_sync // context.num_input_pipelines
      return batches(data.ReplicaShare(first=context.input_pipeline_id * local,
                                       local=local, total=context.num_replicas_in_sync))
    return iter(self.strategy.distribute_datasets_from_function(worker_batches)), window

  def _train_pass(self, day: datetime.date, skip: int) -> _Pass:
    """Trains the rest of day D's stream from example `skip`; returns what it did.

    Checkpoints, summaries and the injected kill happen at their step boundaries
    (`_train_to_log_step`); the day is not marked complete here.
    """
    started, start_step = time.perf_counter(), self.global_step
    self.model.load_negative_corpus(self.workdir, day)  # D's: every item up to D
    iterator, window = self._stream(day, skip)
    kill_after = kill_after_step()
    probe: dict[str, float] = {}
    since = (started, skip, *self._day_loss())
    with self._writer.as_default(), self._errors_as(day, self._window_where(day, window)):
      self._remember(day)
      while True:
        # The first step after each log boundary runs from Python: its batch is
        # probed (in-batch recall, estimator stats) before being trained on.
        batch = next(iterator, None)
        if batch is None:
          break
        probe = self._probe_batch(batch)
        self._train_batch(batch)
        if not self._train_to_log_step(iterator, kill_after):
          break
        since = self._log_interval(day, since, probe)
    return _Pass(skip=skip, steps=self.global_step - start_step,
                 seconds=time.perf_counter() - started, probe=probe, window=window)

  def _remember(self, day: datetime.date) -> None:
    """Counts day D's pairs into the pair memory, once, before D trains."""
    if self.model.absorb_day(self.workdir, day):
      logging.info("day %s: pair memory holds %d pairs", day,
                   int(tf.shape(self.model.memory.pair_counts)[0]))

  def _probe_batch(self, batch: Any) -> dict[str, float]:
    """The probe of a batch about to be trained on, written to TensorBoard."""
    probe = {k: float(v) for k, v in self._probe(batch).items()}
    for name, value in probe.items():
      tf.summary.scalar(name, value, step=self.global_step + 1)
    return probe

  def _train_to_log_step(self, iterator: Iterator[Any], kill_after: Optional[int]) -> bool:
    """Trains chunks up to the next log step; False if the data ends before it.

    Saves a checkpoint at every checkpoint step and kills the process at
    `kill_after` (fault injection): chunks end at those steps and at log steps.
    """
    every_checkpoint, every_log = (self.config.checkpoint_every_steps,
                                   self.config.log_every_steps)
    while True:
      step = self.global_step
      if step % every_checkpoint == 0:
        self._save(step)
      if step == kill_after:
        self._writer.flush()
        kill_self()
      if step % every_log == 0:
        return True
      chunk = min(every_log - step % every_log, every_checkpoint - step % every_checkpoint)
      if kill_after is not None and kill_after > step:
        chunk = min(chunk, kill_after - step)
      if self._run_steps(iterator, chunk) < chunk:
        return False

  def _finish_day(self, day: datetime.date, done: _Pass) -> dict[str, Any]:
    """Marks the day complete, checkpoints it and returns its stats (`train_day`)."""
    step = self.global_step
    self._day_complete.assign(True)
    path = self._save(step)
    self._writer.flush()
    consumed = int(self._day_examples.numpy())
    total, day_steps = self._day_loss()
    stats = {
        "day": day.isoformat(),
        "status": "resumed" if done.skip else "trained",
        "examples": consumed,
        "examples_this_run": consumed - done.skip,
        "steps_this_run": done.steps,
        "global_step": step,
        "mean_loss": total / day_steps if day_steps else None,
        "examples_per_s": ((consumed - done.skip) / done.seconds if done.seconds > 0
                           else None),
        "window_days": [d.isoformat() for d in done.window],
        "epochs": self.config.epochs_per_day,
        "window_examples": consumed // self.config.epochs_per_day,
        "checkpoint": path,
        **done.probe,
    }
    logging.info("day %s done: %s", day, json.dumps(stats))
    return stats
