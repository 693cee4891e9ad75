r"""Converts MovieLens data to the daily layout (`pipeline.movielens_convert`).

    python -m pipeline.movielens --input=ml-latest-small --out=/tmp/w --period_days=7

Writes OUT/logs/D/, OUT/catalog/D/ and OUT/movielens_report.json, and prints the
report's counts. Missing input, a bad header, or under --strict the first
malformed row, fails in one line naming the file (and line) with exit status 2.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app
from absl import flags

from core import app_logging
from core import cli
from pipeline import movielens_convert

_INPUT = flags.DEFINE_string("input", None,
                             "MovieLens directory (ml-latest-small, ml-25m or ml-100k).")
_OUT = flags.DEFINE_string("out", None, "Output root: logs/ and catalog/ go under it.")
_PERIOD = flags.DEFINE_integer("period_days", 1, "Calendar days per partition.",
                               lower_bound=1)
_STRICT = flags.DEFINE_bool("strict", False, "Fail on the first malformed row.")


def main(argv: Sequence[str]) -> None:
  """Checks the flags, converts, prints the report without its example rows."""
  del argv
  try:
    if not _INPUT.value:
      raise app.UsageError("--input is required")
    out = cli.workdir(_OUT.value, "out")
  except app.UsageError as e:
    cli.exit_with_error(e)
  app_logging.setup(out, "movielens")
  try:
    result = movielens_convert.convert(_INPUT.value, out, _PERIOD.value, _STRICT.value)
  except (FileNotFoundError, movielens_convert.MalformedRow) as e:
    cli.exit_with_error(e)
  result.pop("examples")
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
