r"""The main job on the embedded default data: what `make demo` runs.

Generates a few days of synthetic logs with the project's generator into the
workdir, then runs every part of the daily pipeline that exists over them.

  python -m pipeline.demo --workdir=workdir/demo
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Sequence

from absl import app
from absl import flags

from pipeline import app_flags
from pipeline import synthetic

_DEMO_DAYS = flags.DEFINE_integer("demo_days", 4, "Synthetic days to generate and run.")


def main(argv: Sequence[str]) -> None:
  del argv
  workdir = app_flags.WORKDIR.value or "workdir/demo"
  cfg = synthetic.WorldConfig(start_date=dt.date(2024, 1, 1), days=_DEMO_DAYS.value,
                              bad_line_rate=0.002)
  summary = synthetic.generate(workdir, cfg)
  print(json.dumps(summary, indent=1))
  print(f"logs: {os.path.join(workdir, 'logs')}  catalog: {os.path.join(workdir, 'catalog')}")


if __name__ == "__main__":
  app.run(main)
