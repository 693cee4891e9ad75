"""The named steps of the day's Beam job: parse, dedupe, corpus, join, examples, stats.

Each step is a PTransform that a test can run on its own; `logs_to_tfrecords`
composes them (with `history.AttachHistories`) into the day. Elements that cross a
shuffle are typed, so Beam encodes `schema.Event` and `schema.CatalogItem` as tuples
of their fields (`EventCoder`, `CatalogItemCoder`) instead of pickling each one.

Counts travel as data, not as Beam metrics, so that stats.json is exact on every
runner: each step emits ((metric, file, detail), n) pairs and `ComputeStats` sums
them and checks that no input line was lost.
"""

import dataclasses
import datetime as dt
import functools
import json
import operator
from typing import Any, Iterable, Iterator, Mapping, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.io.filesystems import FileSystems
from apache_beam.typehints import trivial_inference

from models import features
from pipeline import io
from pipeline import schema

# Output tags.
DEAD_LETTERS = "dead_letters"
DUPLICATES = "duplicates"
UNKNOWN_ITEMS = "unknown_items"
SOURCES = "sources"

# Metrics: ((metric, file, detail), n) pairs summed by `ComputeStats`.
LINES = "lines"
DEAD = "dead_letters"
DUPLICATE = "duplicates"
EXAMPLES = "examples"
UNKNOWN_ITEM = "unknown_item_events"
CATALOG_LINES = "catalog_lines"
CATALOG_DEAD = "catalog_dead_letters"
CATALOG_ACCEPTED = "catalog_accepted"
CORPUS_ITEMS = "corpus_items"
USERS = "users"
HISTORY_USERS = "history_users"
WRITTEN = "written"

STATS_FILE = "stats.json"
HOURS = 24

Count = Tuple[Tuple[str, str, str], int]
# An event after the join, with its item's catalog entry (defaults when the item is
# not in the catalog).
JoinedEvent = Tuple[schema.Event, schema.CatalogItem]


class StatsMismatchError(RuntimeError):
  """Counts that must agree do not: a line was lost or written twice."""


class _FieldTupleCoder(coders.Coder):
  """Encodes a frozen dataclass as the tuple of its fields (all primitives)."""

  value_type: type = type(None)

  def __init__(self):
    self._fields = operator.attrgetter(
        *(f.name for f in dataclasses.fields(self.value_type)))
    self._tuple = coders.FastPrimitivesCoder()

  def encode(self, value: Any) -> bytes:
    return self._tuple.encode(self._fields(value))

  def decode(self, encoded: bytes) -> Any:
    return self.value_type(*self._tuple.decode(encoded))

  def is_deterministic(self) -> bool:
    return True

  def to_type_hint(self) -> type:
    return self.value_type

  def __eq__(self, other: object) -> bool:
    return type(self) is type(other)

  def __hash__(self) -> int:
    return hash(type(self))


class EventCoder(_FieldTupleCoder):
  value_type = schema.Event


class CatalogItemCoder(_FieldTupleCoder):
  value_type = schema.CatalogItem


beam.coders.registry.register_coder(schema.Event, EventCoder)
beam.coders.registry.register_coder(schema.CatalogItem, CatalogItemCoder)


def _encode_tagged(element: tuple[str, Any], tag: str, coder: coders.Coder
                   ) -> tuple[str, tuple[str, bytes]]:
  return element[0], (tag, coder.encode(element[1]))


class _TaggedValues:
  """One input's values in a co-grouped iterable, decoded as they are iterated.

  Re-iterable without holding the group in memory where the runner pages grouped
  values (Dataflow, Flink): a join can find an item's catalog entry and then
  stream its events, however hot the item.
  """

  def __init__(self, tagged: Iterable[tuple[str, bytes]], tag: str, coder: coders.Coder):
    self._tagged = tagged
    self._tag = tag
    self._coder = coder

  def __iter__(self) -> Iterator[Any]:
    for tag, data in self._tagged:
      if tag == self._tag:
        yield self._coder.decode(data)

  def __reduce__(self):
    # Should a runner encode it, it becomes the list of its values.
    return list, (list(self),)


def _decode_grouped(element: tuple[str, Iterable[tuple[str, bytes]]],
                    value_coders: Mapping[str, coders.Coder]
                    ) -> tuple[str, dict[str, Iterable[Any]]]:
  key, tagged = element
  return key, {tag: _TaggedValues(tagged, tag, coder) for tag, coder in value_coders.items()}


