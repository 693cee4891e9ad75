"""An exclusive lock on a workdir, so two daily runs cannot both proceed.

The lock is an `flock` on `W/.lock`: the kernel drops it when its process dies, so
a crashed run never leaves a lock that blocks the next one. The file also records
who holds it (pid, host, start time) for the refusal message and for the log line
that notes a stale file left by a dead holder.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from typing import Optional

from absl import logging

from core import workdir as workdir_lib


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """Context manager holding `W/.lock` exclusively for the duration of a run."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = workdir_lib.Workdir(workdir).lock_path
    self._fd: Optional[int] = None

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def __enter__(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = self._holder()
      raise WorkdirLocked(
          f"{self.path} is held by pid {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')} since {holder.get('since', '?')}: another run on "
          "this workdir is in progress. Wait for it to finish.") from None
    previous = self._holder()
    if previous.get("pid"):
      logging.warning("Taking over %s from pid %s (%s), which is no longer running.",
                      self.path, previous.get("pid"), previous.get("since"))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
