"""The trainer's command line: trains days of a workdir in order (models/trainer.py).

  python -m models.train --workdir=W --date=YYYY-MM-DD
  python -m models.train --workdir=W --start_date=YYYY-MM-DD --end_date=YYYY-MM-DD

Each day's stats are printed as one JSON line. The model flags (--correction,
--batch_size, ..., --config_overrides='{"embedding_dim": 32}') override
W/config.json (or the default config on a new workdir). Arguments are checked
before anything is created: a bad value, or a config that differs from
W/config.json in an architecture field, fails in one line with exit status 2.
The full log goes to W/run_logs/train-<UTC time>-<pid>.log (`-v 0` shows it).

With TF_CONFIG in the environment, this process is one worker of a
MultiWorkerMirroredStrategy cluster (models/distribute.py): start the same
command on every worker; each global batch of --batch_size is split across them,
and the chief (worker 0, or the "chief" task) writes checkpoints and summaries.

With --distill_weight > 0 the two-tower is distilled (models/distill.py) from the
workdir's ranking teacher, restored from its latest checkpoint in W/ranker
(models/ranker_trainer.py; the daily job trains it with --ranker); the teacher
is not trained here. Distillation runs on one worker only.
"""

from __future__ import annotations

import datetime
import json
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from core import app_logging
from core import cli
from models import config as config_lib
from models import distribute
from models import ranker_trainer
from models import trainer as trainer_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (see README: layout).")
_DATE = flags.DEFINE_string("date", None, "The day to train, YYYY-MM-DD.")
_START_DATE = flags.DEFINE_string("start_date", None, "First day of a range, YYYY-MM-DD.")
_END_DATE = flags.DEFINE_string("end_date", None, "Last day of a range, inclusive.")
_MODEL_FLAGS = [getattr(flags, f"DEFINE_{kind}")(name, None, help=help, **extra)
                for kind, name, help, extra in config_lib.FLAG_FIELDS]
_CONFIG_OVERRIDES = flags.DEFINE_string(
    "config_overrides", None, 'JSON object of other ModelConfig fields, e.g. '
    '\'{"embedding_dim": 32}\'.')

# Errors of a day that cannot be trained as asked: one line, the log names the rest.
_EXPECTED_ERRORS = (FileNotFoundError, trainer_lib.DivergenceError, RuntimeError,
                    ValueError)


def main(argv: Sequence[str]) -> None:
  app_logging.quiet_terminal()
  try:
    cli.no_arguments(argv)
    workdir = cli.workdir(_WORKDIR.value)
    first, last = cli.day_range(_DATE.value, _START_DATE.value, _END_DATE.value)
    overrides = cli.json_object(_CONFIG_OVERRIDES.value, _CONFIG_OVERRIDES.name)
    overrides.update({flag.name: flag.value for flag in _MODEL_FLAGS
                      if flag.value is not None})
    config = config_lib.config_from_overrides(config_lib.saved_config(workdir), overrides)
    trainer_lib.resolve_config(workdir, config)  # before anything is created
    # Before any TensorFlow op runs (collectives are set up at program start);
    # it waits for every worker of TF_CONFIG's cluster.
    strategy = distribute.strategy_from_environment()
  except (flags.Error, app.UsageError, ValueError) as e:
    cli.exit_with_error(e)
  app_logging.setup(workdir, "train")
  try:
    teacher = None
    if trainer_lib.resolve_config(workdir, config).distill_weight > 0:
      teacher, position = ranker_trainer.load_ranker(workdir)
      logging.info("distilling from the ranker of %s", position.checkpoint)
    trainer = trainer_lib.Trainer(workdir, config, strategy=strategy, teacher=teacher)
    day = first
    while day <= last:
      print(json.dumps(trainer.train_day(day)), flush=True)
      day += datetime.timedelta(days=1)
  except _EXPECTED_ERRORS as e:
    logging.exception("training failed")
    where = app_logging.log_path()
    cli.exit_with_error(f"{e}{f' (log: {where})' if where else ''}")


if __name__ == "__main__":
  app.run(main)
