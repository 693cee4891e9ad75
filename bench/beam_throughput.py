r"""Throughput and peak memory of the logs-to-TFRecords Beam job (issue 3).

Converts one synthetic day of `--events` events three ways, each in its own fresh
process so that peak memory is its own:
  loop      a plain single-process Python loop doing the same work: read lines,
            validate, dedupe, latest catalog entry, histories, serialize Examples,
            write a gzip TFRecord. Our stand-in for the limit on one core.
  beam      `run_day` on the DirectRunner's engine, defaults (one worker, in process).
  beam_mp2  the same with --direct_num_workers=2 --direct_running_mode=multi_processing.
and prints events/s, each as a ratio to the loop, wall time and peak RSS (the
process, and the largest of its worker processes).

  python bench/beam_throughput.py --events=1000000 [--json_out=F] [--profile]

--profile runs the in-process Beam job under cProfile and prints where the time goes.
"""

import cProfile
import datetime as dt
import io as std_io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_EVENTS = flags.DEFINE_integer("events", 1_000_000, "Events in the synthetic day.")
_MODES = flags.DEFINE_list("modes", ["loop", "beam", "beam_mp2"], "What to run.")
_BENCH_DIR = flags.DEFINE_string("bench_dir", None,
                                 "Scratch directory (default: a temporary one).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures here.")
_PROFILE = flags.DEFINE_bool("profile", False, "cProfile the in-process Beam run.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one mode and write JSON.")

DAY = dt.date(2024, 1, 1)
MULTI_PROCESS = ("beam_mp2",)
MODE_ARGS = {
    "beam": [],
    "beam_mp2": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
}


