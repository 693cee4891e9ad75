"""The day's Beam job as a library: one day of raw logs -> time-ordered TFRecords,
corpus, dead letters, stats and the users' carried histories (docs/design.md, "The
day, as data flows"). Its app is `pipeline.logs_to_tfrecords`; the daily job calls
`run_day` itself.

`run_day` reads `logs`/D (default W/logs/D), the catalog state of the latest earlier
day and the `catalog` partitions dated after it up to D (default W/catalog; every
partition up to D when there is no usable state, see pipeline.catalog_state), and
the history state of the latest earlier day. Writes
    W/data/D/examples-HH.tfrecord.gz        24 files; name order, then record order,
                                            is (timestamp, event_id) order
    W/data/D/corpus-SSSSS-of-NNNNN.tfrecord.gz
    W/data/D/dead_letter-{logs,catalog}-SSSSS-of-NNNNN.jsonl
    W/data/D/stats.json                     input lines == examples + duplicates +
                                            dead letters, overall and per file
    W/state/history/D/                      see pipeline.history
    W/state/catalog/D/                      the corpus, see pipeline.catalog_state
Files in subfolders of a partition, and dangling symbolic links, fail the day before
anything runs (they would not be read). Each event's history holds only its user's
items strictly earlier than it (see pipeline.history). The three directories are
built under temporary names (W/data/.tmp-D-<id>, with the sort's scratch runs in
W/data/.tmp-D-<id>-runs) and moved into place only after the whole pipeline has
succeeded, the states first: W/data/D/stats.json existing means the day is complete.
A crashed attempt's temporaries are removed by the next run. A re-run of a day
gives the same bytes, on any runner: the in-process engine by default, Beam's others
by --runner (--runner=DaskRunner is pipeline.dask_runner's). Workers write the
files, this process publishes them: on several machines W must be on a filesystem
they all see. Every output is counted into stats.json, so every branch of the
pipeline ends in its last step.

Memory: on a distributed runner a worker holds one user's events of the day (the
history pass), one event id's copies, one item's catalog entry, and a 64 MB sort
buffer; shuffles live in the runner. The embedded DirectRunner keeps its shuffles
in memory: about 1.2 KB per event above a ~0.8 GB base (bench/beam_throughput.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
from typing import Any, Callable, Optional, Sequence

from absl import logging
import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.runner import PipelineRunner
from apache_beam.transforms import userstate

from core import workdir as workdir_lib
from models import features
from pipeline import catalog_state
from pipeline import dask_runner
from pipeline import history
from pipeline import io
from pipeline import parse
from pipeline import records
from pipeline import schema
from pipeline import stats
from pipeline import writers


def _setting(default: Any, help_text: str, least: Optional[int] = None) -> Any:
  """A BeamSettings field with its flag help and lower bound (`flag_args`)."""
  return dataclasses.field(default=default, metadata={"help": help_text, "least": least})


@dataclasses.dataclass(frozen=True)
class BeamSettings:
  """How the day's job cuts, checks and shards what it writes; checked when made.

  Each field's help and lower bound are its metadata: the apps declare their flags
  from them (`flag_args`).
  """
  max_skew_s: int = _setting(
      3600, "Events further than this outside the day's UTC bounds are dead letters "
      "(timestamp_out_of_partition).", 0)
  max_history: int = _setting(
      features.MAX_HISTORY, "Items kept in a user's history: the model's "
      "ModelConfig.max_history.", 0)
  corpus_shards: int = _setting(4, "Corpus TFRecord files.", 1)
  history_shards: int = _setting(4, "History state files.", 1)
  allow_missing_history: bool = _setting(
      False, "Carry on from the latest earlier history state (or none) even when days "
      "before the date have data but no state.")

  def __post_init__(self):
    for field in dataclasses.fields(self):
      least, value = field.metadata["least"], getattr(self, field.name)
      if least is not None and value < least:
        raise ValueError(f"{field.name} must be >= {least}, not {value}")


def flag_args(name: str) -> dict[str, Any]:
  """default, help and lower_bound of a BeamSettings field, for an app's flag:

    _MAX_SKEW_S = flags.DEFINE_integer("max_skew_s", **beam_day.flag_args("max_skew_s"))
  """
  field = next(f for f in dataclasses.fields(BeamSettings) if f.name == name)
  args = {"default": field.default, "help": field.metadata["help"]}
  if field.metadata["least"] is not None:
    args["lower_bound"] = field.metadata["least"]
  return args


@dataclasses.dataclass(frozen=True)
class DayPlan:
  """Where one day's job reads and writes, resolved before the pipeline is built."""
  day: dt.date
  settings: BeamSettings
  logs_pattern: str
  catalog_pattern: str
  catalog: catalog_state.CatalogPlan
  previous_state: Optional[str]
  data_dir: str
  state_dir: str
  catalog_state_dir: str
  data_tmp: str
  state_tmp: str
  catalog_state_tmp: str
  scratch_dir: str

  def context(self) -> dict[str, Any]:
    """What stats.json records about the run's inputs and settings."""
    return {
        "day": workdir_lib.partition_name(self.day),
        "logs": self.logs_pattern,
        "catalog": self.catalog_pattern,
        "previous_catalog_state": self.catalog.previous_state,
        "previous_history_state": self.previous_state,
        "max_skew_s": self.settings.max_skew_s,
        "max_history": self.settings.max_history,
    }


