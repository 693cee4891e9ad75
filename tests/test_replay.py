"""Replay (ModelConfig.replay_days, epochs_per_day): what day D's stream holds, that
it never reads past D, that it resumes exactly, and test-then-train in the daily job."""

import datetime
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from core.workdir import Workdir
from models import data
from models.config import write_config
from models import trainer as trainer_lib
from trainer_testlib import assert_same_state
from trainer_testlib import TINY
from trainer_testlib import train_killed
from trainer_testlib import world_examples
from trainer_testlib import write_day

D1, D2, D3 = (datetime.date(2024, 3, 1), datetime.date(2024, 3, 2),
              datetime.date(2024, 3, 3))
REPLAY = TINY.replace(replay_days=2, epochs_per_day=2, batch_size=8)
POISON = "i_poison"


def _timestamps(batches: tf.data.Dataset) -> list[int]:
  """The stream's examples by timestamp (unique across the test days' examples)."""
  return [int(t) for batch in batches for t in batch["timestamp"].numpy()]


def _poisoned(day: datetime.date, n: int) -> list[dict]:
  """Examples whose every item (target, seed, history) is the poison id."""
  examples = world_examples(day, n, seed=9)
  for e in examples:
    e.update(item_id=POISON, seed_item_id=POISON, history_item_ids=[POISON])
  return examples


def _three_days(workdir: str) -> tuple[list[dict], list[dict]]:
  """D1 (23 examples), D2 (17) and D3 (all poison) on disk; returns D1's and D2's."""
  first, second = world_examples(D1, 23, seed=1), world_examples(D2, 17, seed=2)
  write_day(workdir, D1, first)
  write_day(workdir, D2, second, num_files=3)
  write_day(workdir, D3, _poisoned(D3, 40))
  return first, second


def _window(workdir: str, day: datetime.date, replay_days: int) -> list[data.DayFiles]:
  return [data.day_files(workdir, d, seed=0)
          for d in data.replay_window(workdir, day, replay_days)]


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_stream_is_the_window_in_time_order_epochs_times_and_skips_exactly(
    tmp_path, shuffle_buffer):
  """Both ways of reading (streamed: 1 epoch; parsed once: 2) give D1 then D2, and
  from any position the rest of the very same stream."""
  workdir = str(tmp_path)
  first, second = _three_days(workdir)
  window = _window(workdir, D2, 2)
  assert [d.directory for d in window] == [Workdir(workdir).data_dir(d) for d in (D1, D2)]
  times = {day: [e["timestamp"] for e in examples]
           for day, examples in ((D1, first), (D2, second))}
  wholes = {}
  for epochs in (1, 2):
    def stream(skip: int, batch_size: int = 5, epochs: int = epochs) -> tf.data.Dataset:
      return data.stream_batches(window, batch_size, skip=skip, epochs=epochs,
                                 max_history=TINY.max_history,
                                 shuffle_buffer=shuffle_buffer)
    whole = _timestamps(stream(0))
    assert len(whole) == epochs * 40
    for e in range(epochs):
      part = whole[40 * e:40 * e + 40]
      # Each day on its own, in order (shuffled only within windows of that day).
      assert sorted(part[:23]) == times[D1] and sorted(part[23:]) == times[D2]
      if not shuffle_buffer:
        assert part == times[D1] + times[D2]
    # Mid-batch, at and after the day boundary (23), at and after the epoch's (40),
    # in the replayed D1 of epoch 2, at the end.
    for skip in (6, 23, 24, 40, 47, 80)[:4 if epochs == 1 else 6]:
      assert _timestamps(stream(skip, batch_size=7)) == whole[skip:], skip
    sizes = [int(b["item_id"].shape[0]) for b in stream(3)]
    assert sizes == [5] * (len(sizes) - 1) + [(epochs * 40 - 3) % 5 or 5]
    wholes[epochs] = whole
  assert wholes[2] == wholes[1] + wholes[1]  # the same epoch, read either way


def test_replay_epochs_parse_the_window_once(tmp_path):
  """Two epochs read and parse the files once: the stream outlives them."""
  workdir = str(tmp_path)
  first, second = _three_days(workdir)
  window = _window(workdir, D2, 2)
  batches = data.stream_batches(window, 8, epochs=2, max_history=TINY.max_history)
  for d in window:
    for path in d.files:
      os.remove(path)
  expected = [e["timestamp"] for e in first + second]
  assert _timestamps(batches) == expected + expected


def test_position_past_the_parsed_stream_fails(tmp_path):
  """A checkpoint further into the stream than W/data now holds: it changed since."""
  workdir = str(tmp_path)
  _three_days(workdir)
  with pytest.raises(RuntimeError, match=r"data/2024-03-02: the checkpoint consumed 81 "
                     r"examples of a stream of 2 x 40: .* changed since"):
    data.stream_batches(_window(workdir, D2, 2), 8, skip=81, epochs=2)


