"""Tests of models/trainer.py and models/data.py on tiny TFRecord days."""

import datetime
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from core.workdir import Workdir
from models import data
from models import features
from models.config import ModelConfig
from models.config import write_config
from models import trainer as trainer_lib
from trainer_testlib import assert_same_state
from trainer_testlib import REPO
from trainer_testlib import TINY
from trainer_testlib import train_killed
from trainer_testlib import world_examples
from trainer_testlib import write_day

DAY1 = datetime.date(2024, 3, 1)
DAY2 = datetime.date(2024, 3, 2)


def batch_of(examples: list[dict]) -> dict[str, tf.Tensor]:
  return features.parse_examples(tf.constant(
      [features.to_example(e).SerializeToString() for e in examples]))


PLANTED_ITEMS = 40


def partner(item: int) -> int:
  """The planted world's one obvious partner of each item: 0-1, 2-3, ..."""
  return item ^ 1


def planted_examples(day: datetime.date, n: int, seed: int) -> list[dict]:
  """Every event's seed (and history) is an item, its target that item's partner.

  Users are noise; the partner's channel and topic are its own. Uniform item
  popularity, so the logQ correction plays no part in what is learned.
  """
  rng = np.random.default_rng(seed)
  start = int(datetime.datetime(day.year, day.month, day.day,
                                tzinfo=datetime.timezone.utc).timestamp())
  out = []
  for i in range(n):
    seed_item = int(rng.integers(PLANTED_ITEMS))
    target = partner(seed_item)
    out.append({
        "event_id": f"{day}-{i:06d}", "timestamp": start + i * 7,
        "user_id": f"u{int(rng.integers(50))}", "seed_item_id": f"i{seed_item}",
        "history_item_ids": [f"i{seed_item}"], "item_id": f"i{target}",
        "item_channel_id": f"c{target}", "item_topics": [f"t{target // 2}"],
        "item_topic_weights": [1.0]})
  return out


def partner_ranks(model) -> tuple[np.ndarray, float]:
  """(rank of each item's partner among all items for that item's query, loss)."""
  queries = batch_of([{
      "seed_item_id": f"i{i}", "history_item_ids": [f"i{i}"],
      "item_id": f"i{partner(i)}", "item_channel_id": f"c{partner(i)}",
      "item_topics": [f"t{partner(i) // 2}"], "item_topic_weights": [1.0]}
                      for i in range(PLANTED_ITEMS)])
  query, candidate = model(queries)
  scores = tf.linalg.matmul(query, candidate, transpose_b=True).numpy()
  ranks = np.sum(scores > np.diag(scores)[:, None], axis=1)
  return ranks, float(model.compute_loss(queries, training=False))


def test_short_training_learns_a_planted_partner_world(tmp_path):
  """Relative, wide-margin checks: any CPU, any summation order passes them.

  Untrained, a partner ranks about 20th of 40 (chance); one day of 50 steps
  brings it to about 0 (top 1), and the loss from about 5 to about 0.3.
  """
  workdir = str(tmp_path)
  write_day(workdir, DAY1, planted_examples(DAY1, 1600, seed=1))
  trainer = trainer_lib.Trainer(workdir, TINY)
  ranks_before, loss_before = partner_ranks(trainer.model)

  stats = trainer.train_day(DAY1)

  ranks_after, loss_after = partner_ranks(trainer.model)
  assert stats["status"] == "trained"
  assert stats["examples"] == 1600
  assert stats["steps_this_run"] == stats["global_step"] == 50
  assert np.isfinite(stats["mean_loss"])
  assert ranks_before.mean() > 5, "the untrained model already knows the world"
  assert ranks_after.mean() < 0.2 * ranks_before.mean()
  assert np.mean(ranks_after == 0) > 4 * max(np.mean(ranks_before == 0), 1 / PLANTED_ITEMS)
  assert loss_after < 0.5 * loss_before


