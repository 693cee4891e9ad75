"""Parsing and joining steps of the day's Beam job: lines to events and catalog items,
one event per event id, the latest catalog entry per item, and their join.

Each step is a PTransform that a test can run on its own; `pipeline.beam_day`
composes them into the day. Every input line lands either in a step's main output
or in its dead letters, whose records say why (`schema` reasons).
"""

import datetime as dt
import functools
import json
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Tuple

import apache_beam as beam

from pipeline import coders
from pipeline import io
from pipeline import schema
from pipeline import writers

# Output tags.
DEAD_LETTERS = "dead_letters"
DUPLICATES = "duplicates"
UNKNOWN_ITEMS = "unknown_items"
SOURCES = "sources"

# An event after the join, with its item's catalog entry (defaults when the item is
# not in the catalog).
JoinedEvent = Tuple[schema.Event, schema.CatalogItem]


class _ValidateLineFn(beam.DoFn):
  """RawLine -> (valid value, file, line number), or a dead-letter record.

  A line longer than `max_line_bytes` (the reader kept only its head) is rejected
  unread.
  """

  def __init__(self, validate: Callable[[bytes], Any], max_line_bytes: int):
    self._validate = validate
    self._max_line_bytes = max_line_bytes

  def process(self, line: io.RawLine) -> Iterator[Any]:
    if line.size > self._max_line_bytes:
      result = schema.Invalid(schema.LINE_TOO_LONG,
                              f"{line.size} bytes > {self._max_line_bytes}")
    else:
      result = self._validate(line.data)
    if isinstance(result, schema.Invalid):
      yield beam.pvalue.TaggedOutput(DEAD_LETTERS, schema.dead_letter(
          line.data, line.file, line.line_number, result, line_bytes=line.size))
    else:
      yield result, line.file, line.line_number


class _ParseLines(beam.PTransform):
  """RawLine -> `.<main>` (value, file, line number) and `.dead_letters` (records)."""

  main = ""
  value_type: type = object

  def __init__(self, validate: Callable[[bytes], Any], max_line_bytes: int):
    super().__init__()
    self._fn = _ValidateLineFn(validate, max_line_bytes)

  def expand(self, lines):
    return lines | "Validate" >> beam.ParDo(self._fn).with_output_types(
        Tuple[self.value_type, str, int]).with_outputs(DEAD_LETTERS, main=self.main)


class ParseEvents(_ParseLines):
  """RawLine -> `.events` (Event, file, line number) and `.dead_letters` (records).

  Every line lands in exactly one of the two. Events outside `day` by more than
  `max_skew_s` are dead letters (timestamp_out_of_partition).
  """

  main = "events"
  value_type = schema.Event

  def __init__(self, day: dt.date, max_skew_s: int = 3600,
               max_line_bytes: int = schema.MAX_LINE_BYTES):
    super().__init__(functools.partial(schema.validate_event, day=day,
                                       max_skew_s=max_skew_s), max_line_bytes)


class ParseCatalog(_ParseLines):
  """RawLine -> `.items` (CatalogItem, file, line number) and `.dead_letters`."""

  main = "items"
  value_type = schema.CatalogItem

  def __init__(self, max_line_bytes: int = schema.MAX_LINE_BYTES):
    super().__init__(schema.validate_catalog, max_line_bytes)


def dead_letter_record(record: Mapping[str, Any]) -> tuple[tuple[str, int], bytes]:
  """A dead-letter record keyed for `writers.WriteShardedByKey`: by (file, line), as
  one JSON line."""
  return ((record["file"], record["line_number"]),
          json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))


class WriteDeadLetters(beam.PTransform):
  """Dead-letter records -> `prefix`-00000-of-00001.jsonl in `directory`, sorted by
  (file, line). Returns written counts."""

  def __init__(self, directory: str, prefix: str, scratch_dir: str):
    super().__init__()
    self._write = writers.WriteShardedByKey(directory, prefix, 1, ".jsonl", scratch_dir)

  def expand(self, records):
    return (records
            | "Serialize" >> beam.Map(dead_letter_record)
            | "Shards" >> self._write)


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
        | "Group" >> coders.EncodedGroupByKey()
        | "KeepEarliest" >> beam.ParDo(_KeepEarliestFn()).with_outputs(
            SOURCES, DUPLICATES, main="events"))


def _line_order(entry: tuple[schema.CatalogItem, str, int]
                ) -> tuple[str, tuple[tuple[str, str, int], schema.CatalogItem]]:
  item, file, line = entry
  return item.item_id, ((io.partition_of(file), file, line), item)


# A line's rank and item, as `_line_order` makes them; None before any line.
_Ranked = Optional[tuple[tuple[str, str, int], schema.CatalogItem]]


class _LatestLineFn(beam.CombineFn):
  """(rank, item) lines of one item -> the item of the highest rank.

  What `beam.combiners.Top.PerKey(1)` then taking its one element computes, in
  one step and without its heap: a day carries the whole catalog through it.
  """

  def create_accumulator(self) -> _Ranked:
    return None

  def add_input(self, best: _Ranked, entry: _Ranked) -> _Ranked:
    return entry if best is None or entry[0] > best[0] else best

  def merge_accumulators(self, accumulators: Iterable[_Ranked]) -> _Ranked:
    best = None
    for entry in accumulators:
      if entry is not None:
        best = self.add_input(best, entry)
    return best

  def extract_output(self, best: _Ranked) -> schema.CatalogItem:
    return best[1]

  def get_accumulator_coder(self) -> beam.coders.Coder:
    return beam.coders.NullableCoder(beam.coders.TupleCoder(
        [beam.coders.FastPrimitivesCoder(), coders.CatalogItemCoder()]))


class LatestCatalog(beam.PTransform):
  """(CatalogItem, file, line) -> (item_id, CatalogItem): the corpus.

  The latest line for an item wins: partition date first (files sit in
  YYYY-MM-DD directories), then file name, then line number. No two lines share
  all three, so the winner does not depend on arrival order.
  """

  def expand(self, items):
    return (
        items
        | "ByItemId" >> beam.Map(_line_order)
        | "Latest" >> beam.CombinePerKey(_LatestLineFn())
        .with_output_types(Tuple[str, schema.CatalogItem]))


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
        | "CoGroup" >> coders.EncodedCoGroupByKey()
        | "Join" >> beam.ParDo(_JoinItemFn()).with_outputs(UNKNOWN_ITEMS, main="events"))