class EncodedCoGroupByKey(beam.PTransform):
  """{tag: (key, value)} -> (key, {tag: values}), like beam.CoGroupByKey.

  Values cross the shuffle as bytes, encoded with the coder of each input's
  declared value type. Two reasons: Beam's CoGroupByKey tags values in an untyped
  step, so Event and CatalogItem would be pickled (2.5x slower, 2x larger); and
  the DirectRunner holds a whole shuffle in memory as decoded values, where a
  bytes object costs a fraction of the objects it encodes.
  """

  def expand(self, inputs):
    value_coders = {}
    tagged = []
    for tag, pcoll in inputs.items():
      key_type, value_type = trivial_inference.key_value_types(pcoll.element_type)
      value_coders[tag] = beam.coders.registry.get_coder(value_type)
      tagged.append(pcoll | f"Encode[{tag}]" >> beam.Map(
          _encode_tagged, tag, value_coders[tag]).with_output_types(
              Tuple[key_type, Tuple[str, bytes]]))
    return (tagged
            | "Flatten" >> beam.Flatten()
            | "Group" >> beam.GroupByKey()
            | "Decode" >> beam.Map(_decode_grouped, value_coders))


class EncodedGroupByKey(beam.PTransform):
  """(key, value) -> (key, values): GroupByKey with `EncodedCoGroupByKey`'s encoding."""

  def expand(self, pcoll):
    return ({"values": pcoll}
            | "CoGroup" >> EncodedCoGroupByKey()
            | "Values" >> beam.Map(lambda kv: (kv[0], kv[1]["values"])))


def _check(line: io.RawLine, validate, max_line_bytes: int) -> Any:
  """Runs `validate` on a line, or rejects it unread when the reader had to cut it."""
  if line.size > max_line_bytes:
    return schema.Invalid(schema.LINE_TOO_LONG, f"{line.size} bytes > {max_line_bytes}")
  return validate(line.data)


def _dead_letter(line: io.RawLine, invalid: schema.Invalid) -> dict[str, Any]:
  return schema.dead_letter(line.data, line.file, line.line_number, invalid,
                            line_bytes=line.size)


@beam.typehints.with_output_types(Tuple[schema.Event, str, int])
class _ParseEventFn(beam.DoFn):
  """RawLine -> (Event, file, line number), or a dead-letter record."""

  def __init__(self, day: dt.date, max_skew_s: int, max_line_bytes: int):
    self._day = day
    self._max_skew_s = max_skew_s
    self._max_line_bytes = max_line_bytes

  def process(self, line: io.RawLine) -> Iterator[Any]:
    result = _check(line, functools.partial(
        schema.validate_event, day=self._day, max_skew_s=self._max_skew_s),
                    self._max_line_bytes)
    if isinstance(result, schema.Invalid):
      yield beam.pvalue.TaggedOutput(DEAD_LETTERS, _dead_letter(line, result))
    else:
      yield result, line.file, line.line_number


class ParseEvents(beam.PTransform):
  """RawLine -> `.events` (Event, file, line number) and `.dead_letters` (records).

  Every line lands in exactly one of the two. Events outside `day` by more than
  `max_skew_s` are dead letters (timestamp_out_of_partition).
  """

  def __init__(self, day: dt.date, max_skew_s: int = 3600,
               max_line_bytes: int = schema.MAX_LINE_BYTES):
    super().__init__()
    self._fn = _ParseEventFn(day, max_skew_s, max_line_bytes)

  def expand(self, lines):
    return lines | "Validate" >> beam.ParDo(self._fn).with_outputs(
        DEAD_LETTERS, main="events")


@beam.typehints.with_output_types(Tuple[schema.CatalogItem, str, int])
class _ParseCatalogFn(beam.DoFn):
  """RawLine -> (CatalogItem, file, line number), or a dead-letter record."""

  def __init__(self, max_line_bytes: int):
    self._max_line_bytes = max_line_bytes

  def process(self, line: io.RawLine) -> Iterator[Any]:
    result = _check(line, schema.validate_catalog, self._max_line_bytes)
    if isinstance(result, schema.Invalid):
      yield beam.pvalue.TaggedOutput(DEAD_LETTERS, _dead_letter(line, result))
    else:
      yield result, line.file, line.line_number


class ParseCatalog(beam.PTransform):
  """RawLine -> `.items` (CatalogItem, file, line number) and `.dead_letters`."""

  def __init__(self, max_line_bytes: int = schema.MAX_LINE_BYTES):
    super().__init__()
    self._fn = _ParseCatalogFn(max_line_bytes)

  def expand(self, lines):
    return lines | "Validate" >> beam.ParDo(self._fn).with_outputs(
        DEAD_LETTERS, main="items")