def test_days_train_in_order_and_once(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 100, seed=1))
  write_day(workdir, DAY2, world_examples(DAY2, 70, seed=2), num_files=3)
  trainer = trainer_lib.Trainer(workdir, TINY)
  first = trainer.train_day(DAY1)
  again = trainer.train_day(DAY1)
  second = trainer.train_day(DAY2)

  assert (first["examples"], first["global_step"]) == (100, 4)
  assert again["status"] == "already_trained"
  assert (second["examples"], second["global_step"]) == (70, 7)
  assert trainer.train_day(DAY1)["status"] == "already_trained"
  assert trainer.position() == (DAY2, 70, True)
  # A new process sees the same state, from the checkpoint.
  assert trainer_lib.Trainer(workdir).position() == (DAY2, 70, True)


def test_unfinished_day_must_be_finished_first(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 100, seed=1))
  trainer = trainer_lib.Trainer(workdir, TINY)
  trainer._start_day(DAY1)  # pylint: disable=protected-access
  trainer._day_examples.assign(32)  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match="2024-03-01 stopped after 32 examples"):
    trainer.train_day(DAY2)


def test_empty_day_completes(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, [], num_files=1)
  trainer = trainer_lib.Trainer(workdir, TINY)
  stats = trainer.train_day(DAY1)
  assert (stats["examples"], stats["steps_this_run"], stats["mean_loss"]) == (0, 0, None)
  assert trainer.position() == (DAY1, 0, True)


def test_corrupt_example_file_fails_naming_the_day(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 200, seed=1))
  path = data.example_files(workdir, DAY1)[1]
  with open(path, "r+b") as f:
    f.seek(100)
    f.write(b"\x00garbage\xff" * 20)
  with pytest.raises(RuntimeError, match="data/2024-03-01: cannot read examples after"):
    trainer_lib.Trainer(workdir, TINY).train_day(DAY1)


def test_example_with_more_topics_than_weights_fails_naming_the_day(tmp_path):
  workdir = str(tmp_path)
  examples = world_examples(DAY1, 100, seed=1)
  examples[70]["item_topic_weights"] = [1.0]  # 2 topics, 1 weight; batch 3 (64..95)
  write_day(workdir, DAY1, examples)
  with pytest.raises(RuntimeError, match="data/2024-03-01: bad examples after example 64: "
                     ".*topics and weights differ in length: Example 6 of the batch"):
    trainer_lib.Trainer(workdir, TINY).train_day(DAY1)


def test_missing_day_names_directory(tmp_path):
  trainer = trainer_lib.Trainer(str(tmp_path), TINY)
  with pytest.raises(FileNotFoundError, match="data/2024-03-01"):
    trainer.train_day(DAY1)


def test_config_saved_then_incompatible_config_fails(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 40, seed=1))
  trainer_lib.Trainer(workdir, TINY).train_day(DAY1)
  with open(os.path.join(workdir, "config.json")) as f:
    assert ModelConfig.from_json(f.read()) == TINY

  changed = TINY.replace(embedding_dim=24, temperature=0.2)
  with pytest.raises(ValueError, match=r"embedding_dim: 16 != 24.*temperature: 0\.1 != 0\.2"):
    trainer_lib.Trainer(workdir, changed)
  # Run-time fields may change; the saved config is used when none is given.
  assert trainer_lib.Trainer(workdir, TINY.replace(batch_size=8)).config.batch_size == 8
  assert trainer_lib.Trainer(workdir).config == TINY
  # Checkpoints without their config: nobody can tell which model they are.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(ValueError, match="checkpoints without .*config.json"):
    trainer_lib.Trainer(workdir, TINY)
  with pytest.raises(FileNotFoundError, match="config.json: missing"):
    trainer_lib.load_model(workdir)


def test_nan_loss_stops_the_day_without_a_checkpoint_past_it(tmp_path):
  workdir = str(tmp_path)
  examples = world_examples(DAY1, 200, seed=1)
  examples[150]["reward"] = float("nan")  # in step 5 (examples 128..159)
  write_day(workdir, DAY1, examples)
  config = TINY.replace(checkpoint_every_steps=2)
  trainer = trainer_lib.Trainer(workdir, config)

  with pytest.raises(trainer_lib.DivergenceError, match="global step 5"):
    trainer.train_day(DAY1)

  checkpoints = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
  assert checkpoints.model_checkpoint_path.endswith("ckpt-4")
  restored = trainer_lib.Trainer(workdir)
  assert restored.position() == (DAY1, 128, False)
  assert restored.global_step == 4


