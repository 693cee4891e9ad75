r"""Fixed cost per day of a daily-job catch-up over tiny days (issue 7, "Catch-up").

Generates `--days` synthetic days of `--events_per_day` events (default 200 x 500,
MovieLens-100K's shape), then catches them all up with `pipeline.daily_job.run` in
this one process, from a fresh workdir. On days this small almost nothing scales
with the data, so a day's wall time is its fixed cost: Beam start-up, restore,
tracing, checkpoint and SavedModel writes, evaluation set-up. The table gives the
mean and median seconds of each step (from the manifest's step records), the
training compute proper (examples / the trainer's examples/s), and the fixed cost
per day = day total - training compute. Medians resist the noise of a shared
machine; the first day is reported apart (it traces and builds everything).

  python bench/daily_catchup.py --out=/tmp/catchup
  python bench/daily_catchup.py --out=/tmp/catchup --days=20 --profile
"""

from __future__ import annotations

import cProfile
import datetime as dt
import io
import os
import pstats
import shutil
import statistics
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import cli  # noqa: E402
from core import workdir as workdir_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from pipeline import daily_job  # noqa: E402
from pipeline import synthetic_world  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/towerstream_catchup", "Output root.")
_DAYS = flags.DEFINE_integer("catchup_days", 200, "Days to catch up.")
_EVENTS = flags.DEFINE_integer("catchup_events_per_day", 500, "Events per day.")
_USERS = flags.DEFINE_integer("catchup_users", 943, "Synthetic users.")
_ITEMS = flags.DEFINE_integer("catchup_items", 1682, "Items cataloged before day 1.")
_NEW_ITEMS = flags.DEFINE_integer("catchup_new_items_per_day", 5, "Items born a day.")
_BATCH = flags.DEFINE_integer("catchup_batch_size", 128, "Training batch size.")
_PROFILE = flags.DEFINE_bool("profile", False, "cProfile the catch-up; print the top.")

STEPS = daily_job.STEPS


def _stats(values: Sequence[float]) -> dict[str, float]:
  if not values:
    return {"mean": float("nan"), "median": float("nan"), "max": float("nan")}
  return {"mean": statistics.fmean(values), "median": statistics.median(values),
          "max": max(values)}


def _train_compute(record: dict[str, Any]) -> float:
  """Seconds the trainer spent on its batches (examples / examples per second)."""
  rate = record.get("examples_per_s")
  return record.get("examples_this_run", 0) / rate if rate else 0.0


def summarize(days: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Any]:
  """Per-step and per-day figures from the manifest's day records."""
  ran = [steps for _, steps in sorted(days.items()) if "report" in steps]
  rest = ran[1:] or ran  # The first day traces and builds everything: apart.
  per_step = {step: _stats([d[step]["seconds"] for d in rest]) for step in STEPS}
  totals = [sum(d[step]["seconds"] for step in STEPS) for d in rest]
  compute = [_train_compute(d["train"]) for d in rest]
  fixed = [t - c for t, c in zip(totals, compute)]
  steps_s = sum(sum(d[step]["seconds"] for step in STEPS) for d in ran)
  return {
      "days": len(ran),
      "wall_s": wall_s,
      "first_day_s": {step: ran[0][step]["seconds"] for step in STEPS} if ran else {},
      "per_step_s": per_step,
      "day_total_s": _stats(totals),
      "train_compute_s": _stats(compute),
      "fixed_per_day_s": _stats(fixed),
      "outside_steps_s": wall_s - steps_s,
  }


def table(result: dict[str, Any]) -> str:
  lines = [f"{result['days']} days x {result['events_per_day']} events, wall "
           f"{result['wall_s']:.1f} s ({result['wall_s'] / max(result['days'], 1):.2f} "
           f"s/day); days 2.. below, first day apart",
           "| part | first day s | mean s | median s | max s |", "|---|---|---|---|---|"]

  def row(name: str, stats: dict[str, float], first: Any = "") -> str:
    first = f"{first:.2f}" if isinstance(first, float) else first
    return (f"| {name} | {first} | {stats['mean']:.2f} | {stats['median']:.2f} | "
            f"{stats['max']:.2f} |")

  for step in STEPS:
    lines.append(row(step, result["per_step_s"][step], result["first_day_s"].get(step)))
  lines.append(row("day total", result["day_total_s"]))
  lines.append(row("train compute", result["train_compute_s"]))
  lines.append(row("**fixed cost per day**", result["fixed_per_day_s"]))
  lines.append(f"outside the steps (lock, manifest, listing): "
               f"{result['outside_steps_s']:.1f} s in all")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  out = _OUT.value
  raw = os.path.join(out, f"raw-{_DAYS.value}x{_EVENTS.value}")
  if not os.path.exists(os.path.join(raw, "catalog")):
    synthetic_world.generate(raw, synthetic_world.WorldConfig(
        days=_DAYS.value, events_per_day=_EVENTS.value, users=_USERS.value,
        items=_ITEMS.value, new_items_per_day=_NEW_ITEMS.value, shards=1))
  dates = sorted(os.listdir(os.path.join(raw, "logs")))
  workdir = os.path.join(out, "workdir")
  shutil.rmtree(workdir, ignore_errors=True)
  config = ModelConfig(batch_size=_BATCH.value)
  profiler = cProfile.Profile() if _PROFILE.value else None
  start = time.perf_counter()
  if profiler:
    profiler.enable()
  days = daily_job.run(
      workdir_lib.Workdir(workdir, os.path.join(raw, "logs"), os.path.join(raw, "catalog")),
      dt.date.fromisoformat(dates[0]), dt.date.fromisoformat(dates[-1]), config=config,
      pipeline_args=argv[1:])
  if profiler:
    profiler.disable()
  wall = time.perf_counter() - start
  result = {**summarize(days, wall), "events_per_day": _EVENTS.value,
            "config": config.to_dict()}
  text = table(result)
  print(text)
  if profiler:
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(60)
    print(buffer.getvalue())
  workdir_lib.write_json(os.path.join(out, "daily_catchup.json"), {**result, "table": text})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)
