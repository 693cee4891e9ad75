r"""A day's fixed cost over a daily-job catch-up of tiny days, this tree against another.

Generates `--days` synthetic days of `--events_per_day` events (default 200 x 500,
MovieLens-100K's shape), then catches them up from a fresh workdir, one day at a
time, in one worker process per code tree: this tree, and `--old_tree` (e.g. the
committed tree, `git archive HEAD | tar -x -C /tmp/OLD`) run with its own
PYTHONPATH. Each worker keeps one `DailyJob` for the whole catch-up, as
`pipeline.daily` does for a range; the trees take turns day by day (which one goes
first alternates), so a change in the machine's load falls on both alike.

On days this small almost nothing scales with the data, so a day's wall time is its
fixed cost: Beam start-up, restore, tracing, checkpoint and SavedModel writes,
evaluation set-up, the report. The tables give, per tree, the median seconds of
each step (the manifest's step records) and of the day (its steps, and the worker's
wall and CPU seconds for the whole day, manifest and lock included), the training
compute proper (examples / the trainer's examples/s), and new / old; then the
flatness: the median day of the first and of the last `--window` days (20, or less
so that they do not overlap), and last / first. Medians resist the noise of a shared
machine; the first day, which traces and builds everything, is reported apart.

  python bench/daily_catchup.py --old_tree=/tmp/OLD --days=200
  python bench/daily_catchup.py --old_tree=/tmp/OLD --days=30 --out=/tmp/catchup
  python bench/daily_catchup.py --days=20 --profile=1   # this tree alone, profiled
  python bench/daily_catchup.py --days=200 --keep_exports=2   # bounded disk

Flags are plain --name=value (no absl: a worker must import only its own tree).
"""

from __future__ import annotations

import cProfile
import datetime as dt
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("beam", "evaluate", "train", "export", "report")
_DEFAULTS = {
    "out": "/tmp/towerstream_catchup", "days": "200", "events_per_day": "500",
    "users": "943", "items": "1682", "new_items_per_day": "5", "batch_size": "128",
    "old_tree": "", "new_tree": _REPO, "window": "20", "profile": "0",
    "keep_exports": "0",
}


def parse_flags(argv: Sequence[str], defaults: dict[str, str]) -> dict[str, str]:
  """--name=value arguments over `defaults`; an unknown name is an error."""
  values = dict(defaults)
  for arg in argv:
    name, _, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
    if name not in defaults or "=" not in arg:
      raise SystemExit(f"error: unknown or malformed argument {arg!r}; flags: "
                       f"{', '.join('--' + n for n in defaults)}")
    values[name] = value
  return values


def synthetic_days(values: dict[str, str]) -> str:
  """OUT/raw-DAYSxEVENTS: the flags' synthetic days (logs and catalog), made once."""
  days, events = int(values["days"]), int(values["events_per_day"])
  os.makedirs(values["out"], exist_ok=True)
  raw = os.path.join(values["out"], f"raw-{days}x{events}")
  if not os.path.exists(os.path.join(raw, "catalog")):
    sys.path.insert(0, _REPO)
    from pipeline import synthetic_world  # pylint: disable=g-import-not-at-top
    synthetic_world.generate(raw, synthetic_world.WorldConfig(
        days=days, events_per_day=events, users=int(values["users"]),
        items=int(values["items"]), new_items_per_day=int(values["new_items_per_day"]),
        shards=1))
  return raw


def code_trees(values: dict[str, str]) -> dict[str, str]:
  """{"new": --new_tree, "old": --old_tree if given}, as absolute paths."""
  trees = {"new": os.path.abspath(values["new_tree"])}
  if values["old_tree"]:
    trees["old"] = os.path.abspath(values["old_tree"])
  return trees