@beam.typehints.with_output_types(schema.Event)
class _KeepEarliestFn(beam.DoFn):
  """(event_id, copies) -> the earliest copy, its file on SOURCES, and each other
  copy's file on DUPLICATES.

  Earliest is by (timestamp, file, line number), so the survivor does not depend
  on the order in which copies arrive.
  """

  def process(self, element: tuple[str, Iterable[tuple[schema.Event, str, int]]]
              ) -> Iterator[Any]:
    _, copies = element
    copies = sorted(copies, key=lambda c: (c[0].timestamp, c[1], c[2]))
    event, file, _ = copies[0]
    yield event
    yield beam.pvalue.TaggedOutput(SOURCES, file)
    for _, duplicate_file, _ in copies[1:]:
      yield beam.pvalue.TaggedOutput(DUPLICATES, duplicate_file)


class DedupeEvents(beam.PTransform):
  """(Event, file, line) -> `.events` (one Event per event_id), `.sources` (the
  file of each kept event) and `.duplicates` (the file of each dropped copy).

  Every event kept becomes exactly one example, so `.sources` counts the examples
  of each file; the stats then check that many were written.
  """

  def expand(self, events):
    return (
        events
        | "ByEventId" >> beam.Map(lambda e: (e[0].event_id, e)).with_output_types(
            Tuple[str, Tuple[schema.Event, str, int]])
        | "Group" >> EncodedGroupByKey()
        | "KeepEarliest" >> beam.ParDo(_KeepEarliestFn()).with_outputs(
            SOURCES, DUPLICATES, main="events"))


def partition_up_to(day_iso: str, partition: str) -> bool:
  """Whether a partition name is a YYYY-MM-DD date on or before the day."""
  try:
    schema.parse_date(partition)
  except ValueError:
    return False
  return partition <= day_iso


def catalog_file_up_to(day_iso: str, path: str) -> bool:
  """Whether a catalog file is a data file of a partition dated on or before the day."""
  return io.is_data_file(path) and partition_up_to(day_iso, io.partition_of(path))


class _LatestLineFn(beam.CombineFn):
  """Keeps the catalog line that comes last in (partition, file, line) order."""

  def create_accumulator(self) -> Optional[tuple[tuple[str, str, int], schema.CatalogItem]]:
    return None

  def add_input(self, latest, entry):
    return entry if latest is None or entry[0] > latest[0] else latest

  def merge_accumulators(self, accumulators):
    latest = None
    for accumulator in accumulators:
      if accumulator is not None:
        latest = self.add_input(latest, accumulator)
    return latest

  def extract_output(self, latest) -> schema.CatalogItem:
    return latest[1]


class LatestCatalog(beam.PTransform):
  """(CatalogItem, file, line) -> (item_id, CatalogItem): the corpus.

  The latest line for an item wins: partition date first (files sit in
  YYYY-MM-DD directories), then file name, then line number.
  """

  def expand(self, items):
    return (
        items
        | "ByItemId" >> beam.Map(
            lambda e: (e[0].item_id, ((io.partition_of(e[1]), e[1], e[2]), e[0])))
        | "Latest" >> beam.CombinePerKey(_LatestLineFn()).with_output_types(
            Tuple[str, schema.CatalogItem]))


@beam.typehints.with_output_types(JoinedEvent)
class _JoinItemFn(beam.DoFn):
  """(item_id, {events, corpus}) -> each event with its item; unknown items counted.

  Holds the item's catalog entry, not its events.
  """

  def process(self, element: tuple[str, Mapping[str, Iterable[Any]]]) -> Iterator[Any]:
    item_id, grouped = element
    entries = list(grouped["corpus"])
    item = entries[0] if entries else schema.CatalogItem(item_id=item_id)
    for event in grouped["events"]:
      if not entries:
        yield beam.pvalue.TaggedOutput(UNKNOWN_ITEMS, item_id)
      yield event, item


