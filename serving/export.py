"""Command line of the export (the library is serving/exporter.py).

  python -m serving.export --workdir=W --date=YYYY-MM-DD \
      [--export_k=100 --min_ann_recall=0.95 --corpus_glob=...]

Loads the model of the latest readable checkpoint in W/checkpoints and publishes
both exports of day D, labelled D: the checkpoint must hold day D trained to its
end (checked before the model loads, and again for the checkpoint restored).
Prints {"version", "scann_dir", "exact_dir"} as JSON; a day that cannot be
exported fails with one line and exit status 2.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from core import app_logging
from core import cli
from models import trainer as trainer_lib
from serving import exporter

_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (see README: layout).")
_DATE = flags.DEFINE_string("date", None, "The day to export (its corpus, its label), "
                            "YYYY-MM-DD.")
_CORPUS_GLOB = flags.DEFINE_string(
    "corpus_glob", None, "Corpus TFRecords to index (default W/data/D/corpus-*.tfrecord.gz).")
_MIN_ANN_RECALL = flags.DEFINE_float(
    "min_ann_recall", 0.95, "Fail the export when ScaNN's recall@10 against exact search "
    "stays below this after retuning.")
_EXPORT_K = flags.DEFINE_integer("export_k", 100, "Items returned by serving_default.")
_ANN_NARROW = flags.DEFINE_float(
    "ann_narrow_tolerance", None, "Then halve ScaNN's leaves searched while recall@10 "
    "and recall@k stay within this of the setting that met --min_ann_recall (faster "
    "queries at the same measured recall); unset: keep that setting.")

# Errors of a day that cannot be exported as asked: one line, the log names the rest.
_EXPECTED_ERRORS = (FileNotFoundError, NotADirectoryError, RuntimeError, ValueError)


def main(argv: Sequence[str]) -> None:
  app_logging.quiet_terminal()
  try:
    cli.no_arguments(argv)
    workdir, day = cli.workdir(_WORKDIR.value), cli.parse_day(_DATE.value)
    settings = exporter.ExportSettings(export_k=_EXPORT_K.value,
                                       min_ann_recall=_MIN_ANN_RECALL.value,
                                       corpus_glob=_CORPUS_GLOB.value,
                                       ann_narrow_tolerance=_ANN_NARROW.value)
    # Before the model is loaded: a --date the checkpoint has not trained is refused.
    exporter.check_label(trainer_lib.checkpoint_position(workdir), day)
  except (flags.Error, app.UsageError) + _EXPECTED_ERRORS as e:
    cli.exit_with_error(e)
  app_logging.setup(workdir, "export")
  try:
    model, trained = trainer_lib.load_model(workdir)
    result = exporter.export_day(model, model.config, workdir, day, settings,
                                 trained=trained)
  except _EXPECTED_ERRORS as e:
    logging.exception("the export failed")
    where = app_logging.log_path()
    cli.exit_with_error(f"{e}{f' (log: {where})' if where else ''}")
  print(json.dumps({key: result[key] for key in ("version", "scann_dir", "exact_dir")}))


if __name__ == "__main__":
  app.run(main)