def test_train_day_replays_the_window_and_never_a_later_day(tmp_path):
  """D3 is on disk but after D2: training D2 never reads it (its item stays untouched)."""
  workdir = str(tmp_path)
  first, second = _three_days(workdir)
  trainer = trainer_lib.Trainer(workdir, REPLAY)
  table = trainer.model.candidate_tower.item_embedding
  seen = {i for e in first + second for i in (e["item_id"], e["seed_item_id"],
                                             *e["history_item_ids"]) if i}
  poison_row = int(table.bucket(tf.constant(POISON)))
  assert poison_row not in {int(b) for b in table.bucket(tf.constant(sorted(seen)))}
  d2_row = int(table.bucket(tf.constant(second[-1]["item_id"])))
  rows = table.embedding.embeddings
  before = rows.numpy()

  stats = trainer.train_day(D2)

  assert (stats["examples"], stats["window_examples"]) == (2 * (23 + 17), 23 + 17)
  assert (stats["window_days"], stats["epochs"]) == (["2024-03-01", "2024-03-02"], 2)
  # Every batch of the stream is a global step: the estimator sees each.
  assert stats["global_step"] == stats["steps_this_run"] == math.ceil(80 / 8)
  after = rows.numpy()
  np.testing.assert_array_equal(after[poison_row], before[poison_row])
  assert np.abs(after[d2_row] - before[d2_row]).max() > 0  # the check can fail
  assert trainer.position() == (D2, 80, True)


def test_window_is_the_last_data_partitions_not_calendar_days(tmp_path):
  """30-day partitions: the last N partitions with data, whatever the calendar gap."""
  workdir = str(tmp_path)
  days = [datetime.date(2024, 1, 1), datetime.date(2024, 1, 31),
          datetime.date(2024, 3, 1)]
  sizes = (11, 13, 17)
  for day, n, seed in zip(days, sizes, (1, 2, 3)):
    write_day(workdir, day, world_examples(day, n, seed=seed))
  # Neither a file with a date's name nor another directory is a data day.
  with open(os.path.join(workdir, "data", "2024-02-15"), "w") as f:
    f.write("not a partition")
  os.makedirs(os.path.join(workdir, "data", "tmp"))

  assert data.replay_window(workdir, days[2], 2) == days[1:]
  assert data.replay_window(workdir, days[2], 30) == days
  assert data.replay_window(workdir, days[1], 2) == days[:2]  # never a later day
  assert data.replay_window(workdir, days[0], 3) == days[:1]
  with pytest.raises(FileNotFoundError, match="data/2024-02-15: no data for 2024-02-15"):
    data.replay_window(workdir, datetime.date(2024, 2, 15), 2)

  trainer = trainer_lib.Trainer(workdir, TINY.replace(replay_days=2))
  stats = trainer.train_day(days[2])
  assert stats["window_days"] == ["2024-01-31", "2024-03-01"]
  assert stats["examples"] == stats["window_examples"] == 13 + 17


@pytest.mark.parametrize("epochs", [2, 1])
def test_unreadable_day_of_the_window_is_named(tmp_path, epochs):
  """A damaged replayed day fails naming it: parsed once (2 epochs), its own
  directory; streamed (1 epoch), the window's days."""
  workdir = str(tmp_path)
  _three_days(workdir)
  with open(data.example_files(workdir, D1)[0], "r+b") as f:
    f.seek(30)
    f.write(b"\x00garbage\xff" * 20)
  where = ("data/2024-03-01" if epochs == 2 else
           r"data/2024-03-02 \(the replay stream of 2024-03-02: "
           r"2024-03-01, 2024-03-02, 1 epochs\)")  # streamed: any day of the window
  with pytest.raises(RuntimeError, match=f"{where}: cannot read examples after example "):
    trainer_lib.Trainer(workdir, REPLAY.replace(epochs_per_day=epochs)).train_day(D2)


def test_killed_mid_stream_resumes_exactly(tmp_path):
  """A real SIGKILL in D2's second epoch, inside the replayed D1 and between
  checkpoints; the rerun ends where an uninterrupted run does.

  D1 trains 2 x 23 examples (6 steps of 8), D2 2 x (23 + 17) = 80 (10 steps):
  global steps 7..16. Killed after step 13 (checkpoint 12: D2's example 48, that
  is epoch 2's 8th example, in D1), the rerun restores step 12 and trains 4 steps.
  """
  config = REPLAY.replace(checkpoint_every_steps=4)
  killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
  for workdir in (killed, reference):
    _three_days(workdir)
    write_config(config, Workdir(workdir).config_path)
    trainer_lib.Trainer(workdir).train_day(D1)

  train_killed(killed, D2, 13)

  interrupted = trainer_lib.Trainer(killed)
  assert interrupted.position() == (D2, 48, False)
  assert interrupted.global_step == 12
  stats = interrupted.train_day(D2)
  assert (stats["status"], stats["examples"], stats["examples_this_run"]) == (
      "resumed", 80, 32)
  assert (stats["steps_this_run"], stats["global_step"]) == (4, 16)

  uninterrupted = trainer_lib.Trainer(reference)
  whole = uninterrupted.train_day(D2)
  assert whole["global_step"] == 16
  assert stats["mean_loss"] == pytest.approx(whole["mean_loss"], rel=1e-5)
  assert_same_state(trainer_lib.Trainer(killed), uninterrupted)


