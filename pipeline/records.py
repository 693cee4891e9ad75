"""The records the day's Beam job writes: tf.train.Examples of events and items.

`example_features` and `item_features` spell the Example contract of
docs/design.md ("Examples") from the parsed schema; `serialize` makes their bytes
reproducible. Events go to hourly files (`ToExamples`), catalog items to the
corpus (`corpus_record`), both through `pipeline.writers`.
"""

import datetime as dt
from typing import Any, Mapping, Tuple

import apache_beam as beam

from models import features
from pipeline import schema

HOURS = 24
_HOUR_FILE = "examples-{:02d}.tfrecord.gz"


def item_features(item: schema.CatalogItem) -> dict[str, Any]:
  """The candidate-side Example features of a catalog item."""
  return {
      "item_id": item.item_id,
      "item_channel_id": item.channel_id,
      "item_topics": item.topics,
      "item_topic_weights": item.topic_weights,
      "item_duration_s": item.duration_s,
  }


def example_features(event: schema.Event, item: schema.CatalogItem,
                     history: Tuple[str, ...], seed: str) -> dict[str, Any]:
  """All Example features of one event (docs/design.md, "Examples")."""
  return {
      "event_id": event.event_id,
      "timestamp": event.timestamp,
      "user_id": event.user_id,
      "device": event.device,
      "country": event.country,
      "seed_item_id": seed,
      "history_item_ids": history,
      **item_features(item),
      "reward": event.reward,
  }


def serialize(values: Mapping[str, Any]) -> bytes:
  """A serialized Example whose bytes depend only on `values`.

  Protobuf map fields (Features.feature) serialize in an order that changes from
  process to process unless asked to be deterministic.
  """
  return features.to_example(values).SerializeToString(deterministic=True)


def hour_shard(day: dt.date, timestamp: int) -> str:
  """The hourly example file of an event; skewed events go to the first or last hour."""
  start, _ = schema.day_bounds(day)
  return _HOUR_FILE.format(min(max((timestamp - start) // 3600, 0), HOURS - 1))


def hour_shards() -> list[str]:
  """The day's 24 example files, in time order."""
  return [_HOUR_FILE.format(hour) for hour in range(HOURS)]


def _to_example(element: tuple[schema.Event, schema.CatalogItem, Tuple[str, ...], str],
                day: dt.date) -> tuple[str, tuple[tuple[int, str], bytes]]:
  event, item, history, seed = element
  return (hour_shard(day, event.timestamp),
          ((event.timestamp, event.event_id),
           serialize(example_features(event, item, history, seed))))


class ToExamples(beam.PTransform):
  """(Event, item, history, seed) -> (hourly file, ((timestamp, event_id), Example)),
  ready for `writers.WriteSortedShards` over `hour_shards()`: reading the files in
  name order, then record order, gives (timestamp, event_id) order."""

  def __init__(self, day: dt.date):
    super().__init__()
    self._day = day

  def expand(self, events):
    return events | "Serialize" >> beam.Map(_to_example, self._day)


def corpus_record(entry: tuple[str, schema.CatalogItem]) -> tuple[tuple[str], bytes]:
  """(item_id, item) -> its item_* Example keyed for `writers.WriteShardedByKey`."""
  item_id, item = entry
  return (item_id,), serialize(item_features(item))