def worker(tree: str, raw: str, workdir: str, batch_size: int,
           profile_to: Optional[str], keep_exports: int = 0) -> None:
  """Runs the daily job of `tree`, one day per line read from stdin ("YYYY-MM-DD").

  Answers each day with one JSON line: the day's manifest records and the day's wall
  and CPU seconds. Anything else the libraries print goes to stderr.
  """
  sys.path.insert(0, tree)
  answers = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  from core import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from pipeline import daily_job  # pylint: disable=g-import-not-at-top
  from pipeline import workdir_lock  # pylint: disable=g-import-not-at-top
  paths = workdir_lib.Workdir(workdir, os.path.join(raw, "logs"),
                              os.path.join(raw, "catalog"))
  profiler = cProfile.Profile() if profile_to else None
  with workdir_lock.WorkdirLock(workdir):
    # Pruning old versions (`--keep_exports`, a tree that has it) bounds the disk.
    settings = (daily_job.JobSettings(keep_exports=keep_exports) if keep_exports
                else daily_job.JobSettings())
    job = daily_job.DailyJob(paths, settings=settings,
                             config=ModelConfig(batch_size=batch_size))
    for line in sys.stdin:
      day = dt.date.fromisoformat(line.strip())
      wall, cpu = time.perf_counter(), time.process_time()
      if profiler:
        profiler.enable()
      record = job.run_day(day)
      if profiler:
        profiler.disable()
      answers.write(json.dumps({
          "day": day.isoformat(), "wall_s": time.perf_counter() - wall,
          "cpu_s": time.process_time() - cpu, "steps": record}, default=str) + "\n")
      answers.flush()
  if profiler:
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(80)
    with open(profile_to, "w") as f:
      f.write(buffer.getvalue())


