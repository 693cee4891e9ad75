r"""Throughput of the synthetic log generator (issue 6: 1M events well under a minute).

Times one day of `--events` events, split into drawing the world and the events
(numpy), serialising them to JSON lines, and gzip-writing, and reports events/s
and each stage's share of the run.

  python bench/synthetic_throughput.py --events=1000000
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import synthetic_world  # noqa: E402
from pipeline import textio  # noqa: E402

_EVENTS = flags.DEFINE_integer("events", 1_000_000, "Events in the day.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here.")


def main(argv: Sequence[str]) -> None:
  del argv
  cfg = synthetic_world.WorldConfig(days=1, users=100_000, items=100_000,
                              events_per_day=_EVENTS.value)
  t0 = time.perf_counter()
  world = synthetic_world._build_world(cfg)  # pylint: disable=protected-access
  t1 = time.perf_counter()
  rng = synthetic_world.np.random.default_rng([cfg.seed, 1, 0])
  events = synthetic_world._day_events(world, cfg, 0, rng)  # pylint: disable=protected-access
  t2 = time.perf_counter()
  lines = synthetic_world._event_lines(  # pylint: disable=protected-access
      world, cfg, 0, cfg.start_date, events)
  t3 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    textio.write_gz(os.path.join(tmp, "part.jsonl.gz"), lines)
    size = os.path.getsize(os.path.join(tmp, "part.jsonl.gz"))
  t4 = time.perf_counter()
  total = t4 - t0
  figures = {
      "events": len(lines), "seconds": round(total, 2),
      "events_per_s": round(len(lines) / total),
      "share_world": round((t1 - t0) / total, 3), "share_draw": round((t2 - t1) / total, 3),
      "share_json": round((t3 - t2) / total, 3), "share_gzip": round((t4 - t3) / total, 3),
      "gz_mb": round(size / 1e6, 1), "cpus": os.cpu_count(),
  }
  print(json.dumps(figures, indent=1))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)
