"""Beam job: one day of raw logs -> time-ordered TFRecords, corpus, dead letters, stats
and the users' carried histories (docs/design.md, "The day, as data flows").

    python -m pipeline.logs_to_tfrecords --workdir=W --date=2024-01-01 [Beam options]

Reads `--logs`/D (default W/logs/D), every `--catalog` partition dated up to D
(default W/catalog) and the history state of the latest earlier day. Writes
    W/data/D/examples-HH.tfrecord.gz        24 files; name order, then record order,
                                            is (timestamp, event_id) order
    W/data/D/corpus-SSSSS-of-NNNNN.tfrecord.gz
    W/data/D/dead_letter-{logs,catalog}-SSSSS-of-NNNNN.jsonl
    W/data/D/stats.json                     input lines == examples + duplicates +
                                            dead letters, overall and per file
    W/state/history/D/                      see pipeline.history
Files in subfolders of a partition, and dangling symbolic links, fail the day before
anything runs (they would not be read). Each event's history holds only its user's
items strictly earlier than it (see pipeline.history). The standalone job holds
W/.lock (pipeline.workdir_lock) while it runs; the daily job holds it already.
Both directories are built under temporary names (W/data/.tmp-D-<id>, with the
sort's scratch runs in W/data/.tmp-D-<id>-runs) and moved into place only after the
whole pipeline has succeeded, the state first: W/data/D/stats.json existing means
the day is complete. A crashed attempt's temporaries are removed by the next run.
A re-run of a day gives the same bytes.

Memory: on a distributed runner a worker holds one user's events of the day (the
history pass), one event id's copies, one item's catalog entry, and a 64 MB sort
buffer; shuffles live in the runner. The embedded DirectRunner keeps its shuffles
in memory: about 1.2 KB per event above a ~0.8 GB base (bench/beam_throughput.py).

Flags this module does not define are Beam pipeline options, e.g.
--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
--setup_file=./setup.py, or --direct_num_workers=2
--direct_running_mode=multi_processing.
"""

import contextlib
import dataclasses
import datetime as dt
import functools
import json
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipeline import app_flags
from pipeline import history
from pipeline import io
from pipeline import schema
from pipeline import transforms
from pipeline import workdir_lock

_ALLOW_MISSING_HISTORY = flags.DEFINE_bool(
    "allow_missing_history", False,
    "Carry on from the latest earlier history state (or none) even when days before "
    "the date have data but no state.")
_MAX_SKEW_S = flags.DEFINE_integer(
    "max_skew_s", 3600, "Events further than this outside the day's UTC bounds are "
    "dead letters (timestamp_out_of_partition).", lower_bound=0)
_MAX_HISTORY = flags.DEFINE_integer("max_history", 50, "Items kept in a user's history.",
                                    lower_bound=0)
_CORPUS_SHARDS = flags.DEFINE_integer("corpus_shards", 4, "Corpus TFRecord files.",
                                      lower_bound=1)
_HISTORY_SHARDS = flags.DEFINE_integer("history_shards", 4, "History state files.",
                                       lower_bound=1)


@dataclasses.dataclass(frozen=True)
class DayPlan:
  """Where one day's job reads and writes, resolved before the pipeline is built."""
  day: dt.date
  logs_pattern: str
  catalog_pattern: str
  previous_state: Optional[str]
  data_dir: str
  state_dir: str
  data_tmp: str
  state_tmp: str
  scratch_dir: str
  max_skew_s: int = 3600
  max_history: int = 50
  corpus_shards: int = 4
  history_shards: int = 4

  def context(self) -> dict[str, Any]:
    """What stats.json records about the run's inputs and settings."""
    return {
        "day": schema.partition_name(self.day),
        "logs": self.logs_pattern,
        "catalog": self.catalog_pattern,
        "previous_history_state": self.previous_state,
        "max_skew_s": self.max_skew_s,
        "max_history": self.max_history,
    }


