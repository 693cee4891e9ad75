r"""The daily job: one command runs a day, or catches up a range, end to end.

For each day D, in order (test-then-train):
  1. beam:     logs/D + catalog/<=D + state/history/D-1 -> data/D (Beam job);
  2. evaluate: the latest export, made before D, is scored on D's events;
  3. train:    one pass over data/D in time order, from the latest checkpoint;
  4. export:   a new ScaNN and exact export version from the trained model;
  5. report:   D's metrics are appended to eval/summary.json and eval/summary.png.

`W/manifest.json` records each completed step, so a re-run of a completed day is a
no-op (unless --force) and a killed run resumes at the step it was in (the trainer
itself resumes mid-day from its checkpoint). `W/.lock` keeps a second run out.
A range runs in one process: TensorFlow is imported once and the model and its
frequency estimator stay in memory from day to day.

Every flag of the steps' own apps is accepted too (e.g. the trainer's); flags this
app does not know are passed to Beam as pipeline options (e.g. --runner).

  python -m pipeline.daily --workdir=W --date=2024-01-03
  python -m pipeline.daily --workdir=W --start_date=2024-01-01 --end_date=2024-01-31
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from apache_beam.io.filesystems import FileSystems

from pipeline import app_flags
from pipeline import history
from pipeline import logs_to_tfrecords
from pipeline import manifest as manifest_lib
from pipeline import report
from pipeline import workdir_lock
from models import trainer as trainer_lib
from models.config import ModelConfig
from serving import evaluate as evaluate_lib
from serving import export as export_lib
from serving import versions

_FORCE = flags.DEFINE_bool("force", False, "Re-run days whose steps are complete.")
_SKIP_MISSING = flags.DEFINE_bool(
    "skip_missing_days", False,
    "In a range, skip dates without a log partition (recorded in the manifest) "
    "instead of failing.")
_MAX_DEAD = flags.DEFINE_float(
    "max_dead_letter_rate", 0.05, "Fail a day whose dead-letter lines exceed this "
    "fraction of its input lines.")

FLAGS = flags.FLAGS
STEPS = ("beam", "evaluate", "train", "export", "report")
# The Beam job's own flags that the daily job passes on to it.
_BEAM_FLAGS = ("allow_missing_history", "max_skew_s", "max_history", "corpus_shards",
               "history_shards")


class DayFailed(RuntimeError):
  """A day cannot be run as asked; the message says why and what to look at."""


def log_partitions(logs_root: str) -> set[dt.date]:
  """Dates that have a non-empty `logs_root/YYYY-MM-DD/` (any Beam filesystem)."""
  if not FileSystems.exists(logs_root):
    return set()
  pattern = FileSystems.join(logs_root, "????-??-??", "*")
  dates = set()
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    try:
      dates.add(dt.date.fromisoformat(metadata.path.rstrip("/").split("/")[-2]))
    except ValueError:
      continue
  return dates


def latest_versions(workdir: str) -> Optional[tuple[str, str]]:
  """The newest (scann, exact) export directories, or None before the first export.

  Both variants of an export share a version number and the exact one is published
  last, so an exact version N implies a complete ScaNN version N.
  """
  exact_base = export_lib.export_base(workdir, export_lib.EXACT_MODEL)
  versions_found = versions.list_versions(exact_base)
  if not versions_found:
    return None
  v = str(versions_found[-1])
  return (os.path.join(export_lib.export_base(workdir, export_lib.SCANN_MODEL), v),
          os.path.join(exact_base, v))


class DailyJob:
  """Runs days in order in one process, keeping the trainer (model, estimator) warm."""

  def __init__(self, workdir: str, logs: Optional[str] = None,
               catalog: Optional[str] = None, pipeline_args: Sequence[str] = (),
               force: bool = False, max_dead_letter_rate: float = 0.05,
               config: Optional[ModelConfig] = None, strategy: Any = None,
               beam_options: Optional[dict[str, Any]] = None,
               min_ann_recall: float = 0.95):
    self.workdir = workdir
    self.logs = logs or os.path.join(workdir, "logs")
    self.catalog = catalog or os.path.join(workdir, "catalog")
    self.pipeline_args = list(pipeline_args)
    self.force = force
    self.max_dead_letter_rate = max_dead_letter_rate
    self.config = config
    self.strategy = strategy
    self.beam_options = dict(beam_options or {})
    self.min_ann_recall = min_ann_recall
    self.manifest = manifest_lib.Manifest(workdir)
    self._trainer: Optional[trainer_lib.Trainer] = None

  @property
  def trainer(self) -> trainer_lib.Trainer:
    if self._trainer is None:
      self._trainer = trainer_lib.Trainer(self.workdir, self.config, strategy=self.strategy)
    return self._trainer

  def run_day(self, day: dt.date) -> dict[str, Any]:
    """Runs every step of `day` not yet complete; returns the day's step records."""
    if self.force and self.manifest.get(day, "report"):
      self.manifest.clear(day)
    steps: dict[str, Callable[[dt.date], dict[str, Any]]] = {
        "beam": self._beam, "evaluate": self._evaluate, "train": self._train,
        "export": self._export, "report": self._report}
    for step in STEPS:
      if self.manifest.done(day, step):
        logging.info("%s %-8s already complete", day, step)
        continue
      logging.info("%s %-8s started", day, step)
      start = time.perf_counter()
      record = steps[step](day)
      record["seconds"] = round(time.perf_counter() - start, 2)
      self.manifest.mark(day, step, record)
      logging.info("%s %-8s done in %.1f s", day, step, record["seconds"])
    return self.manifest.days()[day.isoformat()]

  def _beam(self, day: dt.date) -> dict[str, Any]:
    stats = logs_to_tfrecords.run_day(day, self.workdir, logs=self.logs,
                                      catalog=self.catalog,
                                      pipeline_args=self.pipeline_args,
                                      **self.beam_options)
    stats_path = os.path.join(self.workdir, "data", day.isoformat(), "stats.json")
    lines = stats["input_lines"]
    if lines == 0:
      raise DayFailed(f"{day}: the logs under {self.logs}/{day} hold no lines "
                      f"(see {stats_path})")
    rate = stats["dead_letters"] / lines
    if rate > self.max_dead_letter_rate:
      raise DayFailed(
          f"{day}: dead-letter rate {rate:.4f} exceeds --max_dead_letter_rate="
          f"{self.max_dead_letter_rate} ({stats['dead_letters']} of {lines} lines); "
          f"see {stats_path} and the dead_letter files beside it")
    return {"input_lines": lines, "examples": stats["examples"],
            "duplicates": stats["duplicates"], "dead_letters": stats["dead_letters"]}

  def _evaluate(self, day: dt.date) -> dict[str, Any]:
    latest = latest_versions(self.workdir)
    if latest is None:
      return {"skipped": "no export yet: nothing trained before this day"}
    metrics = evaluate_lib.evaluate_day(self.workdir, day, latest[0], latest[1])
    return {"export": latest[1], "metrics": os.path.join(
        self.workdir, "eval", day.isoformat(), "metrics.json"),
            "recall": report.headline(metrics)}

  def _train(self, day: dt.date) -> dict[str, Any]:
    return _jsonable(self.trainer.train_day(day))

  def _export(self, day: dt.date) -> dict[str, Any]:
    latest = latest_versions(self.workdir)
    if latest and not self.force and export_lib.read_metadata(latest[1])["day"] == str(day):
      # Published by a run that died before recording it: keep that version.
      meta = export_lib.read_metadata(latest[1])
      return {"version": meta["version"], "scann_dir": latest[0], "exact_dir": latest[1],
              "ann_recall_at_10": meta["ann"]["recall_at_10"], "reused": True}
    result = export_lib.export_day(self.trainer.model, self.trainer.config, self.workdir,
                                   day, min_ann_recall=self.min_ann_recall)
    return {"version": result["version"], "scann_dir": result["scann_dir"],
            "exact_dir": result["exact_dir"],
            "ann_recall_at_10": result["metadata"]["ann"]["recall_at_10"]}

  def _report(self, day: dt.date) -> dict[str, Any]:
    return report.update(self.workdir, self.manifest.days(), day)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def days_to_run(date: Optional[str], start: Optional[str], end: Optional[str],
                available: set[dt.date], skip_missing: bool) -> tuple[list[dt.date],
                                                                      list[dt.date]]:
  """(days to run, days skipped for lack of logs); raises DayFailed on a gap."""
  if date and (start or end):
    raise flags.ValidationError("give --date, or --start_date and --end_date, not both")
  if date:
    first = last = app_flags.parse_day(date, "date")
  else:
    first = app_flags.parse_day(start, "start_date")
    last = app_flags.parse_day(end, "end_date")
    if last < first:
      raise flags.ValidationError(f"--end_date {last} is before --start_date {first}")
  wanted = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
  missing = [d for d in wanted if d not in available]
  if missing and (date or not skip_missing):
    raise DayFailed(
        f"no log partition for {', '.join(map(str, missing[:5]))}"
        f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(wanted)} days)"
        + ("" if date else "; pass --skip_missing_days to run only the days with logs"))
  return [d for d in wanted if d in available], missing


