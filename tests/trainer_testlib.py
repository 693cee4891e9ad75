"""Shared by the trainer tests (test_trainer, test_replay): a tiny config, a small
clustered world of examples, W/data days written by hand, and the comparison of
two trainers' whole state."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys

import numpy as np
import tensorflow as tf

from core.workdir import Workdir
from models import features
from models.config import ModelConfig, ONE_PASS
from models import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLUSTERS = 8

TINY = ModelConfig(
    embedding_dim=16, id_embedding_dim=16, feature_embedding_dim=4, item_buckets=500,
    user_buckets=200, channel_buckets=50, topic_buckets=50, category_buckets=10,
    query_hidden=(32,), candidate_hidden=(32,), temperature=0.1, batch_size=32,
    learning_rate=0.1, estimator_buckets=256, estimator_hashes=2,
    checkpoint_every_steps=10, log_every_steps=5, max_history=10, **ONE_PASS)


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
  directory = Workdir(workdir).data_dir(day)
  os.makedirs(directory, exist_ok=True)
  options = tf.io.TFRecordOptions(compression_type="GZIP")
  for f, chunk in enumerate(np.array_split(np.arange(len(examples)), num_files)):
    with tf.io.TFRecordWriter(os.path.join(directory, f"examples-{f:02d}.tfrecord.gz"),
                              options) as writer:
      for i in chunk:
        writer.write(features.to_example(examples[i]).SerializeToString())


def write_corpus(workdir: str, day: datetime.date, examples: list[dict]) -> None:
  """Writes W/data/D/corpus-00.tfrecord.gz: the distinct items of `examples`."""
  items = {}
  for e in examples:
    items.setdefault(e["item_id"], {name: e[name] for name in features.CANDIDATE_FEATURES})
  path = os.path.join(Workdir(workdir).data_dir(day), "corpus-00.tfrecord.gz")
  with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type="GZIP")) as w:
    for row in items.values():
      w.write(features.to_example(row).SerializeToString())


def state(trainer) -> list[np.ndarray]:
  return [v.numpy() for v in trainer.model.variables]


def assert_same_state(got, want) -> None:
  """Position, global step, estimator and weights of two trainers agree."""
  assert got.position() == want.position()
  assert got.global_step == want.global_step
  # The estimator's state is part of it: A (last step seen) matches exactly.
  np.testing.assert_array_equal(got.model.estimator.last_seen.numpy(),
                                want.model.estimator.last_seen.numpy())
  for a, b in zip(state(got), state(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def train_killed(workdir: str, day: datetime.date, kill_after: int) -> None:
  """Runs models.train on `day` in a subprocess that SIGKILLs itself after global
  step `kill_after` (the trainer's fault injection); asserts it was killed."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         trainer_lib.KILL_AFTER_STEP_ENV: str(kill_after)}
  process = subprocess.run(
      [sys.executable, "-m", "models.train", f"--workdir={workdir}", f"--date={day}"],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
