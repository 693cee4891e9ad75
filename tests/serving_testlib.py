"""Shared by the serving and evaluation tests: tiny configs and hand-made W/data days."""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, Mapping

import tensorflow as tf

from models import features
from models.config import ModelConfig

DAY = datetime.date(2024, 3, 5)


def tiny_config(**overrides: Any) -> ModelConfig:
  """A model small enough to train for a few hundred steps in seconds."""
  values = dict(embedding_dim=16, id_embedding_dim=16, feature_embedding_dim=4,
                item_buckets=4096, user_buckets=512, channel_buckets=64,
                topic_buckets=64, category_buckets=16, query_hidden=(32,),
                candidate_hidden=(32,), batch_size=32, optimizer="adam",
                learning_rate=0.02, correction="none", checkpoint_every_steps=10_000,
                log_every_steps=10_000, max_history=5)
  values.update(overrides)
  return ModelConfig(**values)


def write_records(path: str, rows: Iterable[Mapping[str, Any]]) -> str:
  """Writes Examples built from `rows` to a gzip TFRecord file."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path, options="GZIP") as writer:
    for row in rows:
      writer.write(features.to_example(row).SerializeToString())
  return path


def day_dir(workdir: str, day: datetime.date) -> str:
  return os.path.join(workdir, "data", day.isoformat())


def corpus_row(item: str) -> dict[str, Any]:
  return {"item_id": item, "item_channel_id": f"channel-{item[-1]}",
          "item_topics": ["t"], "item_topic_weights": [1.0], "item_duration_s": 60.0}


def event_row(event: str, user: str, item: str, seed: str = "",
              history: Iterable[str] = (), timestamp: int = 1_709_600_000) -> dict[str, Any]:
  return {"event_id": event, "timestamp": timestamp, "user_id": user, "device": "web",
          "country": "de", "seed_item_id": seed, "history_item_ids": list(history),
          **corpus_row(item), "reward": 1.0}
