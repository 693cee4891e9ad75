r"""The daily job on one big day (issue 14): wall time per step, peak memory, and
whether the cost per event grows with the day's size.

For each size in `--sizes`, in a fresh worker process: generates a synthetic world
of two days (`pipeline.synthetic_world`, the project's generator), cuts the first
day to `--warmup_events` events, then runs `pipeline.daily_job.DailyJob` over both
days in one workdir, as `pipeline.daily` does for a range. The small first day
traces and builds everything and makes the export that the big day's evaluation
scores; the second day, of `size` events, is the one measured. Per step of the
big day it reports wall and CPU seconds, both per 1,000 events, the process's peak
RSS during the step alone and how far above the RSS it started at it went (Linux:
the high-water mark is reset as each step starts, through /proc/self/clear_refs;
elsewhere the high-water mark so far), and the peak RSS of the whole run. The
warm-up day's steps are printed too: they are the steps' fixed cost, which a small
day's per-event figure includes.

The evaluation reads and scores the day in chunks (evaluator.CHUNK_EVENTS), so it
runs at any size; `--evaluate_max_events` can still skip it on a bigger day (marked
done in the manifest, as a day without an earlier export is).

Then, between the smallest and the largest size, the ratio of each step's seconds
per event (largest / smallest): at most about 1 when the cost per event does not
grow with the day (fixed costs make the small day's figure the larger one).

  python bench/big_day.py                                 # 100k and 1M events
  python bench/big_day.py --sizes=20000,100000 --json_out=/tmp/big.json

A 1M-event day takes about 30 minutes (evaluation included) on two loaded cores; run one bench at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["100000", "1000000"], "Events of the big day.")
_USERS = flags.DEFINE_integer("users", 50_000, "Users of the world (every size).")
_ITEMS = flags.DEFINE_integer("items", 20_000, "Items cataloged before the first day.")
_WARMUP = flags.DEFINE_integer("warmup_events", 2_000, "Events of the first day.")
_EVALUATE_MAX = flags.DEFINE_integer(
    "evaluate_max_events", 0, "Skip the evaluate step (marked done in the manifest) "
    "of a day of more events (0: never skip it).")
_BAD = flags.DEFINE_float("bad_line_rate", 0.001, "Corrupted lines (dead letters).")
_ROOT = flags.DEFINE_string("root", None, "Where the worlds and workdirs go "
                            "(default: a temporary directory, removed after).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here.")
_WORKER = flags.DEFINE_integer("worker_size", 0, "Internal: run one size in this "
                               "process and write its figures to ROOT/result-SIZE.json.")

FIRST = dt.date(2024, 3, 1)
STEPS = ("beam", "evaluate", "train", "export", "report")


def _peak_rss_mb() -> float:
  """This process's peak resident memory so far, in MB (Linux: ru_maxrss in KB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_step_peak() -> bool:
  """Resets this process's resident high-water mark (Linux 4.0+), so `_step_peak_mb`
  gives the peak since; False where it cannot (the peak so far stands in)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _status_mb(field: str) -> Optional[float]:
  """A memory field of /proc/self/status ("VmHWM", "VmRSS") in MB; None off Linux."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024
  except (OSError, StopIteration, ValueError):
    return None


def _step_peak_mb() -> float:
  """The resident high-water mark (since `_reset_step_peak`), in MB."""
  found = _status_mb("VmHWM")
  return _peak_rss_mb() if found is None else found


