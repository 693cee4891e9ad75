r"""The main job on the embedded default data: what `make demo` runs.

1. generates `--demo_days` days of synthetic logs with the project's generator;
2. runs the daily job over them (test-then-train, one process);
3. prints the per-day recall table and where the exports and plots are.

A second run finds the days complete and only prints the table. The terminal shows
one line per day and step; the full log is in W/run_logs/ (`--verbosity=0` shows it).

  python -m pipeline.demo --workdir=workdir/demo
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Sequence

from absl import app
from absl import flags

from core import app_logging
from core import cli
from core import workdir as workdir_lib
from models.config import config_from_overrides
from models.config import ModelConfig
from models.config import saved_config
from pipeline import daily_job
from pipeline import report
from pipeline import synthetic_world
from pipeline import workdir_lock

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Working directory.")
_DEMO_DAYS = flags.DEFINE_integer("demo_days", 5, "Synthetic days to generate and run.")
_DEMO_EVENTS = flags.DEFINE_integer("demo_events_per_day", 30000, "Synthetic events a day.")
_CONFIG_OVERRIDES = flags.DEFINE_string(
    "config_overrides", None, "JSON object of ModelConfig fields, e.g. "
    "'{\"embedding_dim\": 32}' (default: batch size 256).")


def main(argv: Sequence[str]) -> None:
  app_logging.quiet_terminal()
  try:
    workdir = workdir_lib.Workdir(cli.workdir(_WORKDIR.value))
    # Smaller batches than the production default suit a world of 30k events a day:
    # more steps per day (bench/quality.py measured batch 256 best here).
    overrides = cli.json_object(_CONFIG_OVERRIDES.value, _CONFIG_OVERRIDES.name)
    config = (config_from_overrides(saved_config(workdir.root), overrides)
              or ModelConfig(batch_size=256))
  except (app.UsageError, flags.Error, ValueError) as e:
    cli.exit_with_error(e)
  app_logging.log_to_file(workdir.root, "demo")
  cfg = synthetic_world.WorldConfig(start_date=dt.date(2024, 1, 1), days=_DEMO_DAYS.value,
                                    events_per_day=_DEMO_EVENTS.value, bad_line_rate=0.002)
  start = time.perf_counter()
  print(f"generating {cfg.days} days of synthetic logs under {workdir.root}", flush=True)
  synthetic_world.generate(workdir.root, cfg)
  last = cfg.start_date + dt.timedelta(days=cfg.days - 1)
  try:
    days = daily_job.run(workdir, cfg.start_date, last, pipeline_args=argv[1:],
                         config=config, progress=lambda line: print(line, flush=True))
  except (daily_job.DayFailed, workdir_lock.WorkdirLocked) as e:
    cli.exit_with_error(f"{e} (log: {app_logging.log_path()})")
  print()
  print(report.table(days))
  print()
  print(f"recall is test-then-train: day D scores the export made after day D-1 "
        f"(ScaNN, exact; popularity and co-visitation baselines); done in "
        f"{time.perf_counter() - start:.0f} s")
  for what, path in (("exports", workdir.exports_root),
                     ("per-day metrics and plots", workdir.join("eval", "*", "")),
                     ("summary", workdir.join("eval", workdir_lib.SUMMARY)),
                     ("summary plot", workdir.join("eval", workdir_lib.SUMMARY_PLOT)),
                     ("manifest", workdir.manifest_path),
                     ("TensorBoard", workdir.tensorboard_dir)):
    print(f"  {what:<26} {path}")
  print(f"  {'log':<26} {app_logging.log_path()}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)
