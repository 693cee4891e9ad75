"""Tests of the trainer's loop: steps run in chunks inside one tf.function call
(`Trainer._run_steps`) up to the next log, checkpoint or kill step, and must do
exactly what one call per step does."""

import datetime
import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from models import trainer as trainer_lib
from models.config import ModelConfig
from trainer_testlib import assert_same_state
from trainer_testlib import TINY
from trainer_testlib import world_examples
from trainer_testlib import write_day

DAY1 = datetime.date(2024, 3, 1)
DAY2 = datetime.date(2024, 3, 2)
# One step per call: every step starts a log interval, so it runs from Python
# (`_train_batch`) and no chunk is ever run.
PER_STEP = TINY.replace(log_every_steps=1, checkpoint_every_steps=1000)
# Chunks as long as the data: after each interval's first step, one call.
CHUNKED = TINY.replace(log_every_steps=1000, checkpoint_every_steps=1000)


def _checkpoint_steps(workdir: str) -> list[int]:
  """The global steps of the checkpoints in W/checkpoints."""
  return sorted(int(os.path.basename(p)[len("ckpt-"):-len(".index")]) for p in
                glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")))


def _summary_steps(workdir: str, tag: str) -> list[int]:
  """The global steps at which W/tensorboard got `tag`."""
  steps = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return sorted(steps)


def _trainer(tmp_path, name: str, config: ModelConfig,
             days: dict[datetime.date, list[dict]]) -> trainer_lib.Trainer:
  """A trainer of a new workdir tmp_path/name holding `days`' examples."""
  workdir = str(tmp_path / name)
  for day, examples in days.items():
    write_day(workdir, day, examples)
  return trainer_lib.Trainer(workdir, config)


def test_chunked_steps_are_the_steps_of_one_call_each(tmp_path):
  """Two days, the last batch of each short: same weights, estimator, global step,
  position and mean loss as one step per call; a skipped or repeated batch would
  change the counts and the weights."""
  days = {DAY1: world_examples(DAY1, 200, seed=1), DAY2: world_examples(DAY2, 170, seed=2)}
  per_step = _trainer(tmp_path, "per_step", PER_STEP, days)
  chunked = _trainer(tmp_path, "chunked", CHUNKED, days)
  global_steps = {DAY1: 7, DAY2: 7 + 6}  # ceil(200 / 32), then ceil(170 / 32)
  for day, examples in days.items():
    want = per_step.train_day(day)
    got = chunked.train_day(day)
    assert (got["examples"], got["global_step"]) == (len(examples), global_steps[day])
    assert (want["examples"], want["global_step"]) == (len(examples), global_steps[day])
    assert got["steps_this_run"] == want["steps_this_run"]
    assert got["mean_loss"] == pytest.approx(want["mean_loss"], rel=1e-5)
    assert_same_state(chunked, per_step)


def test_chunk_of_more_steps_than_the_data_has_stops_at_its_end(tmp_path):
  """`_run_steps` asked for more steps than remain: it trains each remaining batch
  once, says how many, and a further call trains nothing."""
  trainer = _trainer(tmp_path, "w", CHUNKED, {DAY1: world_examples(DAY1, 200, seed=1)})
  trainer._start_day(DAY1)  # pylint: disable=protected-access
  iterator, _ = trainer._stream(DAY1, 0)  # pylint: disable=protected-access
  assert trainer._run_steps(iterator, 5) == 5  # pylint: disable=protected-access
  assert (trainer.global_step, trainer.position()[1]) == (5, 160)
  assert trainer._run_steps(iterator, 100) == 2  # pylint: disable=protected-access
  assert (trainer.global_step, trainer.position()[1]) == (7, 200)
  assert trainer._run_steps(iterator, 100) == 0  # pylint: disable=protected-access
  assert (trainer.global_step, trainer.position()[1]) == (7, 200)


def test_checkpoints_and_summaries_land_on_their_steps(tmp_path):
  """10 steps, checkpoints every 3 and logs every 4: chunks end on those steps."""
  config = TINY.replace(checkpoint_every_steps=3, log_every_steps=4, max_checkpoints=20)
  trainer = _trainer(tmp_path, "w", config, {DAY1: world_examples(DAY1, 320, seed=1)})
  trainer.train_day(DAY1)
  assert trainer.global_step == 10
  assert _checkpoint_steps(trainer.workdir) == [3, 6, 9, 10]
  assert _summary_steps(trainer.workdir, "loss") == [4, 8]
  # Each interval's first batch is probed before it is trained on.
  assert _summary_steps(trainer.workdir, "in_batch_recall@10") == [1, 5, 9]
  for step in (3, 6, 9):
    position = trainer_lib.checkpoint_position(
        trainer.workdir, os.path.join(trainer.workdir, "checkpoints", f"ckpt-{step}"))
    assert (position.global_step, position.examples, position.complete) == (
        step, 32 * step, False)


def test_nan_mid_chunk_stops_before_that_step(tmp_path):
  """A NaN loss at step 7 of the chunk 5..8: steps 5 and 6 are applied, step 7 is
  not, and the checkpoint of step 8 is never written."""
  examples = world_examples(DAY1, 320, seed=1)
  examples[200]["reward"] = float("nan")  # in step 7 (examples 192..223)
  config = TINY.replace(checkpoint_every_steps=4, log_every_steps=1000)
  trainer = _trainer(tmp_path, "nan", config, {DAY1: examples})
  with pytest.raises(trainer_lib.DivergenceError, match="global step 7"):
    trainer.train_day(DAY1)
  assert _checkpoint_steps(trainer.workdir) == [4]
  assert trainer.global_step == 6
  # The weights are those of the first 6 good steps, trained alone.
  good = _trainer(tmp_path, "good", config, {DAY1: examples[:6 * 32]})
  good.train_day(DAY1)
  assert good.global_step == 6
  for a, b in zip(trainer.model.trainable_variables, good.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
  # A new trainer restores step 4 and trains the day from there.
  restored = trainer_lib.Trainer(trainer.workdir)
  assert restored.position() == (DAY1, 128, False) and restored.global_step == 4
