"""The day's Beam job as a command: `beam_day.run_day` under the workdir lock.

    python -m pipeline.logs_to_tfrecords --workdir=W --date=2024-01-01 [Beam options]

What it reads and writes is `pipeline.beam_day`'s docstring. The job holds W/.lock
(pipeline.workdir_lock) while it runs; bad input (a missing day, files that would
not be read, missing history state, a lock held by another run, a bad flag) fails
in one line with exit status 2. The full log goes to W/run_logs
(core.app_logging).

--max_history defaults to W/config.json's max_history (the model's), else
models.features.MAX_HISTORY; a value that differs from W/config.json's is refused,
since the model would then read histories cut to another length.

Flags this module does not define are Beam pipeline options, e.g.
--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
--setup_file=./setup.py, --direct_num_workers=2 --direct_running_mode=multi_processing,
or --runner=DaskRunner [--dask_client_address=HOST:8786] (pipeline.dask_runner).
"""

from __future__ import annotations

import contextlib
import json
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from core import app_logging
from core import cli
from core import workdir as workdir_lib
from models import config as config_lib
from models import features
from pipeline import beam_day
from pipeline import history
from pipeline import io
from pipeline import workdir_lock

_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (see README: layout).")
_DATE = flags.DEFINE_string("date", None, "The day to process, YYYY-MM-DD.")
_LOGS = flags.DEFINE_string("logs", None, "Root of logs/YYYY-MM-DD/ (default W/logs); "
                            "any Beam filesystem path.")
_CATALOG = flags.DEFINE_string("catalog", None, "Root of catalog/YYYY-MM-DD/ "
                               "(default W/catalog); any Beam filesystem path.")
_ALLOW_MISSING_HISTORY = flags.DEFINE_bool("allow_missing_history",
                                           **beam_day.flag_args("allow_missing_history"))
_MAX_SKEW_S = flags.DEFINE_integer("max_skew_s", **beam_day.flag_args("max_skew_s"))
_MAX_HISTORY = flags.DEFINE_integer(
    "max_history", None, "Items kept in a user's history (default: W/config.json's "
    f"max_history, else {features.MAX_HISTORY}); must equal W/config.json's.",
    lower_bound=0)
_CORPUS_SHARDS = flags.DEFINE_integer("corpus_shards", **beam_day.flag_args("corpus_shards"))
_HISTORY_SHARDS = flags.DEFINE_integer("history_shards",
                                       **beam_day.flag_args("history_shards"))

_SUMMARY_KEYS = ("day", "input_lines", "examples", "duplicates", "dead_letters",
                 "dead_letters_by_reason", "unknown_item_events", "corpus_items")


def history_length(workdir: str, requested: Optional[int]) -> int:
  """The history length to cut to: the model's (W/config.json) when it exists.

  Raises:
    ValueError: `requested` differs from W/config.json's max_history, or that file
      cannot be read (both name the file).
  """
  saved = config_lib.saved_config(workdir)
  if saved is None:
    return features.MAX_HISTORY if requested is None else requested
  if requested is not None and requested != saved.max_history:
    raise ValueError(
        f"--max_history={requested} differs from max_history={saved.max_history} in "
        f"{workdir_lib.Workdir(workdir).config_path}: the model reads histories of "
        "that length (leave --max_history out to use it)")
  return saved.max_history


def _workdir_lock(workdir: str) -> contextlib.AbstractContextManager:
  """W/.lock for a local workdir; an flock cannot guard a remote one (gs://, ...)."""
  if io.is_local_path(workdir):
    return workdir_lock.WorkdirLock(workdir)
  logging.warning("%s is not on a local disk: no lock keeps a second run of this "
                  "workdir out", workdir)
  return contextlib.nullcontext()


def main(argv: Sequence[str]) -> None:
  """Checks the flags, takes the lock, runs the day, prints its summary."""
  try:
    workdir = cli.workdir(_WORKDIR.value)
    day = cli.parse_day(_DATE.value)
    settings = beam_day.BeamSettings(
        max_skew_s=_MAX_SKEW_S.value,
        max_history=history_length(workdir, _MAX_HISTORY.value),
        corpus_shards=_CORPUS_SHARDS.value, history_shards=_HISTORY_SHARDS.value,
        allow_missing_history=_ALLOW_MISSING_HISTORY.value)
    beam_day.check_pipeline_args(argv[1:])
  except (app.UsageError, flags.Error, ValueError) as e:
    cli.exit_with_error(e)
  try:
    with _workdir_lock(workdir):
      app_logging.setup(workdir, "logs_to_tfrecords")
      stats = beam_day.run_day(day, workdir, settings, logs=_LOGS.value,
                               catalog=_CATALOG.value, pipeline_args=argv[1:])
  except (workdir_lock.WorkdirLocked, FileNotFoundError,
          history.MissingHistoryError) as e:
    log = app_logging.log_path()
    cli.exit_with_error(f"{e}{f' (log: {log})' if log else ''}")
  print(json.dumps({key: stats[key] for key in _SUMMARY_KEYS}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)
