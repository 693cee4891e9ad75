"""Command line of the offline evaluation (the library is evaluation/evaluator.py).

  python -m evaluation.evaluate --workdir=W --date=YYYY-MM-DD \
      [--scann_export=W/exports/retrieval_scann/7 --exact_export=...]
  python -m evaluation.evaluate --workdir=W --date=YYYY-MM-DD --diversity_theta=0.5
  python -m evaluation.evaluate --workdir=W --date=YYYY-MM-DD --funnel
  python -m evaluation.evaluate --workdir=W --date=YYYY-MM-DD --plot_only

Scores the exports on day D's events and writes W/eval/D/metrics.json and
recall.png; by default both variants of the newest version labelled with a day
before D (serving.versions.exports_before). Prints the recall figures as JSON
(with --diversity_theta, {"recall": ..., "diversity": its headline}: the DPP
re-ranked lists of retrieve_diverse beside the plain top k; with --funnel, "funnel":
the exact export's top 100 re-ranked by the newest ranker export made before D;
metrics.json holds all of it); a day that cannot be evaluated fails with one line and exit status 2. With
--plot_only it only draws recall.png from the day's metrics.json (a day evaluated
without its plot).
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from core import app_logging
from core import cli
from core import workdir as workdir_lib
from evaluation import evaluator
from evaluation import funnel
from serving import versions

_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (see README: layout).")
_DATE = flags.DEFINE_string("date", None, "The day whose events are scored, YYYY-MM-DD.")
_SCANN_EXPORT = flags.DEFINE_string(
    "scann_export", None, "ScaNN export to score (default: the newest version labelled "
    "with a day before --date).")
_EXACT_EXPORT = flags.DEFINE_string(
    "exact_export", None, "Exact export to score (default: as for --scann_export).")
_DIVERSITY_THETA = flags.DEFINE_float("diversity_theta",
                                      **evaluator.flag_args("diversity_theta"))
_DIVERSITY_CANDIDATES = flags.DEFINE_integer(
    "diversity_candidates", **evaluator.flag_args("diversity_candidates"))
_DIVERSITY_K = flags.DEFINE_integer("diversity_k", **evaluator.flag_args("diversity_k"))
_FUNNEL = flags.DEFINE_bool("funnel", **evaluator.flag_args("funnel"))
_PLOT_ONLY = flags.DEFINE_bool(
    "plot_only", False, "Score nothing: draw W/eval/D/recall.png from the day's "
    "metrics.json.")

# Errors of a day that cannot be evaluated as asked: one line, the log names the rest.
_EXPECTED_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError)


def main(argv: Sequence[str]) -> None:
  app_logging.quiet_terminal()
  try:
    cli.no_arguments(argv)
    workdir, day = cli.workdir(_WORKDIR.value), cli.parse_day(_DATE.value)
    settings = evaluator.EvaluationSettings(
        diversity_theta=_DIVERSITY_THETA.value,
        diversity_candidates=_DIVERSITY_CANDIDATES.value, diversity_k=_DIVERSITY_K.value,
        funnel=_FUNNEL.value)
    if _PLOT_ONLY.value:
      print(evaluator.plot_day(workdir, day))
      return
    scann_dir, exact_dir = _SCANN_EXPORT.value, _EXACT_EXPORT.value
    if not scann_dir or not exact_dir:
      default = versions.exports_before(workdir, day) or (None, None)
      scann_dir, exact_dir = scann_dir or default[0], exact_dir or default[1]
    if not scann_dir and not exact_dir:
      raise app.UsageError(f"no export from a day before {day} under "
                           f"{workdir_lib.Workdir(workdir).exports_root}; pass "
                           "--scann_export/--exact_export")
  except (flags.Error, app.UsageError) + _EXPECTED_ERRORS as e:
    cli.exit_with_error(e)
  app_logging.setup(workdir, "evaluate")
  try:
    metrics = evaluator.evaluate_day(workdir, day, scann_dir, exact_dir,
                                     settings=settings)
  except _EXPECTED_ERRORS as e:
    logging.exception("the evaluation failed")
    where = app_logging.log_path()
    cli.exit_with_error(f"{e}{f' (log: {where})' if where else ''}")
  extra = {name: found for name, found in (
      ("diversity", evaluator.diversity_summary(metrics)),
      ("funnel", funnel.summary(metrics))) if found is not None}
  print(json.dumps({"recall": metrics["recall"], **extra} if extra
                   else metrics["recall"], indent=2))


if __name__ == "__main__":
  app.run(main)
