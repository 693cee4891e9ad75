r"""The daily job's app: one command runs a day, or catches up a range, end to end.

Each day D runs beam, evaluate, train, export and report in order (test-then-train;
see pipeline/daily_job.py for what each step does and how a run resumes). With
--ranker, the ranking teacher also trains and exports after the export (step
"ranker"), the evaluation scores the two-stage funnel, and a second table shows it.

Every setting of the steps is a flag here too (the model's, the Beam job's, the
export's); any other argument must be a Beam pipeline option (e.g. --runner),
passed on to Beam: a misspelt flag fails with exit status 2 before anything is
created. The model's history length is a model field (`--config_overrides=
'{"max_history": 20}'`), which the Beam job follows.

The terminal shows one line per day and step, then the table; the full log goes to
W/run_logs/daily-<time>-<pid>.log (`--verbosity=0` shows it on the terminal too).

Under a TF_CONFIG that names a cluster (models/distribute.py), start the same
command on every worker: the chief runs the job (lock, manifest, every step) and
trains with the others, which only follow its training steps (Trainer.follow).

  python -m pipeline.daily --workdir=W --date=2024-01-03
  python -m pipeline.daily --workdir=W --start_date=2024-01-01 --end_date=2024-01-31
"""

from __future__ import annotations

from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from core import app_logging
from core import cli
from core import workdir as workdir_lib
from evaluation import evaluator
from models import config as config_lib
from models import distribute
from models import ranker as ranker_lib
from models import ranker_trainer
from models import trainer as trainer_lib
from pipeline import beam_day
from pipeline import daily_job
from pipeline import history
from pipeline import report
from pipeline import workdir_lock
from serving import exporter

_EXPORT = exporter.ExportSettings()
_JOB = daily_job.JobSettings()

_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (see README: layout).")
_DATE = flags.DEFINE_string("date", None, "The day to run, YYYY-MM-DD.")
_START_DATE = flags.DEFINE_string("start_date", None, "First day of a range, YYYY-MM-DD.")
_END_DATE = flags.DEFINE_string("end_date", None, "Last day of a range, inclusive.")
_LOGS = flags.DEFINE_string("logs", None, "Root of logs/YYYY-MM-DD/ (default W/logs).")
_CATALOG = flags.DEFINE_string("catalog", None,
                               "Root of catalog/YYYY-MM-DD/ (default W/catalog).")
_FORCE = flags.DEFINE_bool("force", _JOB.force, "Re-run days whose steps are complete.")
_SKIP_MISSING = flags.DEFINE_bool(
    "skip_missing_days", _JOB.skip_missing_days,
    "In a range, skip dates without a log partition (recorded in the manifest) "
    "instead of failing.")
_RANKER = flags.DEFINE_bool(
    "ranker", _JOB.ranker, "Also train and export the ranking teacher each day (step "
    "ranker, W/ranker, W/exports/ranker) and score the two-stage funnel (retrieve "
    "100, re-rank with the teacher) in the evaluation.")
_RANKER_OVERRIDES = flags.DEFINE_string(
    "ranker_overrides", None, "With --ranker: JSON object of RankerConfig fields, "
    "e.g. '{\"negatives\": 8}' (default: W/ranker/config.json, else sized like the "
    "two-tower).")
_KEEP_EXPORTS = flags.DEFINE_integer(
    "keep_exports", _JOB.keep_exports, "Keep only the newest N versions of each export "
    "after a day's export (0: keep all).", lower_bound=0)
_MAX_DEAD = flags.DEFINE_float(
    "max_dead_letter_rate", _JOB.max_dead_letter_rate,
    "Fail a day whose dead-letter lines exceed this fraction of its input lines.")
# The model (W/config.json is the default; an architecture change is refused).
_MODEL_FLAGS = [getattr(flags, f"DEFINE_{kind}")(name, None, help=help, **extra)
                for kind, name, help, extra in config_lib.FLAG_FIELDS]
_CONFIG_OVERRIDES = flags.DEFINE_string(
    "config_overrides", None, "JSON object of other ModelConfig fields, e.g. "
    "'{\"embedding_dim\": 32}'.")
# The Beam job.
_ALLOW_MISSING_HISTORY = flags.DEFINE_bool(
    "allow_missing_history", **beam_day.flag_args("allow_missing_history"))
_MAX_SKEW_S = flags.DEFINE_integer("max_skew_s", **beam_day.flag_args("max_skew_s"))
_CORPUS_SHARDS = flags.DEFINE_integer("corpus_shards",
                                      **beam_day.flag_args("corpus_shards"))
_HISTORY_SHARDS = flags.DEFINE_integer("history_shards",
                                       **beam_day.flag_args("history_shards"))
# The evaluation.
_DIVERSITY_THETA = flags.DEFINE_float("diversity_theta",
                                      **evaluator.flag_args("diversity_theta"))
_DIVERSITY_CANDIDATES = flags.DEFINE_integer(
    "diversity_candidates", **evaluator.flag_args("diversity_candidates"))
# The export.
_MIN_ANN_RECALL = flags.DEFINE_float(
    "min_ann_recall", _EXPORT.min_ann_recall, "Fail the export when ScaNN's recall@10 "
    "against exact search stays below this after retuning.")