def data_dir(workdir: str, day: dt.date) -> str:
  """W/data/YYYY-MM-DD."""
  return FileSystems.join(workdir, "data", schema.partition_name(day))


def _check_catalog(catalog_root: str, day: dt.date) -> None:
  """Fails on files that the catalog partitions read for `day` hold but would not be read.

  Raises:
    io.PartitionLayoutError: naming them.
  """
  for name in io.partition_names(catalog_root):
    if transforms.partition_up_to(schema.partition_name(day), name):
      io.partition_files(FileSystems.join(catalog_root, name))


def plan_day(day: dt.date, workdir: str, logs: Optional[str] = None,
             catalog: Optional[str] = None, allow_missing_history: bool = False,
             max_skew_s: int = 3600, max_history: int = 50, corpus_shards: int = 4,
             history_shards: int = 4) -> DayPlan:
  """Checks a day's inputs and settings and picks its paths.

  Raises:
    ValueError: a setting out of range (shards < 1, negative skew or history).
    FileNotFoundError: the day has no log files.
    io.PartitionLayoutError: a log or catalog partition read for the day holds files
      that would not be read (in a subfolder, dangling symbolic links).
    history.MissingHistoryError: see `history.previous_state`.
  """
  for name, value, least in (("corpus_shards", corpus_shards, 1),
                             ("history_shards", history_shards, 1),
                             ("max_skew_s", max_skew_s, 0), ("max_history", max_history, 0)):
    if value < least:
      raise ValueError(f"{name} must be >= {least}, not {value}")
  logs_root = logs or FileSystems.join(workdir, "logs")
  logs_dir = FileSystems.join(logs_root, schema.partition_name(day))
  logs_pattern = FileSystems.join(logs_dir, "*")
  if not io.partition_files(logs_dir):
    raise FileNotFoundError(f"no log files for {day}: nothing matches {logs_pattern}")
  catalog_root = catalog or FileSystems.join(workdir, "catalog")
  _check_catalog(catalog_root, day)
  previous = history.previous_state(workdir, day, logs_root, allow_missing_history)
  final_data = data_dir(workdir, day)
  final_state = history.state_dir(workdir, day)
  data_tmp = io.temp_dir(final_data)
  return DayPlan(
      day=day, logs_pattern=logs_pattern,
      catalog_pattern=FileSystems.join(catalog_root, "*", "*"),
      previous_state=previous, data_dir=final_data, state_dir=final_state,
      data_tmp=data_tmp, state_tmp=io.temp_dir(final_state),
      scratch_dir=f"{data_tmp}-runs",
      max_skew_s=max_skew_s, max_history=max_history, corpus_shards=corpus_shards,
      history_shards=history_shards)


def _count_pairs(metric: str):
  return lambda file_count: ((metric, file_count[0], ""), file_count[1])


def _written(name_count: tuple[str, int]) -> transforms.Count:
  return (transforms.WRITTEN, "", name_count[0]), name_count[1]


