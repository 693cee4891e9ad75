"""Tests of models/trainer.py and models/data.py on tiny TFRecord days."""

import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from models import data
from models import features
from models.config import ModelConfig
from models.config import write_config
from models.retrieval import in_batch_recall
from models import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY1 = datetime.date(2024, 3, 1)
DAY2 = datetime.date(2024, 3, 2)
NUM_CLUSTERS = 8

TINY = ModelConfig(
    embedding_dim=16, id_embedding_dim=16, feature_embedding_dim=4, item_buckets=500,
    user_buckets=200, channel_buckets=50, topic_buckets=50, category_buckets=10,
    query_hidden=(32,), candidate_hidden=(32,), temperature=0.1, batch_size=32,
    learning_rate=0.1, estimator_buckets=256, estimator_hashes=2,
    checkpoint_every_steps=10, log_every_steps=5, max_history=10)


def world_examples(day: datetime.date, n: int, seed: int) -> list[dict]:
  """A clustered world: users watch (popularity-skewed) items of their cluster.

  Item i is in cluster i % 8 with that cluster's channel and topic; user u
  prefers cluster u % 8 (90% of events). Histories and seeds are carried within
  the day, most recent first; timestamps increase.
  """
  rng = np.random.default_rng(seed)
  num_users, num_items = 40, 160
  start = int(datetime.datetime(day.year, day.month, day.day,
                                tzinfo=datetime.timezone.utc).timestamp())
  per_cluster = num_items // NUM_CLUSTERS
  popularity = 1.0 / np.arange(1, per_cluster + 1)
  popularity /= popularity.sum()
  histories: dict[int, list[str]] = {}
  out = []
  for i in range(n):
    user = int(rng.integers(num_users))
    cluster = user % NUM_CLUSTERS if rng.random() < 0.9 else int(rng.integers(NUM_CLUSTERS))
    item = cluster + NUM_CLUSTERS * int(rng.choice(per_cluster, p=popularity))
    history = histories.setdefault(user, [])
    out.append({
        "event_id": f"{day}-{i:06d}", "timestamp": start + i * 7, "user_id": f"u{user}",
        "device": ["ios", "android", "web"][user % 3], "country": "fr",
        "seed_item_id": history[0] if history else "",
        "history_item_ids": history[:TINY.max_history],
        "item_id": f"i{item}", "item_channel_id": f"c{cluster}",
        "item_topics": [f"t{cluster}", "all"], "item_topic_weights": [1.0, 0.25],
        "item_duration_s": float(60 + item), "reward": float(0.5 + rng.random()),
    })
    history.insert(0, f"i{item}")
  return out


def write_day(workdir: str, day: datetime.date, examples: list[dict],
              num_files: int = 2) -> None:
  """Writes W/data/D/examples-HH.tfrecord.gz, time order split across files."""
  directory = data.day_dir(workdir, day)
  os.makedirs(directory, exist_ok=True)
  options = tf.io.TFRecordOptions(compression_type="GZIP")
  for f, chunk in enumerate(np.array_split(np.arange(len(examples)), num_files)):
    with tf.io.TFRecordWriter(os.path.join(directory, f"examples-{f:02d}.tfrecord.gz"),
                              options) as writer:
      for i in chunk:
        writer.write(features.to_example(examples[i]).SerializeToString())


def batch_of(examples: list[dict]) -> dict[str, tf.Tensor]:
  return features.parse_examples(tf.constant(
      [features.to_example(e).SerializeToString() for e in examples]))


def probe(model, batch) -> tuple[float, float]:
  """(loss without updating the estimator, in-batch recall@5) of a fixed batch."""
  q, c = model(batch)
  return (float(model.compute_loss(batch, training=False)),
          float(in_batch_recall(q, c, batch["item_id"], 5)))


def test_short_training_lowers_loss_and_raises_in_batch_recall(tmp_path):
  workdir = str(tmp_path)
  write_day(workdir, DAY1, world_examples(DAY1, 2400, seed=1))
  held_out = batch_of(world_examples(DAY2, 64, seed=2))
  trainer = trainer_lib.Trainer(workdir, TINY)
  loss_before, recall_before = probe(trainer.model, held_out)

  stats = trainer.train_day(DAY1)

  loss_after, recall_after = probe(trainer.model, held_out)
  assert stats["status"] == "trained"
  assert stats["examples"] == 2400
  assert stats["steps_this_run"] == stats["global_step"] == 75
  assert loss_after < loss_before - 0.3
  assert recall_after > recall_before + 0.15
  assert np.isfinite(stats["mean_loss"])


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
  loaded = trainer_lib.load_model(workdir)
  np.testing.assert_allclose(loaded.query_tower(batch), trainer.model.query_tower(batch),
                             atol=1e-6)
  np.testing.assert_allclose(loaded.candidate_tower(batch),
                             trainer.model.candidate_tower(batch), atol=1e-6)
  assert loaded.config == TINY


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


def _state(trainer) -> list[np.ndarray]:
  return [v.numpy() for v in trainer.model.variables]


def test_killed_process_resumes_without_retraining_or_skipping(tmp_path):
  """A real kill -9 mid-day; the rerun ends in the uninterrupted run's state."""
  config = TINY.replace(checkpoint_every_steps=1, batch_size=8)
  examples = world_examples(DAY1, 1600, seed=1)
  killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
  for workdir in (killed, reference):
    write_day(workdir, DAY1, examples)
    write_config(config, os.path.join(workdir, "config.json"))

  command = [sys.executable, "-m", "models.trainer", f"--workdir={killed}",
             f"--date={DAY1}"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
  state_file = os.path.join(killed, "checkpoints", "checkpoint")
  deadline = time.monotonic() + 120
  try:
    while not os.path.exists(state_file) and process.poll() is None:
      assert time.monotonic() < deadline, "no checkpoint within 120 s"
      time.sleep(0.02)
    time.sleep(0.3)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert process.returncode == -signal.SIGKILL, "the day finished before the kill"
  interrupted = trainer_lib.Trainer(killed)
  day, consumed, complete = interrupted.position()
  assert day == DAY1 and 0 < consumed < 1600 and not complete
  assert interrupted.global_step * 8 == consumed
  del interrupted

  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
  stats = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert stats["status"] == "resumed"
  assert stats["examples"] == 1600
  assert stats["examples_this_run"] == 1600 - consumed
  assert stats["global_step"] == 200

  uninterrupted = trainer_lib.Trainer(reference)
  uninterrupted.train_day(DAY1)
  resumed = trainer_lib.Trainer(killed)
  assert resumed.position() == uninterrupted.position() == (DAY1, 1600, True)
  assert resumed.global_step == uninterrupted.global_step == 200
  # The estimator's state is part of it: A (last step seen) matches exactly.
  np.testing.assert_array_equal(resumed.model.estimator.last_seen.numpy(),
                                uninterrupted.model.estimator.last_seen.numpy())
  for got, want in zip(_state(resumed), _state(uninterrupted)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
