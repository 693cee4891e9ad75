"""The day's counts and stats.json: what each step saw, and the check that no line was lost.

Counts travel as data, not as Beam metrics, so that stats.json is exact on every
runner: each step's elements become ((metric, file, detail), n) pairs (`CountMetric`,
`line_counts`, `written_counts`) and `ComputeStats` sums them in one combine, checks
that every input line is an example, a duplicate or a dead letter and that every
count was written, and writes stats.json.
"""

from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from core import workdir as workdir_lib
from pipeline import writers

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

# What the writers' counts are of: ((WRITTEN, output, shard), records).
OUT_EXAMPLES = "examples"
OUT_CORPUS = "corpus"
OUT_DEAD_LETTERS = "dead_letters"
OUT_HISTORIES = "histories"
OUT_CATALOG_STATE = "catalog_state"

STATS_FILE = workdir_lib.STATS

Count = Tuple[Tuple[str, str, str], int]


class StatsMismatchError(RuntimeError):
  """Counts that must agree do not: a line was lost or written twice."""


def file_key(element: str) -> tuple[str, str]:
  """The (file, detail) of an element that is a file name."""
  return element, ""


def source_key(element: tuple[Any, str, int]) -> tuple[str, str]:
  """The (file, detail) of a parsed (value, file, line number)."""
  return element[1], ""


def day_key(element: Any) -> tuple[str, str]:
  """One (file, detail) for every element: a count of the whole day."""
  return "", ""


def reason_key(record: Mapping[str, Any]) -> tuple[str, str]:
  """The (file, detail) of a dead-letter record: its file and its reason."""
  return record["file"], record["reason"]


class CountMetric(beam.PTransform):
  """Elements -> ((metric, file, detail), 1) each, with `key_fn(element) -> (file,
  detail)`: `ComputeStats` sums them (one combine for every metric, not one each)."""

  def __init__(self, metric: str, key_fn: Callable[[Any], tuple[str, str]] = file_key):
    super().__init__()
    self._metric = metric
    self._key_fn = key_fn

  def expand(self, elements):
    metric, key_fn = self._metric, self._key_fn
    return elements | "Key" >> beam.Map(lambda e: ((metric, *key_fn(e)), 1))


def line_counts(metric: str) -> Callable[[tuple[str, int]], Count]:
  """(file, lines) -> ((metric, file, ""), lines): `io.ReadLines`' line counts."""
  return lambda file_count: ((metric, file_count[0], ""), file_count[1])


def written_counts(output: str) -> Callable[[tuple[str, int]], Count]:
  """(shard, records) of a writer of `output` -> ((WRITTEN, output, shard), records)."""
  return lambda name_count: ((WRITTEN, output, name_count[0]), name_count[1])


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

  written = _by_file(counts, WRITTEN)
  total = lambda mapping: sum(mapping.values())  # noqa: E731
  corpus_items = total(_by_file(counts, CORPUS_ITEMS))
  history_users = total(_by_file(counts, HISTORY_USERS))
  checks = {
      "examples": (total(examples), written.get(OUT_EXAMPLES, 0)),
      "corpus": (corpus_items, written.get(OUT_CORPUS, 0)),
      "dead letters": (total(dead) + total(catalog_dead),
                       written.get(OUT_DEAD_LETTERS, 0)),
      "histories": (history_users, written.get(OUT_HISTORIES, 0)),
      "catalog state": (corpus_items, written.get(OUT_CATALOG_STATE, 0)),
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
      "examples_by_file": _by_detail(counts, WRITTEN, OUT_EXAMPLES),
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


class _SumCounts(beam.CombineFn):
  """((metric, file, detail), n) pairs -> their sums by key, as a list of pairs."""

  def create_accumulator(self) -> dict[tuple[str, str, str], int]:
    return {}

  def add_input(self, sums: dict[tuple[str, str, str], int], pair: Count
                ) -> dict[tuple[str, str, str], int]:
    key, n = pair
    sums[key] = sums.get(key, 0) + n
    return sums

  def merge_accumulators(self, accumulators: Iterable[dict[tuple[str, str, str], int]]
                         ) -> dict[tuple[str, str, str], int]:
    accumulators = iter(accumulators)
    sums = next(accumulators)
    for more in accumulators:
      for key, n in more.items():
        sums[key] = sums.get(key, 0) + n
    return sums

  def extract_output(self, sums: dict[tuple[str, str, str], int]) -> list[Count]:
    return sorted(sums.items())


class ComputeStats(beam.PTransform):
  """((metric, file, detail), n) pairs -> stats.json in `directory` (and its dict).

  Give it the writers' counts too: it then runs after them and checks them. Its
  input is never empty (every log file read has a line count).
  """

  def __init__(self, directory: str, context: Mapping[str, Any]):
    super().__init__()
    self._directory = directory
    self._context = dict(context)

  def expand(self, counts):
    return (counts
            | "Sum" >> beam.CombineGlobally(_SumCounts()).without_defaults()
            | "Write" >> beam.Map(_write_stats, self._directory, self._context))


def _write_stats(pairs: list[Count], directory: str, context: Mapping[str, Any]
                 ) -> dict[str, Any]:
  stats = assemble_stats(pairs, context)
  writers.write_json(FileSystems.join(directory, STATS_FILE), stats)
  return stats