def test_summaries_are_written(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 320, seed=1))
  trainer_lib.Trainer(workdir, TINY).train_day(DAY1)
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  assert {"loss", "examples_per_s", "in_batch_recall@1", "in_batch_recall@10",
          "estimator/p_mean", "estimator/minus_log_p_mean",
          "estimator/occupancy"} <= tags


@pytest.mark.parametrize("correction", ["exact", "none"])
def test_other_corrections_train(tmp_path, correction):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 96, seed=1))
  trainer = trainer_lib.Trainer(workdir, TINY.replace(correction=correction))
  stats = trainer.train_day(DAY1)
  assert stats["examples"] == 96 and np.isfinite(stats["mean_loss"])
  assert (trainer.model.estimator is None) == (correction == "none")


def test_strategy_passthrough(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 96, seed=1))
  trainer = trainer_lib.Trainer(workdir, TINY,
                                strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert trainer.train_day(DAY1)["examples"] == 96


def test_load_model_restores_trained_weights(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 96, seed=1))
  trainer = trainer_lib.Trainer(workdir, TINY)
  trainer.train_day(DAY1)
  batch = batch_of(world_examples(DAY2, 8, seed=2))
  loaded, position = trainer_lib.load_model(workdir)
  assert position == trainer.trained_position() == trainer_lib.checkpoint_position(workdir)
  assert (position.day, position.examples, position.complete, position.global_step) == (
      DAY1, 96, True, 3)
  assert position.checkpoint == os.path.join(workdir, "checkpoints", "ckpt-3")
  np.testing.assert_allclose(loaded.query_tower(batch), trainer.model.query_tower(batch),
                             atol=1e-6)
  np.testing.assert_allclose(loaded.candidate_tower(batch),
                             trainer.model.candidate_tower(batch), atol=1e-6)
  assert loaded.config == TINY


def test_checkpoint_position_reads_the_trainers_keys(tmp_path):
  workdir = str(tmp_path / "w")
  with pytest.raises(FileNotFoundError, match="checkpoints: no checkpoint"):
    trainer_lib.checkpoint_position(workdir)
  write_day(workdir, DAY1, world_examples(DAY1, 100, seed=1))
  trainer = trainer_lib.Trainer(workdir, TINY.replace(checkpoint_every_steps=2))
  trainer.train_day(DAY1)  # 4 steps: checkpoints 2, 4 (mid-day) and 4 (complete)
  first = os.path.join(workdir, "checkpoints", "ckpt-2")
  assert trainer_lib.checkpoint_position(workdir, first) == trainer_lib.TrainedPosition(
      day=DAY1, examples=64, complete=False, global_step=2, checkpoint=first)
  assert trainer_lib.checkpoint_position(workdir) == trainer.trained_position()
  assert trainer.trained_position().to_json() == {
      "day": "2024-03-01", "examples": 100, "complete": True, "global_step": 4,
      "checkpoint": os.path.join(workdir, "checkpoints", "ckpt-4")}

  other = str(tmp_path / "other")
  tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1)),
                             Workdir(other).checkpoints_dir, max_to_keep=1).save()
  with pytest.raises(ValueError, match="ckpt-1: not a trainer checkpoint, it lacks"):
    trainer_lib.checkpoint_position(other)


def test_window_shuffle_is_a_reproducible_permutation_within_windows(tmp_path):
  workdir = str(tmp_path)
  examples = world_examples(DAY1, 50, seed=1)
  write_day(workdir, DAY1, examples)
  files = data.example_files(workdir, DAY1)

  def times(skip=0):  # timestamps are unique here: they identify the examples
    return [t for batch in data.training_batches(
        files, 7, skip=skip, shuffle_buffer=10, seed=3) for t in batch["timestamp"].numpy()]

  order = times()
  assert order != [e["timestamp"] for e in examples]
  for w in range(5):
    assert sorted(order[10 * w:10 * w + 10]) == [e["timestamp"]
                                                 for e in examples[10 * w:10 * w + 10]]
  assert times(skip=13) == order[13:]


KILL_CONFIG = TINY.replace(checkpoint_every_steps=4, batch_size=8)  # 200 examples: 25 steps