def _workdir(workdir: str, logs: Optional[str], catalog: Optional[str]
             ) -> workdir_lib.Workdir:
  return workdir_lib.Workdir(workdir, logs=logs or "", catalog=catalog or "")


def plan_day(day: dt.date, workdir: str, settings: BeamSettings,
             logs: Optional[str] = None, catalog: Optional[str] = None) -> DayPlan:
  """Checks a day's inputs and picks its paths.

  Raises:
    FileNotFoundError: the day has no log files.
    io.PartitionLayoutError: a log or catalog partition read for the day holds files
      that would not be read (in a subfolder, dangling symbolic links).
    history.MissingHistoryError: see `history.previous_state`.
  """
  paths = _workdir(workdir, logs, catalog)
  logs_pattern = FileSystems.join(paths.logs_dir(day), "*")
  if not io.partition_inputs(paths.logs_dir(day)):
    raise FileNotFoundError(f"no log files for {day}: nothing matches {logs_pattern}")
  catalog = catalog_state.plan(paths, day)
  previous = history.previous_state(paths, day, settings.allow_missing_history)
  data_tmp = io.temp_dir(paths.data_dir(day))
  catalog_dir = catalog_state.state_dir(paths, day)
  return DayPlan(
      day=day, settings=settings, logs_pattern=logs_pattern,
      catalog_pattern=FileSystems.join(paths.catalog, "*", "*"), catalog=catalog,
      previous_state=previous, data_dir=paths.data_dir(day),
      state_dir=paths.history_dir(day), catalog_state_dir=catalog_dir,
      data_tmp=data_tmp, state_tmp=io.temp_dir(paths.history_dir(day)),
      catalog_state_tmp=io.temp_dir(catalog_dir), scratch_dir=f"{data_tmp}-runs")


