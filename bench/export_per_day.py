r"""Seconds per day of `serving.exporter.export_day` over consecutive days, old vs new.

The daily job trains a day, then exports it, keeping one `ExportState` in one
process. This bench does the same on small synthetic days (MovieLens-100K's
shape, as bench/daily_catchup.py: --items cataloged before day 1, a few born each
day, --events_per_day events), training each day with the Trainer and timing only
the export. Each code tree (this one, and --old_tree, e.g. the committed tree
from `git archive HEAD`) runs in its own process on a copy of the same data, the
trees taking turns day by day; the report gives each tree's median seconds per
day (the first day, which traces and builds everything, apart) and new / old.

Where the time goes: each tree's export functions are wrapped with timers
(inclusive seconds; nested ones are counted inside their callers too): reading
the corpus, embedding, the recall queries, ScaNN tuning (its builds, the exact
search and the ScaNN searches of the recall check), the servables, saving,
warm-up and metadata files, verifying (loading back or restoring into the
SavedModel loaded before, and replaying), publishing.

  python bench/export_per_day.py --old_tree=/tmp/OLD --days=20
  python bench/export_per_day.py --old_tree=/tmp/OLD --new_tree=/tmp/NEW --days=20
  python bench/export_per_day.py --days=5 --json_out=/tmp/export.json
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIRST_DAY = dt.date(2024, 1, 1)
# (module, attribute) timed in the worker, where present in the tree.
_TIMED = (
    ("serving.corpus", "read_corpus"), ("serving.exporter", "_day_queries"),
    ("serving.exporter", "Embedder.__call__"), ("serving.index", "tune_scann"),
    ("serving.index", "build_scann"), ("serving.index", "exact_top_k_numpy"),
    ("serving.index", "scann_rows"), ("serving.exporter", "_retrievers"),
    ("serving.exporter", "data_range"), ("serving.exporter", "stack_versions"),
    ("serving.servable", "Retriever.save"),
    ("serving.warmup", "write_warmup"), ("serving.versions", "write_metadata"),
    ("serving.exporter", "_verify"), ("serving.exporter", "_restored"),
    ("serving.warmup", "replay"), ("serving.versions", "publish"),
    ("serving.exporter", "build_export"), ("serving.exporter", "write_export"),
)


def _flags(argv: Sequence[str]) -> dict[str, str]:
  """--name=value arguments (this bench runs its workers without absl)."""
  values = {}
  for arg in argv:
    if not arg.startswith("--") or "=" not in arg:
      raise SystemExit(f"expected --name=value, got {arg!r}")
    name, value = arg[2:].split("=", 1)
    values[name] = value
  return values


def write_days(workdir: str, days: int, events_per_day: int, items: int,
               new_items_per_day: int, users: int = 943, seed: int = 0) -> None:
  """W/data/D for `days` days: the corpus cataloged up to D and D's events."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from models import features  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  histories: dict[int, list[str]] = {}

  def item(j: int) -> dict[str, Any]:
    return {"item_id": f"item_{j:06d}", "item_channel_id": f"channel_{j % 97:03d}",
            "item_topics": [f"topic_{j % 31:02d}", f"topic_{j % 7:02d}"],
            "item_topic_weights": [0.5, 0.5], "item_duration_s": 60.0 + j % 600}

  def write(path: str, rows: list[dict[str, Any]]) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
      for row in rows:
        writer.write(features.to_example(row).SerializeToString())

  for d in range(days):
    day = _FIRST_DAY + dt.timedelta(days=d)
    directory = os.path.join(workdir, "data", day.isoformat())
    cataloged = items + new_items_per_day * d
    write(os.path.join(directory, "corpus-00000-of-00001.tfrecord.gz"),
          [item(j) for j in range(cataloged)])
    start = int(dt.datetime(day.year, day.month, day.day,
                            tzinfo=dt.timezone.utc).timestamp())
    events = []
    for n, ts in enumerate(np.sort(rng.integers(start, start + 86400, events_per_day))):
      user = int(rng.integers(users))
      past = histories.setdefault(user, [])
      j = int(min(cataloged - 1, rng.zipf(1.3) - 1))
      events.append({"event_id": f"e{d}-{n}", "timestamp": int(ts),
                     "user_id": f"user_{user:05d}", "device": "web", "country": "de",
                     "seed_item_id": past[0] if past else "",
                     "history_item_ids": past[:50], **item(j), "reward": 1.0})
      past.insert(0, item(j)["item_id"])
    write(os.path.join(directory, "examples-00.tfrecord.gz"), events)


def _timed(timings: dict[str, float], module: Any, attribute: str) -> None:
  """Replaces module.attribute (or module.Class.method) with a timing wrapper."""
  owner, name = module, attribute
  if "." in attribute:
    owner_name, name = attribute.split(".")
    owner = getattr(module, owner_name, None)
  original = getattr(owner, name, None) if owner is not None else None
  if original is None:
    return
  key = f"{module.__name__.split('.')[-1]}.{attribute}"

  def wrapper(*args, **kwargs):
    started = time.perf_counter()
    try:
      return original(*args, **kwargs)
    finally:
      timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
  setattr(owner, name, wrapper)


_RESULT = "@@export_per_day "