def run(workdir: str, date: Optional[str] = None, start_date: Optional[str] = None,
        end_date: Optional[str] = None, skip_missing_days: bool = False,
        **job_options: Any) -> dict[str, Any]:
  """Runs the asked days under the workdir lock; returns the manifest's days.

  `job_options` are DailyJob's keyword arguments (logs, catalog, config, ...).
  """
  with workdir_lock.WorkdirLock(workdir):
    job = DailyJob(workdir, **job_options)
    days, missing = days_to_run(date, start_date, end_date, log_partitions(job.logs),
                                skip_missing_days)
    if missing:
      reason = f"no log partition under {job.logs}"
      logging.warning("skipping %d of %d days (%s .. %s): %s", len(missing),
                      len(missing) + len(days), missing[0], missing[-1], reason)
      job.manifest.mark_all(missing, "skipped", {"reason": reason})
    for day in days:
      job.run_day(day)
    return job.manifest.days()


def main(argv: Sequence[str]) -> None:
  workdir = app_flags.workdir()
  try:
    days = run(workdir, app_flags.DATE.value, app_flags.START_DATE.value,
               app_flags.END_DATE.value, skip_missing_days=_SKIP_MISSING.value,
               logs=app_flags.LOGS.value, catalog=app_flags.CATALOG.value,
               pipeline_args=argv[1:], force=_FORCE.value,
               max_dead_letter_rate=_MAX_DEAD.value,
               config=trainer_lib.config_from_flags(workdir),
               beam_options={name: getattr(FLAGS, name) for name in _BEAM_FLAGS},
               min_ann_recall=FLAGS.min_ann_recall)
  except (DayFailed, workdir_lock.WorkdirLocked, flags.ValidationError,
          FileNotFoundError, history.MissingHistoryError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report.table(days))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
