"""Typed shuffles of the day's Beam job: Events and catalog items cross as field tuples.

Elements that cross a shuffle are typed, so Beam encodes `schema.Event` and
`schema.CatalogItem` as tuples of their fields (`EventCoder`, `CatalogItemCoder`)
instead of pickling each one; `EncodedCoGroupByKey` keeps that encoding through a
co-group. Importing this module registers the coders.
"""

import dataclasses
import operator
from typing import Any, Iterable, Iterator, Mapping, Tuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.typehints import trivial_inference

from pipeline import schema


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

# The one tag of `EncodedGroupByKey`'s values.
_VALUES = "values"


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
    key_type, value_type = trivial_inference.key_value_types(pcoll.element_type)
    coder = beam.coders.registry.get_coder(value_type)
    return (pcoll
            | "Encode" >> beam.Map(_encode_tagged, _VALUES, coder).with_output_types(
                Tuple[key_type, Tuple[str, bytes]])
            | "Group" >> beam.GroupByKey()
            | "Decode" >> beam.MapTuple(
                lambda key, tagged: (key, _TaggedValues(tagged, _VALUES, coder)))
            .with_output_types(Tuple[key_type, Iterable[value_type]]))