def _kill_worlds(tmp_path) -> tuple[str, str]:
  """Two workdirs with the same day and config: one to break, one for reference."""
  examples = world_examples(DAY1, 200, seed=1)
  broken, reference = str(tmp_path / "broken"), str(tmp_path / "reference")
  for workdir in (broken, reference):
    write_day(workdir, DAY1, examples)
    write_config(KILL_CONFIG, os.path.join(workdir, "config.json"))
  return broken, reference


def test_killed_process_resumes_without_retraining_or_skipping(tmp_path):
  """A real SIGKILL after step 20 (injected), then a rerun: the uninterrupted state.

  The day's mean loss counts the killed part too.
  """
  killed, reference = _kill_worlds(tmp_path)
  train_killed(killed, DAY1, 20)
  # Step 20 is a checkpoint step: saved before the kill, and nothing after it.
  state = tf.train.get_checkpoint_state(os.path.join(killed, "checkpoints"))
  assert os.path.basename(state.model_checkpoint_path) == "ckpt-20"
  interrupted = trainer_lib.Trainer(killed)
  assert interrupted.position() == (DAY1, 160, False)
  assert interrupted.global_step == 20

  stats = interrupted.train_day(DAY1)
  assert stats["status"] == "resumed"
  assert (stats["examples"], stats["examples_this_run"]) == (200, 40)
  assert (stats["steps_this_run"], stats["global_step"]) == (5, 25)

  uninterrupted = trainer_lib.Trainer(reference)
  whole = uninterrupted.train_day(DAY1)
  assert uninterrupted.position() == (DAY1, 200, True)
  assert stats["mean_loss"] == pytest.approx(whole["mean_loss"], rel=1e-5)
  assert_same_state(trainer_lib.Trainer(killed), uninterrupted)


def _train_command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "models.train", *args], cwd=REPO,
                        capture_output=True, text=True, check=False)


def _one_line_error(process: subprocess.CompletedProcess, *words: str) -> None:
  assert process.returncode == 2, (process.returncode, process.stderr[-3000:])
  lines = process.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), process.stderr[-3000:]
  for word in words:
    assert word in lines[0], (word, lines[0])


def test_train_command_refuses_bad_arguments_before_creating_anything(tmp_path):
  """A misspelt model field and a config of another model: one line, nothing written."""
  workdir = str(tmp_path / "w")
  _one_line_error(_train_command(f"--workdir={workdir}", f"--date={DAY1}",
                                 '--config_overrides={"embeding_dim": 8}'),
                  "unknown ModelConfig fields: ['embeding_dim']")
  assert not os.path.exists(workdir)
  os.makedirs(workdir)
  write_config(TINY, Workdir(workdir).config_path)
  _one_line_error(_train_command(f"--workdir={workdir}", f"--date={DAY1}",
                                 "--temperature=0.3", "--batch_size=4"),
                  "config.json: this workdir's model", "temperature: 0.1 != 0.3")
  assert os.listdir(workdir) == ["config.json"]


class _Killed(Exception):
  """Raised in place of the SIGKILL, to look at the trainer at that moment."""


def _raise_killed() -> None:
  raise _Killed()


