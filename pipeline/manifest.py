"""Which steps of which day are complete: `W/manifest.json`, rewritten atomically.

Every step rewrites the file, so the text of each day is kept and only the days a
write changes are encoded again: a step's write costs about the same on the 1000th
day as on the first (the file is what json.dumps(..., indent=1, sort_keys=True)
writes, as it always was).

Besides the per-day step records, the manifest keeps the highest export version
ever recorded (`export_high_water`): versions only grow, even when W/exports was
lost or a day's records were cleared by --force, because TF Serving may have
loaded any version it saw and must never see a number reused for another model.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional, Sequence

from core import workdir as workdir_lib

EXPORT_STEP = "export"


class Manifest:
  """Per-day step records. A step is complete once `mark` returned."""

  def __init__(self, path: str):
    """`path`: the manifest file (core.workdir.Workdir.manifest_path)."""
    self.path = path
    self._days: dict[str, dict[str, Any]] = {}
    # Each day's steps as they appear in the file, from `_encode`.
    self._encoded: dict[str, str] = {}
    self._export_high_water = 0
    if workdir_lib.exists(path):
      saved = workdir_lib.read_json(path)
      self._days = saved.get("days", {})
      # Manifests written before the mark was kept: the versions they record.
      self._export_high_water = saved.get("export_high_water", max(
          (_version(steps.get(EXPORT_STEP)) for steps in self._days.values()),
          default=0))

  def done(self, day: dt.date, step: str) -> bool:
    return step in self._days.get(day.isoformat(), {})

  def get(self, day: dt.date, step: str) -> Optional[dict[str, Any]]:
    return self._days.get(day.isoformat(), {}).get(step)

  def mark(self, day: dt.date, step: str, record: dict[str, Any]) -> None:
    self.mark_all([day], step, record)

  def mark_all(self, days: Sequence[dt.date], step: str, record: dict[str, Any]) -> None:
    """`mark` for many days at once, with one write (a catch-up's skipped days)."""
    for day in days:
      # A copy of its own, so that the record kept is the one written.
      self._days.setdefault(day.isoformat(), {})[step] = json.loads(json.dumps(record))
      self._encoded.pop(day.isoformat(), None)
    if step == EXPORT_STEP:
      self._export_high_water = max(self._export_high_water, _version(record))
    self._write()

  def clear(self, day: dt.date) -> None:
    """Forgets a day (for --force), so every step of it runs again."""
    self._days.pop(day.isoformat(), None)
    self._encoded.pop(day.isoformat(), None)
    self._write()

  def days(self) -> dict[str, dict[str, Any]]:
    return {d: dict(steps) for d, steps in sorted(self._days.items())}

  @property
  def export_high_water(self) -> int:
    """The highest export version this workdir's manifest ever recorded (0: none)."""
    return self._export_high_water

  def _encode(self, day: str) -> str:
    """`day`'s entry of the "days" object, indented as json.dumps(indent=1) nests it."""
    if day not in self._encoded:
      steps = json.dumps(self._days[day], indent=1, sort_keys=True).replace("\n", "\n  ")
      self._encoded[day] = f"  {json.dumps(day)}: {steps}"
    return self._encoded[day]

  def _write(self) -> None:
    days = ",\n".join(self._encode(day) for day in sorted(self._days))
    workdir_lib.atomic_write(self.path, (
        f'{{\n "days": {{\n{days}\n }},\n' if days else '{\n "days": {},\n')
        + f' "export_high_water": {self._export_high_water}\n}}')


def _version(record: Optional[dict[str, Any]]) -> int:
  """The export version of an export step record (0 for none, or a skipped export)."""
  version = (record or {}).get("version")
  return version if isinstance(version, int) else 0