def run_trees(trees: dict[str, str], raw: str, out: str, batch_size: int,
              profile: bool, keep_exports: int = 0) -> dict[str, list[dict[str, Any]]]:
  """Catches up every day of `raw` with each tree, the trees taking turns per day."""
  dates = sorted(os.listdir(os.path.join(raw, "logs")))
  workers = {}
  for name, tree in trees.items():
    workdir = os.path.join(out, f"workdir-{name}")
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, os.path.abspath(__file__), "--worker=1", f"--tree={tree}",
               f"--raw={raw}", f"--workdir={workdir}", f"--batch_size={batch_size}",
               f"--keep_exports={keep_exports}"]
    if profile and name == "new":
      command.append(f"--profile_to={os.path.join(out, 'profile-new.txt')}")
    workers[name] = subprocess.Popen(
        command, cwd=tree, env={**os.environ, "PYTHONPATH": tree},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=open(os.path.join(out, f"worker-{name}.log"), "w"), text=True)
  results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
  try:
    for i, day in enumerate(dates):
      order = list(workers) if i % 2 == 0 else list(reversed(workers))
      for name in order:
        process = workers[name]
        process.stdin.write(day + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer:
          raise SystemExit(f"the {name} worker died on {day}; see "
                           f"{os.path.join(out, f'worker-{name}.log')}")
        results[name].append(json.loads(answer))
      line = "  ".join(f"{name} {results[name][-1]['wall_s']:5.2f} s" for name in workers)
      print(f"{day}  {line}", flush=True)
  finally:
    for process in workers.values():
      process.stdin.close()
      process.wait()
  return results


def _median(values: Sequence[float]) -> float:
  return statistics.median(values) if values else float("nan")


def _train_compute(record: dict[str, Any]) -> float:
  """Seconds the trainer spent on its batches (examples / examples per second)."""
  rate = record.get("examples_per_s")
  return record.get("examples_this_run", 0) / rate if rate else 0.0


def summarize(days: list[dict[str, Any]], window: int) -> dict[str, Any]:
  """One tree's figures: medians over days 2.. and the first / last `window` days."""
  rest = days[1:] or days
  totals = [sum(d["steps"][step]["seconds"] for step in STEPS) for d in days]
  compute = [_train_compute(d["steps"]["train"]) for d in days]
  window = max(1, min(window, len(rest) // 2))
  return {
      "days": len(days),
      "first_day_s": {step: days[0]["steps"][step]["seconds"] for step in STEPS},
      "step_median_s": {step: _median([d["steps"][step]["seconds"] for d in rest])
                        for step in STEPS},
      "day_median_s": _median(totals[1:] or totals),
      "wall_median_s": _median([d["wall_s"] for d in rest]),
      "cpu_median_s": _median([d["cpu_s"] for d in rest]),
      "train_compute_median_s": _median(compute[1:] or compute),
      "fixed_median_s": _median([t - c for t, c in zip(totals[1:], compute[1:])]
                                or [totals[0] - compute[0]]),
      "wall_total_s": sum(d["wall_s"] for d in days),
      "window": window,
      "first_window_median_s": _median([d["wall_s"] for d in rest[:window]]),
      "last_window_median_s": _median([d["wall_s"] for d in rest[-window:]]),
  }


def table(figures: dict[str, dict[str, Any]], events_per_day: int) -> str:
  """Markdown tables of the figures; new / old where both trees ran."""
  names = list(figures)
  both = "old" in figures and "new" in figures
  any_figures = figures[names[0]]
  header = ("| seconds per day (median, days 2..) | "
            + " | ".join(names) + (" | new / old |" if both else " |"))
  lines = [f"{any_figures['days']} days x {events_per_day} events; the first day "
           "apart (it traces and builds everything)", "", header,
           "|---" * (len(names) + 1 + both) + "|"]

  def row(label: str, values: list[float]) -> None:
    ratio = f" | {values[names.index('new')] / values[names.index('old')]:.2f}" if (
        both and values[names.index("old")]) else (" | -" if both else "")
    lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + ratio + " |")

  for step in STEPS:
    row(step, [figures[n]["step_median_s"][step] for n in names])
  row("**day, its steps**", [figures[n]["day_median_s"] for n in names])
  row("day, wall (manifest and lock too)", [figures[n]["wall_median_s"] for n in names])
  row("day, CPU (all threads)", [figures[n]["cpu_median_s"] for n in names])
  row("train compute", [figures[n]["train_compute_median_s"] for n in names])
  row("**fixed cost per day** (steps - train compute)",
      [figures[n]["fixed_median_s"] for n in names])
  row("first day (all steps)", [sum(figures[n]["first_day_s"].values()) for n in names])
  row("catch-up wall, all days (minutes)", [figures[n]["wall_total_s"] / 60 for n in names])
  window = any_figures["window"]
  lines += ["", f"| flatness: day wall, median of {window} days | "
            + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for label, key in ((f"first {window} (days 2..{window + 1})", "first_window_median_s"),
                     (f"last {window}", "last_window_median_s")):
    lines.append(f"| {label} | " + " | ".join(f"{figures[n][key]:.2f}" for n in names)
                 + " |")
  lines.append("| last / first | " + " | ".join(
      f"{figures[n]['last_window_median_s'] / figures[n]['first_window_median_s']:.2f}"
      for n in names) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if "--worker=1" in argv:
    values = parse_flags([a for a in argv if a != "--worker=1"], {
        "tree": "", "raw": "", "workdir": "", "batch_size": "128", "profile_to": "",
        "keep_exports": "0"})
    worker(values["tree"], values["raw"], values["workdir"], int(values["batch_size"]),
           values["profile_to"] or None, int(values["keep_exports"]))
    return
  values = parse_flags(argv, _DEFAULTS)
  out, events = values["out"], int(values["events_per_day"])
  raw = synthetic_days(values)
  trees = code_trees(values)
  results = run_trees(trees, raw, out, int(values["batch_size"]), values["profile"] == "1",
                      int(values["keep_exports"]))
  figures = {name: summarize(days_, int(values["window"]))
             for name, days_ in results.items()}
  text = table(figures, events)
  print(text)
  with open(os.path.join(out, "daily_catchup.json"), "w") as f:
    json.dump({"flags": values, "figures": figures, "table": text, "days": results}, f,
              indent=1)
  if values["profile"] == "1":
    print(f"profile of the new tree: {os.path.join(out, 'profile-new.txt')}")


if __name__ == "__main__":
  main(sys.argv[1:])
