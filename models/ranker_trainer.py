"""Trains the ranking teacher (models/ranker.py) day by day, in time order, resumably.

Training day D reads W/data/D's examples in time order (models/data.py), one
pass. The logs hold no impressions, so each example's negatives come from the
retrieval model: `negatives` items drawn without replacement from its top
`candidates_k` for the example's query, the example's own item excluded. The
caller passes that retrieval as a function (`Retrieve`); the daily job uses
the exact export labelled D (serving/ranker_export.py `export_retriever`): it is
what the funnel's first stage serves, it is immutable on disk, so a resumed
run draws exactly the negatives of an uninterrupted one, and it needs no
two-tower in memory. Draws are stateless, seeded by (seed, day, the batch's
first example), so they depend on nothing but the stream's position.
Their candidate features come from day D's corpus (W/data/D/corpus-*, a
`CorpusTable`), the positive's from the example itself.

Loss: sigmoid cross-entropy of each (query, candidate) logit against a soft
label: the example's reward clipped to [0, 1] (watch fraction, rating / 5) for
its own item, 0 for the negatives; the mean over the batch's valid pairs (a
retrieval list shorter than `negatives` leaves fewer).

State lives under W/ranker (models/ranker.py: config.json, checkpoints/),
beside the two-tower's: tf.train.CheckpointManager of the ranker, its
optimizer (whose `iterations` is the ranker's global step), the day, the
examples of it consumed, whether it is complete, and the day's loss sum and
steps. A checkpoint is written every `checkpoint_every_steps` steps and at the
end of a day; a process killed anywhere restarts from the last one and skips
exactly the examples it had consumed.

Fault injection, for tests only: with TOWERSTREAM_KILL_RANKER_AFTER_STEP=N the
process SIGKILLs itself right after the ranker's global step N has been trained
and, if N is a checkpoint step, saved.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import tensorflow as tf

from models import data
from models import features as features_lib
from models import negatives as negatives_lib
from models import ranker as ranker_lib
from models import trainer as trainer_lib
from models.config import ModelConfig

KILL_AFTER_STEP_ENV = "TOWERSTREAM_KILL_RANKER_AFTER_STEP"
_LOSS_CHECK = "ranker loss is not finite"
# (query features [b], ids to exclude [b, E]) -> retrieved item ids [b, k], best
# first, padded with "".
Retrieve = Callable[[Mapping[str, tf.Tensor], tf.Tensor], tf.Tensor]


def resolve_config(workdir: str, config: Optional[ranker_lib.RankerConfig] = None,
                   model: Optional[ModelConfig] = None) -> ranker_lib.RankerConfig:
  """The ranker config to train with: `config`, else W/ranker/config.json, else the
  default for the two-tower `model` (RankerConfig.like), else the default.

  Raises:
    ValueError: `config` differs from the saved one in an architecture field.
  """
  saved = ranker_lib.saved_config(workdir)
  if saved is None:
    return config or (ranker_lib.RankerConfig.like(model) if model
                      else ranker_lib.RankerConfig())
  if config is None:
    return saved
  diffs = saved.incompatibilities(config)
  if diffs:
    raise ValueError(f"{ranker_lib.config_path(workdir)}: this workdir's ranker was "
                     "trained with a different config; incompatible fields (saved != "
                     "requested): " + "; ".join(diffs))
  return config


def load_ranker(workdir: str) -> tuple[ranker_lib.Ranker, trainer_lib.TrainedPosition]:
  """The Ranker of W/ranker/config.json with its latest readable checkpoint.

  Returns:
    The ranker and how far it had trained (the checkpoint restored).

  Raises:
    FileNotFoundError: no ranker config or checkpoint in `workdir`.
    RuntimeError: no checkpoint can be restored (trainer.restore_checkpoint).
  """
  config = ranker_lib.saved_config(workdir)
  if config is None:
    raise FileNotFoundError(f"{ranker_lib.config_path(workdir)}: missing; train the "
                            "ranker for at least one day first")
  model = ranker_lib.build(config)
  state = {key: tf.Variable(value) for key, value in (
      ("day", tf.constant(0, tf.int64)), ("day_examples", tf.constant(0, tf.int64)),
      ("day_complete", tf.constant(False)))}
  directory = ranker_lib.checkpoints_dir(workdir)
  restored = trainer_lib.restore_checkpoint({"ranker": model, **state}, directory,
                                            partial=True)
  if restored is None:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  step = tf.train.load_checkpoint(restored).get_tensor(
      "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
  day = int(state["day"].numpy())
  return model, trainer_lib.TrainedPosition(
      datetime.date.fromordinal(day) if day else None, int(state["day_examples"].numpy()),
      bool(state["day_complete"].numpy()), int(step), restored)


def _step_signature() -> list[Any]:
  """The training step's inputs: query features [b], candidate lists [b, M] (their
  multi-valued features [b, M, T]), labels and weights [b, M]."""
  lists = {name: tf.TensorSpec([None, None, None] if multi else [None, None], dtype)
           for name, (dtype, multi, _) in features_lib.FEATURES.items()
           if name in features_lib.CANDIDATE_FEATURES}
  pairs = tf.TensorSpec([None, None], tf.float32)
  return [features_lib.query_input_signature(), lists, pairs, pairs]


def _checked(retrieve: Retrieve) -> Retrieve:
  """`retrieve`, its answer checked: a string matrix with one row per query."""
  def checked(query: Mapping[str, tf.Tensor], exclude: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(retrieve(query, exclude))
    if ids.dtype != tf.string or ids.shape.rank != 2 or ids.shape[0] != exclude.shape[0]:
      raise ValueError(f"retrieve answered {ids.dtype.name} {ids.shape} for "
                       f"{exclude.shape[0]} queries; want string [queries, k]")
    return ids
  return checked


class RankerTrainer:
  """Owns the ranker, its optimizer and checkpoints of a workdir; trains day by day.

  Attributes:
    workdir: the workdir.
    config: the RankerConfig in use (W/ranker/config.json once trained).
    model: the Ranker.
    table: the corpus of the day being trained (negatives' features).
    restored: the checkpoint restored at construction, or None.
  """

  def __init__(self, workdir: str, config: Optional[ranker_lib.RankerConfig] = None,
               model_config: Optional[ModelConfig] = None):
    self.workdir = workdir
    self.config = resolve_config(workdir, config, model_config)
    self.model = ranker_lib.build(self.config)
    # jit_compile=False: XLA would densify the sparse embedding updates on CPU.
    kind = (tf.keras.optimizers.Adam if self.config.optimizer == "adam"
            else tf.keras.optimizers.Adagrad)
    self.optimizer = kind(self.config.learning_rate, jit_compile=False)
    self.optimizer.build(self.model.trainable_variables)
    self._day = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._day_examples = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._day_complete = tf.Variable(False, trainable=False)
    self._loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    self._loss_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
    objects = {"ranker": self.model, "optimizer": self.optimizer, "day": self._day,
               "day_examples": self._day_examples, "day_complete": self._day_complete,
               "day_loss_sum": self._loss_sum, "day_loss_steps": self._loss_steps}
    self._manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(**objects), ranker_lib.checkpoints_dir(workdir),
        max_to_keep=self.config.max_checkpoints, step_counter=self.optimizer.iterations)
    self.restored = trainer_lib.restore_checkpoint(objects, self._manager.directory)
    if self.restored:
      logging.info("ranker: restored %s", self.restored)
    self.optimizer.learning_rate.assign(self.config.learning_rate)
    # The checkpoint saved or restored last and the position it holds.
    self._held = (self.restored, (*self.position(), self.global_step))
    self.table = ranker_lib.CorpusTable()
    # One trace per process: every shape but the features' ranks is dynamic
    # (batches differ in history and topic widths). No autograph: the step has no
    # control flow, and converting Keras' calls cost 8 s a trace.
    self._train_step = tf.function(self._step, input_signature=_step_signature(),
                                   autograph=False)

  @property
  def global_step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def position(self) -> tuple[Optional[datetime.date], int, bool]:
    """(day being or last trained, its examples consumed, whether complete)."""
    day = int(self._day.numpy())
    return (datetime.date.fromordinal(day) if day else None,
            int(self._day_examples.numpy()), bool(self._day_complete.numpy()))

  def trained_position(self) -> trainer_lib.TrainedPosition:
    """`position()` and the global step, with the checkpoint that holds them (None
    when the state has moved on since the last save or restore)."""
    now = (*self.position(), self.global_step)
    path, held = self._held
    return trainer_lib.TrainedPosition(*now, path if held == now else None)

  def _save(self) -> str:
    if ranker_lib.saved_config(self.workdir) != self.config:
      ranker_lib.write_config(self.workdir, self.config)
    path = self._manager.save(checkpoint_number=self.global_step)
    self._held = (path, (*self.position(), self.global_step))
    return path

  def _start_day(self, day: datetime.date) -> Optional[int]:
    """Moves the state to `day`; returns examples to skip, None if already trained."""
    skip, new = trainer_lib.day_start(self.workdir, self.position(), day, "the ranker's ")
    if new:
      self._day.assign(day.toordinal())
      self._day_examples.assign(0)
      self._day_complete.assign(False)
      self._loss_sum.assign(0.0)
      self._loss_steps.assign(0)
    return skip

  def candidate_lists(self, batch: Mapping[str, tf.Tensor], retrieve: Retrieve,
                      day: datetime.date, first: int
                      ) -> tuple[dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
    """Each example's own item then its negatives: (candidate features [b, 1 + K],
    labels [b, 1 + K], weights [b, 1 + K]: 0 where a negative is missing).

    `first` is the batch's first example in the day's stream: with the day and the
    seed it seeds the draw, so a resumed day draws the same negatives.
    """
    count = self.config.negatives
    query = {name: batch[name] for name in features_lib.QUERY_FEATURES}
    retrieved = retrieve(query, batch["item_id"][:, tf.newaxis])
    retrieved = tf.pad(retrieved, [[0, 0], [0, tf.maximum(count - tf.shape(retrieved)[1],
                                                          0)]])
    valid = retrieved != ""
    noise = tf.random.stateless_uniform(tf.shape(retrieved), seed=tf.constant(
        [self.config.seed * 100003 + day.toordinal(), first], tf.int64))
    picked = tf.argsort(tf.where(valid, noise, 2.0), axis=1, stable=True)[:, :count]
    present = tf.gather(valid, picked, batch_dims=1)
    ids = tf.where(present, tf.gather(retrieved, picked, batch_dims=1), "")
    own = {name: batch[name][:, tf.newaxis] for name in features_lib.CANDIDATE_FEATURES}
    candidates = features_lib.concat_padded(own, self.table.lookup(ids), axis=1)
    reward = tf.clip_by_value(tf.cast(batch["reward"], tf.float32), 0.0, 1.0)
    labels = tf.concat([reward[:, tf.newaxis], tf.zeros(tf.shape(ids))], axis=1)
    weights = tf.concat([tf.ones_like(reward)[:, tf.newaxis], tf.cast(present,
                                                                      tf.float32)], 1)
    return candidates, labels, weights

  def loss(self, query: Mapping[str, tf.Tensor], candidates: Mapping[str, tf.Tensor],
           labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """The weighted mean sigmoid cross-entropy of the batch's pairs."""
    logits = self.model.score_lists(query, candidates, training=True)
    losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)

  def _step(self, query, candidates, labels, weights) -> tf.Tensor:
    with tf.GradientTape() as tape:
      loss = self.loss(query, candidates, labels, weights)
    variables = self.model.trainable_variables
    gradients = tape.gradient(loss, variables)
    with tf.control_dependencies([tf.debugging.check_numerics(loss, _LOSS_CHECK)]):
      self.optimizer.apply_gradients(zip(gradients, variables))
    self._day_examples.assign_add(tf.shape(labels, out_type=tf.int64)[0])
    self._loss_sum.assign_add(tf.cast(loss, tf.float64))
    self._loss_steps.assign_add(1)
    return loss

  def train_day(self, day: datetime.date, retrieve: Retrieve) -> dict[str, Any]:
    """Trains day D's examples in time order (resuming mid-day); returns its stats.

    Args:
      day: the day; its examples and corpus must be in W/data/D.
      retrieve: the retrieval the negatives are drawn from (`Retrieve`).

    Returns:
      day, status ("trained", "resumed" or "already_trained"), examples,
      examples_this_run, steps_this_run, global_step, mean_loss (the whole day's),
      negatives_per_example (this run's mean), seconds, checkpoint.

    Raises:
      FileNotFoundError: no W/data/D, or no corpus there.
      RuntimeError: an earlier day is unfinished; unreadable examples; a NaN loss
        (no checkpoint is written past the last good step).
    """
    started = time.perf_counter()
    skip = self._start_day(day)
    if skip is None:
      return {"day": day.isoformat(), "status": "already_trained",
              "global_step": self.global_step, "examples": self.position()[1]}
    self.table.set_corpus(negatives_lib.read_corpus(self.workdir, day))
    files = data.day_files(self.workdir, day, self.config.seed)
    kill_after = trainer_lib.kill_after_step(KILL_AFTER_STEP_ENV)
    checked = _checked(retrieve)
    start_step, negatives = self.global_step, 0.0
    try:
      for batch in data.stream_batches([files], self.config.batch_size, skip=skip,
                                       max_history=self.config.max_history):
        first = int(self._day_examples.numpy())
        candidates, labels, weights = self.candidate_lists(batch, checked, day, first)
        negatives += float(tf.reduce_sum(weights)) - int(labels.shape[0])
        self._train_step({name: batch[name] for name in features_lib.QUERY_FEATURES},
                         candidates, labels, weights)
        if self.global_step % self.config.checkpoint_every_steps == 0:
          self._save()
        if self.global_step == kill_after:
          trainer_lib.kill_self()
    except tf.errors.InvalidArgumentError as e:
      if _LOSS_CHECK in e.message:
        raise RuntimeError(f"day {day}: the ranker's loss is NaN or infinite at step "
                           f"{self.global_step + 1}; stopped, last checkpoint "
                           f"{self._manager.latest_checkpoint} is untouched") from e
      raise data.input_error(files.directory, int(self._day_examples.numpy()), e) from e
    except tf.errors.OpError as e:
      raise data.input_error(files.directory, int(self._day_examples.numpy()), e) from e
    self._day_complete.assign(True)
    path = self._save()
    examples = int(self._day_examples.numpy())
    steps = int(self._loss_steps.numpy())
    stats = {
        "day": day.isoformat(), "status": "resumed" if skip else "trained",
        "examples": examples, "examples_this_run": examples - skip,
        "steps_this_run": self.global_step - start_step, "global_step": self.global_step,
        "mean_loss": float(self._loss_sum.numpy()) / steps if steps else None,
        "negatives_per_example": negatives / max(examples - skip, 1),
        "seconds": round(time.perf_counter() - started, 2), "checkpoint": path}
    logging.info("ranker day %s done: %s", day, json.dumps(stats))
    return stats