class JoinCatalog(beam.PTransform):
  """{"events": Event, "corpus": (item_id, CatalogItem)} -> `.events` (Event,
  CatalogItem) and `.unknown_items` (the item id of each event whose item is not in
  the corpus; the event keeps that id and gets default item features)."""

  def expand(self, inputs):
    events = inputs["events"] | "ByItemId" >> beam.Map(
        lambda e: (e.item_id, e)).with_output_types(Tuple[str, schema.Event])
    return (
        {"events": events, "corpus": inputs["corpus"]}
        | "CoGroup" >> EncodedCoGroupByKey()
        | "Join" >> beam.ParDo(_JoinItemFn()).with_outputs(UNKNOWN_ITEMS, main="events"))


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
  hour = min(max((timestamp - start) // 3600, 0), HOURS - 1)
  return f"examples-{hour:02d}.tfrecord.gz"


def hour_shards() -> list[str]:
  return [f"examples-{hour:02d}.tfrecord.gz" for hour in range(HOURS)]


def _to_example(element: tuple[schema.Event, schema.CatalogItem, Tuple[str, ...], str],
                day: dt.date) -> tuple[str, tuple[tuple[int, str], bytes]]:
  event, item, history, seed = element
  return (hour_shard(day, event.timestamp),
          ((event.timestamp, event.event_id),
           serialize(example_features(event, item, history, seed))))


class ToExamples(beam.PTransform):
  """(Event, item, history, seed) -> (hourly file, ((timestamp, event_id), Example))."""

  def __init__(self, day: dt.date):
    super().__init__()
    self._day = day

  def expand(self, events):
    return events | "Serialize" >> beam.Map(_to_example, self._day)


class WriteExamples(beam.PTransform):
  """Keyed examples -> `directory`/examples-HH.tfrecord.gz, each sorted by
  (timestamp, event_id): reading the files in name order gives time order.

  Sorting is external (`io.WriteSortedShards`, runs in `scratch_dir`), so an hour
  need not fit in a worker's memory. Returns written counts.
  """

  def __init__(self, directory: str, scratch_dir: str):
    super().__init__()
    self._directory = directory
    self._scratch_dir = scratch_dir

  def expand(self, examples):
    return examples | "Shards" >> io.WriteSortedShards(
        self._directory, hour_shards(), self._scratch_dir)


class WriteCorpus(beam.PTransform):
  """(item_id, CatalogItem) -> corpus-SSSSS-of-NNNNN.tfrecord.gz of item_* Examples,
  sharded by a stable hash of the item id and sorted by it. Returns written counts."""

  def __init__(self, directory: str, num_shards: int, scratch_dir: str):
    super().__init__()
    self._directory = directory
    self._names = io.shard_names("corpus", num_shards, ".tfrecord.gz")
    self._scratch_dir = scratch_dir

  def expand(self, corpus):
    names = self._names
    return (
        corpus
        | "Serialize" >> beam.Map(lambda kv: (
            names[io.shard_of(kv[0], len(names))],
            (kv[0], serialize(item_features(kv[1])))))
        | "Shards" >> io.WriteSortedShards(self._directory, names, self._scratch_dir))


class WriteDeadLetters(beam.PTransform):
  """Dead-letter records -> `prefix`-SSSSS-of-NNNNN.jsonl, sorted by (file, line).
  Returns written counts."""

  def __init__(self, directory: str, prefix: str, scratch_dir: str, num_shards: int = 1):
    super().__init__()
    self._directory = directory
    self._names = io.shard_names(prefix, num_shards, ".jsonl")
    self._scratch_dir = scratch_dir

  def expand(self, records):
    names = self._names
    return (
        records
        | "Serialize" >> beam.Map(lambda r: (
            names[io.shard_of(r["file"], len(names))],
            ((r["file"], r["line_number"]),
             json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8"))))
        | "Shards" >> io.WriteSortedShards(self._directory, names, self._scratch_dir))


class CountBy(beam.PTransform):
  """Elements -> ((metric, file, detail), n), with `key_fn(element) -> (file, detail)`."""

  def __init__(self, metric: str, key_fn=lambda file: (file, "")):
    super().__init__()
    self._metric = metric
    self._key_fn = key_fn

  def expand(self, elements):
    metric, key_fn = self._metric, self._key_fn
    return (elements
            | "Key" >> beam.Map(lambda e: ((metric, *key_fn(e)), 1))
            | "Sum" >> beam.CombinePerKey(sum))


def _by_file(counts: Mapping[tuple[str, str, str], int], metric: str) -> dict[str, int]:
  out: dict[str, int] = {}
  for (name, file, _), n in counts.items():
    if name == metric:
      out[file] = out.get(file, 0) + n
  return out


def _by_detail(counts: Mapping[tuple[str, str, str], int], metric: str,
               file: Optional[str] = None) -> dict[str, int]:
  out: dict[str, int] = {}
  for (name, f, detail), n in counts.items():
    if name == metric and (file is None or f == file):
      out[detail] = out.get(detail, 0) + n
  return dict(sorted(out.items()))


def assemble_stats(pairs: Iterable[Count], context: Mapping[str, Any]) -> dict[str, Any]:
  """Builds stats.json from summed counts and checks that nothing was lost.

  Raises:
    StatsMismatchError: input lines != examples + duplicates + dead letters (for a
      file or overall), or what was written differs from what was counted.
  """
  counts = {key: n for key, n in pairs}
  lines = _by_file(counts, LINES)
  examples = _by_file(counts, EXAMPLES)
  duplicates = _by_file(counts, DUPLICATE)
  dead = _by_file(counts, DEAD)
  files = {}
  for file in sorted(set(lines) | set(examples) | set(duplicates) | set(dead)):
    entry = {
        "lines": lines.get(file, 0),
        "examples": examples.get(file, 0),
        "duplicates": duplicates.get(file, 0),
        "dead_letters": dead.get(file, 0),
        "dead_letters_by_reason": _by_detail(counts, DEAD, file),
    }
    if entry["lines"] != entry["examples"] + entry["duplicates"] + entry["dead_letters"]:
      raise StatsMismatchError(f"{file}: lines != examples + duplicates + dead letters: "
                               f"{entry}")
    files[file] = entry

  catalog_lines = _by_file(counts, CATALOG_LINES)
  catalog_accepted = _by_file(counts, CATALOG_ACCEPTED)
  catalog_dead = _by_file(counts, CATALOG_DEAD)
  catalog_files = {}
  for file in sorted(set(catalog_lines) | set(catalog_accepted) | set(catalog_dead)):
    entry = {
        "lines": catalog_lines.get(file, 0),
        "accepted": catalog_accepted.get(file, 0),
        "dead_letters": catalog_dead.get(file, 0),
        "dead_letters_by_reason": _by_detail(counts, CATALOG_DEAD, file),
    }
    if entry["lines"] != entry["accepted"] + entry["dead_letters"]:
      raise StatsMismatchError(f"{file}: catalog lines != accepted + dead letters: {entry}")
    catalog_files[file] = entry

  written = _by_detail(counts, WRITTEN)
  total = lambda mapping: sum(mapping.values())  # noqa: E731
  corpus_items = total(_by_file(counts, CORPUS_ITEMS))
  history_users = total(_by_file(counts, HISTORY_USERS))
  examples_by_file = {name: n for name, n in written.items() if name.startswith("examples-")}
  checks = {
      "examples": (total(examples), total(examples_by_file)),
      "corpus": (corpus_items, sum(n for name, n in written.items()
                                   if name.startswith("corpus-"))),
      "dead letters": (total(dead) + total(catalog_dead),
                       sum(n for name, n in written.items()
                           if name.startswith("dead_letter-"))),
      "histories": (history_users, sum(n for name, n in written.items()
                                       if name.startswith("part-"))),
  }
  for what, (counted, wrote) in checks.items():
    if counted != wrote:
      raise StatsMismatchError(f"{what}: counted {counted} but wrote {wrote}")

  return {
      **context,
      "input_lines": total(lines),
      "examples": total(examples),
      "duplicates": total(duplicates),
      "dead_letters": total(dead),
      "dead_letters_by_reason": _by_detail(counts, DEAD),
      "unknown_item_events": total(_by_file(counts, UNKNOWN_ITEM)),
      "users": total(_by_file(counts, USERS)),
      "history_users": history_users,
      "corpus_items": corpus_items,
      "examples_by_file": examples_by_file,
      "files": files,
      "catalog": {
          "lines": total(catalog_lines),
          "accepted": total(catalog_accepted),
          "superseded": total(catalog_accepted) - corpus_items,
          "dead_letters": total(catalog_dead),
          "dead_letters_by_reason": _by_detail(counts, CATALOG_DEAD),
          "files": catalog_files,
      },
  }


def _write_stats(pairs: list[Count], directory: str, context: Mapping[str, Any]
                 ) -> dict[str, Any]:
  stats = assemble_stats(pairs, context)
  with FileSystems.create(FileSystems.join(directory, STATS_FILE)) as f:
    f.write(json.dumps(stats, indent=2, sort_keys=True).encode("utf-8") + b"\n")
  return stats


class ComputeStats(beam.PTransform):
  """((metric, file, detail), n) pairs -> stats.json in `directory` (and its dict).

  Give it the writers' counts too: it then runs after them and checks them.
  """

  def __init__(self, directory: str, context: Mapping[str, Any]):
    super().__init__()
    self._directory = directory
    self._context = dict(context)

  def expand(self, counts):
    return (counts
            | "Sum" >> beam.CombinePerKey(sum)
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_stats, self._directory, self._context))