def build_day(p: beam.Pipeline, plan: DayPlan) -> None:
  """Adds the day's transforms to `p`; running `p` fills plan.data_tmp, plan.state_tmp
  and plan.catalog_state_tmp (all but the states' summaries, which `run_day` writes)."""
  settings = plan.settings
  logs = (p
          | "LogFiles" >> io.Values([plan.logs_pattern])
          | "ReadLogs" >> io.ReadLines(allow_empty=False))
  parsed = logs.lines | "ParseEvents" >> parse.ParseEvents(plan.day, settings.max_skew_s)
  unique = parsed.events | "Dedupe" >> parse.DedupeEvents()

  catalog = (p
             | "CatalogFiles" >> io.Values(plan.catalog.patterns)
             | "ReadCatalog" >> io.ReadLines())
  items = catalog.lines | "ParseCatalog" >> parse.ParseCatalog()
  corpus = items.items | "Corpus" >> parse.LatestCatalog()

  joined = ({"events": unique.events, "corpus": corpus}
            | "JoinCatalog" >> parse.JoinCatalog())
  previous = p | "ReadHistories" >> history.ReadHistories(plan.previous_state)
  # A later day's event can be as early as the end of this day minus the skew.
  keep_from_ts = schema.day_bounds(plan.day)[1] - settings.max_skew_s
  histories = ({"events": joined.events, history.STATE: previous}
               | "AttachHistories" >> history.AttachHistories(settings.max_history,
                                                              keep_from_ts))

  def written(name: str, output: str, elements, writer: beam.PTransform):
    """Writes `elements` with `writer`; returns its counts of `output` written."""
    return (elements
            | f"Write{name}" >> writer
            | f"Count{name}Written" >> beam.Map(stats.written_counts(output)))

  counts = [
      written("Examples", stats.OUT_EXAMPLES,
              histories.events | "ToExamples" >> records.ToExamples(plan.day),
              writers.WriteSortedShards(plan.data_tmp, records.hour_shards(),
                                        plan.scratch_dir)),
      written("Corpus", stats.OUT_CORPUS,
              corpus | "CorpusRecords" >> beam.Map(records.corpus_record),
              writers.WriteShardedByKey(plan.data_tmp, "corpus", settings.corpus_shards,
                                        ".tfrecord.gz", plan.scratch_dir)),
      written("DeadLetters", stats.OUT_DEAD_LETTERS, parsed.dead_letters,
              parse.WriteDeadLetters(plan.data_tmp, "dead_letter-logs", plan.scratch_dir)),
      written("CatalogDeadLetters", stats.OUT_DEAD_LETTERS, items.dead_letters,
              parse.WriteDeadLetters(plan.data_tmp, "dead_letter-catalog",
                                     plan.scratch_dir)),
      written("Histories", stats.OUT_HISTORIES, histories[history.STATE],
              history.WriteHistories(plan.state_tmp, plan.scratch_dir,
                                     settings.history_shards)),
      written("CatalogState", stats.OUT_CATALOG_STATE, corpus,
              catalog_state.WriteCatalogState(plan.catalog_state_tmp, plan.scratch_dir,
                                              settings.corpus_shards)),
      logs[io.LINE_COUNTS] | "CountLines" >> beam.Map(stats.line_counts(stats.LINES)),
      catalog[io.LINE_COUNTS] | "CountCatalogLines" >> beam.Map(
          stats.line_counts(stats.CATALOG_LINES)),
      parsed.dead_letters | "CountDead" >> stats.CountMetric(stats.DEAD, stats.reason_key),
      unique.duplicates | "CountDuplicates" >> stats.CountMetric(stats.DUPLICATE),
      joined.unknown_items | "CountUnknownItems" >> stats.CountMetric(
          stats.UNKNOWN_ITEM, stats.day_key),
      unique.sources | "CountExamples" >> stats.CountMetric(stats.EXAMPLES),
      items.items | "CountCatalogAccepted" >> stats.CountMetric(
          stats.CATALOG_ACCEPTED, stats.source_key),
      items.dead_letters | "CountCatalogDead" >> stats.CountMetric(
          stats.CATALOG_DEAD, stats.reason_key),
      corpus | "CountCorpus" >> stats.CountMetric(stats.CORPUS_ITEMS, stats.day_key),
      histories[history.USERS] | "CountUsers" >> stats.CountMetric(
          stats.USERS, stats.day_key),
      histories[history.STATE] | "CountHistoryUsers" >> stats.CountMetric(
          stats.HISTORY_USERS, stats.day_key),
  ]
  _ = (counts
       | "AllCounts" >> beam.Flatten()
       | "Stats" >> stats.ComputeStats(plan.data_tmp, plan.context()))


class _ViewCachingOptions(PipelineOptions):
  """PipelineOptions that make each view (`view_as`) once per options class.

  Beam asks the pipeline's options for a view about 900 times to build and run one
  day (type checks ask at every step), and a fresh view parses the flags against
  every option of its class: a fifth of the job's CPU on a small day. A view keeps
  no values of its own (they live in `_all_options`, which all views share), so
  one view per class answers them all. The cache is not copied or pickled.
  """

  def view_as(self, cls: type[Any]) -> Any:
    views = self.__dict__.setdefault("_views", {})
    if cls not in views:
      views[cls] = super().view_as(cls)
    return views[cls]

  def __getstate__(self) -> dict[str, Any]:
    state = dict(super().__getstate__())
    state.pop("_views", None)
    return state


# Where `_memoized_dofn_specs` keeps a DoFn's specs: on the DoFn itself, so that
# they travel with it when Beam pickles it into a stage.
_DOFN_SPECS = "_towerstream_dofn_specs"
_Specs = tuple[set[Any], set[Any]]


def _memoized_dofn_specs(introspect: Callable[[beam.DoFn], _Specs]
                         ) -> Callable[[beam.DoFn], _Specs]:
  """Beam's `userstate.get_dofn_specs`, computed once per DoFn instance.

  Beam finds a DoFn's state and timer specs by taking the signature of every
  method it has (some 35, most of them DoFn's own), and asks about 8 times per
  ParDo to build and run one day (constructing, translating, each bundle): a
  quarter of a small day's CPU. A DoFn's methods do not change once it is
  made, so the answer is kept on the instance; a copy of each set is returned.
  """
  @functools.wraps(introspect)
  def specs(dofn: beam.DoFn) -> _Specs:
    held = getattr(dofn, "__dict__", None)
    if held is None:  # __slots__: nowhere to keep it
      return introspect(dofn)
    if _DOFN_SPECS not in held:
      held[_DOFN_SPECS] = introspect(dofn)
    state, timers = held[_DOFN_SPECS]
    return set(state), set(timers)
  specs.memoized = True
  return specs


