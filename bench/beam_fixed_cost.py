r"""The Beam job's cost per small day, this tree against another, in one run.

Generates `--days` synthetic days of `--events_per_day` events (MovieLens-100K's
shape by default: 943 users, 1,682 items, 500 events a day), then runs
`pipeline.beam_day.run_day` over them, day after day in one fresh workdir, in a
worker process per code tree (this tree, and `--old_tree`, e.g. the committed tree
from `git archive HEAD | tar -x -C /tmp/OLD`, on its own PYTHONPATH). The trees
take turns for `--rounds` rounds. Per tree it prints the median wall and CPU
seconds of a day (days 2.., the first builds the history and catalog states from
nothing) and of each part of it: building the pipeline (`build_day`), translating it
for the runner (`Pipeline.to_runner_api`), running its stages (the FnApiRunner's
`run_stages`), and the rest of `run_day` (planning, publishing); then new / old;
and whether both trees wrote the same bytes (every file under W/data and W/state).

On days this small the job's cost is its fixed cost: Beam's pipeline
construction and per-stage overhead, and the catalog carried through the day.

  python bench/beam_fixed_cost.py --old_tree=/tmp/OLD [--days=8] [--rounds=2]

Flags are plain --name=value (no absl: a worker must import only its own tree).
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import daily_catchup  # bench/'s own (stdlib only): its flags and synthetic days

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("build_day", "to_runner_api", "run_stages", "run_day")
_DEFAULTS = {"out": "/tmp/towerstream_beam_fixed_cost", "days": "8",
             "events_per_day": "500", "users": "943", "items": "1682",
             "new_items_per_day": "5", "rounds": "2", "old_tree": "", "new_tree": _REPO}


def _digest(workdir: str) -> str:
  """sha256 over every file the job wrote (W/data and W/state), names included."""
  digest = hashlib.sha256()
  for sub in ("data", "state"):
    for directory, _, names in sorted(os.walk(os.path.join(workdir, sub))):
      for name in sorted(names):
        path = os.path.join(directory, name)
        digest.update(os.path.relpath(path, workdir).encode())
        with open(path, "rb") as f:
          digest.update(f.read())
  return digest.hexdigest()


def worker(tree: str, raw: str, workdir: str) -> None:
  """Runs every day of `raw` with `tree`'s Beam job; prints one JSON line of figures."""
  sys.path.insert(0, tree)
  answers = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  # pylint: disable=g-import-not-at-top
  import apache_beam as beam
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from pipeline import beam_day
  # pylint: enable=g-import-not-at-top
  seconds: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)

  def timed(part: str, owner: Any, name: str) -> None:
    """Wraps owner.name so that each call's wall and CPU seconds go to `part`."""
    inner = getattr(owner, name)

    def call(*args, **kwargs):
      wall, cpu = time.perf_counter(), time.process_time()
      try:
        return inner(*args, **kwargs)
      finally:
        seconds[part].append((time.perf_counter() - wall, time.process_time() - cpu))
    setattr(owner, name, call)

  timed("build_day", beam_day, "build_day")
  timed("to_runner_api", beam.Pipeline, "to_runner_api")
  timed("run_stages", fn_runner.FnApiRunner, "run_stages")
  shutil.rmtree(workdir, ignore_errors=True)
  logs, catalog = os.path.join(raw, "logs"), os.path.join(raw, "catalog")
  for name in sorted(os.listdir(logs)):
    wall, cpu = time.perf_counter(), time.process_time()
    beam_day.run_day(dt.date.fromisoformat(name), workdir, logs=logs, catalog=catalog)
    seconds["run_day"].append((time.perf_counter() - wall, time.process_time() - cpu))
  answers.write(json.dumps({"seconds": seconds, "digest": _digest(workdir)}) + "\n")
  answers.flush()
  shutil.rmtree(workdir, ignore_errors=True)


def _median(values: Sequence[float]) -> float:
  return statistics.median(values) if values else float("nan")


def main(argv: Sequence[str]) -> None:
  if "--worker=1" in argv:
    values = daily_catchup.parse_flags([a for a in argv if a != "--worker=1"],
                    {"tree": "", "raw": "", "workdir": ""})
    worker(values["tree"], values["raw"], values["workdir"])
    return
  values = daily_catchup.parse_flags(argv, _DEFAULTS)
  out, days, events = values["out"], int(values["days"]), int(values["events_per_day"])
  raw = daily_catchup.synthetic_days(values)
  trees = daily_catchup.code_trees(values)
  # Days 2.. of every round, per tree and part: (wall, CPU) seconds.
  figures: dict[str, dict[str, list[tuple[float, float]]]] = {
      name: collections.defaultdict(list) for name in trees}
  digests: dict[str, set[str]] = {name: set() for name in trees}
  for round_ in range(int(values["rounds"])):
    order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
    for name in order:
      # The same workdir path for both trees: the states' summaries name it.
      command = [sys.executable, os.path.abspath(__file__), "--worker=1",
                 f"--tree={trees[name]}", f"--raw={raw}",
                 f"--workdir={os.path.join(out, 'workdir')}"]
      log = os.path.join(out, f"worker-{name}.log")
      with open(log, "w") as stderr:
        done = subprocess.run(command, cwd=trees[name], stdout=subprocess.PIPE,
                              stderr=stderr, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": trees[name]})
      if done.returncode:
        raise SystemExit(f"the {name} worker failed; see {log}")
      answer = json.loads(done.stdout.strip().splitlines()[-1])
      for part, runs in answer["seconds"].items():
        figures[name][part] += [tuple(run) for run in runs[1:]]
      digests[name].add(answer["digest"])
      print(f"round {round_ + 1} {name}: median day "
            f"{_median([w for w, _ in answer['seconds']['run_day'][1:]]):.2f} s", flush=True)
  lines = [f"{days} days x {events} events, {values['rounds']} rounds; medians of days "
           "2.. (seconds)", "", "| part | " + " | ".join(
               f"{name} wall | {name} CPU" for name in trees)
           + (" | new / old wall | new / old CPU |" if len(trees) > 1 else " |"),
           "|---" * (1 + 2 * len(trees) + (2 if len(trees) > 1 else 0)) + "|"]
  for part in PARTS:
    medians = {name: [_median([run[i] for run in figures[name][part]]) for i in (0, 1)]
               for name in trees}
    row = f"| {part} | " + " | ".join(f"{w:.3f} | {c:.3f}" for w, c in medians.values())
    if len(trees) > 1:
      row += " | " + " | ".join(f"{medians['new'][i] / medians['old'][i]:.2f}"
                                for i in (0, 1))
    lines.append(row + " |")
  same = len(set().union(*digests.values())) == 1
  lines += ["", f"same bytes written by every run: {same}"]
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(out, "beam_fixed_cost.json"), "w") as f:
    json.dump({"flags": values, "figures": figures, "digests":
               {name: sorted(d) for name, d in digests.items()}, "table": text}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
