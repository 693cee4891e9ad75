"""The catalog carried from day to day: `state/catalog/D` is the corpus after day D.

Day D's corpus is the latest line of every item in the catalog partitions dated up
to D. Instead of reading all of them again each day, day D reads the state of the
latest earlier day X, the corpus of X as one catalog line per item, and the
partitions dated after X up to D, and writes the state of D. Its cost then follows
the corpus and the day's new lines, not the number of partitions so far.

`state/catalog/D` holds part-SSSSS-of-NNNNN.jsonl.gz, one catalog line per item
(`state_line`, which `schema.validate_catalog` reads back as the same item),
sharded by a stable hash of the item id and sorted by it, and summary.json,
written last: {"day", "items", "shards", "catalog_files"}, where `catalog_files`
maps each catalog file the state holds ("YYYY-MM-DD/name", of a partition dated up
to D) to its [size, modification time].

The state's lines go through the catalog's own reader and parser, so the stats
count them like any catalog file, and they rank below every line of the partitions
read with them: a line's rank starts with its partition, and the state's is its
directory's name, X. A state is used only while the catalog files dated up to X
are still the ones it holds (same names, sizes and times); otherwise, and when no
earlier state exists, the day reads every partition up to D, as the first day does,
and its state starts afresh.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import posixpath
from typing import Any, Optional

from absl import logging
import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from core import workdir as workdir_lib
from pipeline import io
from pipeline import schema
from pipeline import writers

SUMMARY_FILE = "summary.json"
_SHARD_PREFIX = "part"
_SHARD_SUFFIX = ".jsonl.gz"

# {"YYYY-MM-DD/name": [size in bytes, modification time in seconds]}
CatalogFiles = dict[str, list[float]]


def state_root(paths: workdir_lib.Workdir) -> str:
  """W/state/catalog: the catalog states, one directory per day."""
  return paths.catalog_state_root


def state_dir(paths: workdir_lib.Workdir, day: dt.date) -> str:
  """W/state/catalog/D: the corpus after day D."""
  return paths.catalog_state_dir(day)


def _rfc3339(seconds: int) -> str:
  return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


def state_line(item: schema.CatalogItem) -> bytes:
  """An item as the catalog line that `schema.validate_catalog` reads back as it.

  `upload_ts` is written in RFC 3339: a large count of seconds would read back as
  milliseconds.

  Raises:
    ValueError: the line would be longer than the reader keeps (a catalog line
      near the limit whose numbers print longer than they were written).
  """
  obj = {"item_id": item.item_id, "channel_id": item.channel_id,
         "topics": list(item.topics), "topic_weights": list(item.topic_weights),
         "duration_s": item.duration_s, "upload_ts": _rfc3339(item.upload_ts)}
  line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  if len(line) > schema.MAX_LINE_BYTES:
    raise ValueError(f"catalog item {item.item_id!r} makes a state line of {len(line)} "
                     f"bytes, more than the {schema.MAX_LINE_BYTES} a line may have")
  return line


def _state_record(entry: tuple[str, schema.CatalogItem]) -> tuple[tuple[str], bytes]:
  """(item_id, item) -> its state line keyed for `writers.WriteShardedByKey`."""
  item_id, item = entry
  return (item_id,), state_line(item)


class WriteCatalogState(beam.PTransform):
  """(item_id, CatalogItem) -> part-SSSSS-of-NNNNN.jsonl.gz in `directory`.

  Returns the written (shard, items) counts. summary.json is `write_summary`'s, once
  the day's pipeline has succeeded.
  """

  def __init__(self, directory: str, scratch_dir: str, num_shards: int):
    super().__init__()
    self._write = writers.WriteShardedByKey(directory, _SHARD_PREFIX, num_shards,
                                            _SHARD_SUFFIX, scratch_dir)

  def expand(self, corpus):
    return corpus | "Serialize" >> beam.Map(_state_record) | "Shards" >> self._write


def catalog_files(catalog_root: str, through: dt.date) -> CatalogFiles:
  """The catalog's data files in partitions dated up to `through`, with their size
  and modification time (one listing of the whole catalog)."""
  files: CatalogFiles = {}
  pattern = FileSystems.join(catalog_root, "*", "*")
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    partition, name = io.partition_of(metadata.path), posixpath.basename(
        metadata.path.replace("\\", "/"))
    try:
      day = dt.date.fromisoformat(partition)
    except ValueError:
      continue
    if day <= through and workdir_lib.is_data_file(name):
      files[f"{partition}/{name}"] = [metadata.size_in_bytes,
                                      metadata.last_updated_in_seconds]
  return dict(sorted(files.items()))


@dataclasses.dataclass(frozen=True)
class CatalogPlan:
  """What day D reads of the catalog, and what its state will hold.

  Attributes:
    previous_state: the state directory read, or None (every partition is read).
    patterns: the files and patterns read: the state's shards, then one pattern per
      partition.
    partitions: the catalog partitions read (dated after the state's day, up to D).
    files: the catalog files the state of D holds (partitions up to D).
  """
  previous_state: Optional[str]
  patterns: tuple[str, ...]
  partitions: tuple[dt.date, ...]
  files: CatalogFiles


def _usable_shards(paths: workdir_lib.Workdir, state_day: dt.date, files: CatalogFiles
                   ) -> Optional[list[str]]:
  """The shard files of the state of `state_day` if it holds exactly today's catalog
  files up to its day and has all its shards; else None."""
  directory = state_dir(paths, state_day)
  held_summary = summary(paths, state_day)
  shards = [FileSystems.join(directory, name) for name in held_summary.get("shards", [])]
  missing = [shard for shard in shards if not FileSystems.exists(shard)]
  if missing or not shards:
    logging.warning("%s lacks %s: reading every catalog partition instead", directory,
                    missing[0] if missing else "its shards")
    return None
  held = held_summary.get("catalog_files")
  through = workdir_lib.partition_name(state_day)
  now = {name: value for name, value in files.items() if name[:10] <= through}
  if held == now:
    return shards
  held = held or {}
  changed = sorted(name for name in set(held) | set(now) if held.get(name) != now.get(name))
  logging.warning("%s holds other catalog files than %s has now up to %s (first %s): "
                  "reading every catalog partition instead", directory, paths.catalog,
                  through, changed[0])
  return None


def plan(paths: workdir_lib.Workdir, day: dt.date) -> CatalogPlan:
  """The catalog state and partitions that day `day` reads.

  Raises:
    io.PartitionLayoutError: a partition read holds files that would not be read.
  """
  files = catalog_files(paths.catalog, day)
  states = [d for d in workdir_lib.partition_files(state_root(paths), SUMMARY_FILE)
            if d < day]
  shards = _usable_shards(paths, states[-1], files) if states else None
  previous = states[-1] if shards else None
  partitions = [d for d in workdir_lib.partition_dates(paths.catalog)
                if d <= day and (previous is None or d > previous)]
  patterns = list(shards or [])
  for partition in partitions:
    io.partition_inputs(paths.catalog_dir(partition))
    patterns.append(FileSystems.join(paths.catalog_dir(partition), "*"))
  return CatalogPlan(previous_state=state_dir(paths, previous) if previous else None,
                     patterns=tuple(patterns), partitions=tuple(partitions), files=files)


def write_summary(directory: str, day: dt.date, items: int, num_shards: int,
                  files: CatalogFiles) -> None:
  """summary.json of a state whose `num_shards` shards are written (by
  `WriteCatalogState`): it makes the state usable."""
  writers.write_json(FileSystems.join(directory, SUMMARY_FILE), {
      "day": workdir_lib.partition_name(day), "items": items,
      "shards": writers.shard_names(_SHARD_PREFIX, num_shards, _SHARD_SUFFIX),
      "catalog_files": files})


def summary(paths: workdir_lib.Workdir, day: dt.date) -> dict[str, Any]:
  """The summary.json of the state of `day`."""
  with FileSystems.open(FileSystems.join(state_dir(paths, day), SUMMARY_FILE)) as f:
    return json.loads(f.read())
