"""Where an app's log goes: the whole INFO log to a file, the terminal to the app.

The libraries under the apps (TensorFlow, Beam, absl) log hundreds of INFO lines
and warnings a day; on the terminal they bury the app's own progress lines. So
an app that calls `setup` keeps the terminal for what it prints itself, and the
full log (absl, Python logging, Beam, Python warnings) goes to
`W/run_logs/<app>-<UTC time>-<pid>.log`. What native code writes to the process's
stderr (ScaNN's C++ log, Beam's worker processes) goes to that file too: file
descriptor 2 is pointed at it, while Python's `sys.stderr` keeps the terminal for
the app's errors. TensorFlow's C++ log is silenced by the packages' `__init__`
(TF_CPP_MIN_LOG_LEVEL=3 unless set; =0 brings it back, into the file).

The log comes back to the terminal (and still goes to the file) with absl's
`--verbosity=0` (`-v 0`; 1 adds DEBUG) or `--alsologtostderr`; `--logtostderr`
sends it to the terminal only.

  workdir = cli.workdir(_WORKDIR.value)   # validate first: nothing is created before
  log_path = app_logging.setup(workdir, "daily")
"""

from __future__ import annotations

import datetime as dt
import io
import logging as py_logging
import os
import sys
from typing import Optional

from absl import flags
from absl import logging

from core import workdir as workdir_lib

_held: Optional[io.StringIO] = None  # records logged before the file is opened
_path: Optional[str] = None


def verbose() -> bool:
  """Whether the user asked for the log on the terminal (--verbosity, -v, ...)."""
  names = flags.FLAGS
  return bool(names["verbosity"].present or names["alsologtostderr"].value
              or names["logtostderr"].value)


def _handler() -> logging.PythonHandler:
  return logging.get_absl_handler().python_handler


def quiet_terminal() -> None:
  """Holds the log in memory (off the terminal) until `log_to_file` names the file.

  Call it first thing in main: records logged while the arguments are checked are
  written to the file once it exists, or dropped when the arguments are refused
  (and nothing was created).
  """
  global _held
  logging.use_absl_handler()  # app.run does this; here for callers outside app.run
  py_logging.captureWarnings(True)  # Python warnings go to the log, not stderr
  # TensorFlow adds its own stderr handler when it is imported before any other.
  tf_logger = py_logging.getLogger("tensorflow")
  for h in list(tf_logger.handlers):
    if isinstance(h, py_logging.StreamHandler) and h.stream in (sys.stderr,
                                                                sys.__stderr__):
      tf_logger.removeHandler(h)
  if flags.FLAGS["logtostderr"].value or _held is not None:
    return
  if verbose():
    flags.FLAGS.alsologtostderr = True
  _held = io.StringIO()
  _handler().stream = _held


def log_to_file(workdir: str, app_name: str) -> Optional[str]:
  """Writes the log from now on (and what was held) to a new file under W/run_logs.

  Returns:
    The file's path; None under --logtostderr (the log goes to stderr only).
  """
  global _held, _path
  if _path is not None:
    return _path
  if flags.FLAGS["logtostderr"].value:
    return None
  directory = workdir_lib.Workdir(workdir).run_logs_dir
  os.makedirs(directory, exist_ok=True)
  stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  path = os.path.join(directory, f"{app_name}-{stamp}-{os.getpid()}.log")
  stream = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
  handler = _handler()
  handler.acquire()
  try:
    if _held is not None:
      stream.write(_held.getvalue())
    stream.flush()
    handler.stream = stream
    _held = None
  finally:
    handler.release()
  if not verbose():
    _native_stderr_to(stream)
  _path = path
  logging.info("%s: log of %s (pid %d)", path, " ".join(sys.argv), os.getpid())
  return path


def _native_stderr_to(stream: io.TextIOBase) -> None:
  """Points file descriptor 2 at `stream`'s file; `sys.stderr` keeps the terminal."""
  sys.stderr.flush()
  terminal = os.dup(2)
  sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding,
                         errors="backslashreplace")
  os.dup2(stream.fileno(), 2)


def log_path() -> Optional[str]:
  """The log file of this process, once `log_to_file` opened it."""
  return _path


def setup(workdir: str, app_name: str) -> Optional[str]:
  """`quiet_terminal` then `log_to_file`: the one call for an app with a workdir.

  Call it after the arguments are validated (it creates W/run_logs).
  """
  quiet_terminal()
  return log_to_file(workdir, app_name)