def test_daily_job_scores_each_day_before_replay_trains_on_it(tmp_path):
  """Two tiny synthetic days through the daily job with replay on: day 2 is scored
  by day 1's export, made from a model that had trained day 1's stream and nothing
  of day 2; then day 2's stream (days 1 and 2, twice) trains."""
  # Imported here: the rest of this module needs only models.
  from pipeline import daily_job  # pylint: disable=g-import-not-at-top
  from pipeline import synthetic_world  # pylint: disable=g-import-not-at-top
  from serving import versions  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path)
  first, second = datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)
  synthetic_world.generate(workdir, synthetic_world.WorldConfig(
      start_date=first, days=2, users=60, items=150, new_items_per_day=5,
      events_per_day=200, seed=5))
  config = TINY.replace(item_buckets=1024, replay_days=2, epochs_per_day=2)
  record = daily_job.run(workdir, first, second, config=config)
  day1, day2 = record[first.isoformat()], record[second.isoformat()]

  n1, n2 = day1["beam"]["examples"], day2["beam"]["examples"]
  assert (day1["train"]["window_days"], day1["train"]["examples"]) == (["2024-01-01"],
                                                                       2 * n1)
  assert day2["train"]["window_days"] == ["2024-01-01", "2024-01-02"]
  assert day2["train"]["examples"] == 2 * (n1 + n2)
  assert day2["train"]["global_step"] == day1["train"]["global_step"] + math.ceil(
      2 * (n1 + n2) / config.batch_size)

  assert "skipped" in day1["evaluate"]
  with open(os.path.join(Workdir(workdir).eval_dir(second), "metrics.json")) as f:
    scored_by = json.load(f)["exports"]
  assert set(scored_by) == {"exact", "scann"}
  for export in scored_by.values():
    assert export["exported_from_day"] == "2024-01-01"
    trained = versions.read_metadata(export["dir"])["trained"]
    # The model that scored day 2 had trained through day 1's stream, no further.
    assert trained["day"] == "2024-01-01" and trained["complete"]
    assert trained["global_step"] == day1["train"]["global_step"]
    assert trained["examples"] == day1["train"]["examples"]


def test_old_replay_days_are_a_seeded_draw_from_before_the_window(tmp_path):
  """replay_old_days: K days older than the window, the same draw for the same
  (seed, day), oldest first; never the window's days nor a day after D."""
  workdir = str(tmp_path)
  days = [datetime.date(2024, 1, 1) + datetime.timedelta(days=7 * i) for i in range(10)]
  for i, day in enumerate(days):
    write_day(workdir, day, world_examples(day, 3, seed=i))
  d = days[7]
  window = data.replay_window(workdir, d, 2)
  assert window == days[6:8]
  draws = [data.old_replay_days(workdir, d, window, 3, seed) for seed in range(8)]
  for drawn in draws:
    assert len(drawn) == 3 and drawn == sorted(drawn) and set(drawn) <= set(days[:6])
  assert draws[0] == data.old_replay_days(workdir, d, window, 3, 0)  # resumable
  assert len({tuple(x) for x in draws}) > 1  # the draw depends on the seed
  assert data.old_replay_days(workdir, d, window, 50, 0) == days[:6]  # all there are
  assert data.old_replay_days(workdir, d, window, 0, 0) == []
  assert data.old_replay_days(workdir, days[1], [days[1]], 4, 0) == days[:1]


def test_train_day_streams_old_days_first_then_the_window(tmp_path):
  """The stream of D2 with replay_old_days = 1 and replay_days = 1 is D1 then D2;
  the poisoned D3, after D2, is never read."""
  workdir = str(tmp_path)
  first, second = _three_days(workdir)
  trainer = trainer_lib.Trainer(workdir, REPLAY.replace(replay_days=1, replay_old_days=1))
  table = trainer.model.candidate_tower.item_embedding
  poison_row = int(table.bucket(tf.constant(POISON)))
  before = table.embedding.embeddings.numpy()[poison_row]

  stats = trainer.train_day(D2)

  assert stats["window_days"] == ["2024-03-01", "2024-03-02"]
  assert stats["window_examples"] == len(first) + len(second)
  np.testing.assert_array_equal(table.embedding.embeddings.numpy()[poison_row], before)