@pytest.mark.parametrize("kill_after", [3, 7, 12])
def test_kill_after_step_stops_after_exactly_that_step(tmp_path, monkeypatch, kill_after):
  """Steps 3 and 7 are neither log (5) nor checkpoint (4) boundaries; 12 is one."""
  workdir, _ = _kill_worlds(tmp_path)
  trainer = trainer_lib.Trainer(workdir)
  monkeypatch.setattr(trainer_lib, "kill_self", _raise_killed)
  monkeypatch.setenv(trainer_lib.KILL_AFTER_STEP_ENV, str(kill_after))
  with pytest.raises(_Killed):
    trainer.train_day(DAY1)
  assert trainer.global_step == kill_after
  assert trainer.position() == (DAY1, 8 * kill_after, False)
  # Only a checkpoint step's state is held by a checkpoint.
  held = trainer.trained_position().checkpoint
  assert held == (os.path.join(workdir, "checkpoints", f"ckpt-{kill_after}")
                  if kill_after % 4 == 0 else None)
  saved = sorted(int(os.path.basename(p)[len("ckpt-"):-len(".index")]) for p in
                 glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")))
  assert saved == list(range(4, kill_after + 1, 4))[-3:]


def test_kill_after_step_must_be_an_integer(tmp_path, monkeypatch):
  workdir, _ = _kill_worlds(tmp_path)
  monkeypatch.setenv(trainer_lib.KILL_AFTER_STEP_ENV, "soon")
  with pytest.raises(ValueError, match="TOWERSTREAM_KILL_AFTER_STEP='soon'"):
    trainer_lib.Trainer(workdir).train_day(DAY1)


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  broken, reference = _kill_worlds(tmp_path)
  trainer_lib.Trainer(broken).train_day(DAY1)
  # Checkpoints at steps 20, 24 and the day's end, 25 (complete): break the last.
  directory = os.path.join(broken, "checkpoints")
  newest = tf.train.get_checkpoint_state(directory).model_checkpoint_path
  assert os.path.basename(newest) == "ckpt-25"
  _truncate(glob.glob(newest + ".data-*")[0])

  with caplog.at_level("WARNING"):
    restored = trainer_lib.Trainer(broken)
  assert any(newest in r.getMessage() for r in caplog.records), caplog.text
  assert os.path.basename(restored.restored) == "ckpt-24"
  assert restored.position() == (DAY1, 192, False)
  assert restored.global_step == 24
  # load_model (serving) falls back the same way, to the same weights.
  loaded, position = trainer_lib.load_model(broken)
  assert position == restored.trained_position()
  assert (position.day, position.examples, position.complete, position.global_step) == (
      DAY1, 192, False, 24)
  assert position.checkpoint == restored.restored
  batch = batch_of(world_examples(DAY2, 8, seed=2))
  np.testing.assert_allclose(loaded.candidate_tower(batch),
                             restored.model.candidate_tower(batch), atol=1e-6)

  stats = restored.train_day(DAY1)
  assert (stats["status"], stats["examples_this_run"], stats["steps_this_run"]) == (
      "resumed", 8, 1)
  uninterrupted = trainer_lib.Trainer(reference)
  whole = uninterrupted.train_day(DAY1)
  assert stats["mean_loss"] == pytest.approx(whole["mean_loss"], rel=1e-5)
  assert_same_state(trainer_lib.Trainer(broken), uninterrupted)


def test_no_restorable_checkpoint_names_the_directory(tmp_path):
  workdir, _ = _kill_worlds(tmp_path)
  trainer_lib.Trainer(workdir).train_day(DAY1)
  directory = os.path.join(workdir, "checkpoints")
  for path in glob.glob(os.path.join(directory, "ckpt-*.data-*")):
    _truncate(path)
  message = re.escape(f"{directory}: none of its 3 checkpoints can be restored")
  with pytest.raises(RuntimeError, match=message):
    trainer_lib.Trainer(workdir)
  with pytest.raises(RuntimeError, match=message):
    trainer_lib.load_model(workdir)


def test_checkpoint_from_before_the_day_loss_was_kept_still_restores(tmp_path,
                                                                     monkeypatch):
  """Checkpoints without day_loss_sum/day_loss_steps: the resumed part's mean."""
  old, new = _kill_worlds(tmp_path)
  trainer = trainer_lib.Trainer(old)
  monkeypatch.setattr(trainer_lib, "kill_self", _raise_killed)
  monkeypatch.setenv(trainer_lib.KILL_AFTER_STEP_ENV, "12")
  with pytest.raises(_Killed):
    trainer.train_day(DAY1)
  monkeypatch.delenv(trainer_lib.KILL_AFTER_STEP_ENV)
  # The checkpoint layout of before: the position, no loss of the day.
  # pylint: disable=protected-access
  layout = tf.train.Checkpoint(
      model=trainer.model, optimizer=trainer.optimizer, day=trainer._day,
      day_examples=trainer._day_examples, day_complete=trainer._day_complete)
  # pylint: enable=protected-access
  manager = tf.train.CheckpointManager(layout, os.path.join(new, "checkpoints"),
                                       max_to_keep=3)
  manager.save(checkpoint_number=12)

  resumed = trainer_lib.Trainer(new)
  assert resumed.position() == (DAY1, 96, False) and resumed.global_step == 12
  stats = resumed.train_day(DAY1)
  assert (stats["status"], stats["steps_this_run"], stats["global_step"]) == (
      "resumed", 13, 25)
  assert np.isfinite(stats["mean_loss"])