_EXPORT_K = flags.DEFINE_integer("export_k", _EXPORT.export_k,
                                 "Items returned by serving_default.")

# Errors that mean "this run cannot proceed as asked": one line, exit status 2.
_EXPECTED_ERRORS = (daily_job.DayFailed, workdir_lock.WorkdirLocked,
                    flags.ValidationError, app.UsageError, FileNotFoundError,
                    NotADirectoryError, history.MissingHistoryError,
                    trainer_lib.DivergenceError)


def follow(workdir: workdir_lib.Workdir, config, strategy) -> None:
  """A non-chief worker's run: trains each day the chief trains, in step with it."""
  app_logging.log_to_file(workdir.root, "daily-worker")
  task = distribute.strategy_task(strategy)
  print(f"worker {task.index} of {task.workers}: following the chief's training",
        flush=True)
  days = trainer_lib.Trainer(workdir.root, config, strategy=strategy).follow(
      on_day=lambda stats: print(f"{stats['day']} train (worker {task.index}) "
                                 f"{stats.get('examples')} examples, global step "
                                 f"{stats.get('global_step')}", flush=True))
  print(f"worker {task.index}: trained {len(days)} days with the chief", flush=True)


def _ranker_config(workdir: workdir_lib.Workdir, config: Optional[config_lib.ModelConfig],
                   ranker: bool, text: Optional[str]) -> Optional[ranker_lib.RankerConfig]:
  """The teacher's config of --ranker_overrides `text` (on W/ranker/config.json's,
  else the default sized like the two-tower), checked against the saved one; None
  without overrides.

  Raises:
    app.UsageError: overrides without --ranker.
    ValueError: an unknown field, a bad value, or an architecture change.
  """
  overrides = cli.json_object(text, "ranker_overrides")
  if not overrides:
    return None
  if not ranker:
    raise app.UsageError("--ranker_overrides needs --ranker")
  base = ranker_trainer.resolve_config(
      workdir.root, None, config or config_lib.saved_config(workdir.root)
      or config_lib.ModelConfig())
  try:
    wanted = ranker_lib.RankerConfig.from_dict({**base.to_dict(), **overrides})
  except TypeError as e:
    raise ValueError(f"--ranker_overrides {overrides}: {e}") from e
  return ranker_trainer.resolve_config(workdir.root, wanted)


def main(argv: Sequence[str]) -> None:
  app_logging.quiet_terminal()
  try:
    # First: MultiWorkerMirroredStrategy must configure collectives before any op.
    strategy = distribute.strategy_from_environment()
    workdir = workdir_lib.Workdir(cli.workdir(_WORKDIR.value), _LOGS.value or "",
                                  _CATALOG.value or "")
    first, last = cli.day_range(_DATE.value, _START_DATE.value, _END_DATE.value)
    overrides = cli.json_object(_CONFIG_OVERRIDES.value, _CONFIG_OVERRIDES.name)
    overrides.update({flag.name: flag.value for flag in _MODEL_FLAGS
                      if flag.value is not None})
    config = config_lib.config_from_overrides(config_lib.saved_config(workdir.root),
                                              overrides)
    beam_day.check_pipeline_args(argv[1:])
    ranker_config = _ranker_config(workdir, config, _RANKER.value,
                                   _RANKER_OVERRIDES.value)
    options = dict(
        settings=daily_job.JobSettings(force=_FORCE.value,
                                       max_dead_letter_rate=_MAX_DEAD.value,
                                       skip_missing_days=_SKIP_MISSING.value,
                                       ranker=_RANKER.value, ranker_config=ranker_config,
                                       keep_exports=_KEEP_EXPORTS.value),
        config=config,
        beam=beam_day.BeamSettings(allow_missing_history=_ALLOW_MISSING_HISTORY.value,
                                   max_skew_s=_MAX_SKEW_S.value,
                                   corpus_shards=_CORPUS_SHARDS.value,
                                   history_shards=_HISTORY_SHARDS.value),
        evaluate=evaluator.EvaluationSettings(
            diversity_theta=_DIVERSITY_THETA.value,
            diversity_candidates=_DIVERSITY_CANDIDATES.value),
        export=exporter.ExportSettings(export_k=_EXPORT_K.value,
                                       min_ann_recall=_MIN_ANN_RECALL.value),
        pipeline_args=argv[1:], strategy=strategy,
        progress=lambda line: print(line, flush=True))
  except (flags.Error, app.UsageError, ValueError) as e:
    cli.exit_with_error(e)
  if not distribute.is_chief(strategy):
    try:
      follow(workdir, config, strategy)
    except (ValueError, trainer_lib.DivergenceError) as e:
      logging.error("%s", e)
      cli.exit_with_error(e)
    return
  try:
    days = daily_job.run(workdir, first, last,
                         on_start=lambda: app_logging.log_to_file(workdir.root, "daily"),
                         **options)
  except _EXPECTED_ERRORS as e:
    logging.error("%s", e)
    where = app_logging.log_path()
    cli.exit_with_error(f"{e}{f' (log: {where})' if where else ''}")
  except Exception:  # the traceback goes to the log file too, then to the terminal
    logging.exception("the daily job failed")
    raise
  print(report.table(days))
  if _RANKER.value:
    print(daily_job.funnel_table(days))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)