def generate(raw: str, size: int) -> dict[str, int]:
  """Writes the two days' logs and catalogs under `raw`; returns each day's events."""
  from pipeline import synthetic_world  # pylint: disable=import-outside-toplevel
  from pipeline import textio  # pylint: disable=import-outside-toplevel
  from core import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  config = synthetic_world.WorldConfig(
      start_date=FIRST, days=2, users=_USERS.value, items=_ITEMS.value,
      events_per_day=size, shards=4, bad_line_rate=_BAD.value)
  paths = workdir_lib.Workdir(raw)
  events_per_day = {}
  for i, (date, events, catalog, _) in enumerate(synthetic_world.iter_days(config)):
    if i == 0:
      events = events[:_WARMUP.value]
    per = -(-len(events) // config.shards)
    for s in range(config.shards):
      textio.write_gz(os.path.join(paths.logs_dir(date),
                                   f"part-{s:05d}-of-{config.shards:05d}.jsonl.gz"),
                      events[s * per:(s + 1) * per])
    textio.write_gz(os.path.join(paths.catalog_dir(date), "part-00000-of-00001.jsonl.gz"),
                    catalog)
    events_per_day[date.isoformat()] = len(events)
  return events_per_day


def run_size(root: str, size: int) -> dict[str, Any]:
  """One size, in this process: the world, then the daily job over its two days."""
  import core  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from core import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from pipeline import daily_job  # pylint: disable=import-outside-toplevel
  from pipeline import workdir_lock  # pylint: disable=import-outside-toplevel

  raw, workdir = (os.path.join(root, f"{kind}-{size}") for kind in ("raw", "workdir"))
  for leftover in (raw, workdir):  # of an earlier run that failed
    shutil.rmtree(leftover, ignore_errors=True)
  start = time.perf_counter()
  events = generate(raw, size)
  generate_s = time.perf_counter() - start
  paths = workdir_lib.Workdir(workdir, os.path.join(raw, "logs"),
                              os.path.join(raw, "catalog"))
  since: list[tuple[float, float]] = []  # (wall, CPU) when the last step ended
  started: list[Optional[float]] = []  # the resident MB then (None: unknown)
  steps: dict[str, dict[str, float]] = {}

  def progress(line: str) -> None:
    """The job's line after each step ("D step seconds ..."): the step's figures."""
    step = line.split()[1]
    if step in STEPS:
      wall, cpu = time.perf_counter(), time.process_time()
      steps[step] = {"wall_s": wall - since[-1][0], "cpu_s": cpu - since[-1][1],
                     "peak_rss_mb": _step_peak_mb() if reset else _peak_rss_mb(),
                     "start_rss_mb": started[-1]}
      since.append((wall, cpu))
      _reset_step_peak()
      started.append(_status_mb("VmRSS"))

  days = []
  reset = _reset_step_peak()
  with workdir_lock.WorkdirLock(workdir):
    job = daily_job.DailyJob(paths, config=ModelConfig(), progress=progress)
    for date in sorted(events):
      day = dt.date.fromisoformat(date)
      steps.clear()
      if _EVALUATE_MAX.value and events[date] > _EVALUATE_MAX.value:
        job.manifest.mark(day, "evaluate", {"skipped": f"{events[date]} events, more "
                                            f"than --evaluate_max_events"})
        steps["evaluate"] = {"skipped": True}
      since.append((time.perf_counter(), time.process_time()))
      _reset_step_peak()
      started.append(_status_mb("VmRSS"))
      record = job.run_day(day)
      for step, figures in steps.items():
        figures["recorded_s"] = record[step].get("seconds")
      days.append({"day": date, "events": events[date], "steps": dict(steps),
                   "examples": record["train"].get("examples"),
                   "input_lines": record["beam"].get("input_lines")})
  shutil.rmtree(raw, ignore_errors=True)
  shutil.rmtree(workdir, ignore_errors=True)
  return {"size": size, "generate_s": generate_s, "warmup": days[0], "big": days[1],
          "peak_rss_mb": _peak_rss_mb(), "step_peaks": reset, "cpus": os.cpu_count()}


def _ran(day: dict[str, Any]) -> list[str]:
  """The steps that ran on `day` (not skipped)."""
  return [s for s in STEPS if s in day["steps"] and "skipped" not in day["steps"][s]]


def _per_k(day: dict[str, Any], step: str, kind: str) -> float:
  return 1000 * day["steps"][step][kind] / day["events"]


def table(results: list[dict[str, Any]]) -> str:
  """Markdown: each size's big day per step, the warm-up day, and the growth ratio."""
  lines = ["| step | " + " | ".join(
      f"{r['size']:,} events: s (s/1k events, CPU s/1k), " + (
          "the step's peak RSS GB (+ above the RSS it started at)" if r.get("step_peaks")
          else "peak RSS so far GB") for r in results)
           + f" | warm-up day ({results[0]['warmup']['events']:,} events) s |",
           "|---" * (len(results) + 2) + "|"]
  for step in STEPS:
    cells = []
    for r in results:
      big = r["big"]
      if step not in _ran(big):
        cells.append("skipped")
        continue
      figures = big["steps"][step]
      added = (f" (+{(figures['peak_rss_mb'] - figures['start_rss_mb']) / 1024:.2f})"
               if r.get("step_peaks") and figures.get("start_rss_mb") is not None else "")
      cells.append(f"{figures['wall_s']:.1f} ({_per_k(big, step, 'wall_s'):.3f}, "
                   f"{_per_k(big, step, 'cpu_s'):.3f}), "
                   f"{figures['peak_rss_mb'] / 1024:.2f}{added}")
    lines.append(f"| {step} | " + " | ".join(cells)
                 + f" | {results[0]['warmup']['steps'][step]['wall_s']:.1f} |")
  totals = []
  for r in results:
    big = r["big"]
    wall = sum(big["steps"][s]["wall_s"] for s in _ran(big))
    cpu = sum(big["steps"][s]["cpu_s"] for s in _ran(big))
    totals.append(f"{wall:.1f} ({1000 * wall / big['events']:.3f}, "
                  f"{1000 * cpu / big['events']:.3f}), {r['peak_rss_mb'] / 1024:.2f}")
  warmup = sum(results[0]["warmup"]["steps"][s]["wall_s"] for s in STEPS)
  lines.append("| **day** (steps that ran) | " + " | ".join(totals) + f" | {warmup:.1f} |")
  if len(results) > 1:
    small, large = results[0], results[-1]
    both = [s for s in _ran(small["big"]) if s in _ran(large["big"])]
    lines += ["", f"| seconds per event, {large['size']:,} / {small['size']:,} events "
              "| wall | CPU |", "|---|---|---|"]
    for step in both + ["steps " + " + ".join(both)]:
      ratios = []
      for kind in ("wall_s", "cpu_s"):
        per = [sum(r["big"]["steps"][s][kind] for s in (both if step not in both
                                                          else [step]))
               / r["big"]["events"] for r in (small, large)]
        ratios.append(f"{per[1] / per[0]:.2f}")
      lines.append(f"| {step} | " + " | ".join(ratios) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  if _WORKER.value:
    with open(os.path.join(_ROOT.value, f"result-{_WORKER.value}.json"), "w") as f:
      json.dump(run_size(_ROOT.value, _WORKER.value), f)
    return
  root = _ROOT.value or tempfile.mkdtemp(prefix="big_day-")
  os.makedirs(root, exist_ok=True)
  results = []
  try:
    for size in sorted(int(s) for s in _SIZES.value):
      command = [sys.executable, os.path.abspath(__file__), f"--worker_size={size}",
                 f"--root={root}", f"--users={_USERS.value}", f"--items={_ITEMS.value}",
                 f"--warmup_events={_WARMUP.value}", f"--bad_line_rate={_BAD.value}",
                 f"--evaluate_max_events={_EVALUATE_MAX.value}"]
      log = os.path.join(root, f"worker-{size}.log")
      with open(log, "w") as output:
        done = subprocess.run(command, stdout=output, stderr=output, check=False)
      if done.returncode:
        raise SystemExit(f"the worker for {size} events failed ({done.returncode}); "
                         f"see {log}")
      with open(os.path.join(root, f"result-{size}.json")) as f:
        results.append(json.load(f))
      big = results[-1]["big"]
      print(f"{size:,} events: generated in {results[-1]['generate_s']:.1f} s, day "
            f"{sum(big['steps'][s]['wall_s'] for s in _ran(big)):.1f} s "
            f"({', '.join(_ran(big))}), peak RSS {results[-1]['peak_rss_mb'] / 1024:.2f} GB",
            flush=True)
  finally:
    if not _ROOT.value:
      shutil.rmtree(root, ignore_errors=True)
  text = table(results)
  print(text)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"results": results, "table": text}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
