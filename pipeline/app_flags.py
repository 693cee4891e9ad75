"""Flags shared by several absl apps, defined once, and the checks of their values.

absl flags are process-global, and the daily job imports every step's module to
run the steps in one process. So a flag name is defined exactly once in the
project: the names several apps share live here, and each app's own flags have
names unique to it (and are then accepted by the daily job as well).

Apps that pass the flags they do not know to Beam parse with
`parse_flags_with_beam_options`, so a misspelt flag fails instead of being handed
to Beam (which would drop it with a warning and run with the default).
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import sys
from typing import NoReturn, Optional, Sequence

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

# The exit status of a command line that cannot be run as given (as argparse's).
USAGE_EXIT_CODE = 2


def workdir(default: Optional[str] = None) -> str:
  """The --workdir value (or `default`), checked; a usage error when it cannot be one.

  Every app calls this before it creates anything. A local path must be a
  directory, or not exist yet under a directory (it is created later); the
  filesystem root is refused. Paths of other filesystems (gs://...) are not
  checked here.
  """
  value = WORKDIR.value or default
  if not value:
    raise app.UsageError("--workdir is required")
  if "://" in value:
    return value
  path = os.path.abspath(value)
  if path == os.path.dirname(path):
    raise app.UsageError(f"--workdir={value}: the filesystem root cannot be a workdir; "
                         "give a directory of its own")
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is" if existing == path else f"is under {existing}, which is"
    raise app.UsageError(f"--workdir={value} {what} not a directory")
  return value


def parse_day(text: Optional[str], flag: str = "date") -> dt.date:
  """A YYYY-MM-DD flag value -> date, or a usage error naming the flag."""
  if not text:
    raise flags.ValidationError(f"--{flag} is required (YYYY-MM-DD)")
  try:
    return dt.date.fromisoformat(text)
  except ValueError as e:
    raise flags.ValidationError(f"--{flag}={text!r} is not YYYY-MM-DD") from e


def exit_with_error(error: BaseException | str) -> NoReturn:
  """Prints `error: <error>` as one line on stderr and exits with status 2."""
  message = " ".join(str(error).split("\n")).strip()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


class _BeamArgumentError(flags.Error):
  """A command-line argument that is neither an app flag nor a Beam pipeline option."""


def _beam_parser():
  """Beam's own parser of every PipelineOptions subclass imported so far.

  `PipelineOptions.get_all_options` builds it (the parser Beam itself parses the
  options with) and hands it to `add_extra_args_fn` before parsing; we keep it.
  """
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  parsers = []
  pipeline_options.PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
  parser = parsers[0]

  def error(message: str) -> NoReturn:
    raise _BeamArgumentError(message)

  parser.error = error  # argparse would print usage and exit; we name the argument
  return parser


def _suggestion(name: str, beam_options: Sequence[str]) -> str:
  candidates = [f"--{n}" for n in flags.FLAGS] + list(beam_options)
  close = difflib.get_close_matches(name, candidates, n=1)
  return f"; did you mean {close[0]}?" if close else ""


def check_beam_args(args: Sequence[str]) -> list[str]:
  """`args` (what an app's flags left) if Beam parses each as a pipeline option.

  Raises:
    flags.Error: the first argument Beam does not know, or cannot parse (a bad
      value, a missing value), with a suggestion for a near miss.
  """
  args = list(args)
  if not args:
    return args
  parser = _beam_parser()
  beam_options = [s for action in parser._actions  # pylint: disable=protected-access
                  for s in action.option_strings if s.startswith("--")]
  for arg in args:
    if arg in ("-h", "--help"):
      raise _BeamArgumentError(f"{arg}: use --help (or --helpfull)")
  try:
    _, unknown = parser.parse_known_args(args)
  except _BeamArgumentError as e:
    raise _BeamArgumentError(f"Beam pipeline option: {e}") from None
  if unknown:
    first = unknown[0]
    if not first.startswith("-"):
      raise _BeamArgumentError(f"unexpected argument {first!r}")
    name = first.split("=", 1)[0]
    raise _BeamArgumentError(
        f"unknown flag {name}: neither a flag of this app nor a Beam pipeline option"
        + _suggestion(name, beam_options))
  return args


def parse_flags_with_beam_options(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser` of apps that pass the flags they do not define to Beam.

  Returns argv[0] and the Beam pipeline options. A bad value of an app flag, or an
  argument that is not a Beam pipeline option either, ends the process with a
  one-line error and exit status 2, before the app does anything.

    app.run(main, flags_parser=app_flags.parse_flags_with_beam_options)
  """
  try:
    rest = flags.FLAGS(list(argv), known_only=True)
    return rest[:1] + check_beam_args(rest[1:])
  except flags.Error as e:
    exit_with_error(e)
