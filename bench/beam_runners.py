r"""Wall time of the day's Beam job on Beam's DaskRunner against the in-process engine.

Generates `--days` demo-size synthetic days (`make demo`'s world: 30,000 events a
day), runs them with `beam_day.run_day` in process (the default runner), then again
in the same workdir on `--runner=DaskRunner` over a dask.distributed LocalCluster of
`--workers` worker processes with one thread each, started before the first day,
and prints each day's seconds on both and their ratio (all measured in this one
run), the cluster's start, and whether every output file has the same bytes.
Day 1 on Dask includes each worker's first imports (TensorFlow, through the
Example writer); day 2 reads day 1's history and catalog states, as every later
day does.

  python bench/beam_runners.py [--events=30000] [--days=2] [--workers=2] \
      [--dask_args=--dask_partition_size=1] [--json_out=F]
"""

import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_EVENTS = flags.DEFINE_integer("events", 30000, "Events a day (make demo's).")
_DAYS = flags.DEFINE_integer("days", 2, "Days to run on each runner.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Dask worker processes (1 thread each).")
_DASK_ARGS = flags.DEFINE_list("dask_args", [], "More Beam options for the Dask runs.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures here.")

FIRST = dt.date(2024, 1, 1)


def _digests(workdir: str) -> dict[str, str]:
  """sha256 of every file the Beam job wrote (data/ and state/), by relative path."""
  out = {}
  for sub in ("data", "state"):
    for dirpath, _, names in os.walk(os.path.join(workdir, sub)):
      for name in names:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _run_days(workdir: str, days: Sequence[dt.date], args: Sequence[str]) -> list[float]:
  from pipeline import beam_day  # pylint: disable=import-outside-toplevel
  seconds = []
  for day in days:
    start = time.perf_counter()
    beam_day.run_day(day, workdir, pipeline_args=list(args))
    seconds.append(time.perf_counter() - start)
  return seconds


def measure(root: str) -> dict[str, Any]:
  """Both runners over the same days, in one workdir; the figures."""
  from distributed import LocalCluster  # pylint: disable=import-outside-toplevel
  from pipeline import synthetic_world  # pylint: disable=import-outside-toplevel

  workdir = os.path.join(root, "w")
  synthetic_world.generate(workdir, synthetic_world.WorldConfig(
      start_date=FIRST, days=_DAYS.value, events_per_day=_EVENTS.value,
      bad_line_rate=0.002))
  days = [FIRST + dt.timedelta(days=i) for i in range(_DAYS.value)]
  in_process = _run_days(workdir, days, [])
  reference = _digests(workdir)
  for sub in ("data", "state"):
    shutil.rmtree(os.path.join(workdir, sub))
  start = time.perf_counter()
  with LocalCluster(n_workers=_WORKERS.value, threads_per_worker=1, processes=True,
                    dashboard_address=None) as cluster:
    cluster_start = time.perf_counter() - start
    on_dask = _run_days(workdir, days, [
        "--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}",
        *_DASK_ARGS.value])
  return {
      "events_per_day": _EVENTS.value, "workers": _WORKERS.value,
      "dask_args": _DASK_ARGS.value, "cpus": os.cpu_count(),
      "cluster_start_s": round(cluster_start, 2),
      "days": [{"day": day.isoformat(), "in_process_s": round(a, 2),
                "dask_s": round(b, 2), "dask_over_in_process": round(b / a, 2)}
               for day, a, b in zip(days, in_process, on_dask)],
      "same_bytes": _digests(workdir) == reference,
  }


def main(argv: Sequence[str]) -> None:
  del argv
  root = tempfile.mkdtemp(prefix="beam_runners-")
  try:
    figures = measure(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"{figures['events_per_day']} events a day, {figures['workers']} Dask workers "
        f"x 1 thread on {figures['cpus']} CPUs, cluster started in "
        f"{figures['cluster_start_s']} s; same bytes: {figures['same_bytes']}")
  print(f"{'day':<12}{'in-process s':>14}{'Dask s':>10}{'Dask / in-process':>19}")
  for row in figures["days"]:
    print(f"{row['day']:<12}{row['in_process_s']:>14.2f}{row['dask_s']:>10.2f}"
          f"{row['dask_over_in_process']:>19.2f}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(main)