def worker(workdir: str, batch_size: int) -> None:
  """Trains and exports, one day per line read from stdin ("YYYY-MM-DD").

  Prints each day's export seconds and timed parts as one JSON line after
  _RESULT, so that the driver can interleave trees day by day.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from models import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from serving import exporter  # pylint: disable=g-import-not-at-top
  timings: dict[str, float] = {}
  for module_name, attribute in _TIMED:
    _timed(timings, importlib.import_module(module_name), attribute)
  trainer = trainer_lib.Trainer(workdir, ModelConfig(batch_size=batch_size))
  state = exporter.ExportState()
  for line in sys.stdin:
    day = dt.date.fromisoformat(line.strip())
    trainer.train_day(day)
    timings.clear()
    started = time.perf_counter()
    exporter.export_day(trainer.model, trainer.config, workdir, day,
                        trained=trainer.trained_position(), state=state)
    seconds = time.perf_counter() - started
    print(_RESULT + json.dumps({"seconds": seconds, "parts": timings}), flush=True)


def _median(values: Sequence[float]) -> float:
  return statistics.median(values) if values else float("nan")


def summarize(days: list[dict[str, Any]]) -> dict[str, Any]:
  """Median seconds per day after the first, and of each timed part."""
  rest = days[1:] or days
  parts = sorted({k for d in rest for k in d["parts"]})
  return {"first_day_s": days[0]["seconds"],
          "median_s": _median([d["seconds"] for d in rest]),
          "parts_median_s": {k: _median([d["parts"].get(k, 0.0) for d in rest])
                             for k in parts},
          "seconds": [d["seconds"] for d in days]}


def run_trees(trees: dict[str, str], data: str, days: int,
              batch_size: int) -> dict[str, Any]:
  """Runs one worker per tree, each on a fresh copy of `data`, day by day in turn.

  Day d of every tree runs before day d + 1 of any, so the load of other
  processes falls on all trees alike.
  """
  workdirs, workers = {}, {}
  try:
    for name, tree in trees.items():
      workdirs[name] = tempfile.mkdtemp(prefix=f"export_per_day-{name}-")
      shutil.copytree(os.path.join(data, "data"), os.path.join(workdirs[name], "data"))
      workers[name] = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--worker=1", f"--tree={tree}",
           f"--workdir={workdirs[name]}", f"--batch_size={batch_size}"],
          env={**os.environ, "PYTHONPATH": tree}, stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, text=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for d in range(days):
      day = _FIRST_DAY + dt.timedelta(days=d)
      for name, process in workers.items():
        process.stdin.write(day.isoformat() + "\n")
        process.stdin.flush()
        for line in process.stdout:
          if line.startswith(_RESULT):
            results[name].append(json.loads(line[len(_RESULT):]))
            break
        else:
          raise RuntimeError(f"the {name} worker stopped at {day} (exit status "
                             f"{process.wait()})")
    return {name: summarize(days_done) for name, days_done in results.items()}
  finally:
    for process in workers.values():
      process.stdin.close()
      process.wait()
    for workdir in workdirs.values():
      shutil.rmtree(workdir, ignore_errors=True)


def report(figures: dict[str, Any]) -> None:
  """Prints per-tree medians, the ratio and the breakdown."""
  trees = figures["trees"]
  print(f"\nexport_day over {figures['days']} days "
        f"({figures['events_per_day']} events, {figures['items']}+ items)")
  print(f"{'':<34}" + "".join(f"{name:>10}" for name in trees))
  print(f"{'first day s':<34}" + "".join(f"{t['first_day_s']:>10.2f}"
                                        for t in trees.values()))
  print(f"{'median s/day (days 2..)':<34}" + "".join(f"{t['median_s']:>10.2f}"
                                                    for t in trees.values()))
  parts = sorted({k for t in trees.values() for k in t["parts_median_s"]})
  for part in parts:
    print(f"  {part:<32}" + "".join(f"{t['parts_median_s'].get(part, 0.0):>10.3f}"
                                    for t in trees.values()))
  if "new_over_old" in figures:
    print(f"new / old median: {figures['new_over_old']:.3f}")


def main(argv: Sequence[str]) -> None:
  values = _flags(argv[1:])
  if values.get("worker"):
    worker(values["workdir"], int(values["batch_size"]))
    return
  days = int(values.get("days", 20))
  events = int(values.get("events_per_day", 500))
  items = int(values.get("items", 1682))
  trees = {"new": os.path.abspath(values.get("new_tree", _REPO))}
  if values.get("old_tree"):
    trees = {"old": os.path.abspath(values["old_tree"]), **trees}
  data = tempfile.mkdtemp(prefix="export_per_day-data-")
  figures: dict[str, Any] = {"days": days, "events_per_day": events, "items": items}
  try:
    write_days(data, days, events, items, int(values.get("new_items_per_day", 5)))
    figures["trees"] = run_trees(trees, data, days, int(values.get("batch_size", 128)))
  finally:
    shutil.rmtree(data, ignore_errors=True)
  if "old" in figures["trees"]:
    figures["new_over_old"] = (figures["trees"]["new"]["median_s"] /
                               figures["trees"]["old"]["median_s"])
  report(figures)
  if values.get("json_out"):
    with open(values["json_out"], "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  if "--worker=1" in sys.argv:
    tree = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--tree="))
    sys.path.insert(0, tree)
  else:
    sys.path.insert(0, _REPO)
  import core  # noqa: E402,F401  (the environment, before TensorFlow loads)
  main(sys.argv)
