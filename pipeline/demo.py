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
import os
import time
from typing import Sequence

from absl import app
from absl import flags

from models.config import ModelConfig
from pipeline import app_flags
from pipeline import app_logging
from pipeline import daily
from pipeline import report
from pipeline import synthetic
from pipeline import workdir_lock

_DEMO_DAYS = flags.DEFINE_integer("demo_days", 5, "Synthetic days to generate and run.")
_DEMO_EVENTS = flags.DEFINE_integer("demo_events_per_day", 30000, "Synthetic events a day.")


def main(argv: Sequence[str]) -> None:
  app_logging.quiet_terminal()
  try:
    workdir = app_flags.workdir(default="workdir/demo")
    # Smaller batches than the production default suit a world of 30k events a day:
    # more steps per day (bench/quality.py measured batch 256 best here).
    config = (daily.config_from_flags(workdir, flags.FLAGS.config_overrides)
              or ModelConfig(batch_size=256))
  except (app.UsageError, flags.Error) as e:
    app_flags.exit_with_error(e)
  app_logging.log_to_file(workdir, "demo")
  cfg = synthetic.WorldConfig(start_date=dt.date(2024, 1, 1), days=_DEMO_DAYS.value,
                              events_per_day=_DEMO_EVENTS.value, bad_line_rate=0.002)
  start = time.perf_counter()
  print(f"generating {cfg.days} days of synthetic logs under {workdir}", flush=True)
  synthetic.generate(workdir, cfg)
  last = cfg.start_date + dt.timedelta(days=cfg.days - 1)
  try:
    days = daily.run(workdir, start_date=cfg.start_date.isoformat(),
                     end_date=last.isoformat(), pipeline_args=argv[1:], config=config,
                     progress=daily.progress_line)
  except (daily.DayFailed, workdir_lock.WorkdirLocked, flags.ValidationError) as e:
    app_flags.exit_with_error(f"{e} (log: {app_logging.log_path()})")
  print()
  print(report.table(days))
  print()
  print(f"recall is test-then-train: day D scores the export made after day D-1 "
        f"(ScaNN, exact, popularity baseline); done in {time.perf_counter() - start:.0f} s")
  for what, path in (("exports", "exports"), ("per-day metrics and plots", "eval/*/"),
                     ("summary", "eval/summary.json"), ("summary plot", "eval/summary.png"),
                     ("manifest", "manifest.json"), ("TensorBoard", "tensorboard")):
    print(f"  {what:<26} {os.path.join(workdir, path)}")
  print(f"  {'log':<26} {app_logging.log_path()}")


if __name__ == "__main__":
  app.run(main, flags_parser=app_flags.parse_flags_with_beam_options)