if not getattr(userstate.get_dofn_specs, "memoized", False):
  userstate.get_dofn_specs = _memoized_dofn_specs(userstate.get_dofn_specs)


def _runner(options: PipelineOptions) -> Optional[PipelineRunner]:
  """The runner of `options`, where Beam would not make it from --runner itself.

  Without --runner: the DirectRunner's in-process engine, the FnApiRunner. The
  DirectRunner itself would first try to download and start the Prism runner from
  GitHub; the FnApiRunner honours --direct_num_workers and --direct_running_mode
  just the same and needs no network. --runner=DaskRunner, a name Beam does not
  know: `pipeline.dask_runner`'s. Any other: None, Beam's own.

  Raises:
    ValueError: --runner=DaskRunner without dask installed.
  """
  name = options.view_as(StandardOptions).runner
  if name is None:
    return FnApiRunner()
  return dask_runner.runner() if dask_runner.is_dask(name) else None


def check_pipeline_args(pipeline_args: Sequence[str]) -> None:
  """Checks, before anything runs, what `run_day` can check of its Beam options.

  Raises:
    ValueError: --runner=DaskRunner without dask installed.
  """
  if dask_runner.is_dask(PipelineOptions(list(pipeline_args)).view_as(
      StandardOptions).runner):
    dask_runner.check_available()


def run_day(day: dt.date, workdir: str, settings: BeamSettings = BeamSettings(),
            logs: Optional[str] = None, catalog: Optional[str] = None,
            pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the day's pipeline, publishes its outputs, and returns stats.json's content.

  Takes no lock: the caller holds W/.lock (the app, or the daily job for its run).
  `pipeline_args` are Beam pipeline options (e.g. --runner=DataflowRunner ...).

  Raises:
    FileNotFoundError: the day has no log files.
    io.PartitionLayoutError (a FileNotFoundError): a partition read for the day
      holds files that would not be read.
    history.MissingHistoryError: earlier days have data but no history state.
    io.UnreadableFileError (inside Beam's error): a corrupt or truncated input file.
    stats.StatsMismatchError (inside Beam's error): a line was lost.
  """
  paths = _workdir(workdir, logs, catalog)
  for final in (paths.data_dir(day), paths.history_dir(day),
                catalog_state.state_dir(paths, day)):
    for stale in io.remove_stale_temp_dirs(final):
      logging.warning("removed %s, left by an earlier attempt", stale)
  plan = plan_day(day, workdir, settings, logs, catalog)
  logging.info("%s: logs %s, catalog from %s and %d partition(s), history from %s",
               day, plan.logs_pattern, plan.catalog.previous_state or "nothing",
               len(plan.catalog.partitions), plan.previous_state or "nothing")
  options = _ViewCachingOptions(list(pipeline_args))
  published = False
  try:
    with beam.Pipeline(runner=_runner(options), options=options) as p:
      build_day(p, plan)
    if FileSystems.exists(plan.scratch_dir):
      FileSystems.delete([plan.scratch_dir])
    # The states' summaries last: they make the states usable.
    with FileSystems.open(FileSystems.join(plan.data_tmp, stats.STATS_FILE)) as f:
      counted = json.loads(f.read())
    history.write_summary(plan.state_tmp, day, counted["history_users"],
                          settings.max_history, settings.history_shards)
    catalog_state.write_summary(plan.catalog_state_tmp, day, counted["corpus_items"],
                                settings.corpus_shards, plan.catalog.files)
    io.publish(plan.catalog_state_tmp, plan.catalog_state_dir,
               catalog_state.SUMMARY_FILE)
    io.publish(plan.state_tmp, plan.state_dir, history.SUMMARY_FILE)
    io.publish(plan.data_tmp, plan.data_dir, stats.STATS_FILE)
    published = True
  finally:
    if not published:
      leftovers = [d for d in (plan.data_tmp, plan.state_tmp, plan.catalog_state_tmp,
                               plan.scratch_dir) if FileSystems.exists(d)]
      if leftovers:
        FileSystems.delete(leftovers)
  with FileSystems.open(paths.stats_path(day)) as f:
    day_stats = json.loads(f.read())
  logging.info("%s: %d lines -> %d examples, %d duplicates, %d dead letters -> %s",
               day, day_stats["input_lines"], day_stats["examples"],
               day_stats["duplicates"], day_stats["dead_letters"], plan.data_dir)
  return day_stats
