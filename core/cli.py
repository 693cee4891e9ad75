"""Checks of command-line values, shared by every app; the flags themselves live in the apps.

Each app (a module with `main(argv)`) declares its own flags at its top and turns
their values into typed settings for the libraries; the checks here take values,
not flags, so that no library reads a flag.

Apps that pass the arguments they do not know to Beam parse with
`parse_flags_with_beam_options`, so a misspelt flag fails instead of being handed
to Beam (which would drop it with a warning and run with the default).
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import sys
from typing import Any, NoReturn, Optional, Sequence

from absl import app
from absl import flags

# The exit status of a command line that cannot be run as given (as argparse's).
USAGE_EXIT_CODE = 2


def workdir(value: Optional[str], flag: str = "workdir") -> str:
  """A --workdir value, checked; a usage error when it cannot be one.

  Every app calls this before it creates anything. A local path must be a
  directory, or not exist yet under a directory (it is created later); the
  filesystem root is refused. Paths of other filesystems (gs://...) are not
  checked here.
  """
  if not value:
    raise app.UsageError(f"--{flag} is required")
  if "://" in value:
    return value
  path = os.path.abspath(value)
  if path == os.path.dirname(path):
    raise app.UsageError(f"--{flag}={value}: the filesystem root cannot be a workdir; "
                         "give a directory of its own")
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is" if existing == path else f"is under {existing}, which is"
    raise app.UsageError(f"--{flag}={value} {what} not a directory")
  return value


def day_range(date: Optional[str], start: Optional[str], end: Optional[str]
              ) -> tuple[dt.date, dt.date]:
  """(first, last) of --date, or of --start_date/--end_date; a usage error otherwise."""
  if date and (start or end):
    raise flags.ValidationError("give --date, or --start_date and --end_date, not both")
  if date:
    day = parse_day(date, "date")
    return day, day
  if not start:
    raise flags.ValidationError("--date=YYYY-MM-DD or --start_date/--end_date is required")
  first, last = parse_day(start, "start_date"), parse_day(end, "end_date")
  if last < first:
    raise flags.ValidationError(f"--end_date {last} is before --start_date {first}")
  return first, last

def json_object(value: Optional[str], flag: str) -> dict[str, Any]:
  """A flag's JSON-object value -> dict ({} when unset), or a usage error naming it."""
  if not value:
    return {}
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError as e:
    raise flags.ValidationError(f"--{flag}={value}: not JSON: {e}") from e
  if not isinstance(parsed, dict):
    raise flags.ValidationError(f"--{flag}={value}: not a JSON object")
  return parsed


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


def no_arguments(argv: Sequence[str]) -> None:
  """A usage error naming what follows argv[0], for apps that take flags only."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
