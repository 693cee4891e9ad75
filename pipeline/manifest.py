"""Which steps of which day are complete: `W/manifest.json`, rewritten atomically."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any, Optional, Sequence


class Manifest:
  """Per-day step records. A step is complete once `mark` returned."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "manifest.json")
    self._days: dict[str, dict[str, Any]] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self._days = json.load(f).get("days", {})

  def done(self, day: dt.date, step: str) -> bool:
    return step in self._days.get(day.isoformat(), {})

  def get(self, day: dt.date, step: str) -> Optional[dict[str, Any]]:
    return self._days.get(day.isoformat(), {}).get(step)

  def mark(self, day: dt.date, step: str, record: dict[str, Any]) -> None:
    self.mark_all([day], step, record)

  def mark_all(self, days: Sequence[dt.date], step: str, record: dict[str, Any]) -> None:
    """`mark` for many days at once, with one write (a catch-up's skipped days)."""
    for day in days:
      self._days.setdefault(day.isoformat(), {})[step] = dict(record)
    self._write()

  def clear(self, day: dt.date) -> None:
    """Forgets a day (for --force), so every step of it runs again."""
    self._days.pop(day.isoformat(), None)
    self._write()

  def days(self) -> dict[str, dict[str, Any]]:
    return {d: dict(steps) for d, steps in sorted(self._days.items())}

  def _write(self) -> None:
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"days": self._days}, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
