"""Flags shared by several absl apps, defined once.

absl flags are process-global, and the daily job imports every step's module to
run the steps in one process. So a flag name is defined exactly once in the
project: the names several apps share live here, and each app's own flags have
names unique to it (and are then accepted by the daily job as well).
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from absl import app
from absl import flags

WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (see README: layout).")
DATE = flags.DEFINE_string("date", None, "The day to process, YYYY-MM-DD.")
START_DATE = flags.DEFINE_string("start_date", None, "First day of a range, YYYY-MM-DD.")
END_DATE = flags.DEFINE_string("end_date", None, "Last day of a range, inclusive.")
LOGS = flags.DEFINE_string("logs", None, "Root of logs/YYYY-MM-DD/ (default W/logs); "
                           "any Beam filesystem path.")
CATALOG = flags.DEFINE_string("catalog", None, "Root of catalog/YYYY-MM-DD/ "
                              "(default W/catalog); any Beam filesystem path.")
OUT = flags.DEFINE_string("out", None, "Output root of generated logs/ and catalog/.")


def workdir() -> str:
  """The --workdir value, or a usage error when it is missing."""
  if not WORKDIR.value:
    raise app.UsageError("--workdir is required")
  return WORKDIR.value


def parse_day(text: Optional[str], flag: str = "date") -> dt.date:
  """A YYYY-MM-DD flag value -> date, or a usage error naming the flag."""
  if not text:
    raise flags.ValidationError(f"--{flag} is required (YYYY-MM-DD)")
  try:
    return dt.date.fromisoformat(text)
  except ValueError as e:
    raise flags.ValidationError(f"--{flag}={text!r} is not YYYY-MM-DD") from e