def build_day(p: beam.Pipeline, plan: DayPlan) -> None:
  """Adds the day's transforms to `p`; running `p` fills plan.data_tmp and plan.state_tmp."""
  logs = (p
          | "LogFiles" >> beam.Create([plan.logs_pattern])
          | "ReadLogs" >> io.ReadLines(allow_empty=False))
  parsed = logs.lines | "ParseEvents" >> transforms.ParseEvents(plan.day, plan.max_skew_s)
  unique = parsed.events | "Dedupe" >> transforms.DedupeEvents()

  catalog = (p
             | "CatalogFiles" >> beam.Create([plan.catalog_pattern])
             | "ReadCatalog" >> io.ReadLines(file_filter=functools.partial(
                 transforms.catalog_file_up_to, schema.partition_name(plan.day))))
  items = catalog.lines | "ParseCatalog" >> transforms.ParseCatalog()
  corpus = items.items | "Corpus" >> transforms.LatestCatalog()

  joined = ({"events": unique.events, "corpus": corpus}
            | "JoinCatalog" >> transforms.JoinCatalog())
  previous = p | "ReadHistories" >> history.ReadHistories(plan.previous_state)
  # A later day's event can be as early as the end of this day minus the skew.
  keep_from_ts = schema.day_bounds(plan.day)[1] - plan.max_skew_s
  histories = ({"events": joined.events, history.STATE: previous}
               | "AttachHistories" >> history.AttachHistories(plan.max_history,
                                                              keep_from_ts))
  examples = histories.events | "ToExamples" >> transforms.ToExamples(plan.day)

  written = {
      "Examples": examples | "WriteExamples" >> transforms.WriteExamples(
          plan.data_tmp, plan.scratch_dir),
      "Corpus": corpus | "WriteCorpus" >> transforms.WriteCorpus(
          plan.data_tmp, plan.corpus_shards, plan.scratch_dir),
      "DeadLetters": parsed.dead_letters | "WriteDeadLetters" >> (
          transforms.WriteDeadLetters(plan.data_tmp, "dead_letter-logs", plan.scratch_dir)),
      "CatalogDeadLetters": items.dead_letters | "WriteCatalogDeadLetters" >> (
          transforms.WriteDeadLetters(plan.data_tmp, "dead_letter-catalog",
                                      plan.scratch_dir)),
      "Histories": histories[history.STATE] | "WriteHistories" >> history.WriteHistories(
          plan.state_tmp, plan.day, plan.max_history, plan.scratch_dir,
          plan.history_shards),
  }
  by_reason = lambda record: (record["file"], record["reason"])  # noqa: E731
  everything = lambda element: ("", "")  # noqa: E731
  counts = [
      logs[io.LINE_COUNTS] | "CountLines" >> beam.Map(_count_pairs(transforms.LINES)),
      catalog[io.LINE_COUNTS] | "CountCatalogLines" >> beam.Map(
          _count_pairs(transforms.CATALOG_LINES)),
      parsed.dead_letters | "CountDead" >> transforms.CountBy(transforms.DEAD, by_reason),
      unique.duplicates | "CountDuplicates" >> transforms.CountBy(transforms.DUPLICATE),
      joined.unknown_items | "CountUnknownItems" >> transforms.CountBy(
          transforms.UNKNOWN_ITEM, everything),
      unique.sources | "CountExamples" >> transforms.CountBy(transforms.EXAMPLES),
      items.items | "CountCatalogAccepted" >> transforms.CountBy(
          transforms.CATALOG_ACCEPTED, lambda entry: (entry[1], "")),
      items.dead_letters | "CountCatalogDead" >> transforms.CountBy(
          transforms.CATALOG_DEAD, by_reason),
      corpus | "CountCorpus" >> transforms.CountBy(transforms.CORPUS_ITEMS, everything),
      histories[history.USERS] | "CountUsers" >> transforms.CountBy(
          transforms.USERS, everything),
      histories[history.STATE] | "CountHistoryUsers" >> transforms.CountBy(
          transforms.HISTORY_USERS, everything),
  ] + [pairs | f"Count{name}Written" >> beam.Map(_written)
       for name, pairs in written.items()]
  _ = (counts
       | "AllCounts" >> beam.Flatten()
       | "Stats" >> transforms.ComputeStats(plan.data_tmp, plan.context()))


def _runner(options: PipelineOptions) -> Optional[FnApiRunner]:
  """Without --runner: the DirectRunner's in-process engine, the FnApiRunner.

  The DirectRunner itself would first try to download and start the Prism runner
  from GitHub; the FnApiRunner honours --direct_num_workers and
  --direct_running_mode just the same and needs no network.
  """
  return FnApiRunner() if options.view_as(StandardOptions).runner is None else None