def generate(root: str, events: int) -> dict[str, Any]:
  """One synthetic day: `events` events over events/50 users, 8 log files."""
  from pipeline import synthetic_world  # pylint: disable=import-outside-toplevel
  cfg = synthetic_world.WorldConfig(start_date=DAY, days=1, users=max(100, events // 50),
                                    items=max(1000, events // 20), events_per_day=events,
                                    shards=8, seed=0)
  return synthetic_world.generate(root, cfg)


def plain_loop(logs: str, catalog: str, out_path: str) -> tuple[int, int]:
  """The whole day's work in one Python loop; returns (lines read, examples written)."""
  import collections  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  from models import features  # pylint: disable=import-outside-toplevel
  from pipeline import io, records, schema, writers  # pylint: disable=import-outside-toplevel

  items = {}
  for path in sorted(glob.glob(os.path.join(catalog, "*", "*"))):
    if io.partition_of(path) <= DAY.isoformat():
      for line in io.iter_lines(path):
        item = schema.validate_catalog(line.data)
        if isinstance(item, schema.CatalogItem):
          items[item.item_id] = item
  events = {}
  lines = 0
  for path in sorted(glob.glob(os.path.join(logs, DAY.isoformat(), "*"))):
    for line in io.iter_lines(path):
      lines += 1
      event = schema.validate_event(line.data, DAY)
      if isinstance(event, schema.Event):
        kept = events.get(event.event_id)
        if kept is None or event.timestamp < kept.timestamp:
          events[event.event_id] = event
  histories = collections.defaultdict(
      lambda: collections.deque(maxlen=features.MAX_HISTORY))

  def examples():
    for event in sorted(events.values(), key=lambda e: (e.timestamp, e.event_id)):
      history = histories[event.user_id]
      previous = tuple(history)
      seed = event.seed_item_id or (previous[0] if previous else "")
      item = items.get(event.item_id) or schema.CatalogItem(item_id=event.item_id)
      yield records.serialize(records.example_features(event, item, previous, seed))
      history.appendleft(event.item_id)

  return lines, writers.write_tfrecords(out_path, examples())


def _peak_rss_mb() -> tuple[float, float]:
  """Peak RSS of this process and of its largest waited-for child, in MB."""
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return round(own, 1), round(children, 1)


def _cpu_seconds() -> float:
  """User + system CPU time of this process and its waited-for children."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


def run_child(mode: str, root: str, profile: bool) -> dict[str, Any]:
  """Runs one mode in this process and measures it."""
  from pipeline import beam_day  # pylint: disable=import-outside-toplevel
  logs, catalog = os.path.join(root, "logs"), os.path.join(root, "catalog")
  workdir = os.path.join(root, f"work-{mode}")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  profiler = cProfile.Profile() if profile else None
  start, start_cpu = time.perf_counter(), _cpu_seconds()
  if profiler:
    profiler.enable()
  if mode == "loop":
    lines, examples = plain_loop(logs, catalog, os.path.join(workdir, "examples.tfrecord.gz"))
  else:
    stats = beam_day.run_day(DAY, workdir, beam_day.BeamSettings(allow_missing_history=True),
                             logs=logs, catalog=catalog, pipeline_args=MODE_ARGS[mode])
    lines, examples = stats["input_lines"], stats["examples"]
  seconds, cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
  result = {"mode": mode, "lines": lines, "examples": examples,
            "seconds": round(seconds, 2), "events_per_s": round(lines / seconds),
            "cpu_seconds": round(cpu, 2), "events_per_cpu_s": round(lines / cpu)}
  if profiler:
    profiler.disable()
    text = std_io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    result["profile"] = text.getvalue()
  result["peak_rss_mb"], workers = _peak_rss_mb()
  result["peak_worker_rss_mb"] = workers if mode in MULTI_PROCESS else None
  return result


def _run_in_subprocess(mode: str, root: str, profile: bool) -> dict[str, Any]:
  out = os.path.join(root, f"result-{mode}.json")
  command = [sys.executable, os.path.abspath(__file__), f"--child={mode}",
             f"--bench_dir={root}", f"--json_out={out}"] + (["--profile"] if profile else [])
  subprocess.run(command, check=True)
  with open(out) as f:
    return json.load(f)


def main(argv: Sequence[str]) -> None:
  del argv
  root = _BENCH_DIR.value
  if _CHILD.value:
    result = run_child(_CHILD.value, root, _PROFILE.value)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f)
    return
  scratch = None
  if root is None:
    scratch = tempfile.mkdtemp(prefix="beam_throughput-")
    root = scratch
  try:
    start = time.perf_counter()
    summary = generate(root, _EVENTS.value)
    print(f"generated {summary} in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for mode in _MODES.value:
      profile = _PROFILE.value and mode == "beam"
      results.append(_run_in_subprocess(mode, root, profile))
      print(json.dumps({k: v for k, v in results[-1].items() if k != "profile"}),
            flush=True)
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)
  loop = next((r for r in results if r["mode"] == "loop"), None)
  print(f"\n{'mode':<10}{'lines':>9}{'wall s':>8}{'events/s':>10}{'x loop':>8}"
        f"{'cpu s':>8}{'ev/cpu-s':>10}{'x loop':>8}{'peak MB':>9}{'worker MB':>10}")
  for r in results:
    r["ratio_to_loop"] = round(r["events_per_s"] / loop["events_per_s"], 3) if loop else None
    r["cpu_ratio_to_loop"] = (round(r["events_per_cpu_s"] / loop["events_per_cpu_s"], 3)
                              if loop else None)
    worker = f"{r['peak_worker_rss_mb']:.0f}" if r["mode"] in MULTI_PROCESS else "-"
    print(f"{r['mode']:<10}{r['lines']:>9}{r['seconds']:>8.1f}{r['events_per_s']:>10}"
          f"{r['ratio_to_loop'] or '-':>8}{r['cpu_seconds']:>8.1f}{r['events_per_cpu_s']:>10}"
          f"{r['cpu_ratio_to_loop'] or '-':>8}{r['peak_rss_mb']:>9.0f}{worker:>10}")
  for r in results:
    if "profile" in r:
      print(f"\nprofile of {r['mode']} (top functions by own time):\n{r['profile']}")
  figures = {"events": _EVENTS.value, "cpus": os.cpu_count(), "results": results}
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