def run_day(day: dt.date, workdir: str, logs: Optional[str] = None,
            catalog: Optional[str] = None, pipeline_args: Optional[list[str]] = None,
            allow_missing_history: bool = False, max_skew_s: int = 3600,
            max_history: int = 50, *, corpus_shards: int = 4,
            history_shards: int = 4) -> dict[str, Any]:
  """Runs the day's pipeline, publishes its outputs, and returns stats.json's content.

  Takes no lock: the caller holds W/.lock (`main`, or the daily job for its run).

  Raises:
    ValueError: a setting out of range (see `plan_day`).
    FileNotFoundError: the day has no log files.
    io.PartitionLayoutError (a FileNotFoundError): a partition read for the day
      holds files that would not be read.
    history.MissingHistoryError: earlier days have data but no history state.
    io.UnreadableFileError (inside Beam's error): a corrupt or truncated input file.
    transforms.StatsMismatchError (inside Beam's error): a line was lost.
  """
  for final in (data_dir(workdir, day), history.state_dir(workdir, day)):
    for stale in io.remove_stale_temp_dirs(final):
      logging.warning("removed %s, left by an earlier attempt", stale)
  plan = plan_day(day, workdir, logs, catalog, allow_missing_history, max_skew_s,
                  max_history, corpus_shards, history_shards)
  logging.info("%s: logs %s, history from %s", day, plan.logs_pattern,
               plan.previous_state or "nothing")
  options = PipelineOptions(pipeline_args or [])
  published = False
  try:
    with beam.Pipeline(runner=_runner(options), options=options) as p:
      build_day(p, plan)
    if FileSystems.exists(plan.scratch_dir):
      FileSystems.delete([plan.scratch_dir])
    io.publish(plan.state_tmp, plan.state_dir, history.SUMMARY_FILE)
    io.publish(plan.data_tmp, plan.data_dir, transforms.STATS_FILE)
    published = True
  finally:
    if not published:
      leftovers = [d for d in (plan.data_tmp, plan.state_tmp, plan.scratch_dir)
                   if FileSystems.exists(d)]
      if leftovers:
        FileSystems.delete(leftovers)
  with FileSystems.open(FileSystems.join(plan.data_dir, transforms.STATS_FILE)) as f:
    stats = json.loads(f.read())
  logging.info("%s: %d lines -> %d examples, %d duplicates, %d dead letters -> %s",
               day, stats["input_lines"], stats["examples"], stats["duplicates"],
               stats["dead_letters"], plan.data_dir)
  return stats


def _workdir_lock(workdir: str) -> contextlib.AbstractContextManager:
  """W/.lock for a local workdir; an flock cannot guard a remote one (gs://, ...)."""
  if io.is_local_path(workdir):
    return workdir_lock.WorkdirLock(workdir)
  logging.warning("%s is not on a local disk: no lock keeps a second run of this "
                  "workdir out", workdir)
  return contextlib.nullcontext()


def main(argv: Sequence[str]) -> None:
  """The standalone job: run_day under the workdir lock (the daily job, which calls
  run_day itself, holds the lock already); a one-line error for bad input."""
  try:
    workdir = app_flags.workdir()
    day = app_flags.parse_day(app_flags.DATE.value)
    with _workdir_lock(workdir):
      stats = run_day(
          day, workdir, logs=app_flags.LOGS.value, catalog=app_flags.CATALOG.value,
          pipeline_args=list(argv[1:]),
          allow_missing_history=_ALLOW_MISSING_HISTORY.value, max_skew_s=_MAX_SKEW_S.value,
          max_history=_MAX_HISTORY.value, corpus_shards=_CORPUS_SHARDS.value,
          history_shards=_HISTORY_SHARDS.value)
  except (app.UsageError, flags.Error, workdir_lock.WorkdirLocked, FileNotFoundError,
          history.MissingHistoryError) as e:
    app_flags.exit_with_error(e)
  print(json.dumps({key: stats[key] for key in (
      "day", "input_lines", "examples", "duplicates", "dead_letters",
      "dead_letters_by_reason", "unknown_item_events", "corpus_items")}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=app_flags.parse_flags_with_beam_options)
